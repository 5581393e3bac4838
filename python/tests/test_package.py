"""The package as shipped: examples run, docstring examples hold, stubs match."""

from __future__ import annotations

import doctest
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


def test_py_typed_is_installed() -> None:
    assert (Path(panes.__file__).parent / "py.typed").exists()
