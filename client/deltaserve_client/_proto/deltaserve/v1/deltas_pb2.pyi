import datetime

from google.protobuf import timestamp_pb2 as _timestamp_pb2
from google.protobuf.internal import containers as _containers
from google.protobuf.internal import enum_type_wrapper as _enum_type_wrapper
from google.protobuf import descriptor as _descriptor
from google.protobuf import message as _message
from collections.abc import Iterable as _Iterable, Mapping as _Mapping
from typing import ClassVar as _ClassVar, Optional as _Optional, Union as _Union

DESCRIPTOR: _descriptor.FileDescriptor

class Tier(int, metaclass=_enum_type_wrapper.EnumTypeWrapper):
    __slots__ = ()
    TIER_UNSPECIFIED: _ClassVar[Tier]
    TIER_DEVICE: _ClassVar[Tier]
    TIER_HOST: _ClassVar[Tier]
    TIER_DISK: _ClassVar[Tier]
TIER_UNSPECIFIED: Tier
TIER_DEVICE: Tier
TIER_HOST: Tier
TIER_DISK: Tier

class DeltaInfo(_message.Message):
    __slots__ = ("tenant", "tier", "bytes", "pinned", "in_flight", "hits", "last_used", "load_seconds", "path", "codec", "version", "error")
    TENANT_FIELD_NUMBER: _ClassVar[int]
    TIER_FIELD_NUMBER: _ClassVar[int]
    BYTES_FIELD_NUMBER: _ClassVar[int]
    PINNED_FIELD_NUMBER: _ClassVar[int]
    IN_FLIGHT_FIELD_NUMBER: _ClassVar[int]
    HITS_FIELD_NUMBER: _ClassVar[int]
    LAST_USED_FIELD_NUMBER: _ClassVar[int]
    LOAD_SECONDS_FIELD_NUMBER: _ClassVar[int]
    PATH_FIELD_NUMBER: _ClassVar[int]
    CODEC_FIELD_NUMBER: _ClassVar[int]
    VERSION_FIELD_NUMBER: _ClassVar[int]
    ERROR_FIELD_NUMBER: _ClassVar[int]
    tenant: str
    tier: Tier
    bytes: int
    pinned: bool
    in_flight: int
    hits: int
    last_used: _timestamp_pb2.Timestamp
    load_seconds: float
    path: str
    codec: str
    version: int
    error: str
    def __init__(self, tenant: _Optional[str] = ..., tier: _Optional[_Union[Tier, str]] = ..., bytes: _Optional[int] = ..., pinned: _Optional[bool] = ..., in_flight: _Optional[int] = ..., hits: _Optional[int] = ..., last_used: _Optional[_Union[datetime.datetime, _timestamp_pb2.Timestamp, _Mapping]] = ..., load_seconds: _Optional[float] = ..., path: _Optional[str] = ..., codec: _Optional[str] = ..., version: _Optional[int] = ..., error: _Optional[str] = ...) -> None: ...

class LoadDeltaRequest(_message.Message):
    __slots__ = ("tenant", "path", "pin", "replace")
    TENANT_FIELD_NUMBER: _ClassVar[int]
    PATH_FIELD_NUMBER: _ClassVar[int]
    PIN_FIELD_NUMBER: _ClassVar[int]
    REPLACE_FIELD_NUMBER: _ClassVar[int]
    tenant: str
    path: str
    pin: bool
    replace: bool
    def __init__(self, tenant: _Optional[str] = ..., path: _Optional[str] = ..., pin: _Optional[bool] = ..., replace: _Optional[bool] = ...) -> None: ...

class LoadDeltaResponse(_message.Message):
    __slots__ = ("delta", "replaced")
    DELTA_FIELD_NUMBER: _ClassVar[int]
    REPLACED_FIELD_NUMBER: _ClassVar[int]
    delta: DeltaInfo
    replaced: bool
    def __init__(self, delta: _Optional[_Union[DeltaInfo, _Mapping]] = ..., replaced: _Optional[bool] = ...) -> None: ...

class UnloadDeltaRequest(_message.Message):
    __slots__ = ("tenant",)
    TENANT_FIELD_NUMBER: _ClassVar[int]
    tenant: str
    def __init__(self, tenant: _Optional[str] = ...) -> None: ...

class UnloadDeltaResponse(_message.Message):
    __slots__ = ("tenant", "freed_bytes")
    TENANT_FIELD_NUMBER: _ClassVar[int]
    FREED_BYTES_FIELD_NUMBER: _ClassVar[int]
    tenant: str
    freed_bytes: int
    def __init__(self, tenant: _Optional[str] = ..., freed_bytes: _Optional[int] = ...) -> None: ...

class ListDeltasRequest(_message.Message):
    __slots__ = ("tenant",)
    TENANT_FIELD_NUMBER: _ClassVar[int]
    tenant: str
    def __init__(self, tenant: _Optional[str] = ...) -> None: ...

class ListDeltasResponse(_message.Message):
    __slots__ = ("deltas",)
    DELTAS_FIELD_NUMBER: _ClassVar[int]
    deltas: _containers.RepeatedCompositeFieldContainer[DeltaInfo]
    def __init__(self, deltas: _Optional[_Iterable[_Union[DeltaInfo, _Mapping]]] = ...) -> None: ...

class ServerInfoRequest(_message.Message):
    __slots__ = ()
    def __init__(self) -> None: ...

class Limits(_message.Message):
    __slots__ = ("max_prompt_tokens", "max_new_tokens", "max_context_tokens", "max_queued_requests", "max_batch_requests", "max_message_bytes")
    MAX_PROMPT_TOKENS_FIELD_NUMBER: _ClassVar[int]
    MAX_NEW_TOKENS_FIELD_NUMBER: _ClassVar[int]
    MAX_CONTEXT_TOKENS_FIELD_NUMBER: _ClassVar[int]
    MAX_QUEUED_REQUESTS_FIELD_NUMBER: _ClassVar[int]
    MAX_BATCH_REQUESTS_FIELD_NUMBER: _ClassVar[int]
    MAX_MESSAGE_BYTES_FIELD_NUMBER: _ClassVar[int]
    max_prompt_tokens: int
    max_new_tokens: int
    max_context_tokens: int
    max_queued_requests: int
    max_batch_requests: int
    max_message_bytes: int
    def __init__(self, max_prompt_tokens: _Optional[int] = ..., max_new_tokens: _Optional[int] = ..., max_context_tokens: _Optional[int] = ..., max_queued_requests: _Optional[int] = ..., max_batch_requests: _Optional[int] = ..., max_message_bytes: _Optional[int] = ...) -> None: ...

class ServerInfoResponse(_message.Message):
    __slots__ = ("base_model", "architecture", "base_fingerprint", "codecs", "limits", "version", "device", "dtype")
    BASE_MODEL_FIELD_NUMBER: _ClassVar[int]
    ARCHITECTURE_FIELD_NUMBER: _ClassVar[int]
    BASE_FINGERPRINT_FIELD_NUMBER: _ClassVar[int]
    CODECS_FIELD_NUMBER: _ClassVar[int]
    LIMITS_FIELD_NUMBER: _ClassVar[int]
    VERSION_FIELD_NUMBER: _ClassVar[int]
    DEVICE_FIELD_NUMBER: _ClassVar[int]
    DTYPE_FIELD_NUMBER: _ClassVar[int]
    base_model: str
    architecture: str
    base_fingerprint: str
    codecs: _containers.RepeatedScalarFieldContainer[str]
    limits: Limits
    version: str
    device: str
    dtype: str
    def __init__(self, base_model: _Optional[str] = ..., architecture: _Optional[str] = ..., base_fingerprint: _Optional[str] = ..., codecs: _Optional[_Iterable[str]] = ..., limits: _Optional[_Union[Limits, _Mapping]] = ..., version: _Optional[str] = ..., device: _Optional[str] = ..., dtype: _Optional[str] = ...) -> None: ...
