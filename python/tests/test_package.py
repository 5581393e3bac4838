"""The package as shipped: examples run, docstring examples hold, stubs match."""

from __future__ import annotations

import doctest
import os
import subprocess
import sys
from pathlib import Path

import pytest

import panes
import panes._defs

EXAMPLES = sorted((Path(__file__).resolve().parents[1] / "examples").glob("*.py"))
PYPROJECT = Path(__file__).resolve().parents[1] / "pyproject.toml"
# Entries stubtest may skip, each with the reason.
ALLOWLIST = Path(__file__).resolve().parents[1] / "stubtest-allowlist.txt"


def test_there_are_examples() -> None:
    assert EXAMPLES, "python/examples/ is empty"


@pytest.mark.parametrize("path", EXAMPLES, ids=[p.name for p in EXAMPLES])
def test_example_runs(path: Path) -> None:
    out = subprocess.run([sys.executable, str(path)], capture_output=True, text=True, timeout=600)
    assert out.returncode == 0, out.stdout[-2000:] + out.stderr[-4000:]


@pytest.mark.parametrize("module", [panes, panes._defs], ids=lambda m: m.__name__)
def test_docstring_examples(module: object) -> None:
    result = doctest.testmod(module, optionflags=doctest.NORMALIZE_WHITESPACE)  # type: ignore[arg-type]
    assert result.attempted > 0 and result.failed == 0, result


def test_stubs_match_the_runtime() -> None:
    out = subprocess.run(
        [sys.executable, "-m", "mypy.stubtest", "panes", "--concise",
         "--mypy-config-file", str(PYPROJECT), "--allowlist", str(ALLOWLIST)],
        capture_output=True,
        text=True,
        timeout=600,
    )
    assert out.returncode == 0, out.stdout + out.stderr


def test_package_type_checks_strictly() -> None:
    out = subprocess.run(
        [sys.executable, "-m", "mypy", "--config-file", str(PYPROJECT), "--strict", "-p", "panes"],
        capture_output=True,
        text=True,
        timeout=600,
    )
    assert out.returncode == 0, out.stdout + out.stderr


def test_a_gpu_probe_without_a_desktop_session_prints_no_errors() -> None:
    """Before, an ``auto`` engine on a machine without a desktop session printed
    libwayland's "error: XDG_RUNTIME_DIR is invalid or not set in the environment."
    twice (Mesa's Vulkan device-select layer, probing for a compositor)."""
    env = {k: v for k, v in os.environ.items()
           if k not in ("XDG_RUNTIME_DIR", "NODEVICE_SELECT", "PANES_BACKEND")}
    code = (
        "import panes\n"
        "engine = panes.Engine([panes.View('cards', key='card', time='ts', pane='10s',\n"
        "    features=[panes.count(window='5m', name='n_5m')])], backend='auto')\n"
        "print(engine.backend)\n"
    )
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True,
                         env=env, timeout=300)
    assert out.returncode == 0, out.stderr
    assert "XDG_RUNTIME_DIR" not in out.stderr, out.stderr
    assert all(line.startswith("panes: ") for line in out.stderr.splitlines()), out.stderr


def test_py_typed_is_installed() -> None:
    assert (Path(panes.__file__).parent / "py.typed").exists()
