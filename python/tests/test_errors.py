"""Every error class, raised by a real mistake, with the details a user needs."""

from __future__ import annotations

import os
import pickle
import subprocess
import sys

import polars as pl
import pyarrow as pa
import pytest

import panes


def engine(**kw: object) -> panes.Engine:
    v = panes.View("cards", key="card", time="ts", features=[panes.mean("amount", window="1m", name="m")])
    return panes.Engine(v, **kw)  # type: ignore[arg-type]


def test_spec_error_lists_every_problem_with_its_location() -> None:
    with pytest.raises(panes.SpecError) as e:
        panes.Engine([
            panes.View("v", key="k", time="t", pane="7s", features=[
                panes.mean("x", window="5q", name="a"),
                panes.sum("x", window="10s", name="a"),
                panes.max("x", window="lifetime", hop="0s", name="b"),
            ])
        ])
    err = e.value
    assert isinstance(err, ValueError) and err.domain == "user" and not err.retryable
    fields = {(loc, field) for loc, field, _ in err.issues}
    assert ('view "v" feature "a"', "window") in fields
    assert any(f == "name" for _, f, _ in err.issues), err.issues  # duplicate name
    assert ('view "v" feature "b"', "hop") in fields
    assert "5q" in str(err) and len(err.issues) >= 4
    with pytest.raises(panes.SpecError, match="not a valid feature file"):
        panes.Engine.from_toml_str("[[views]\nname = ")


def test_schema_error_names_view_and_column_and_counts_rows() -> None:
    e = engine()
    with pytest.raises(panes.SchemaError) as err:
        e.push(pl.DataFrame({"card": [1, 2], "ts": [1, 2]}))
    assert (err.value.view, err.value.column) == ("cards", "amount")
    assert "missing" in str(err.value)
    with pytest.raises(panes.SchemaError, match="key column has type Float64") as err:
        e.push(pl.DataFrame({"card": [1.5], "ts": [1], "amount": [1.0]}))
    with pytest.raises(panes.SchemaError, match="value column has type") as err:
        e.push(pl.DataFrame({"card": [1], "ts": [1], "amount": ["x"]}))
    assert e.metrics()["cards"]["rejected"]["schema"] == 4
    assert e.metrics()["cards"]["accepted"] == 0


def test_data_error_for_bad_arguments() -> None:
    e = engine()
    e.push(pl.DataFrame({"card": [1], "ts": [1], "amount": [1.0]}))
    with pytest.raises(panes.DataError, match="has integer keys; the keys given are Utf8"):
        e.read(["1"])
    with pytest.raises(panes.DataError, match="has integer keys"):
        e.backfill(pa.table({"card": [1], "ts": [1], "amount": [1.0]}), pa.table({"card": ["1"], "ts": [5]}))
    with pytest.raises(panes.DataError, match="expected Arrow data"):
        e.push({"card": [1]})
    with pytest.raises(panes.DataError, match="mix str and int"):
        e.read([1, "a"])
    with pytest.raises(panes.DataError, match=r"keys\[1\]: expected an int, a str or None"):
        e.read([1, 2.5])
    with pytest.raises(TypeError, match="not a single string"):
        e.read("abc")
    with pytest.raises(panes.DataError, match="no time column"):
        e.backfill(pa.table({"card": [1], "ts": [1], "amount": [1.0]}), pa.table({"card": [1], "when": [5]}))
    with pytest.raises(panes.DataError, match="unknown backend"):
        engine(backend="tpu")
    with pytest.raises(panes.DataError, match="not an ISO 8601 time"):
        e.read([1], at="yesterday")
    with pytest.raises(panes.DataError, match="out of range|too large"):
        e.read([1], at=2**62)


def test_unknown_view_and_feature_are_key_errors_with_the_choices() -> None:
    e = engine()
    with pytest.raises(panes.UnknownViewError) as err:
        e.push(pl.DataFrame({"card": [1], "ts": [1], "amount": [1.0]}), view="nope")
    assert isinstance(err.value, KeyError) and err.value.name == "nope"
    assert str(err.value) == 'unknown view "nope"; the views are: cards'
    with pytest.raises(panes.UnknownFeatureError) as ferr:
        e.read([1], features=["m", "zz"])
    assert (ferr.value.view, ferr.value.name) == ("cards", "zz")
    assert "its features are: m" in str(ferr.value)


def test_inexact_read_says_why_and_what_to_do() -> None:
    e = engine()
    e.push(pl.DataFrame({"card": [7, 7], "ts": [1_000, 50_000], "amount": [1.0, 2.0]}))
    with pytest.raises(panes.InexactReadError) as err:
        e.read([7], at=40_000)
    assert (err.value.view, err.value.key, err.value.at) == ("cards", "7", 40_000)
    assert "backfill" in str(err.value)


def test_file_error_names_the_path() -> None:
    e = engine()
    with pytest.raises(panes.PanesFileError) as err:
        e.backfill("/nonexistent/events.parquet", pa.table({"card": [1], "ts": [1]}))
    assert isinstance(err.value, OSError)
    assert err.value.path == "/nonexistent/events.parquet" and err.value.retryable


def test_backend_error_when_the_gpu_is_asked_for_and_absent() -> None:
    # A process whose wgpu may only use OpenGL (which Panes does not build) has no
    # adapter: asking for the GPU must fail loudly, and `auto` must fall back to the CPU.
    code = (
        "import panes\n"
        "v = panes.View('cards', key='card', time='ts', features=[panes.count(window='1m', name='n')])\n"
        "assert panes.Engine([v]).backend == 'cpu'\n"
        "try:\n"
        "    panes.Engine([v], backend='gpu')\n"
        "except panes.BackendError as e:\n"
        "    assert e.domain == 'external', e.domain\n"
        "    print(e)\n"
        "else:\n"
        "    raise SystemExit('no error')\n"
    )
    env = {**os.environ, "WGPU_BACKEND": "gl"}
    r = subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, text=True)
    assert r.returncode == 0, r.stderr
    assert "no GPU adapter" in r.stdout and "use the cpu backend" in r.stdout, r.stdout
    assert "auto backend uses the cpu backend" in r.stderr, r.stderr


def test_error_hierarchy() -> None:
    for cls in (panes.SpecError, panes.SchemaError, panes.DataError, panes.UnknownViewError,
                panes.UnknownFeatureError, panes.InexactReadError, panes.PanesFileError,
                panes.BackendError, panes.InternalError):
        assert issubclass(cls, panes.PanesError)
    assert panes.InternalError("x").domain == "internal"
    assert issubclass(panes.InternalError, RuntimeError)
    # Errors survive pickling (multiprocessing, joblib) with their message.
    e = pickle.loads(pickle.dumps(panes.DataError("bad keys")))
    assert str(e) == "bad keys"
