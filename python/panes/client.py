"""A client for ``panes serve`` over gRPC (needs the ``client`` extra: grpcio, protobuf).

>>> from panes.client import Client                      # doctest: +SKIP
>>> with Client("127.0.0.1:50051") as c:                 # doctest: +SKIP
...     c.ingest("cards", table)                         # any Arrow table / polars frame
...     f = c.get_features("cards", [1, 2, 3])
...     f.values                                         # (3, n_features) float64, NaN = null

The stubs in :mod:`panes.v1` are generated from ``engine/proto/panes/v1/panes.proto``
with grpcio-tools; reads come back as one packed block of doubles plus a validity
bitmap, turned into numpy arrays here without a per-value Python object.
"""

from __future__ import annotations

import os
from collections.abc import Iterable, Iterator, Sequence
from dataclasses import dataclass, field
from typing import Any

import numpy as np

try:
    import grpc
except ImportError:  # pragma: no cover - depends on the environment
    raise ImportError(
        "panes.client needs grpcio and protobuf: pip install 'panes[client]'"
    ) from None

from ._errors import PanesError
from .v1 import panes_pb2 as pb
from .v1 import panes_pb2_grpc as pb_grpc

__all__ = ["Client", "Features", "IngestResult", "ServerError", "Update"]


class ServerError(PanesError):
    """The server refused a call. ``code`` is the gRPC status name
    (``INVALID_ARGUMENT``, ``RESOURCE_EXHAUSTED``, ``UNAVAILABLE``...)."""

    code: str


@dataclass(frozen=True)
class Features:
    """A ``GetFeatures`` reply as numpy arrays."""

    names: list[str]
    values: np.ndarray
    """``(keys, features)`` float64; NaN where null."""
    valid: np.ndarray
    """``(keys, features)`` bool."""
    latest_event_ms: np.ndarray
    """Per key: time of its latest event; ``None``-like ``INT64_MIN`` for unseen keys."""
    window_events: np.ndarray
    """Per key: events in the widest window read."""
    at_ms: int
    state_version: int
    lists: dict[str, list[list[float]] | list[list[str]]] = field(default_factory=dict)
    """List-valued features (``last_n``, ``top_k``) by name: one list per key
    (``values`` holds their lengths); lists of strings for those of a string column."""
    strings: dict[str, list[str | None]] = field(default_factory=dict)
    """String-valued features (``first``, ``last`` of a string column) by name: one
    value per key, ``None`` where null (``values`` holds NaN for them)."""

    def to_dict(self) -> dict[str, np.ndarray]:
        """Feature name → column, with null as NaN."""
        return {n: self.values[:, j] for j, n in enumerate(self.names)}


@dataclass(frozen=True)
class Update:
    """One message of a subscription: the vectors of the keys that changed (or, while
    ``snapshot`` is true, of every key followed)."""

    keys: list[Any]
    """The keys of ``features``' rows: ints, strings, or tuples for a composite key."""
    features: Features
    snapshot: bool
    """Whether this message belongs to the first snapshot."""
    coalesced_intervals: int
    """Intervals since the previous message that passed while the stream was full
    (this client had not read it): their changes are merged into this message."""
    request_rows: list[int] = field(default_factory=list)
    """For a service subscription (whose ``keys`` are empty): the indices of the
    request rows whose vectors these are."""


@dataclass(frozen=True)
class IngestResult:
    """Totals of one ``Ingest`` call."""

    accepted: int
    late: int
    rejected: int
    messages: int
    rejections: list[dict[str, Any]]


def _error(e: grpc.RpcError) -> ServerError:
    code = e.code().name if hasattr(e, "code") and e.code() is not None else "UNKNOWN"
    details = e.details() if hasattr(e, "details") else str(e)
    return ServerError(f"{code}: {details}", code=code)


def _ipc_messages(view: str, data: Any, batch_rows: int) -> Iterator[pb.IngestRequest]:
    import pyarrow as pa

    if isinstance(data, pa.RecordBatch):
        table = pa.Table.from_batches([data])
    elif isinstance(data, pa.Table):
        table = data
    elif hasattr(data, "__arrow_c_stream__"):
        table = pa.table(data)
    else:
        raise TypeError(
            f"ingest takes an Arrow table, record batch or anything with __arrow_c_stream__, not {type(data).__name__}"
        )
    for batch in table.to_batches(max_chunksize=batch_rows):
        sink = pa.BufferOutputStream()
        with pa.ipc.new_stream(sink, batch.schema) as w:
            w.write_batch(batch)
        yield pb.IngestRequest(view=view, arrow_ipc=sink.getvalue().to_pybytes())


def _features(r: Any) -> Features:
    """A ``GetFeaturesResponse`` as numpy arrays."""
    shape = (r.rows, len(r.features))
    values = np.array(r.values, dtype=np.float64).reshape(shape)
    bits = np.unpackbits(np.frombuffer(r.validity, dtype=np.uint8), bitorder="little")
    valid = bits[: shape[0] * shape[1]].astype(bool).reshape(shape)
    return Features(
        names=list(r.features),
        values=values,
        valid=valid,
        latest_event_ms=np.array(r.latest_event_ms, dtype=np.int64),
        window_events=np.array(r.window_events, dtype=np.uint64),
        at_ms=r.at_ms,
        state_version=r.state_version,
        lists={
            r.features[lst.feature]: [
                list((lst.strings or lst.values)[lst.offsets[i] : lst.offsets[i + 1]])
                for i in range(r.rows)
            ]
            for lst in r.lists
        },
        strings={
            r.features[s.feature]: [
                v if valid[i, s.feature] else None for i, v in enumerate(s.values)
            ]
            for s in r.strings
        },
    )


def _ipc_table(data: Any) -> bytes:
    """A pyarrow / polars table (anything with ``__arrow_c_stream__``) as Arrow IPC bytes."""
    import pyarrow as pa

    table = data if isinstance(data, pa.Table) else pa.table(data)
    sink = pa.BufferOutputStream()
    with pa.ipc.new_stream(sink, table.schema) as w:
        w.write_table(table)
    return bytes(sink.getvalue().to_pybytes())


def _set_keys(req: Any, keys: Any) -> None:
    """Sets the keys of a ``GetFeaturesRequest`` or ``SubscribeRequest``: all ints, all
    strings, or tuples (one value per key column) for a composite key."""
    keys = list(keys.tolist() if isinstance(keys, np.ndarray) else keys)
    if keys and isinstance(keys[0], (tuple, list)):
        for j in range(len(keys[0])):
            part = req.composite_keys.parts.add()
            column = [k[j] for k in keys]
            if isinstance(column[0], str):
                part.strings.keys.extend(column)
            else:
                part.ints.keys.extend(int(v) for v in column)
    elif keys and isinstance(keys[0], str):
        req.string_keys.keys.extend(keys)
    else:
        req.int_keys.keys.extend(int(k) for k in keys)


def _keys_of(u: Any) -> list[Any]:
    """The keys of a ``SubscribeUpdate``'s rows."""
    which = u.WhichOneof("keys")
    if which == "int_keys":
        return list(u.int_keys.keys)
    if which == "string_keys":
        return list(u.string_keys.keys)
    if which == "decimal_keys":
        return [int(k) for k in u.decimal_keys.keys]
    if which == "composite_keys":
        columns = [
            list(p.ints.keys) if p.WhichOneof("values") == "ints" else list(p.strings.keys)
            for p in u.composite_keys.parts
        ]
        return list(zip(*columns))
    return []


class Client:
    """A connection to a ``panes serve`` instance.

    ``target`` is ``host:port``; ``timeout`` (seconds) applies to every call.
    ``token`` is sent as ``authorization: Bearer <token>`` with every call (servers
    started with ``--tokens``). TLS is used when ``tls`` is true or any of ``tls_ca``
    (PEM CA certificates to trust instead of the system's), ``tls_cert`` and
    ``tls_key`` (PEM client certificate and key, for servers that require one) is
    given, each a path or the PEM bytes; ``server_name`` overrides the name checked
    against the server's certificate (when ``target`` is an IP address the
    certificate does not name).

    >>> Client("feature-server:50051", token=os.environ["PANES_TOKEN"],   # doctest: +SKIP
    ...        tls_ca="ca.pem")
    """

    def __init__(
        self,
        target: str = "127.0.0.1:50051",
        *,
        timeout: float | None = 30.0,
        token: str | None = None,
        tls: bool = False,
        tls_ca: str | os.PathLike[str] | bytes | None = None,
        tls_cert: str | os.PathLike[str] | bytes | None = None,
        tls_key: str | os.PathLike[str] | bytes | None = None,
        server_name: str | None = None,
    ) -> None:
        options: list[tuple[str, Any]] = [
            ("grpc.max_receive_message_length", -1),
            ("grpc.max_send_message_length", -1),
        ]
        if (tls_cert is None) != (tls_key is None):
            raise ValueError("tls_cert and tls_key go together")
        if tls or tls_ca is not None or tls_cert is not None:
            credentials = grpc.ssl_channel_credentials(
                root_certificates=_pem(tls_ca),
                private_key=_pem(tls_key),
                certificate_chain=_pem(tls_cert),
            )
            if server_name is not None:
                options.append(("grpc.ssl_target_name_override", server_name))
            self._channel = grpc.secure_channel(target, credentials, options=options)
        else:
            self._channel = grpc.insecure_channel(target, options=options)
        # The generated stub is not annotated.
        self._stub: Any = pb_grpc.FeaturesStub(self._channel)  # type: ignore[no-untyped-call]
        self._timeout = timeout
        self._metadata = (("authorization", f"Bearer {token}"),) if token is not None else ()

    def __enter__(self) -> Client:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def close(self) -> None:
        """Closes the channel."""
        self._channel.close()

    def get_features(
        self,
        view: str,
        keys: Sequence[int] | Sequence[str] | Sequence[tuple[int | str, ...]] | np.ndarray,
        features: Sequence[str] | None = None,
        at_ms: int | None = None,
    ) -> Features:
        """Feature vectors of ``keys`` (all ints or all strings; for a view with a
        composite key, tuples with one value per key column) from ``view``."""
        req = pb.GetFeaturesRequest(view=view, features=list(features or []))
        _set_keys(req, keys)
        if at_ms is not None:
            req.at_ms = at_ms
        return self._get(req)

    def get_service(self, service: str, request: Any, at_column: str = "ts") -> Features:
        """One vector per row of ``request`` (pyarrow / polars / anything with
        ``__arrow_c_stream__``) from feature service ``service``: its features, then its
        on-demand features. ``request`` holds the key columns of the service's views, an
        optional time column ``at_column``, and the columns the on-demand features use;
        it travels as Arrow IPC."""
        req = pb.GetFeaturesRequest(
            service=service,
            request=pb.ServiceRequest(arrow_ipc=_ipc_table(request), at_column=at_column),
        )
        return self._get(req)

    def _get(self, req: pb.GetFeaturesRequest) -> Features:
        try:
            r = self._stub.GetFeatures(req, timeout=self._timeout, metadata=self._metadata)
        except grpc.RpcError as e:
            raise _error(e) from None
        return _features(r)

    def subscribe(
        self,
        view: str,
        keys: Sequence[int] | Sequence[str] | Sequence[tuple[int | str, ...]] | np.ndarray | None = None,
        *,
        features: Sequence[str] | None = None,
        interval_ms: int = 100,
    ) -> Iterator[Update]:
        """Follows ``keys`` of ``view`` (every key when ``None``): yields their current
        vectors (``snapshot`` true), then after each publish the vectors that changed, at
        most one message per ``interval_ms``, each key's latest vector only. The iterator
        never ends by itself: stop iterating (or ``close()`` it) to cancel. Not bounded
        by the client's ``timeout``."""
        req = pb.SubscribeRequest(view=view, features=list(features or []), interval_ms=interval_ms)
        if keys is None:
            req.all_keys = True
        else:
            _set_keys(req, keys)
        return self._subscribe(req)

    def subscribe_service(
        self, service: str, request: Any, *, at_column: str = "ts", interval_ms: int = 100
    ) -> Iterator[Update]:
        """Like :meth:`subscribe`, for the rows of ``request`` (as for
        :meth:`get_service`) of feature service ``service``: each update's
        ``request_rows`` say which rows its vectors are."""
        req = pb.SubscribeRequest(
            service=service,
            request=pb.ServiceRequest(arrow_ipc=_ipc_table(request), at_column=at_column),
            interval_ms=interval_ms,
        )
        return self._subscribe(req)

    def _subscribe(self, req: pb.SubscribeRequest) -> Iterator[Update]:
        call = self._stub.Subscribe(req, metadata=self._metadata)
        try:
            for u in call:
                if not u.HasField("features"):
                    continue  # a heartbeat
                yield Update(
                    keys=_keys_of(u),
                    features=_features(u.features),
                    snapshot=u.snapshot,
                    coalesced_intervals=u.coalesced_intervals,
                    request_rows=list(u.request_rows),
                )
        except grpc.RpcError as e:
            if e.code() == grpc.StatusCode.CANCELLED:
                return
            raise _error(e) from None
        finally:
            call.cancel()

    def ingest(self, view: str, data: Any, *, batch_rows: int = 65_536) -> IngestResult:
        """Streams ``data`` (pyarrow / polars / anything with ``__arrow_c_stream__``)
        to ``view`` as Arrow IPC messages of at most ``batch_rows`` rows."""
        return self._ingest(_ipc_messages(view, data, batch_rows))

    def ingest_rows(
        self,
        view: str,
        rows: Iterable[
            tuple[int | str | tuple[int | str, ...] | None, int, Sequence[float | str | None]]
        ],
        columns: Sequence[str],
    ) -> IngestResult:
        """Streams typed rows ``(key, time_ms, values)``; ``values`` follow ``columns``,
        ``None`` for null, strings for a column of strings (``first``, ``top_k``, …). A
        composite key is a tuple with one value per key column."""
        msg = pb.Rows(columns=list(columns))
        for key, time_ms, values in rows:
            row = msg.rows.add(time_ms=time_ms)
            if isinstance(key, tuple):
                for kv in key:
                    part = row.tuple_key.parts.add()
                    if isinstance(kv, str):
                        part.string_value = kv
                    else:
                        part.int_value = kv
            elif isinstance(key, str):
                row.string_key = key
            elif key is not None:
                row.int_key = key
            for j, v in enumerate(values):
                if isinstance(v, str):
                    row.strings[j] = v
                    row.values.append(float("nan"))
                    continue
                row.values.append(float("nan") if v is None else float(v))
                if v is None:
                    row.null_columns.append(j)
        return self._ingest(iter([pb.IngestRequest(view=view, rows=msg)]))

    def _ingest(self, messages: Iterator[pb.IngestRequest]) -> IngestResult:
        try:
            r = self._stub.Ingest(messages, timeout=self._timeout, metadata=self._metadata)
        except grpc.RpcError as e:
            raise _error(e) from None
        return IngestResult(
            accepted=r.accepted,
            late=r.late,
            rejected=r.rejected,
            messages=r.messages,
            rejections=[
                {"message": x.message, "row": x.row, "field": x.field, "reason": x.reason}
                for x in r.rejections
            ],
        )

    def list_features(self) -> list[dict[str, Any]]:
        """Every view served, as dicts."""
        try:
            r = self._stub.ListFeatures(
                pb.ListFeaturesRequest(), timeout=self._timeout, metadata=self._metadata
            )
        except grpc.RpcError as e:
            raise _error(e) from None
        return [_view_dict(v) for v in r.views]

    def describe_view(self, view: str) -> dict[str, Any]:
        """One view's definition as served."""
        try:
            r = self._stub.DescribeView(
                pb.DescribeViewRequest(view=view), timeout=self._timeout, metadata=self._metadata
            )
        except grpc.RpcError as e:
            raise _error(e) from None
        return _view_dict(r)


def _pem(value: str | os.PathLike[str] | bytes | None) -> bytes | None:
    """PEM bytes given as such or as a path."""
    if value is None or isinstance(value, bytes):
        return value
    with open(value, "rb") as f:
        return f.read()


def _view_dict(v: pb.ViewDescription) -> dict[str, Any]:
    return {
        "name": v.name,
        "key": v.key_columns[0] if len(v.key_columns) == 1 else list(v.key_columns),
        "key_kind": v.key_kind,
        "time": v.time,
        "allowed_lateness_ms": v.allowed_lateness_ms,
        "read_time": v.read_time,
        "features": [
            {
                "name": f.name,
                "agg": f.agg,
                "column": f.column or None,
                "window_ms": f.window_ms or None,
                "hop_ms": f.hop_ms,
                "half_life_ms": f.half_life_ms or None,
                "precision": f.precision or None,
                "q": f.q if f.agg == "quantile" else None,
                "relative_accuracy": f.relative_accuracy or None,
                "n": f.n or None,
                "k": f.k or None,
                "capacity": f.capacity or None,
                "dtype": f.dtype,
                "filter": f.filter or None,
            }
            for f in v.features
        ],
        "filter": v.filter or None,
        "columns": {c.name: c.expr for c in v.columns},
    }
