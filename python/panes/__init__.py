"""Panes: a real-time ML feature engine.

Define per-entity windowed features, push events (pyarrow, polars, pandas — anything
with the Arrow PyCapsule interface), read fresh feature vectors, and backfill
point-in-time training sets with the same code.

>>> import panes, polars as pl
>>> engine = panes.Engine([
...     panes.View("cards", key="card", time="ts", pane="10s", features=[
...         panes.count(window="5m", name="n_5m"),
...         panes.mean("amount", window="1h", hop="1m", name="amount_mean_1h"),
...     ])
... ])
>>> report = engine.push(pl.DataFrame({"card": [1, 1, 2], "ts": [0, 1000, 2000],
...                                    "amount": [10.0, 30.0, 5.0]}))
>>> report.accepted
3
>>> engine.read([1, 2]).rows()
[(1, 2, 20.0), (2, 1, 5.0)]
"""

from __future__ import annotations

import datetime as _dt
import os
from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Any, Literal, overload

import numpy as np
import polars as pl

# Without a desktop session (a server, a container, a notebook host), Mesa's Vulkan
# device-select layer looks for a Wayland compositor while the ``auto`` and ``gpu``
# backends enumerate GPUs, and libwayland prints "error: XDG_RUNTIME_DIR is invalid or
# not set in the environment." to stderr. With no session the layer has nothing to
# choose by (the GPU backend picks its adapter by power preference), so it is switched
# off with its own variable, as the ``panes`` command does, unless that is set already.
if not os.path.isdir(os.environ.get("XDG_RUNTIME_DIR", "")):
    os.environ.setdefault("NODEVICE_SELECT", "1")

from . import _core
from ._defs import (
    Duration,
    Feature,
    View,
    approx_distinct,
    count,
    decayed_count,
    decayed_sum,
    first,
    last,
    last_n,
    max,
    mean,
    min,
    quantile,
    std,
    sum,
    top_k,
    var,
)
from ._errors import (
    BackendError,
    DataError,
    InexactReadError,
    InternalError,
    PanesError,
    PanesFileError,
    SchemaError,
    SpecError,
    UnknownFeatureError,
    UnknownViewError,
)

__version__: str = _core.__version__

Time = int | str | _dt.datetime | _dt.date | np.datetime64
"""A read time: epoch milliseconds, an ISO 8601 string or ``datetime`` (naive means
UTC), a ``date`` (its midnight UTC) or a ``numpy.datetime64``."""


def _epoch_ms(at: Time | None) -> int | None:
    if at is None:
        return None
    if isinstance(at, bool):
        raise TypeError(f"at: expected a time, got {at!r}")
    if isinstance(at, int | np.integer):
        return int(at)
    if isinstance(at, str):
        try:
            at = _dt.datetime.fromisoformat(at)
        except ValueError:
            raise DataError(f"at: {at!r} is not an ISO 8601 time such as '2026-01-01T12:00:00Z'") from None
    if isinstance(at, np.datetime64):
        return int(at.astype("datetime64[ms]").astype(np.int64))
    if isinstance(at, _dt.datetime):
        if at.tzinfo is None:
            at = at.replace(tzinfo=_dt.UTC)
        return (at - _dt.datetime(1970, 1, 1, tzinfo=_dt.UTC)) // _dt.timedelta(milliseconds=1)
    if isinstance(at, _dt.date):
        return (at - _dt.date(1970, 1, 1)).days * 86_400_000
    raise TypeError(f"at: expected epoch ms, an ISO 8601 string, datetime, date or numpy.datetime64; got {at!r}")


def _is_arrow(data: object) -> bool:
    return hasattr(data, "__arrow_c_stream__") or hasattr(data, "__arrow_c_array__")


def _arrow_input(data: object, what: str) -> object:
    if _is_arrow(data):
        return data
    raise DataError(
        f"{what}: expected Arrow data (pyarrow Table / RecordBatch / RecordBatchReader, "
        f"a polars or pandas DataFrame, anything with __arrow_c_stream__ or "
        f"__arrow_c_array__); got {type(data).__name__}"
    )


def _keys(keys: object) -> object:
    # Composite keys: a DataFrame of key columns (matched to the view's key columns by
    # name), or a sequence of tuples (one value per key column, in the view's order);
    # both go to the engine as one Arrow struct column.
    if isinstance(keys, pl.DataFrame):
        return keys.to_struct("key")
    if hasattr(keys, "column_names") and hasattr(keys, "__arrow_c_stream__"):
        return pl.DataFrame(keys).to_struct("key")  # a pyarrow Table or RecordBatch
    if isinstance(keys, (list, tuple)):
        first = next((k for k in keys if k is not None), None)
        if isinstance(first, (tuple, list)):
            return _tuple_keys(keys, len(first))
    if isinstance(keys, np.ndarray):
        if keys.ndim != 1:
            raise DataError(f"keys: expected a 1-D array, got shape {keys.shape}")
        if keys.dtype.kind in "iu":
            if keys.dtype.kind == "u" and keys.size and keys.max() > np.iinfo(np.int64).max:
                return keys.tolist()
            return np.ascontiguousarray(keys, dtype=np.int64)
        return keys.tolist()
    return keys


def _tuple_keys(keys: Sequence[object], arity: int) -> object:
    parts: list[list[object]] = [[] for _ in range(arity)]
    for i, k in enumerate(keys):
        if k is None:
            for p in parts:
                p.append(None)
            continue
        if not isinstance(k, (tuple, list)) or len(k) != arity:
            raise DataError(
                f"keys[{i}]: expected a tuple of {arity} values like keys[0], got {k!r}"
            )
        for p, v in zip(parts, k):
            p.append(v)
    columns = {}
    for j, values in enumerate(parts):
        kinds = {type(v) for v in values if v is not None}
        if kinds - {int, str} or len(kinds) > 1:
            raise DataError(
                f"keys: part {j} of the tuples holds {sorted(t.__name__ for t in kinds)}; "
                "each part must be all str or all int (None for null)"
            )
        dtype = pl.String if kinds == {str} else pl.Int64
        columns[str(j)] = pl.Series(str(j), values, dtype=dtype)
    return pl.DataFrame(columns).to_struct("key")


@dataclass(frozen=True)
class PushReport:
    """What a push did: rows accepted, late (behind the watermark) and rejected (null
    key, null or unparsable time), with the first rejections as ``(row, reason,
    message)``."""

    view: str
    accepted: int
    late: int
    rejected: int
    rejections: list[tuple[int, str, str]] = field(default_factory=list)


@dataclass(frozen=True)
class BackfillResult:
    """A backfill's output: the spine with one column per feature, the events that
    were late or rejected (with ``panes_view`` and ``panes_reason``; only with
    ``dead_letter=True``) and per-view counts."""

    features: pl.DataFrame
    dead_letter: pl.DataFrame | None
    report: dict[str, Any]


class Engine:
    """The feature engine: views, their pane state, and a compute backend.

    ``backend`` is ``"scalar"``, ``"cpu"``, ``"gpu"`` or ``"auto"`` (default: the
    ``PANES_BACKEND`` environment variable, else ``auto``). Pending events are folded
    into state once ``batch_rows`` of them wait or the oldest waited ``batch_age``
    seconds; a read always sees every event pushed before it. ``read_copy`` keeps a
    key-major copy of the pane state that stopped changing (``cpu`` backend): reads
    of keys scattered over a large state about twice as fast, for as much memory
    again as the state; ``read_copy=False`` saves that memory.

    ``max_keys`` caps the keys of every view whose definition sets no ``max_keys``;
    ``max_state_bytes`` is a budget of state memory for all views together, charged per
    new key. Rows of new keys past either limit are rejected (reason ``key_limit``).

    An engine is safe to use from several threads; long calls release the GIL.
    """

    def __init__(
        self,
        views: Sequence[View] | View,
        *,
        backend: str | None = None,
        shards: int = 32,
        batch_rows: int = 65536,
        batch_age: float = 0.05,
        read_copy: bool = True,
        max_keys: int | None = None,
        max_state_bytes: int | None = None,
    ) -> None:
        if isinstance(views, View):
            views = [views]
        for v in views:
            if not isinstance(v, View):
                raise TypeError(f"views: expected panes.View values, got {v!r}")
        toml = "\n".join(v.to_toml() for v in views)
        self._init(
            toml,
            "<python>",
            backend=backend,
            shards=shards,
            batch_rows=batch_rows,
            batch_age=batch_age,
            read_copy=read_copy,
            max_keys=max_keys,
            max_state_bytes=max_state_bytes,
        )

    def _init(
        self,
        toml: str,
        origin: str,
        *,
        backend: str | None = None,
        shards: int = 32,
        batch_rows: int = 65536,
        batch_age: float = 0.05,
        read_copy: bool = True,
        max_keys: int | None = None,
        max_state_bytes: int | None = None,
    ) -> None:
        self._core = _core.Engine(
            toml,
            origin=origin,
            backend=backend,
            shards=shards,
            batch_rows=batch_rows,
            batch_age_ms=round(batch_age * 1000),
            read_copy=read_copy,
            max_keys=max_keys,
            max_state_bytes=max_state_bytes,
        )

    @classmethod
    def from_toml(cls, path: str | os.PathLike[str], **options: Any) -> Engine:
        """An engine for the feature file at ``path`` (same options as ``Engine()``)."""
        path = os.fspath(path)
        with open(path, encoding="utf-8") as f:
            text = f.read()
        return cls._from_text(text, path, **options)

    @classmethod
    def from_toml_str(cls, text: str, **options: Any) -> Engine:
        """An engine for feature definitions given as TOML text."""
        return cls._from_text(text, "<string>", **options)

    @classmethod
    def _from_text(cls, text: str, origin: str, **options: Any) -> Engine:
        engine = cls.__new__(cls)
        engine._init(text, origin, **options)
        return engine

    @property
    def backend(self) -> str:
        """The backend in use (``scalar``, ``cpu``, ``gpu``, or ``auto`` when a GPU wins
        from some batch size on)."""
        return self._core.backend

    @property
    def views(self) -> list[View]:
        """The views, with every default filled in."""
        return [
            View(
                name=v["name"],
                key=v["key"],
                time=v["time"],
                pane=v["pane"],
                allowed_lateness=v["allowed_lateness"],
                read_time=v["read_time"],
                features=[Feature(**f) for f in v["features"]],
                filter=v["filter"],
                columns=v["columns"],
            )
            for v in self._core.views()
        ]

    def to_toml(self) -> str:
        """The definitions as a feature file; ``Engine.from_toml_str`` of it gives the
        same engine."""
        return self._core.to_toml()

    def push(self, data: object, view: str | None = None) -> PushReport:
        """Pushes events into ``view`` (default: the view whose key and time columns
        ``data`` has).

        ``data`` is a pyarrow Table / RecordBatch / RecordBatchReader, a polars or
        pandas DataFrame — anything exporting ``__arrow_c_stream__`` or
        ``__arrow_c_array__``. Primitive columns are read in place, without a copy.

        Bad rows do not raise: they are counted and reported (``rejected``,
        ``rejections``). A missing or mistyped column raises :class:`SchemaError`.
        """
        report = self._core.push(_arrow_input(data, "push"), view)
        return PushReport(**report)

    def flush(self) -> None:
        """Folds every pending micro-batch now (reads do this themselves)."""
        self._core.flush()

    @overload
    def read(
        self,
        keys: object,
        at: Time | None = ...,
        features: Sequence[str] | None = ...,
        *,
        view: str | None = ...,
        as_numpy: Literal[False] = ...,
    ) -> pl.DataFrame: ...

    @overload
    def read(
        self,
        keys: object,
        at: Time | None = ...,
        features: Sequence[str] | None = ...,
        *,
        view: str | None = ...,
        as_numpy: Literal[True],
    ) -> np.ndarray[Any, np.dtype[np.float64]]: ...

    def read(
        self,
        keys: object,
        at: Time | None = None,
        features: Sequence[str] | None = None,
        *,
        view: str | None = None,
        as_numpy: bool = False,
    ) -> pl.DataFrame | np.ndarray[Any, np.dtype[np.float64]]:
        """Feature values of ``keys`` as of ``at`` (default: the view's read time).

        ``keys``: a list, numpy array, pyarrow array or polars Series of the view's
        key type; for a view with a composite key, a list of tuples (one value per key
        column, in the view's order) or a DataFrame with the key columns. ``at``: epoch ms, an ISO 8601 string, ``datetime``, ``date`` or
        ``numpy.datetime64``. ``features`` selects and orders features (default: all of the
        view's); ``view`` is needed only when the engine has several views and
        ``features`` does not say which. Unknown keys get empty-window values
        (``count``/``sum`` 0, others null).

        Returns a polars DataFrame (the key column, then one column per feature:
        ``count`` as Int64, others Float64), or with ``as_numpy=True`` a 2-D float64
        array ``keys × features`` with NaN for null.
        """
        ms = _epoch_ms(at)
        names = None if features is None else [str(f) for f in features]
        if as_numpy:
            values, _, _ = self._core.read_numpy(_keys(keys), view, ms, names)
            return values
        table, _ = self._core.read(_keys(keys), view, ms, names)
        return pl.DataFrame(table)

    def read_all(
        self,
        at: Time | None = None,
        features: Sequence[str] | None = None,
        *,
        view: str | None = None,
    ) -> pl.DataFrame:
        """Feature values of every key the view holds, as of ``at`` (default: the
        view's read time): what ``read`` returns for all of them, without listing them.

        Returns a polars DataFrame: the key column (integers, or strings for string
        keys), then one column per feature. Keys come in the order the engine holds
        them, not sorted: ``.sort(key)`` for an order.
        """
        names = None if features is None else [str(f) for f in features]
        table, _ = self._core.read_all(view, _epoch_ms(at), names)
        return pl.DataFrame(table)

    def backfill(
        self,
        events: object,
        spine: object,
        at_column: str = "ts",
        *,
        dead_letter: bool = False,
        service: str | None = None,
    ) -> pl.DataFrame:
        """Point-in-time features for a spine of ``(key, time)`` rows: the training-set
        generator.

        ``events`` are replayed in order through the same ingest as :meth:`push`
        (lateness included); each spine row gets, for every view whose key column it
        has, the values a read at its ``at_column`` time returns once every non-late
        event up to that time is in. ``events`` and ``spine`` are Arrow data (as for
        :meth:`push`) or paths of Parquet, CSV or Arrow IPC files. The engine's own
        state is not touched.

        Returns the spine's columns, in its row order, plus one column per feature.
        With ``service``, the columns of that feature service instead: its features in
        its order, then its on-demand features over them and the spine's columns, as
        :meth:`read_service` computes them online.
        Use :meth:`backfill_report` for the dead letters and counts.
        """
        return self.backfill_report(events, spine, at_column, dead_letter=dead_letter, service=service).features

    def backfill_report(
        self,
        events: object,
        spine: object,
        at_column: str = "ts",
        *,
        dead_letter: bool = False,
        service: str | None = None,
    ) -> BackfillResult:
        """Like :meth:`backfill`, with the dead letters (``dead_letter=True``) and
        per-view counts."""

        def source(x: object, what: str) -> object:
            if isinstance(x, str | os.PathLike):
                return os.fspath(x)
            return _arrow_input(x, what)

        table, dead, report = self._core.backfill(
            source(events, "events"), source(spine, "spine"), at_column, dead_letter, service
        )
        return BackfillResult(
            features=pl.DataFrame(table),
            dead_letter=None if dead is None else pl.DataFrame(dead),
            report=report,
        )

    def read_service(self, service: str, request: object, *, at_column: str = "ts") -> pl.DataFrame:
        """One feature vector per row of ``request``, from feature service ``service``
        (``[[services]]`` in the feature file): its features, from any views, then its
        on-demand features, in request row order.

        ``request`` is Arrow data (a polars / pandas DataFrame, a pyarrow Table, ...)
        with the key columns of every view the service reads, optionally a time column
        ``at_column`` (a row without one reads each view at its read time) and the
        columns the on-demand expressions use. :meth:`backfill` with ``service=``
        computes the same columns for a spine.

        >>> import panes
        >>> engine = panes.Engine.from_toml_str('''
        ... [[views]]
        ... name = "cards"
        ... key = "card"
        ... time = "ts"
        ... [[views.features]]
        ... name = "amount_mean_1h"
        ... agg = "mean"
        ... column = "amount"
        ... window = "1h"
        ... [[services]]
        ... name = "fraud"
        ... features = ["amount_mean_1h"]
        ... [[services.on_demand]]
        ... name = "amount_vs_mean"
        ... expr = "amount / amount_mean_1h"
        ... ''')
        >>> import polars as pl
        >>> _ = engine.push(pl.DataFrame({"card": [7, 7], "ts": [0, 1000], "amount": [10.0, 30.0]}))
        >>> engine.read_service("fraud", pl.DataFrame({"card": [7], "amount": [60.0]})).to_dicts()
        [{'amount_mean_1h': 20.0, 'amount_vs_mean': 3.0}]
        """
        return pl.DataFrame(self._core.read_service(service, _arrow_input(request, "request"), at_column))

    @property
    def services(self) -> list[dict[str, Any]]:
        """The feature services: name, features and on-demand features."""
        return self._core.services()

    def metrics(self) -> dict[str, dict[str, Any]]:
        """Per view: events accepted, late, rejected by reason, null / NaN values
        skipped, keys, state bytes, latest event time, watermark, pending events and
        the backend."""
        return self._core.metrics()

    def __repr__(self) -> str:
        views = self.views
        lines = [f"<panes.Engine backend={self.backend}, {len(views)} view(s)>"]
        for v in views:
            lines.extend("  " + line for line in repr(v).splitlines())
        return "\n".join(lines)


__all__ = [
    "BackendError",
    "BackfillResult",
    "DataError",
    "Duration",
    "Engine",
    "Feature",
    "InexactReadError",
    "InternalError",
    "PanesError",
    "PanesFileError",
    "PushReport",
    "SchemaError",
    "SpecError",
    "Time",
    "UnknownFeatureError",
    "UnknownViewError",
    "View",
    "approx_distinct",
    "count",
    "decayed_count",
    "decayed_sum",
    "first",
    "last",
    "last_n",
    "max",
    "mean",
    "min",
    "quantile",
    "std",
    "sum",
    "top_k",
    "var",
]
