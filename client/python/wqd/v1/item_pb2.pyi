import datetime

from google.protobuf import duration_pb2 as _duration_pb2
from google.protobuf import timestamp_pb2 as _timestamp_pb2
from google.protobuf.internal import containers as _containers
from google.protobuf.internal import enum_type_wrapper as _enum_type_wrapper
from google.protobuf import descriptor as _descriptor
from google.protobuf import message as _message
from collections.abc import Mapping as _Mapping
from typing import ClassVar as _ClassVar, Optional as _Optional, Union as _Union

DESCRIPTOR: _descriptor.FileDescriptor

class ItemState(int, metaclass=_enum_type_wrapper.EnumTypeWrapper):
    __slots__ = ()
    ITEM_STATE_UNSPECIFIED: _ClassVar[ItemState]
    ITEM_STATE_PENDING: _ClassVar[ItemState]
    ITEM_STATE_RUNNING: _ClassVar[ItemState]
    ITEM_STATE_OK: _ClassVar[ItemState]
    ITEM_STATE_FAILED: _ClassVar[ItemState]
    ITEM_STATE_CANCELLED: _ClassVar[ItemState]
    ITEM_STATE_EXPIRED: _ClassVar[ItemState]
    ITEM_STATE_REJECTED: _ClassVar[ItemState]
    ITEM_STATE_DELAYED: _ClassVar[ItemState]

class FallbackLevel(int, metaclass=_enum_type_wrapper.EnumTypeWrapper):
    __slots__ = ()
    FALLBACK_LEVEL_UNSPECIFIED: _ClassVar[FallbackLevel]
    FALLBACK_LEVEL_CORE: _ClassVar[FallbackLevel]
    FALLBACK_LEVEL_SHARD: _ClassVar[FallbackLevel]
    FALLBACK_LEVEL_CACHE: _ClassVar[FallbackLevel]
    FALLBACK_LEVEL_NODE: _ClassVar[FallbackLevel]
    FALLBACK_LEVEL_PACKAGE: _ClassVar[FallbackLevel]
    FALLBACK_LEVEL_ALL: _ClassVar[FallbackLevel]
ITEM_STATE_UNSPECIFIED: ItemState
ITEM_STATE_PENDING: ItemState
ITEM_STATE_RUNNING: ItemState
ITEM_STATE_OK: ItemState
ITEM_STATE_FAILED: ItemState
ITEM_STATE_CANCELLED: ItemState
ITEM_STATE_EXPIRED: ItemState
ITEM_STATE_REJECTED: ItemState
ITEM_STATE_DELAYED: ItemState
FALLBACK_LEVEL_UNSPECIFIED: FallbackLevel
FALLBACK_LEVEL_CORE: FallbackLevel
FALLBACK_LEVEL_SHARD: FallbackLevel
FALLBACK_LEVEL_CACHE: FallbackLevel
FALLBACK_LEVEL_NODE: FallbackLevel
FALLBACK_LEVEL_PACKAGE: FallbackLevel
FALLBACK_LEVEL_ALL: FallbackLevel

class WorkItem(_message.Message):
    __slots__ = ("target", "handler", "args", "payload", "key", "delay", "deadline")
    class ArgsEntry(_message.Message):
        __slots__ = ("key", "value")
        KEY_FIELD_NUMBER: _ClassVar[int]
        VALUE_FIELD_NUMBER: _ClassVar[int]
        key: str
        value: str
        def __init__(self, key: _Optional[str] = ..., value: _Optional[str] = ...) -> None: ...
    TARGET_FIELD_NUMBER: _ClassVar[int]
    HANDLER_FIELD_NUMBER: _ClassVar[int]
    ARGS_FIELD_NUMBER: _ClassVar[int]
    PAYLOAD_FIELD_NUMBER: _ClassVar[int]
    KEY_FIELD_NUMBER: _ClassVar[int]
    DELAY_FIELD_NUMBER: _ClassVar[int]
    DEADLINE_FIELD_NUMBER: _ClassVar[int]
    target: str
    handler: str
    args: _containers.ScalarMap[str, str]
    payload: bytes
    key: str
    delay: _duration_pb2.Duration
    deadline: _duration_pb2.Duration
    def __init__(self, target: _Optional[str] = ..., handler: _Optional[str] = ..., args: _Optional[_Mapping[str, str]] = ..., payload: _Optional[bytes] = ..., key: _Optional[str] = ..., delay: _Optional[_Union[datetime.timedelta, _duration_pb2.Duration, _Mapping]] = ..., deadline: _Optional[_Union[datetime.timedelta, _duration_pb2.Duration, _Mapping]] = ...) -> None: ...

class ItemResult(_message.Message):
    __slots__ = ("item_id", "batch_id", "workqueue", "state", "output", "error", "target", "cpu_started", "cpu_finished", "fallback_level", "fallback_reason", "rebinds", "queued_at", "started_at", "finished_at", "topology_epoch", "handler", "decision_epoch", "worker_id", "worker_pid", "worker_slot", "worker_lost")
    ITEM_ID_FIELD_NUMBER: _ClassVar[int]
    BATCH_ID_FIELD_NUMBER: _ClassVar[int]
    WORKQUEUE_FIELD_NUMBER: _ClassVar[int]
    STATE_FIELD_NUMBER: _ClassVar[int]
    OUTPUT_FIELD_NUMBER: _ClassVar[int]
    ERROR_FIELD_NUMBER: _ClassVar[int]
    TARGET_FIELD_NUMBER: _ClassVar[int]
    CPU_STARTED_FIELD_NUMBER: _ClassVar[int]
    CPU_FINISHED_FIELD_NUMBER: _ClassVar[int]
    FALLBACK_LEVEL_FIELD_NUMBER: _ClassVar[int]
    FALLBACK_REASON_FIELD_NUMBER: _ClassVar[int]
    REBINDS_FIELD_NUMBER: _ClassVar[int]
    QUEUED_AT_FIELD_NUMBER: _ClassVar[int]
    STARTED_AT_FIELD_NUMBER: _ClassVar[int]
    FINISHED_AT_FIELD_NUMBER: _ClassVar[int]
    TOPOLOGY_EPOCH_FIELD_NUMBER: _ClassVar[int]
    HANDLER_FIELD_NUMBER: _ClassVar[int]
    DECISION_EPOCH_FIELD_NUMBER: _ClassVar[int]
    WORKER_ID_FIELD_NUMBER: _ClassVar[int]
    WORKER_PID_FIELD_NUMBER: _ClassVar[int]
    WORKER_SLOT_FIELD_NUMBER: _ClassVar[int]
    WORKER_LOST_FIELD_NUMBER: _ClassVar[int]
    item_id: int
    batch_id: int
    workqueue: str
    state: ItemState
    output: bytes
    error: str
    target: str
    cpu_started: int
    cpu_finished: int
    fallback_level: FallbackLevel
    fallback_reason: str
    rebinds: int
    queued_at: _timestamp_pb2.Timestamp
    started_at: _timestamp_pb2.Timestamp
    finished_at: _timestamp_pb2.Timestamp
    topology_epoch: int
    handler: str
    decision_epoch: int
    worker_id: int
    worker_pid: int
    worker_slot: int
    worker_lost: int
    def __init__(self, item_id: _Optional[int] = ..., batch_id: _Optional[int] = ..., workqueue: _Optional[str] = ..., state: _Optional[_Union[ItemState, str]] = ..., output: _Optional[bytes] = ..., error: _Optional[str] = ..., target: _Optional[str] = ..., cpu_started: _Optional[int] = ..., cpu_finished: _Optional[int] = ..., fallback_level: _Optional[_Union[FallbackLevel, str]] = ..., fallback_reason: _Optional[str] = ..., rebinds: _Optional[int] = ..., queued_at: _Optional[_Union[datetime.datetime, _timestamp_pb2.Timestamp, _Mapping]] = ..., started_at: _Optional[_Union[datetime.datetime, _timestamp_pb2.Timestamp, _Mapping]] = ..., finished_at: _Optional[_Union[datetime.datetime, _timestamp_pb2.Timestamp, _Mapping]] = ..., topology_epoch: _Optional[int] = ..., handler: _Optional[str] = ..., decision_epoch: _Optional[int] = ..., worker_id: _Optional[int] = ..., worker_pid: _Optional[int] = ..., worker_slot: _Optional[int] = ..., worker_lost: _Optional[int] = ...) -> None: ...

class StateCounts(_message.Message):
    __slots__ = ("pending", "running", "ok", "failed", "cancelled", "expired", "rejected", "delayed")
    PENDING_FIELD_NUMBER: _ClassVar[int]
    RUNNING_FIELD_NUMBER: _ClassVar[int]
    OK_FIELD_NUMBER: _ClassVar[int]
    FAILED_FIELD_NUMBER: _ClassVar[int]
    CANCELLED_FIELD_NUMBER: _ClassVar[int]
    EXPIRED_FIELD_NUMBER: _ClassVar[int]
    REJECTED_FIELD_NUMBER: _ClassVar[int]
    DELAYED_FIELD_NUMBER: _ClassVar[int]
    pending: int
    running: int
    ok: int
    failed: int
    cancelled: int
    expired: int
    rejected: int
    delayed: int
    def __init__(self, pending: _Optional[int] = ..., running: _Optional[int] = ..., ok: _Optional[int] = ..., failed: _Optional[int] = ..., cancelled: _Optional[int] = ..., expired: _Optional[int] = ..., rejected: _Optional[int] = ..., delayed: _Optional[int] = ...) -> None: ...
