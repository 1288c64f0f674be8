import datetime

from google.protobuf import timestamp_pb2 as _timestamp_pb2
from google.protobuf.internal import containers as _containers
from google.protobuf.internal import enum_type_wrapper as _enum_type_wrapper
from google.protobuf import descriptor as _descriptor
from google.protobuf import message as _message
from collections.abc import Iterable as _Iterable, Mapping as _Mapping
from typing import ClassVar as _ClassVar, Optional as _Optional, Union as _Union

DESCRIPTOR: _descriptor.FileDescriptor

class GroupLevel(int, metaclass=_enum_type_wrapper.EnumTypeWrapper):
    __slots__ = ()
    GROUP_LEVEL_UNSPECIFIED: _ClassVar[GroupLevel]
    GROUP_LEVEL_CPU: _ClassVar[GroupLevel]
    GROUP_LEVEL_CORE: _ClassVar[GroupLevel]
    GROUP_LEVEL_SHARD: _ClassVar[GroupLevel]
    GROUP_LEVEL_CACHE: _ClassVar[GroupLevel]
    GROUP_LEVEL_NODE: _ClassVar[GroupLevel]
    GROUP_LEVEL_PACKAGE: _ClassVar[GroupLevel]
    GROUP_LEVEL_ALL: _ClassVar[GroupLevel]
    GROUP_LEVEL_LIST: _ClassVar[GroupLevel]
GROUP_LEVEL_UNSPECIFIED: GroupLevel
GROUP_LEVEL_CPU: GroupLevel
GROUP_LEVEL_CORE: GroupLevel
GROUP_LEVEL_SHARD: GroupLevel
GROUP_LEVEL_CACHE: GroupLevel
GROUP_LEVEL_NODE: GroupLevel
GROUP_LEVEL_PACKAGE: GroupLevel
GROUP_LEVEL_ALL: GroupLevel
GROUP_LEVEL_LIST: GroupLevel

class CpuState(_message.Message):
    __slots__ = ("cpu", "online", "allowed", "isolated", "live", "core", "cache", "node", "package", "busy", "shard")
    CPU_FIELD_NUMBER: _ClassVar[int]
    ONLINE_FIELD_NUMBER: _ClassVar[int]
    ALLOWED_FIELD_NUMBER: _ClassVar[int]
    ISOLATED_FIELD_NUMBER: _ClassVar[int]
    LIVE_FIELD_NUMBER: _ClassVar[int]
    CORE_FIELD_NUMBER: _ClassVar[int]
    CACHE_FIELD_NUMBER: _ClassVar[int]
    NODE_FIELD_NUMBER: _ClassVar[int]
    PACKAGE_FIELD_NUMBER: _ClassVar[int]
    BUSY_FIELD_NUMBER: _ClassVar[int]
    SHARD_FIELD_NUMBER: _ClassVar[int]
    cpu: int
    online: bool
    allowed: bool
    isolated: bool
    live: bool
    core: int
    cache: int
    node: int
    package: int
    busy: float
    shard: int
    def __init__(self, cpu: _Optional[int] = ..., online: _Optional[bool] = ..., allowed: _Optional[bool] = ..., isolated: _Optional[bool] = ..., live: _Optional[bool] = ..., core: _Optional[int] = ..., cache: _Optional[int] = ..., node: _Optional[int] = ..., package: _Optional[int] = ..., busy: _Optional[float] = ..., shard: _Optional[int] = ...) -> None: ...

class GroupInfo(_message.Message):
    __slots__ = ("level", "target", "members", "live_members")
    LEVEL_FIELD_NUMBER: _ClassVar[int]
    TARGET_FIELD_NUMBER: _ClassVar[int]
    MEMBERS_FIELD_NUMBER: _ClassVar[int]
    LIVE_MEMBERS_FIELD_NUMBER: _ClassVar[int]
    level: GroupLevel
    target: str
    members: str
    live_members: str
    def __init__(self, level: _Optional[_Union[GroupLevel, str]] = ..., target: _Optional[str] = ..., members: _Optional[str] = ..., live_members: _Optional[str] = ...) -> None: ...

class TopologySnapshot(_message.Message):
    __slots__ = ("epoch", "cpus", "groups", "possible", "online", "allowed", "isolated", "live", "allowed_source", "taken_at")
    EPOCH_FIELD_NUMBER: _ClassVar[int]
    CPUS_FIELD_NUMBER: _ClassVar[int]
    GROUPS_FIELD_NUMBER: _ClassVar[int]
    POSSIBLE_FIELD_NUMBER: _ClassVar[int]
    ONLINE_FIELD_NUMBER: _ClassVar[int]
    ALLOWED_FIELD_NUMBER: _ClassVar[int]
    ISOLATED_FIELD_NUMBER: _ClassVar[int]
    LIVE_FIELD_NUMBER: _ClassVar[int]
    ALLOWED_SOURCE_FIELD_NUMBER: _ClassVar[int]
    TAKEN_AT_FIELD_NUMBER: _ClassVar[int]
    epoch: int
    cpus: _containers.RepeatedCompositeFieldContainer[CpuState]
    groups: _containers.RepeatedCompositeFieldContainer[GroupInfo]
    possible: str
    online: str
    allowed: str
    isolated: str
    live: str
    allowed_source: str
    taken_at: _timestamp_pb2.Timestamp
    def __init__(self, epoch: _Optional[int] = ..., cpus: _Optional[_Iterable[_Union[CpuState, _Mapping]]] = ..., groups: _Optional[_Iterable[_Union[GroupInfo, _Mapping]]] = ..., possible: _Optional[str] = ..., online: _Optional[str] = ..., allowed: _Optional[str] = ..., isolated: _Optional[str] = ..., live: _Optional[str] = ..., allowed_source: _Optional[str] = ..., taken_at: _Optional[_Union[datetime.datetime, _timestamp_pb2.Timestamp, _Mapping]] = ...) -> None: ...

class GetTopologyRequest(_message.Message):
    __slots__ = ()
    def __init__(self) -> None: ...

class GetTopologyResponse(_message.Message):
    __slots__ = ("snapshot",)
    SNAPSHOT_FIELD_NUMBER: _ClassVar[int]
    snapshot: TopologySnapshot
    def __init__(self, snapshot: _Optional[_Union[TopologySnapshot, _Mapping]] = ...) -> None: ...

class WatchTopologyRequest(_message.Message):
    __slots__ = ()
    def __init__(self) -> None: ...

class WatchTopologyResponse(_message.Message):
    __slots__ = ("snapshot",)
    SNAPSHOT_FIELD_NUMBER: _ClassVar[int]
    snapshot: TopologySnapshot
    def __init__(self, snapshot: _Optional[_Union[TopologySnapshot, _Mapping]] = ...) -> None: ...
