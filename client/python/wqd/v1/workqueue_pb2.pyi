from . import item_pb2 as _item_pb2
from google.protobuf.internal import containers as _containers
from google.protobuf.internal import enum_type_wrapper as _enum_type_wrapper
from google.protobuf import descriptor as _descriptor
from google.protobuf import message as _message
from collections.abc import Iterable as _Iterable, Mapping as _Mapping
from typing import ClassVar as _ClassVar, Optional as _Optional, Union as _Union

DESCRIPTOR: _descriptor.FileDescriptor

class Placement(int, metaclass=_enum_type_wrapper.EnumTypeWrapper):
    __slots__ = ()
    PLACEMENT_UNSPECIFIED: _ClassVar[Placement]
    PLACEMENT_FIRST: _ClassVar[Placement]
    PLACEMENT_SPREAD: _ClassVar[Placement]
    PLACEMENT_LEAST_LOADED: _ClassVar[Placement]
    PLACEMENT_IDLE: _ClassVar[Placement]

class FallbackPolicy(int, metaclass=_enum_type_wrapper.EnumTypeWrapper):
    __slots__ = ()
    FALLBACK_POLICY_UNSPECIFIED: _ClassVar[FallbackPolicy]
    FALLBACK_POLICY_WIDEN: _ClassVar[FallbackPolicy]
    FALLBACK_POLICY_WAIT: _ClassVar[FallbackPolicy]
    FALLBACK_POLICY_REJECT: _ClassVar[FallbackPolicy]

class WorkerLostPolicy(int, metaclass=_enum_type_wrapper.EnumTypeWrapper):
    __slots__ = ()
    WORKER_LOST_POLICY_UNSPECIFIED: _ClassVar[WorkerLostPolicy]
    WORKER_LOST_POLICY_FAIL: _ClassVar[WorkerLostPolicy]
    WORKER_LOST_POLICY_REQUEUE: _ClassVar[WorkerLostPolicy]

class UnservedPolicy(int, metaclass=_enum_type_wrapper.EnumTypeWrapper):
    __slots__ = ()
    UNSERVED_POLICY_UNSPECIFIED: _ClassVar[UnservedPolicy]
    UNSERVED_POLICY_WAIT: _ClassVar[UnservedPolicy]
    UNSERVED_POLICY_REJECT: _ClassVar[UnservedPolicy]

class ResultsMode(int, metaclass=_enum_type_wrapper.EnumTypeWrapper):
    __slots__ = ()
    RESULTS_MODE_UNSPECIFIED: _ClassVar[ResultsMode]
    RESULTS_MODE_FULL: _ClassVar[ResultsMode]
    RESULTS_MODE_SUMMARY: _ClassVar[ResultsMode]
    RESULTS_MODE_NONE: _ClassVar[ResultsMode]
PLACEMENT_UNSPECIFIED: Placement
PLACEMENT_FIRST: Placement
PLACEMENT_SPREAD: Placement
PLACEMENT_LEAST_LOADED: Placement
PLACEMENT_IDLE: Placement
FALLBACK_POLICY_UNSPECIFIED: FallbackPolicy
FALLBACK_POLICY_WIDEN: FallbackPolicy
FALLBACK_POLICY_WAIT: FallbackPolicy
FALLBACK_POLICY_REJECT: FallbackPolicy
WORKER_LOST_POLICY_UNSPECIFIED: WorkerLostPolicy
WORKER_LOST_POLICY_FAIL: WorkerLostPolicy
WORKER_LOST_POLICY_REQUEUE: WorkerLostPolicy
UNSERVED_POLICY_UNSPECIFIED: UnservedPolicy
UNSERVED_POLICY_WAIT: UnservedPolicy
UNSERVED_POLICY_REJECT: UnservedPolicy
RESULTS_MODE_UNSPECIFIED: ResultsMode
RESULTS_MODE_FULL: ResultsMode
RESULTS_MODE_SUMMARY: ResultsMode
RESULTS_MODE_NONE: ResultsMode

class WorkqueueAttrs(_message.Message):
    __slots__ = ("name", "max_active", "group_max_active", "ordered", "nice", "placement", "fallback", "max_queued", "on_worker_lost", "unserved", "results")
    NAME_FIELD_NUMBER: _ClassVar[int]
    MAX_ACTIVE_FIELD_NUMBER: _ClassVar[int]
    GROUP_MAX_ACTIVE_FIELD_NUMBER: _ClassVar[int]
    ORDERED_FIELD_NUMBER: _ClassVar[int]
    NICE_FIELD_NUMBER: _ClassVar[int]
    PLACEMENT_FIELD_NUMBER: _ClassVar[int]
    FALLBACK_FIELD_NUMBER: _ClassVar[int]
    MAX_QUEUED_FIELD_NUMBER: _ClassVar[int]
    ON_WORKER_LOST_FIELD_NUMBER: _ClassVar[int]
    UNSERVED_FIELD_NUMBER: _ClassVar[int]
    RESULTS_FIELD_NUMBER: _ClassVar[int]
    name: str
    max_active: int
    group_max_active: int
    ordered: bool
    nice: int
    placement: Placement
    fallback: FallbackPolicy
    max_queued: int
    on_worker_lost: WorkerLostPolicy
    unserved: UnservedPolicy
    results: ResultsMode
    def __init__(self, name: _Optional[str] = ..., max_active: _Optional[int] = ..., group_max_active: _Optional[int] = ..., ordered: _Optional[bool] = ..., nice: _Optional[int] = ..., placement: _Optional[_Union[Placement, str]] = ..., fallback: _Optional[_Union[FallbackPolicy, str]] = ..., max_queued: _Optional[int] = ..., on_worker_lost: _Optional[_Union[WorkerLostPolicy, str]] = ..., unserved: _Optional[_Union[UnservedPolicy, str]] = ..., results: _Optional[_Union[ResultsMode, str]] = ...) -> None: ...

class WorkqueueStats(_message.Message):
    __slots__ = ("pending", "running", "delayed", "totals", "draining")
    PENDING_FIELD_NUMBER: _ClassVar[int]
    RUNNING_FIELD_NUMBER: _ClassVar[int]
    DELAYED_FIELD_NUMBER: _ClassVar[int]
    TOTALS_FIELD_NUMBER: _ClassVar[int]
    DRAINING_FIELD_NUMBER: _ClassVar[int]
    pending: int
    running: int
    delayed: int
    totals: _item_pb2.StateCounts
    draining: bool
    def __init__(self, pending: _Optional[int] = ..., running: _Optional[int] = ..., delayed: _Optional[int] = ..., totals: _Optional[_Union[_item_pb2.StateCounts, _Mapping]] = ..., draining: _Optional[bool] = ...) -> None: ...

class WorkqueueInfo(_message.Message):
    __slots__ = ("attrs", "stats")
    ATTRS_FIELD_NUMBER: _ClassVar[int]
    STATS_FIELD_NUMBER: _ClassVar[int]
    attrs: WorkqueueAttrs
    stats: WorkqueueStats
    def __init__(self, attrs: _Optional[_Union[WorkqueueAttrs, _Mapping]] = ..., stats: _Optional[_Union[WorkqueueStats, _Mapping]] = ...) -> None: ...

class CreateWorkqueueRequest(_message.Message):
    __slots__ = ("attrs",)
    ATTRS_FIELD_NUMBER: _ClassVar[int]
    attrs: WorkqueueAttrs
    def __init__(self, attrs: _Optional[_Union[WorkqueueAttrs, _Mapping]] = ...) -> None: ...

class CreateWorkqueueResponse(_message.Message):
    __slots__ = ("attrs",)
    ATTRS_FIELD_NUMBER: _ClassVar[int]
    attrs: WorkqueueAttrs
    def __init__(self, attrs: _Optional[_Union[WorkqueueAttrs, _Mapping]] = ...) -> None: ...

class ListWorkqueuesRequest(_message.Message):
    __slots__ = ("name",)
    NAME_FIELD_NUMBER: _ClassVar[int]
    name: str
    def __init__(self, name: _Optional[str] = ...) -> None: ...

class ListWorkqueuesResponse(_message.Message):
    __slots__ = ("workqueues",)
    WORKQUEUES_FIELD_NUMBER: _ClassVar[int]
    workqueues: _containers.RepeatedCompositeFieldContainer[WorkqueueInfo]
    def __init__(self, workqueues: _Optional[_Iterable[_Union[WorkqueueInfo, _Mapping]]] = ...) -> None: ...

class UpdateWorkqueueRequest(_message.Message):
    __slots__ = ("name", "max_active", "group_max_active", "ordered", "nice", "placement", "fallback", "max_queued", "on_worker_lost", "unserved", "results")
    NAME_FIELD_NUMBER: _ClassVar[int]
    MAX_ACTIVE_FIELD_NUMBER: _ClassVar[int]
    GROUP_MAX_ACTIVE_FIELD_NUMBER: _ClassVar[int]
    ORDERED_FIELD_NUMBER: _ClassVar[int]
    NICE_FIELD_NUMBER: _ClassVar[int]
    PLACEMENT_FIELD_NUMBER: _ClassVar[int]
    FALLBACK_FIELD_NUMBER: _ClassVar[int]
    MAX_QUEUED_FIELD_NUMBER: _ClassVar[int]
    ON_WORKER_LOST_FIELD_NUMBER: _ClassVar[int]
    UNSERVED_FIELD_NUMBER: _ClassVar[int]
    RESULTS_FIELD_NUMBER: _ClassVar[int]
    name: str
    max_active: int
    group_max_active: int
    ordered: bool
    nice: int
    placement: Placement
    fallback: FallbackPolicy
    max_queued: int
    on_worker_lost: WorkerLostPolicy
    unserved: UnservedPolicy
    results: ResultsMode
    def __init__(self, name: _Optional[str] = ..., max_active: _Optional[int] = ..., group_max_active: _Optional[int] = ..., ordered: _Optional[bool] = ..., nice: _Optional[int] = ..., placement: _Optional[_Union[Placement, str]] = ..., fallback: _Optional[_Union[FallbackPolicy, str]] = ..., max_queued: _Optional[int] = ..., on_worker_lost: _Optional[_Union[WorkerLostPolicy, str]] = ..., unserved: _Optional[_Union[UnservedPolicy, str]] = ..., results: _Optional[_Union[ResultsMode, str]] = ...) -> None: ...

class UpdateWorkqueueResponse(_message.Message):
    __slots__ = ("attrs",)
    ATTRS_FIELD_NUMBER: _ClassVar[int]
    attrs: WorkqueueAttrs
    def __init__(self, attrs: _Optional[_Union[WorkqueueAttrs, _Mapping]] = ...) -> None: ...

class DeleteWorkqueueRequest(_message.Message):
    __slots__ = ("name", "cancel_pending")
    NAME_FIELD_NUMBER: _ClassVar[int]
    CANCEL_PENDING_FIELD_NUMBER: _ClassVar[int]
    name: str
    cancel_pending: bool
    def __init__(self, name: _Optional[str] = ..., cancel_pending: _Optional[bool] = ...) -> None: ...

class DeleteWorkqueueResponse(_message.Message):
    __slots__ = ("counts",)
    COUNTS_FIELD_NUMBER: _ClassVar[int]
    counts: _item_pb2.StateCounts
    def __init__(self, counts: _Optional[_Union[_item_pb2.StateCounts, _Mapping]] = ...) -> None: ...
