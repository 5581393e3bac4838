from google.protobuf.internal import containers as _containers
from google.protobuf import descriptor as _descriptor
from google.protobuf import message as _message
from collections.abc import Iterable as _Iterable, Mapping as _Mapping
from typing import ClassVar as _ClassVar, Optional as _Optional, Union as _Union

DESCRIPTOR: _descriptor.FileDescriptor

class GetFeaturesRequest(_message.Message):
    __slots__ = ("view", "string_keys", "int_keys", "composite_keys", "features", "at_ms", "service", "request")
    VIEW_FIELD_NUMBER: _ClassVar[int]
    STRING_KEYS_FIELD_NUMBER: _ClassVar[int]
    INT_KEYS_FIELD_NUMBER: _ClassVar[int]
    COMPOSITE_KEYS_FIELD_NUMBER: _ClassVar[int]
    FEATURES_FIELD_NUMBER: _ClassVar[int]
    AT_MS_FIELD_NUMBER: _ClassVar[int]
    SERVICE_FIELD_NUMBER: _ClassVar[int]
    REQUEST_FIELD_NUMBER: _ClassVar[int]
    view: str
    string_keys: StringKeys
    int_keys: IntKeys
    composite_keys: CompositeKeys
    features: _containers.RepeatedScalarFieldContainer[str]
    at_ms: int
    service: str
    request: ServiceRequest
    def __init__(self, view: _Optional[str] = ..., string_keys: _Optional[_Union[StringKeys, _Mapping]] = ..., int_keys: _Optional[_Union[IntKeys, _Mapping]] = ..., composite_keys: _Optional[_Union[CompositeKeys, _Mapping]] = ..., features: _Optional[_Iterable[str]] = ..., at_ms: _Optional[int] = ..., service: _Optional[str] = ..., request: _Optional[_Union[ServiceRequest, _Mapping]] = ...) -> None: ...

class ServiceRequest(_message.Message):
    __slots__ = ("arrow_ipc", "columns", "at_column")
    ARROW_IPC_FIELD_NUMBER: _ClassVar[int]
    COLUMNS_FIELD_NUMBER: _ClassVar[int]
    AT_COLUMN_FIELD_NUMBER: _ClassVar[int]
    arrow_ipc: bytes
    columns: RequestColumns
    at_column: str
    def __init__(self, arrow_ipc: _Optional[bytes] = ..., columns: _Optional[_Union[RequestColumns, _Mapping]] = ..., at_column: _Optional[str] = ...) -> None: ...

class RequestColumns(_message.Message):
    __slots__ = ("columns",)
    COLUMNS_FIELD_NUMBER: _ClassVar[int]
    columns: _containers.RepeatedCompositeFieldContainer[RequestColumn]
    def __init__(self, columns: _Optional[_Iterable[_Union[RequestColumn, _Mapping]]] = ...) -> None: ...

class RequestColumn(_message.Message):
    __slots__ = ("name", "strings", "ints", "doubles", "nulls")
    NAME_FIELD_NUMBER: _ClassVar[int]
    STRINGS_FIELD_NUMBER: _ClassVar[int]
    INTS_FIELD_NUMBER: _ClassVar[int]
    DOUBLES_FIELD_NUMBER: _ClassVar[int]
    NULLS_FIELD_NUMBER: _ClassVar[int]
    name: str
    strings: StringKeys
    ints: IntKeys
    doubles: DoubleValues
    nulls: _containers.RepeatedScalarFieldContainer[int]
    def __init__(self, name: _Optional[str] = ..., strings: _Optional[_Union[StringKeys, _Mapping]] = ..., ints: _Optional[_Union[IntKeys, _Mapping]] = ..., doubles: _Optional[_Union[DoubleValues, _Mapping]] = ..., nulls: _Optional[_Iterable[int]] = ...) -> None: ...

class DoubleValues(_message.Message):
    __slots__ = ("values",)
    VALUES_FIELD_NUMBER: _ClassVar[int]
    values: _containers.RepeatedScalarFieldContainer[float]
    def __init__(self, values: _Optional[_Iterable[float]] = ...) -> None: ...

class StringKeys(_message.Message):
    __slots__ = ("keys",)
    KEYS_FIELD_NUMBER: _ClassVar[int]
    keys: _containers.RepeatedScalarFieldContainer[str]
    def __init__(self, keys: _Optional[_Iterable[str]] = ...) -> None: ...

class IntKeys(_message.Message):
    __slots__ = ("keys",)
    KEYS_FIELD_NUMBER: _ClassVar[int]
    keys: _containers.RepeatedScalarFieldContainer[int]
    def __init__(self, keys: _Optional[_Iterable[int]] = ...) -> None: ...

class CompositeKeys(_message.Message):
    __slots__ = ("parts",)
    PARTS_FIELD_NUMBER: _ClassVar[int]
    parts: _containers.RepeatedCompositeFieldContainer[KeyPartValues]
    def __init__(self, parts: _Optional[_Iterable[_Union[KeyPartValues, _Mapping]]] = ...) -> None: ...

class KeyPartValues(_message.Message):
    __slots__ = ("strings", "ints")
    STRINGS_FIELD_NUMBER: _ClassVar[int]
    INTS_FIELD_NUMBER: _ClassVar[int]
    strings: StringKeys
    ints: IntKeys
    def __init__(self, strings: _Optional[_Union[StringKeys, _Mapping]] = ..., ints: _Optional[_Union[IntKeys, _Mapping]] = ...) -> None: ...

class GetFeaturesResponse(_message.Message):
    __slots__ = ("features", "rows", "values", "validity", "latest_event_ms", "window_events", "at_ms", "state_version", "lists", "strings", "string_features")
    FEATURES_FIELD_NUMBER: _ClassVar[int]
    ROWS_FIELD_NUMBER: _ClassVar[int]
    VALUES_FIELD_NUMBER: _ClassVar[int]
    VALIDITY_FIELD_NUMBER: _ClassVar[int]
    LATEST_EVENT_MS_FIELD_NUMBER: _ClassVar[int]
    WINDOW_EVENTS_FIELD_NUMBER: _ClassVar[int]
    AT_MS_FIELD_NUMBER: _ClassVar[int]
    STATE_VERSION_FIELD_NUMBER: _ClassVar[int]
    LISTS_FIELD_NUMBER: _ClassVar[int]
    STRINGS_FIELD_NUMBER: _ClassVar[int]
    STRING_FEATURES_FIELD_NUMBER: _ClassVar[int]
    features: _containers.RepeatedScalarFieldContainer[str]
    rows: int
    values: _containers.RepeatedScalarFieldContainer[float]
    validity: bytes
    latest_event_ms: _containers.RepeatedScalarFieldContainer[int]
    window_events: _containers.RepeatedScalarFieldContainer[int]
    at_ms: int
    state_version: int
    lists: _containers.RepeatedCompositeFieldContainer[FeatureList]
    strings: _containers.RepeatedCompositeFieldContainer[FeatureStrings]
    string_features: _containers.RepeatedScalarFieldContainer[int]
    def __init__(self, features: _Optional[_Iterable[str]] = ..., rows: _Optional[int] = ..., values: _Optional[_Iterable[float]] = ..., validity: _Optional[bytes] = ..., latest_event_ms: _Optional[_Iterable[int]] = ..., window_events: _Optional[_Iterable[int]] = ..., at_ms: _Optional[int] = ..., state_version: _Optional[int] = ..., lists: _Optional[_Iterable[_Union[FeatureList, _Mapping]]] = ..., strings: _Optional[_Iterable[_Union[FeatureStrings, _Mapping]]] = ..., string_features: _Optional[_Iterable[int]] = ...) -> None: ...

class FeatureStrings(_message.Message):
    __slots__ = ("feature", "values")
    FEATURE_FIELD_NUMBER: _ClassVar[int]
    VALUES_FIELD_NUMBER: _ClassVar[int]
    feature: int
    values: _containers.RepeatedScalarFieldContainer[str]
    def __init__(self, feature: _Optional[int] = ..., values: _Optional[_Iterable[str]] = ...) -> None: ...

class FeatureList(_message.Message):
    __slots__ = ("feature", "offsets", "values", "strings")
    FEATURE_FIELD_NUMBER: _ClassVar[int]
    OFFSETS_FIELD_NUMBER: _ClassVar[int]
    VALUES_FIELD_NUMBER: _ClassVar[int]
    STRINGS_FIELD_NUMBER: _ClassVar[int]
    feature: int
    offsets: _containers.RepeatedScalarFieldContainer[int]
    values: _containers.RepeatedScalarFieldContainer[float]
    strings: _containers.RepeatedScalarFieldContainer[str]
    def __init__(self, feature: _Optional[int] = ..., offsets: _Optional[_Iterable[int]] = ..., values: _Optional[_Iterable[float]] = ..., strings: _Optional[_Iterable[str]] = ...) -> None: ...

class IngestRequest(_message.Message):
    __slots__ = ("view", "arrow_ipc", "rows")
    VIEW_FIELD_NUMBER: _ClassVar[int]
    ARROW_IPC_FIELD_NUMBER: _ClassVar[int]
    ROWS_FIELD_NUMBER: _ClassVar[int]
    view: str
    arrow_ipc: bytes
    rows: Rows
    def __init__(self, view: _Optional[str] = ..., arrow_ipc: _Optional[bytes] = ..., rows: _Optional[_Union[Rows, _Mapping]] = ...) -> None: ...

class Rows(_message.Message):
    __slots__ = ("columns", "rows")
    COLUMNS_FIELD_NUMBER: _ClassVar[int]
    ROWS_FIELD_NUMBER: _ClassVar[int]
    columns: _containers.RepeatedScalarFieldContainer[str]
    rows: _containers.RepeatedCompositeFieldContainer[Row]
    def __init__(self, columns: _Optional[_Iterable[str]] = ..., rows: _Optional[_Iterable[_Union[Row, _Mapping]]] = ...) -> None: ...

class Row(_message.Message):
    __slots__ = ("string_key", "int_key", "tuple_key", "time_ms", "values", "null_columns", "strings")
    class StringsEntry(_message.Message):
        __slots__ = ("key", "value")
        KEY_FIELD_NUMBER: _ClassVar[int]
        VALUE_FIELD_NUMBER: _ClassVar[int]
        key: int
        value: str
        def __init__(self, key: _Optional[int] = ..., value: _Optional[str] = ...) -> None: ...
    STRING_KEY_FIELD_NUMBER: _ClassVar[int]
    INT_KEY_FIELD_NUMBER: _ClassVar[int]
    TUPLE_KEY_FIELD_NUMBER: _ClassVar[int]
    TIME_MS_FIELD_NUMBER: _ClassVar[int]
    VALUES_FIELD_NUMBER: _ClassVar[int]
    NULL_COLUMNS_FIELD_NUMBER: _ClassVar[int]
    STRINGS_FIELD_NUMBER: _ClassVar[int]
    string_key: str
    int_key: int
    tuple_key: KeyTuple
    time_ms: int
    values: _containers.RepeatedScalarFieldContainer[float]
    null_columns: _containers.RepeatedScalarFieldContainer[int]
    strings: _containers.ScalarMap[int, str]
    def __init__(self, string_key: _Optional[str] = ..., int_key: _Optional[int] = ..., tuple_key: _Optional[_Union[KeyTuple, _Mapping]] = ..., time_ms: _Optional[int] = ..., values: _Optional[_Iterable[float]] = ..., null_columns: _Optional[_Iterable[int]] = ..., strings: _Optional[_Mapping[int, str]] = ...) -> None: ...

class KeyTuple(_message.Message):
    __slots__ = ("parts",)
    PARTS_FIELD_NUMBER: _ClassVar[int]
    parts: _containers.RepeatedCompositeFieldContainer[KeyPart]
    def __init__(self, parts: _Optional[_Iterable[_Union[KeyPart, _Mapping]]] = ...) -> None: ...

class KeyPart(_message.Message):
    __slots__ = ("string_value", "int_value")
    STRING_VALUE_FIELD_NUMBER: _ClassVar[int]
    INT_VALUE_FIELD_NUMBER: _ClassVar[int]
    string_value: str
    int_value: int
    def __init__(self, string_value: _Optional[str] = ..., int_value: _Optional[int] = ...) -> None: ...

class IngestResponse(_message.Message):
    __slots__ = ("accepted", "late", "rejected", "rejections", "messages")
    ACCEPTED_FIELD_NUMBER: _ClassVar[int]
    LATE_FIELD_NUMBER: _ClassVar[int]
    REJECTED_FIELD_NUMBER: _ClassVar[int]
    REJECTIONS_FIELD_NUMBER: _ClassVar[int]
    MESSAGES_FIELD_NUMBER: _ClassVar[int]
    accepted: int
    late: int
    rejected: int
    rejections: _containers.RepeatedCompositeFieldContainer[Rejection]
    messages: int
    def __init__(self, accepted: _Optional[int] = ..., late: _Optional[int] = ..., rejected: _Optional[int] = ..., rejections: _Optional[_Iterable[_Union[Rejection, _Mapping]]] = ..., messages: _Optional[int] = ...) -> None: ...

class Rejection(_message.Message):
    __slots__ = ("message", "row", "field", "reason")
    MESSAGE_FIELD_NUMBER: _ClassVar[int]
    ROW_FIELD_NUMBER: _ClassVar[int]
    FIELD_FIELD_NUMBER: _ClassVar[int]
    REASON_FIELD_NUMBER: _ClassVar[int]
    message: int
    row: int
    field: str
    reason: str
    def __init__(self, message: _Optional[int] = ..., row: _Optional[int] = ..., field: _Optional[str] = ..., reason: _Optional[str] = ...) -> None: ...

class ListFeaturesRequest(_message.Message):
    __slots__ = ()
    def __init__(self) -> None: ...

class ListFeaturesResponse(_message.Message):
    __slots__ = ("views",)
    VIEWS_FIELD_NUMBER: _ClassVar[int]
    views: _containers.RepeatedCompositeFieldContainer[ViewDescription]
    def __init__(self, views: _Optional[_Iterable[_Union[ViewDescription, _Mapping]]] = ...) -> None: ...

class DescribeViewRequest(_message.Message):
    __slots__ = ("view",)
    VIEW_FIELD_NUMBER: _ClassVar[int]
    view: str
    def __init__(self, view: _Optional[str] = ...) -> None: ...

class ViewDescription(_message.Message):
    __slots__ = ("name", "key", "key_kind", "time", "allowed_lateness_ms", "read_time", "features", "filter", "columns", "key_columns")
    NAME_FIELD_NUMBER: _ClassVar[int]
    KEY_FIELD_NUMBER: _ClassVar[int]
    KEY_KIND_FIELD_NUMBER: _ClassVar[int]
    TIME_FIELD_NUMBER: _ClassVar[int]
    ALLOWED_LATENESS_MS_FIELD_NUMBER: _ClassVar[int]
    READ_TIME_FIELD_NUMBER: _ClassVar[int]
    FEATURES_FIELD_NUMBER: _ClassVar[int]
    FILTER_FIELD_NUMBER: _ClassVar[int]
    COLUMNS_FIELD_NUMBER: _ClassVar[int]
    KEY_COLUMNS_FIELD_NUMBER: _ClassVar[int]
    name: str
    key: str
    key_kind: str
    time: str
    allowed_lateness_ms: int
    read_time: str
    features: _containers.RepeatedCompositeFieldContainer[FeatureDescription]
    filter: str
    columns: _containers.RepeatedCompositeFieldContainer[DerivedColumn]
    key_columns: _containers.RepeatedScalarFieldContainer[str]
    def __init__(self, name: _Optional[str] = ..., key: _Optional[str] = ..., key_kind: _Optional[str] = ..., time: _Optional[str] = ..., allowed_lateness_ms: _Optional[int] = ..., read_time: _Optional[str] = ..., features: _Optional[_Iterable[_Union[FeatureDescription, _Mapping]]] = ..., filter: _Optional[str] = ..., columns: _Optional[_Iterable[_Union[DerivedColumn, _Mapping]]] = ..., key_columns: _Optional[_Iterable[str]] = ...) -> None: ...

class DerivedColumn(_message.Message):
    __slots__ = ("name", "expr")
    NAME_FIELD_NUMBER: _ClassVar[int]
    EXPR_FIELD_NUMBER: _ClassVar[int]
    name: str
    expr: str
    def __init__(self, name: _Optional[str] = ..., expr: _Optional[str] = ...) -> None: ...

class FeatureDescription(_message.Message):
    __slots__ = ("name", "agg", "column", "window_ms", "hop_ms", "dtype", "half_life_ms", "precision", "q", "relative_accuracy", "n", "k", "capacity", "filter", "window_events", "session_gap_ms")
    NAME_FIELD_NUMBER: _ClassVar[int]
    AGG_FIELD_NUMBER: _ClassVar[int]
    COLUMN_FIELD_NUMBER: _ClassVar[int]
    WINDOW_MS_FIELD_NUMBER: _ClassVar[int]
    HOP_MS_FIELD_NUMBER: _ClassVar[int]
    DTYPE_FIELD_NUMBER: _ClassVar[int]
    HALF_LIFE_MS_FIELD_NUMBER: _ClassVar[int]
    PRECISION_FIELD_NUMBER: _ClassVar[int]
    Q_FIELD_NUMBER: _ClassVar[int]
    RELATIVE_ACCURACY_FIELD_NUMBER: _ClassVar[int]
    N_FIELD_NUMBER: _ClassVar[int]
    K_FIELD_NUMBER: _ClassVar[int]
    CAPACITY_FIELD_NUMBER: _ClassVar[int]
    FILTER_FIELD_NUMBER: _ClassVar[int]
    WINDOW_EVENTS_FIELD_NUMBER: _ClassVar[int]
    SESSION_GAP_MS_FIELD_NUMBER: _ClassVar[int]
    name: str
    agg: str
    column: str
    window_ms: int
    hop_ms: int
    dtype: str
    half_life_ms: int
    precision: int
    q: float
    relative_accuracy: float
    n: int
    k: int
    capacity: int
    filter: str
    window_events: int
    session_gap_ms: int
    def __init__(self, name: _Optional[str] = ..., agg: _Optional[str] = ..., column: _Optional[str] = ..., window_ms: _Optional[int] = ..., hop_ms: _Optional[int] = ..., dtype: _Optional[str] = ..., half_life_ms: _Optional[int] = ..., precision: _Optional[int] = ..., q: _Optional[float] = ..., relative_accuracy: _Optional[float] = ..., n: _Optional[int] = ..., k: _Optional[int] = ..., capacity: _Optional[int] = ..., filter: _Optional[str] = ..., window_events: _Optional[int] = ..., session_gap_ms: _Optional[int] = ...) -> None: ...

class SubscribeRequest(_message.Message):
    __slots__ = ("view", "string_keys", "int_keys", "composite_keys", "all_keys", "features", "interval_ms", "service", "request")
    VIEW_FIELD_NUMBER: _ClassVar[int]
    STRING_KEYS_FIELD_NUMBER: _ClassVar[int]
    INT_KEYS_FIELD_NUMBER: _ClassVar[int]
    COMPOSITE_KEYS_FIELD_NUMBER: _ClassVar[int]
    ALL_KEYS_FIELD_NUMBER: _ClassVar[int]
    FEATURES_FIELD_NUMBER: _ClassVar[int]
    INTERVAL_MS_FIELD_NUMBER: _ClassVar[int]
    SERVICE_FIELD_NUMBER: _ClassVar[int]
    REQUEST_FIELD_NUMBER: _ClassVar[int]
    view: str
    string_keys: StringKeys
    int_keys: IntKeys
    composite_keys: CompositeKeys
    all_keys: bool
    features: _containers.RepeatedScalarFieldContainer[str]
    interval_ms: int
    service: str
    request: ServiceRequest
    def __init__(self, view: _Optional[str] = ..., string_keys: _Optional[_Union[StringKeys, _Mapping]] = ..., int_keys: _Optional[_Union[IntKeys, _Mapping]] = ..., composite_keys: _Optional[_Union[CompositeKeys, _Mapping]] = ..., all_keys: _Optional[bool] = ..., features: _Optional[_Iterable[str]] = ..., interval_ms: _Optional[int] = ..., service: _Optional[str] = ..., request: _Optional[_Union[ServiceRequest, _Mapping]] = ...) -> None: ...

class SubscribeUpdate(_message.Message):
    __slots__ = ("string_keys", "int_keys", "composite_keys", "decimal_keys", "features", "snapshot", "coalesced_intervals", "request_rows")
    STRING_KEYS_FIELD_NUMBER: _ClassVar[int]
    INT_KEYS_FIELD_NUMBER: _ClassVar[int]
    COMPOSITE_KEYS_FIELD_NUMBER: _ClassVar[int]
    DECIMAL_KEYS_FIELD_NUMBER: _ClassVar[int]
    FEATURES_FIELD_NUMBER: _ClassVar[int]
    SNAPSHOT_FIELD_NUMBER: _ClassVar[int]
    COALESCED_INTERVALS_FIELD_NUMBER: _ClassVar[int]
    REQUEST_ROWS_FIELD_NUMBER: _ClassVar[int]
    string_keys: StringKeys
    int_keys: IntKeys
    composite_keys: CompositeKeys
    decimal_keys: StringKeys
    features: GetFeaturesResponse
    snapshot: bool
    coalesced_intervals: int
    request_rows: _containers.RepeatedScalarFieldContainer[int]
    def __init__(self, string_keys: _Optional[_Union[StringKeys, _Mapping]] = ..., int_keys: _Optional[_Union[IntKeys, _Mapping]] = ..., composite_keys: _Optional[_Union[CompositeKeys, _Mapping]] = ..., decimal_keys: _Optional[_Union[StringKeys, _Mapping]] = ..., features: _Optional[_Union[GetFeaturesResponse, _Mapping]] = ..., snapshot: _Optional[bool] = ..., coalesced_intervals: _Optional[int] = ..., request_rows: _Optional[_Iterable[int]] = ...) -> None: ...
