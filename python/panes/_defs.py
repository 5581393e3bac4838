"""Feature definitions in Python, mirroring the TOML feature file field by field.

They are plain data: ``View.to_toml()`` renders them, and the engine parses and
validates that text with the same code as a feature file, so both give the same
errors.
"""

from __future__ import annotations

import builtins
import datetime as _dt
import json
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field

Duration = str | int | _dt.timedelta
"""A duration: ``"5m"``, ``"90s"``, ``"1h"`` (units ms, s, m, h, d), integer
milliseconds, or a :class:`datetime.timedelta`."""


def _duration(value: Duration, what: str) -> str:
    if isinstance(value, str):
        return value
    if isinstance(value, _dt.timedelta):
        ms, rest = divmod(value, _dt.timedelta(milliseconds=1))
        if rest:
            raise ValueError(f"{what}: {value!r} is not a whole number of milliseconds")
        return f"{ms}ms"
    if isinstance(value, int) and not isinstance(value, bool):
        return f"{value}ms"
    raise TypeError(f"{what}: expected a duration such as '5m', int ms or timedelta; got {value!r}")


def _q(s: str) -> str:
    # A JSON string is a valid TOML basic string.
    return json.dumps(s, ensure_ascii=False)


@dataclass(frozen=True)
class Feature:
    """One feature of a view: an aggregation of a column over a window.

    Build features with :func:`count`, :func:`sum`, :func:`mean`, :func:`min`,
    :func:`max`, :func:`var`, :func:`std`, :func:`last`, :func:`first`,
    :func:`decayed_sum`, :func:`decayed_count`, :func:`approx_distinct`,
    :func:`quantile`, :func:`last_n` and :func:`top_k`.
    """

    name: str
    agg: str
    column: str | None
    window: str | None
    hop: str | None = None
    half_life: str | None = None
    precision: int | None = None
    q: float | None = None
    relative_accuracy: float | None = None
    n: int | None = None
    k: int | None = None
    capacity: int | None = None
    filter: str | None = None
    session_gap: str | None = None

    def to_toml(self) -> str:
        """The feature as a ``[[views.features]]`` table."""
        lines = ["[[views.features]]", f"name = {_q(self.name)}", f"agg = {_q(self.agg)}"]
        if self.column is not None:
            lines.append(f"column = {_q(self.column)}")
        if self.session_gap is not None:
            lines.append(f"session_gap = {_q(self.session_gap)}")
        if self.window is not None:
            lines.append(f"window = {_q(self.window)}")
        if self.hop is not None:
            lines.append(f"hop = {_q(self.hop)}")
        if self.half_life is not None:
            lines.append(f"half_life = {_q(self.half_life)}")
        if self.precision is not None:
            lines.append(f"precision = {self.precision}")
        if self.q is not None:
            lines.append(f"q = {float(self.q)!r}")
        if self.relative_accuracy is not None:
            lines.append(f"relative_accuracy = {float(self.relative_accuracy)!r}")
        for key in ("n", "k", "capacity"):
            if getattr(self, key) is not None:
                lines.append(f"{key} = {int(getattr(self, key))}")
        if self.filter is not None:
            lines.append(f"filter = {_q(self.filter)}")
        return "\n".join(lines) + "\n"

    def __repr__(self) -> str:
        what = f"{self.agg}({self.column})" if self.column else f"{self.agg}()"
        hop = f", hop={self.hop}" if self.hop else ""
        params = "".join(
            f", {k}={v}"
            for k, v in [("half_life", self.half_life), ("precision", self.precision), ("q", self.q),
                         ("relative_accuracy", self.relative_accuracy), ("n", self.n), ("k", self.k),
                         ("capacity", self.capacity)]
            if v is not None
        )
        where = f" where {self.filter}" if self.filter is not None else ""
        over = f"sessions (gap {self.session_gap})" if self.session_gap is not None else self.window
        return f"<Feature {self.name}: {what} over {over}{hop}{params}{where}>"


def _feature(
    agg: str,
    column: str | None,
    window: Duration | None,
    hop: Duration | None,
    name: str | None,
    half_life: Duration | None = None,
    precision: int | None = None,
    q: float | None = None,
    relative_accuracy: float | None = None,
    n: int | None = None,
    k: int | None = None,
    capacity: int | None = None,
    filter: str | None = None,
    session_gap: Duration | None = None,
) -> Feature:
    if (window is None) == (session_gap is None):
        raise TypeError(f"{agg}: give a window (a duration, 'lifetime' or 'N events') or a session_gap, not both")
    gap = None if session_gap is None else _duration(session_gap, "session_gap")
    w = None if window is None else _duration(window, "window")
    h = None if hop is None else _duration(hop, "hop")
    hl = None if half_life is None else _duration(half_life, "half_life")
    if name is None:
        over = f"session_{gap}" if w is None else w.replace(" ", "_")
        name = f"{agg}_{over}" if column is None else f"{column}_{agg}_{over}"
    return Feature(name=name, agg=agg, column=column, window=w, hop=h, half_life=hl, precision=precision,
                   q=q, relative_accuracy=relative_accuracy, n=n, k=k, capacity=capacity, filter=filter,
                   session_gap=gap)


def count(
    column: str | None = None,
    *,
    window: Duration | None = None,
    session_gap: Duration | None = None,
    hop: Duration | None = None,
    name: str | None = None, filter: str | None = None,
) -> Feature:
    """Number of events in the window; with ``column``, of its non-null, non-NaN values.

    >>> import panes
    >>> panes.count(window="5m")
    <Feature count_5m: count() over 5m>
    """
    return _feature("count", column, window, hop, name, filter=filter, session_gap=session_gap)


def sum(
    column: str, *,
    window: Duration | None = None,
    session_gap: Duration | None = None,
    hop: Duration | None = None,
    name: str | None = None,
    filter: str | None = None,
) -> Feature:
    """Sum of ``column`` over the window (0 when empty).

    >>> import panes
    >>> panes.sum("amount", window="1h", hop="5m")
    <Feature amount_sum_1h: sum(amount) over 1h, hop=5m>
    """
    return _feature("sum", column, window, hop, name, filter=filter, session_gap=session_gap)


def mean(
    column: str, *,
    window: Duration | None = None,
    session_gap: Duration | None = None,
    hop: Duration | None = None,
    name: str | None = None,
    filter: str | None = None,
) -> Feature:
    """Mean of ``column`` over the window (null when empty).

    >>> import panes
    >>> panes.mean("amount", window="1h", hop="1m", name="amount_mean_1h")
    <Feature amount_mean_1h: mean(amount) over 1h, hop=1m>
    """
    return _feature("mean", column, window, hop, name, filter=filter, session_gap=session_gap)


def min(
    column: str, *,
    window: Duration | None = None,
    session_gap: Duration | None = None,
    hop: Duration | None = None,
    name: str | None = None,
    filter: str | None = None,
) -> Feature:
    """Smallest value of ``column`` in the window (null when empty)."""
    return _feature("min", column, window, hop, name, filter=filter, session_gap=session_gap)


def max(
    column: str, *,
    window: Duration | None = None,
    session_gap: Duration | None = None,
    hop: Duration | None = None,
    name: str | None = None,
    filter: str | None = None,
) -> Feature:
    """Largest value of ``column`` in the window (null when empty)."""
    return _feature("max", column, window, hop, name, filter=filter, session_gap=session_gap)


def var(
    column: str, *,
    window: Duration | None = None,
    session_gap: Duration | None = None,
    hop: Duration | None = None,
    name: str | None = None,
    filter: str | None = None,
) -> Feature:
    """Sample variance (n − 1) of ``column`` in the window (null for fewer than 2 values)."""
    return _feature("var", column, window, hop, name, filter=filter, session_gap=session_gap)


def std(
    column: str, *,
    window: Duration | None = None,
    session_gap: Duration | None = None,
    hop: Duration | None = None,
    name: str | None = None,
    filter: str | None = None,
) -> Feature:
    """Sample standard deviation of ``column`` in the window (null for fewer than 2 values)."""
    return _feature("std", column, window, hop, name, filter=filter, session_gap=session_gap)


def last(
    column: str, *,
    window: Duration | None = None,
    session_gap: Duration | None = None,
    hop: Duration | None = None,
    name: str | None = None,
    filter: str | None = None,
) -> Feature:
    """Value of ``column`` of the latest event in the window (ties: the one pushed last):
    a number, or a string for a string column."""
    return _feature("last", column, window, hop, name, filter=filter, session_gap=session_gap)


def first(
    column: str, *,
    window: Duration | None = None,
    session_gap: Duration | None = None,
    hop: Duration | None = None,
    name: str | None = None,
    filter: str | None = None,
) -> Feature:
    """Value of ``column`` of the earliest event in the window (ties: the one pushed first):
    a number, or a string for a string column."""
    return _feature("first", column, window, hop, name, filter=filter, session_gap=session_gap)


def decayed_sum(
    column: str,
    *,
    half_life: Duration,
    window: Duration | None = None,
    session_gap: Duration | None = None,
    hop: Duration | None = None,
    name: str | None = None, filter: str | None = None,
) -> Feature:
    """Exponentially decayed sum of ``column`` over the window, as of the read time t:
    ``Σ v · 2^(−(t − ts) / half_life)`` (0 when empty; within 1e-9 relative).

    >>> import panes
    >>> panes.decayed_sum("amount", half_life="1h", window="1d", hop="10m")
    <Feature amount_decayed_sum_1d: decayed_sum(amount) over 1d, hop=10m, half_life=1h>
    """
    return _feature("decayed_sum", column, window, hop, name, half_life, filter=filter, session_gap=session_gap)


def decayed_count(
    column: str | None = None,
    *,
    half_life: Duration,
    window: Duration | None = None,
    session_gap: Duration | None = None,
    hop: Duration | None = None,
    name: str | None = None, filter: str | None = None,
) -> Feature:
    """Exponentially decayed count of the window's events (with ``column``, of its
    non-null, non-NaN values), as of the read time t: ``Σ 2^(−(t − ts) / half_life)``.

    >>> import panes
    >>> panes.decayed_count(half_life="30m", window="lifetime")
    <Feature decayed_count_lifetime: decayed_count() over lifetime, half_life=30m>
    """
    return _feature("decayed_count", column, window, hop, name, half_life, filter=filter, session_gap=session_gap)


def approx_distinct(
    column: str,
    *,
    window: Duration | None = None,
    session_gap: Duration | None = None,
    precision: int | None = None,
    hop: Duration | None = None,
    name: str | None = None, filter: str | None = None,
) -> Feature:
    """Number of distinct values of ``column`` in the window (integers, floats,
    decimals or strings; 0 when empty).

    Exact while the window holds at most ``max(64, min(2**precision / 8, 1024))``
    distinct values; beyond, a HyperLogLog estimate whose error is within three
    standard errors, ``3 · 1.04 / sqrt(2**precision)`` of the count. ``precision`` is
    4 to 18 (default 12); each pane of each key costs about ``2**precision`` bytes.

    >>> import panes
    >>> panes.approx_distinct("merchant", window="1d", hop="1h")
    <Feature merchant_approx_distinct_1d: approx_distinct(merchant) over 1d, hop=1h>
    """
    return _feature(
        "approx_distinct", column, window, hop, name, precision=precision, filter=filter, session_gap=session_gap
    )


def quantile(
    column: str,
    q: float,
    *,
    window: Duration | None = None,
    session_gap: Duration | None = None,
    relative_accuracy: float | None = None,
    hop: Duration | None = None,
    name: str | None = None, filter: str | None = None,
) -> Feature:
    """The ``q``-quantile of ``column`` in the window: the value of rank
    ``floor(q · (n − 1))`` of the sorted values, within ``relative_accuracy · |value|``
    (default 0.01; null when empty).

    A DDSketch per pane: about ``8 · ln(1e12) / ln((1 + α) / (1 − α))`` bytes (11 KiB at
    α = 0.01) per pane of each key; values spanning more than twelve decades (both
    signs together) lose accuracy at the low end.

    >>> import panes
    >>> panes.quantile("trip_s", 0.9, window="7d", hop="1d", name="trip_p90_7d")
    <Feature trip_p90_7d: quantile(trip_s) over 7d, hop=1d, q=0.9>
    """
    return _feature(
        "quantile", column, window, hop, name, q=q, relative_accuracy=relative_accuracy, filter=filter,
        session_gap=session_gap,
    )


def last_n(
    column: str, n: int, *,
    window: Duration | None = None,
    session_gap: Duration | None = None,
    hop: Duration | None = None,
    name: str | None = None,
    filter: str | None = None,
) -> Feature:
    """The values of ``column`` of the window's ``n`` newest events (greatest time; ties:
    the one pushed last), newest first: a list (an empty one for an empty window).
    ``n`` is 1 to 1000; each pane of each key costs ``8 + 16 n`` bytes. A DataFrame
    read gives a list column (of strings for a string column); a numpy read cannot
    hold it.

    >>> import panes
    >>> panes.last_n("amount", 5, window="1d", hop="1h", name="last_amounts")
    <Feature last_amounts: last_n(amount) over 1d, hop=1h, n=5>
    """
    return _feature("last_n", column, window, hop, name, n=n, filter=filter, session_gap=session_gap)


def top_k(
    column: str,
    k: int,
    *,
    window: Duration | None = None,
    session_gap: Duration | None = None,
    capacity: int | None = None,
    hop: Duration | None = None,
    name: str | None = None, filter: str | None = None,
) -> Feature:
    """The ``k`` most frequent values of ``column`` in the window, most frequent first
    (ties: smaller value first; strings by code point): a list, of strings for a
    string column. Exact while the window holds at most
    ``capacity`` distinct values (default ``max(64, 4k)``, at most 10 000); beyond, a
    mergeable Misra–Gries summary that keeps every value more frequent than
    ``n / (capacity + 1)``. Each pane of each key costs ``8 + 16 · capacity`` bytes.

    >>> import panes
    >>> panes.top_k("category", 5, window="1d", hop="1h", name="top_categories")
    <Feature top_categories: top_k(category) over 1d, hop=1h, k=5>
    """
    return _feature("top_k", column, window, hop, name, k=k, capacity=capacity, filter=filter, session_gap=session_gap)


@dataclass(frozen=True)
class View:
    """One event stream with one entity key, and its features.

    ``key`` is a column name, or a list of them for a composite key
    (``key=["card", "merchant"]``: the entity is the tuple; a null part is a null key).
    ``columns`` maps derived column names to SQL expressions over the event's columns
    (computed in order: later ones may use earlier ones); ``filter`` is a SQL condition,
    and rows where it is false or null do not belong to the view. A feature's own
    ``filter`` (``panes.count(window="1h", filter="amount > 100")``) limits what that
    feature aggregates.

    >>> import panes
    >>> v = panes.View("cards", key="card", time="ts", pane="10s",
    ...                features=[panes.count(window="5m")])
    >>> print(v.to_toml().splitlines()[1])
    name = "cards"
    """

    name: str
    key: str | Sequence[str]
    time: str
    features: Sequence[Feature] = field(default_factory=tuple)
    pane: Duration = "1s"
    allowed_lateness: Duration = "0s"
    read_time: str = "event_time"
    max_keys: int | None = None
    filter: str | None = None
    columns: Mapping[str, str] = field(default_factory=dict)

    def __post_init__(self) -> None:
        if not isinstance(self.key, str):
            object.__setattr__(self, "key", tuple(str(k) for k in self.key))
        object.__setattr__(self, "features", tuple(self.features))
        object.__setattr__(self, "columns", dict(self.columns))
        object.__setattr__(self, "pane", _duration(self.pane, "pane"))
        object.__setattr__(
            self, "allowed_lateness", _duration(self.allowed_lateness, "allowed_lateness")
        )
        for f in self.features:
            if not isinstance(f, Feature):
                raise TypeError(
                    f"view {self.name!r}: features must be panes.Feature values "
                    f"(from panes.count, panes.mean, ...); got {f!r}"
                )

    def to_toml(self) -> str:
        """The view as a ``[[views]]`` table with its features."""
        head = [
            "[[views]]",
            f"name = {_q(self.name)}",
            f"key = {self._key_toml()}",
            f"time = {_q(self.time)}",
            f"pane = {_q(str(self.pane))}",
            f"allowed_lateness = {_q(str(self.allowed_lateness))}",
            f"read_time = {_q(self.read_time)}",
        ]
        if self.max_keys is not None:
            head.append(f"max_keys = {int(self.max_keys)}")
        if self.filter is not None:
            head.append(f"filter = {_q(self.filter)}")
        derived = "".join(
            f"[[views.columns]]\nname = {_q(name)}\nexpr = {_q(expr)}\n\n"
            for name, expr in self.columns.items()
        )
        return "\n".join(head) + "\n\n" + derived + "\n".join(f.to_toml() for f in self.features)

    def _key_toml(self) -> str:
        if isinstance(self.key, str):
            return _q(self.key)
        return "[" + ", ".join(_q(k) for k in self.key) + "]"

    def __repr__(self) -> str:
        lines = [
            f"<View {self.name}: key={self.key}, time={self.time}, pane={self.pane}, "
            f"allowed_lateness={self.allowed_lateness}, read_time={self.read_time}>"
        ]
        width = builtins.max((len(f.name) for f in self.features), default=0)
        for f in self.features:
            what = f"{f.agg}({f.column})" if f.column else f"{f.agg}()"
            hop = f" hop {f.hop}" if f.hop else ""
            lines.append(f"  {f.name:<{width}}  {what} over {f.window}{hop}")
        return "\n".join(lines)
