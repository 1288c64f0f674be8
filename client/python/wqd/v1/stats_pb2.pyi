import datetime

from google.protobuf import duration_pb2 as _duration_pb2
from google.protobuf import timestamp_pb2 as _timestamp_pb2
from . import item_pb2 as _item_pb2
from google.protobuf.internal import containers as _containers
from google.protobuf import descriptor as _descriptor
from google.protobuf import message as _message
from collections.abc import Iterable as _Iterable, Mapping as _Mapping
from typing import ClassVar as _ClassVar, Optional as _Optional, Union as _Union

DESCRIPTOR: _descriptor.FileDescriptor

class GetStatsRequest(_message.Message):
    __slots__ = ()
    def __init__(self) -> None: ...

class GetStatsResponse(_message.Message):
    __slots__ = ("version", "started_at", "uptime", "topology_epoch", "items", "batches_accepted", "batches_refused", "deduplicated", "rebinds", "fallbacks", "workqueues", "handlers", "results_retained", "flushes_active", "watchdog_lockups", "cpu_hogs", "workers")
    VERSION_FIELD_NUMBER: _ClassVar[int]
    STARTED_AT_FIELD_NUMBER: _ClassVar[int]
    UPTIME_FIELD_NUMBER: _ClassVar[int]
    TOPOLOGY_EPOCH_FIELD_NUMBER: _ClassVar[int]
    ITEMS_FIELD_NUMBER: _ClassVar[int]
    BATCHES_ACCEPTED_FIELD_NUMBER: _ClassVar[int]
    BATCHES_REFUSED_FIELD_NUMBER: _ClassVar[int]
    DEDUPLICATED_FIELD_NUMBER: _ClassVar[int]
    REBINDS_FIELD_NUMBER: _ClassVar[int]
    FALLBACKS_FIELD_NUMBER: _ClassVar[int]
    WORKQUEUES_FIELD_NUMBER: _ClassVar[int]
    HANDLERS_FIELD_NUMBER: _ClassVar[int]
    RESULTS_RETAINED_FIELD_NUMBER: _ClassVar[int]
    FLUSHES_ACTIVE_FIELD_NUMBER: _ClassVar[int]
    WATCHDOG_LOCKUPS_FIELD_NUMBER: _ClassVar[int]
    CPU_HOGS_FIELD_NUMBER: _ClassVar[int]
    WORKERS_FIELD_NUMBER: _ClassVar[int]
    version: str
    started_at: _timestamp_pb2.Timestamp
    uptime: _duration_pb2.Duration
    topology_epoch: int
    items: _item_pb2.StateCounts
    batches_accepted: int
    batches_refused: int
    deduplicated: int
    rebinds: int
    fallbacks: int
    workqueues: int
    handlers: _containers.RepeatedScalarFieldContainer[str]
    results_retained: int
    flushes_active: int
    watchdog_lockups: int
    cpu_hogs: int
    workers: int
    def __init__(self, version: _Optional[str] = ..., started_at: _Optional[_Union[datetime.datetime, _timestamp_pb2.Timestamp, _Mapping]] = ..., uptime: _Optional[_Union[datetime.timedelta, _duration_pb2.Duration, _Mapping]] = ..., topology_epoch: _Optional[int] = ..., items: _Optional[_Union[_item_pb2.StateCounts, _Mapping]] = ..., batches_accepted: _Optional[int] = ..., batches_refused: _Optional[int] = ..., deduplicated: _Optional[int] = ..., rebinds: _Optional[int] = ..., fallbacks: _Optional[int] = ..., workqueues: _Optional[int] = ..., handlers: _Optional[_Iterable[str]] = ..., results_retained: _Optional[int] = ..., flushes_active: _Optional[int] = ..., watchdog_lockups: _Optional[int] = ..., cpu_hogs: _Optional[int] = ..., workers: _Optional[int] = ...) -> None: ...
