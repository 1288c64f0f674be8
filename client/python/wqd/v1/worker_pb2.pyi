from google.protobuf.internal import containers as _containers
from google.protobuf import descriptor as _descriptor
from google.protobuf import message as _message
from collections.abc import Iterable as _Iterable, Mapping as _Mapping
from typing import ClassVar as _ClassVar, Optional as _Optional, Union as _Union

DESCRIPTOR: _descriptor.FileDescriptor

class WorkerMessage(_message.Message):
    __slots__ = ("hello", "open_slot", "credit", "done", "hand_back", "close_slot")
    HELLO_FIELD_NUMBER: _ClassVar[int]
    OPEN_SLOT_FIELD_NUMBER: _ClassVar[int]
    CREDIT_FIELD_NUMBER: _ClassVar[int]
    DONE_FIELD_NUMBER: _ClassVar[int]
    HAND_BACK_FIELD_NUMBER: _ClassVar[int]
    CLOSE_SLOT_FIELD_NUMBER: _ClassVar[int]
    hello: Hello
    open_slot: OpenSlot
    credit: Credit
    done: Done
    hand_back: HandBack
    close_slot: CloseSlot
    def __init__(self, hello: _Optional[_Union[Hello, _Mapping]] = ..., open_slot: _Optional[_Union[OpenSlot, _Mapping]] = ..., credit: _Optional[_Union[Credit, _Mapping]] = ..., done: _Optional[_Union[Done, _Mapping]] = ..., hand_back: _Optional[_Union[HandBack, _Mapping]] = ..., close_slot: _Optional[_Union[CloseSlot, _Mapping]] = ...) -> None: ...

class DaemonMessage(_message.Message):
    __slots__ = ("welcome", "work", "cancel", "slot_closed")
    WELCOME_FIELD_NUMBER: _ClassVar[int]
    WORK_FIELD_NUMBER: _ClassVar[int]
    CANCEL_FIELD_NUMBER: _ClassVar[int]
    SLOT_CLOSED_FIELD_NUMBER: _ClassVar[int]
    welcome: Welcome
    work: Work
    cancel: Cancel
    slot_closed: SlotClosed
    def __init__(self, welcome: _Optional[_Union[Welcome, _Mapping]] = ..., work: _Optional[_Union[Work, _Mapping]] = ..., cancel: _Optional[_Union[Cancel, _Mapping]] = ..., slot_closed: _Optional[_Union[SlotClosed, _Mapping]] = ...) -> None: ...

class Hello(_message.Message):
    __slots__ = ("handlers", "pid", "name")
    HANDLERS_FIELD_NUMBER: _ClassVar[int]
    PID_FIELD_NUMBER: _ClassVar[int]
    NAME_FIELD_NUMBER: _ClassVar[int]
    handlers: _containers.RepeatedScalarFieldContainer[str]
    pid: int
    name: str
    def __init__(self, handlers: _Optional[_Iterable[str]] = ..., pid: _Optional[int] = ..., name: _Optional[str] = ...) -> None: ...

class Welcome(_message.Message):
    __slots__ = ("worker_id", "pinning", "epoch", "max_credits", "max_output_bytes")
    WORKER_ID_FIELD_NUMBER: _ClassVar[int]
    PINNING_FIELD_NUMBER: _ClassVar[int]
    EPOCH_FIELD_NUMBER: _ClassVar[int]
    MAX_CREDITS_FIELD_NUMBER: _ClassVar[int]
    MAX_OUTPUT_BYTES_FIELD_NUMBER: _ClassVar[int]
    worker_id: int
    pinning: bool
    epoch: int
    max_credits: int
    max_output_bytes: int
    def __init__(self, worker_id: _Optional[int] = ..., pinning: _Optional[bool] = ..., epoch: _Optional[int] = ..., max_credits: _Optional[int] = ..., max_output_bytes: _Optional[int] = ...) -> None: ...

class OpenSlot(_message.Message):
    __slots__ = ("slot", "cpu")
    SLOT_FIELD_NUMBER: _ClassVar[int]
    CPU_FIELD_NUMBER: _ClassVar[int]
    slot: int
    cpu: int
    def __init__(self, slot: _Optional[int] = ..., cpu: _Optional[int] = ...) -> None: ...

class Credit(_message.Message):
    __slots__ = ("slot", "credits")
    SLOT_FIELD_NUMBER: _ClassVar[int]
    CREDITS_FIELD_NUMBER: _ClassVar[int]
    slot: int
    credits: int
    def __init__(self, slot: _Optional[int] = ..., credits: _Optional[int] = ...) -> None: ...

class Work(_message.Message):
    __slots__ = ("item_id", "slot", "cpu", "handler", "args", "payload", "epoch", "batch_id", "workqueue", "rebinds", "attempt")
    class ArgsEntry(_message.Message):
        __slots__ = ("key", "value")
        KEY_FIELD_NUMBER: _ClassVar[int]
        VALUE_FIELD_NUMBER: _ClassVar[int]
        key: str
        value: str
        def __init__(self, key: _Optional[str] = ..., value: _Optional[str] = ...) -> None: ...
    ITEM_ID_FIELD_NUMBER: _ClassVar[int]
    SLOT_FIELD_NUMBER: _ClassVar[int]
    CPU_FIELD_NUMBER: _ClassVar[int]
    HANDLER_FIELD_NUMBER: _ClassVar[int]
    ARGS_FIELD_NUMBER: _ClassVar[int]
    PAYLOAD_FIELD_NUMBER: _ClassVar[int]
    EPOCH_FIELD_NUMBER: _ClassVar[int]
    BATCH_ID_FIELD_NUMBER: _ClassVar[int]
    WORKQUEUE_FIELD_NUMBER: _ClassVar[int]
    REBINDS_FIELD_NUMBER: _ClassVar[int]
    ATTEMPT_FIELD_NUMBER: _ClassVar[int]
    item_id: int
    slot: int
    cpu: int
    handler: str
    args: _containers.ScalarMap[str, str]
    payload: bytes
    epoch: int
    batch_id: int
    workqueue: str
    rebinds: int
    attempt: int
    def __init__(self, item_id: _Optional[int] = ..., slot: _Optional[int] = ..., cpu: _Optional[int] = ..., handler: _Optional[str] = ..., args: _Optional[_Mapping[str, str]] = ..., payload: _Optional[bytes] = ..., epoch: _Optional[int] = ..., batch_id: _Optional[int] = ..., workqueue: _Optional[str] = ..., rebinds: _Optional[int] = ..., attempt: _Optional[int] = ...) -> None: ...

class Done(_message.Message):
    __slots__ = ("item_id", "ok", "error", "cancelled", "cpu_finished", "credits")
    ITEM_ID_FIELD_NUMBER: _ClassVar[int]
    OK_FIELD_NUMBER: _ClassVar[int]
    ERROR_FIELD_NUMBER: _ClassVar[int]
    CANCELLED_FIELD_NUMBER: _ClassVar[int]
    CPU_FINISHED_FIELD_NUMBER: _ClassVar[int]
    CREDITS_FIELD_NUMBER: _ClassVar[int]
    item_id: int
    ok: bytes
    error: str
    cancelled: bool
    cpu_finished: int
    credits: int
    def __init__(self, item_id: _Optional[int] = ..., ok: _Optional[bytes] = ..., error: _Optional[str] = ..., cancelled: _Optional[bool] = ..., cpu_finished: _Optional[int] = ..., credits: _Optional[int] = ...) -> None: ...

class HandBack(_message.Message):
    __slots__ = ("item_id", "reason", "credits")
    ITEM_ID_FIELD_NUMBER: _ClassVar[int]
    REASON_FIELD_NUMBER: _ClassVar[int]
    CREDITS_FIELD_NUMBER: _ClassVar[int]
    item_id: int
    reason: str
    credits: int
    def __init__(self, item_id: _Optional[int] = ..., reason: _Optional[str] = ..., credits: _Optional[int] = ...) -> None: ...

class CloseSlot(_message.Message):
    __slots__ = ("slot",)
    SLOT_FIELD_NUMBER: _ClassVar[int]
    slot: int
    def __init__(self, slot: _Optional[int] = ...) -> None: ...

class SlotClosed(_message.Message):
    __slots__ = ("slot",)
    SLOT_FIELD_NUMBER: _ClassVar[int]
    slot: int
    def __init__(self, slot: _Optional[int] = ...) -> None: ...

class Cancel(_message.Message):
    __slots__ = ("item_id",)
    ITEM_ID_FIELD_NUMBER: _ClassVar[int]
    item_id: int
    def __init__(self, item_id: _Optional[int] = ...) -> None: ...

class ListWorkersRequest(_message.Message):
    __slots__ = ()
    def __init__(self) -> None: ...

class ListWorkersResponse(_message.Message):
    __slots__ = ("workers", "workers_lost", "items_lost")
    WORKERS_FIELD_NUMBER: _ClassVar[int]
    WORKERS_LOST_FIELD_NUMBER: _ClassVar[int]
    ITEMS_LOST_FIELD_NUMBER: _ClassVar[int]
    workers: _containers.RepeatedCompositeFieldContainer[WorkerInfo]
    workers_lost: int
    items_lost: int
    def __init__(self, workers: _Optional[_Iterable[_Union[WorkerInfo, _Mapping]]] = ..., workers_lost: _Optional[int] = ..., items_lost: _Optional[int] = ...) -> None: ...

class WorkerInfo(_message.Message):
    __slots__ = ("worker_id", "pid", "uid", "gid", "cert_names", "name", "handlers", "slots", "attached_seconds", "done", "handed_back")
    WORKER_ID_FIELD_NUMBER: _ClassVar[int]
    PID_FIELD_NUMBER: _ClassVar[int]
    UID_FIELD_NUMBER: _ClassVar[int]
    GID_FIELD_NUMBER: _ClassVar[int]
    CERT_NAMES_FIELD_NUMBER: _ClassVar[int]
    NAME_FIELD_NUMBER: _ClassVar[int]
    HANDLERS_FIELD_NUMBER: _ClassVar[int]
    SLOTS_FIELD_NUMBER: _ClassVar[int]
    ATTACHED_SECONDS_FIELD_NUMBER: _ClassVar[int]
    DONE_FIELD_NUMBER: _ClassVar[int]
    HANDED_BACK_FIELD_NUMBER: _ClassVar[int]
    worker_id: int
    pid: int
    uid: int
    gid: int
    cert_names: _containers.RepeatedScalarFieldContainer[str]
    name: str
    handlers: _containers.RepeatedScalarFieldContainer[str]
    slots: _containers.RepeatedCompositeFieldContainer[SlotInfo]
    attached_seconds: float
    done: int
    handed_back: int
    def __init__(self, worker_id: _Optional[int] = ..., pid: _Optional[int] = ..., uid: _Optional[int] = ..., gid: _Optional[int] = ..., cert_names: _Optional[_Iterable[str]] = ..., name: _Optional[str] = ..., handlers: _Optional[_Iterable[str]] = ..., slots: _Optional[_Iterable[_Union[SlotInfo, _Mapping]]] = ..., attached_seconds: _Optional[float] = ..., done: _Optional[int] = ..., handed_back: _Optional[int] = ...) -> None: ...

class SlotInfo(_message.Message):
    __slots__ = ("slot", "cpu", "credits", "in_flight", "done", "closed", "live")
    SLOT_FIELD_NUMBER: _ClassVar[int]
    CPU_FIELD_NUMBER: _ClassVar[int]
    CREDITS_FIELD_NUMBER: _ClassVar[int]
    IN_FLIGHT_FIELD_NUMBER: _ClassVar[int]
    DONE_FIELD_NUMBER: _ClassVar[int]
    CLOSED_FIELD_NUMBER: _ClassVar[int]
    LIVE_FIELD_NUMBER: _ClassVar[int]
    slot: int
    cpu: int
    credits: int
    in_flight: int
    done: int
    closed: bool
    live: bool
    def __init__(self, slot: _Optional[int] = ..., cpu: _Optional[int] = ..., credits: _Optional[int] = ..., in_flight: _Optional[int] = ..., done: _Optional[int] = ..., closed: _Optional[bool] = ..., live: _Optional[bool] = ...) -> None: ...
