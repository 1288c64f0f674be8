import datetime

from google.protobuf import duration_pb2 as _duration_pb2
from . import item_pb2 as _item_pb2
from google.protobuf.internal import containers as _containers
from google.protobuf.internal import enum_type_wrapper as _enum_type_wrapper
from google.protobuf import descriptor as _descriptor
from google.protobuf import message as _message
from collections.abc import Iterable as _Iterable, Mapping as _Mapping
from typing import ClassVar as _ClassVar, Optional as _Optional, Union as _Union

DESCRIPTOR: _descriptor.FileDescriptor

class ReceiptsMode(int, metaclass=_enum_type_wrapper.EnumTypeWrapper):
    __slots__ = ()
    RECEIPTS_MODE_UNSPECIFIED: _ClassVar[ReceiptsMode]
    RECEIPTS_MODE_EACH: _ClassVar[ReceiptsMode]
    RECEIPTS_MODE_NONE: _ClassVar[ReceiptsMode]

class CancelOutcome(int, metaclass=_enum_type_wrapper.EnumTypeWrapper):
    __slots__ = ()
    CANCEL_OUTCOME_UNSPECIFIED: _ClassVar[CancelOutcome]
    CANCEL_OUTCOME_CANCELLED_PENDING: _ClassVar[CancelOutcome]
    CANCEL_OUTCOME_WAITED_RUNNING: _ClassVar[CancelOutcome]
    CANCEL_OUTCOME_ALREADY_TERMINAL: _ClassVar[CancelOutcome]
    CANCEL_OUTCOME_UNKNOWN: _ClassVar[CancelOutcome]

class LookupStatus(int, metaclass=_enum_type_wrapper.EnumTypeWrapper):
    __slots__ = ()
    LOOKUP_STATUS_UNSPECIFIED: _ClassVar[LookupStatus]
    LOOKUP_STATUS_FOUND: _ClassVar[LookupStatus]
    LOOKUP_STATUS_UNKNOWN: _ClassVar[LookupStatus]
    LOOKUP_STATUS_FORGOTTEN: _ClassVar[LookupStatus]
RECEIPTS_MODE_UNSPECIFIED: ReceiptsMode
RECEIPTS_MODE_EACH: ReceiptsMode
RECEIPTS_MODE_NONE: ReceiptsMode
CANCEL_OUTCOME_UNSPECIFIED: CancelOutcome
CANCEL_OUTCOME_CANCELLED_PENDING: CancelOutcome
CANCEL_OUTCOME_WAITED_RUNNING: CancelOutcome
CANCEL_OUTCOME_ALREADY_TERMINAL: CancelOutcome
CANCEL_OUTCOME_UNKNOWN: CancelOutcome
LOOKUP_STATUS_UNSPECIFIED: LookupStatus
LOOKUP_STATUS_FOUND: LookupStatus
LOOKUP_STATUS_UNKNOWN: LookupStatus
LOOKUP_STATUS_FORGOTTEN: LookupStatus

class SubmitRequest(_message.Message):
    __slots__ = ("workqueue", "items", "wait", "receipts")
    WORKQUEUE_FIELD_NUMBER: _ClassVar[int]
    ITEMS_FIELD_NUMBER: _ClassVar[int]
    WAIT_FIELD_NUMBER: _ClassVar[int]
    RECEIPTS_FIELD_NUMBER: _ClassVar[int]
    workqueue: str
    items: _containers.RepeatedCompositeFieldContainer[_item_pb2.WorkItem]
    wait: bool
    receipts: ReceiptsMode
    def __init__(self, workqueue: _Optional[str] = ..., items: _Optional[_Iterable[_Union[_item_pb2.WorkItem, _Mapping]]] = ..., wait: _Optional[bool] = ..., receipts: _Optional[_Union[ReceiptsMode, str]] = ...) -> None: ...

class ItemReceipt(_message.Message):
    __slots__ = ("item_id", "queued", "duplicate_of", "target", "source_index")
    ITEM_ID_FIELD_NUMBER: _ClassVar[int]
    QUEUED_FIELD_NUMBER: _ClassVar[int]
    DUPLICATE_OF_FIELD_NUMBER: _ClassVar[int]
    TARGET_FIELD_NUMBER: _ClassVar[int]
    SOURCE_INDEX_FIELD_NUMBER: _ClassVar[int]
    item_id: int
    queued: bool
    duplicate_of: int
    target: str
    source_index: int
    def __init__(self, item_id: _Optional[int] = ..., queued: _Optional[bool] = ..., duplicate_of: _Optional[int] = ..., target: _Optional[str] = ..., source_index: _Optional[int] = ...) -> None: ...

class SubmitResponse(_message.Message):
    __slots__ = ("batch_id", "items", "results", "counts", "first_item_id", "item_count", "queued_count", "duplicates")
    BATCH_ID_FIELD_NUMBER: _ClassVar[int]
    ITEMS_FIELD_NUMBER: _ClassVar[int]
    RESULTS_FIELD_NUMBER: _ClassVar[int]
    COUNTS_FIELD_NUMBER: _ClassVar[int]
    FIRST_ITEM_ID_FIELD_NUMBER: _ClassVar[int]
    ITEM_COUNT_FIELD_NUMBER: _ClassVar[int]
    QUEUED_COUNT_FIELD_NUMBER: _ClassVar[int]
    DUPLICATES_FIELD_NUMBER: _ClassVar[int]
    batch_id: int
    items: _containers.RepeatedCompositeFieldContainer[ItemReceipt]
    results: _containers.RepeatedCompositeFieldContainer[_item_pb2.ItemResult]
    counts: _item_pb2.StateCounts
    first_item_id: int
    item_count: int
    queued_count: int
    duplicates: _containers.RepeatedCompositeFieldContainer[DuplicateItem]
    def __init__(self, batch_id: _Optional[int] = ..., items: _Optional[_Iterable[_Union[ItemReceipt, _Mapping]]] = ..., results: _Optional[_Iterable[_Union[_item_pb2.ItemResult, _Mapping]]] = ..., counts: _Optional[_Union[_item_pb2.StateCounts, _Mapping]] = ..., first_item_id: _Optional[int] = ..., item_count: _Optional[int] = ..., queued_count: _Optional[int] = ..., duplicates: _Optional[_Iterable[_Union[DuplicateItem, _Mapping]]] = ...) -> None: ...

class SessionRequest(_message.Message):
    __slots__ = ("tag", "submit", "wait_timeout")
    TAG_FIELD_NUMBER: _ClassVar[int]
    SUBMIT_FIELD_NUMBER: _ClassVar[int]
    WAIT_TIMEOUT_FIELD_NUMBER: _ClassVar[int]
    tag: int
    submit: SubmitRequest
    wait_timeout: _duration_pb2.Duration
    def __init__(self, tag: _Optional[int] = ..., submit: _Optional[_Union[SubmitRequest, _Mapping]] = ..., wait_timeout: _Optional[_Union[datetime.timedelta, _duration_pb2.Duration, _Mapping]] = ...) -> None: ...

class SessionError(_message.Message):
    __slots__ = ("code", "message", "batch_id")
    CODE_FIELD_NUMBER: _ClassVar[int]
    MESSAGE_FIELD_NUMBER: _ClassVar[int]
    BATCH_ID_FIELD_NUMBER: _ClassVar[int]
    code: int
    message: str
    batch_id: int
    def __init__(self, code: _Optional[int] = ..., message: _Optional[str] = ..., batch_id: _Optional[int] = ...) -> None: ...

class SessionResponse(_message.Message):
    __slots__ = ("tag", "submitted", "error")
    TAG_FIELD_NUMBER: _ClassVar[int]
    SUBMITTED_FIELD_NUMBER: _ClassVar[int]
    ERROR_FIELD_NUMBER: _ClassVar[int]
    tag: int
    submitted: SubmitResponse
    error: SessionError
    def __init__(self, tag: _Optional[int] = ..., submitted: _Optional[_Union[SubmitResponse, _Mapping]] = ..., error: _Optional[_Union[SessionError, _Mapping]] = ...) -> None: ...

class SubmitOptions(_message.Message):
    __slots__ = ("workqueue",)
    WORKQUEUE_FIELD_NUMBER: _ClassVar[int]
    workqueue: str
    def __init__(self, workqueue: _Optional[str] = ...) -> None: ...

class SubmitStreamRequest(_message.Message):
    __slots__ = ("options", "items", "commit")
    OPTIONS_FIELD_NUMBER: _ClassVar[int]
    ITEMS_FIELD_NUMBER: _ClassVar[int]
    COMMIT_FIELD_NUMBER: _ClassVar[int]
    options: SubmitOptions
    items: _containers.RepeatedCompositeFieldContainer[_item_pb2.WorkItem]
    commit: bool
    def __init__(self, options: _Optional[_Union[SubmitOptions, _Mapping]] = ..., items: _Optional[_Iterable[_Union[_item_pb2.WorkItem, _Mapping]]] = ..., commit: _Optional[bool] = ...) -> None: ...

class DuplicateItem(_message.Message):
    __slots__ = ("index", "duplicate_of")
    INDEX_FIELD_NUMBER: _ClassVar[int]
    DUPLICATE_OF_FIELD_NUMBER: _ClassVar[int]
    index: int
    duplicate_of: int
    def __init__(self, index: _Optional[int] = ..., duplicate_of: _Optional[int] = ...) -> None: ...

class SubmitStreamResponse(_message.Message):
    __slots__ = ("batch_id", "first_item_id", "item_count", "queued_count", "duplicates")
    BATCH_ID_FIELD_NUMBER: _ClassVar[int]
    FIRST_ITEM_ID_FIELD_NUMBER: _ClassVar[int]
    ITEM_COUNT_FIELD_NUMBER: _ClassVar[int]
    QUEUED_COUNT_FIELD_NUMBER: _ClassVar[int]
    DUPLICATES_FIELD_NUMBER: _ClassVar[int]
    batch_id: int
    first_item_id: int
    item_count: int
    queued_count: int
    duplicates: _containers.RepeatedCompositeFieldContainer[DuplicateItem]
    def __init__(self, batch_id: _Optional[int] = ..., first_item_id: _Optional[int] = ..., item_count: _Optional[int] = ..., queued_count: _Optional[int] = ..., duplicates: _Optional[_Iterable[_Union[DuplicateItem, _Mapping]]] = ...) -> None: ...

class ItemIds(_message.Message):
    __slots__ = ("ids",)
    IDS_FIELD_NUMBER: _ClassVar[int]
    ids: _containers.RepeatedScalarFieldContainer[int]
    def __init__(self, ids: _Optional[_Iterable[int]] = ...) -> None: ...

class FlushRequest(_message.Message):
    __slots__ = ("items", "batch_id", "workqueue", "summary_only", "include_delayed")
    ITEMS_FIELD_NUMBER: _ClassVar[int]
    BATCH_ID_FIELD_NUMBER: _ClassVar[int]
    WORKQUEUE_FIELD_NUMBER: _ClassVar[int]
    SUMMARY_ONLY_FIELD_NUMBER: _ClassVar[int]
    INCLUDE_DELAYED_FIELD_NUMBER: _ClassVar[int]
    items: ItemIds
    batch_id: int
    workqueue: str
    summary_only: bool
    include_delayed: bool
    def __init__(self, items: _Optional[_Union[ItemIds, _Mapping]] = ..., batch_id: _Optional[int] = ..., workqueue: _Optional[str] = ..., summary_only: _Optional[bool] = ..., include_delayed: _Optional[bool] = ...) -> None: ...

class ItemResults(_message.Message):
    __slots__ = ("results",)
    RESULTS_FIELD_NUMBER: _ClassVar[int]
    results: _containers.RepeatedCompositeFieldContainer[_item_pb2.ItemResult]
    def __init__(self, results: _Optional[_Iterable[_Union[_item_pb2.ItemResult, _Mapping]]] = ...) -> None: ...

class FlushSummary(_message.Message):
    __slots__ = ("counts", "items_covered", "waited", "unknown_item_ids", "delayed_not_covered")
    COUNTS_FIELD_NUMBER: _ClassVar[int]
    ITEMS_COVERED_FIELD_NUMBER: _ClassVar[int]
    WAITED_FIELD_NUMBER: _ClassVar[int]
    UNKNOWN_ITEM_IDS_FIELD_NUMBER: _ClassVar[int]
    DELAYED_NOT_COVERED_FIELD_NUMBER: _ClassVar[int]
    counts: _item_pb2.StateCounts
    items_covered: int
    waited: _duration_pb2.Duration
    unknown_item_ids: _containers.RepeatedScalarFieldContainer[int]
    delayed_not_covered: int
    def __init__(self, counts: _Optional[_Union[_item_pb2.StateCounts, _Mapping]] = ..., items_covered: _Optional[int] = ..., waited: _Optional[_Union[datetime.timedelta, _duration_pb2.Duration, _Mapping]] = ..., unknown_item_ids: _Optional[_Iterable[int]] = ..., delayed_not_covered: _Optional[int] = ...) -> None: ...

class FlushResponse(_message.Message):
    __slots__ = ("results", "summary")
    RESULTS_FIELD_NUMBER: _ClassVar[int]
    SUMMARY_FIELD_NUMBER: _ClassVar[int]
    results: ItemResults
    summary: FlushSummary
    def __init__(self, results: _Optional[_Union[ItemResults, _Mapping]] = ..., summary: _Optional[_Union[FlushSummary, _Mapping]] = ...) -> None: ...

class CancelRequest(_message.Message):
    __slots__ = ("items", "batch_id")
    ITEMS_FIELD_NUMBER: _ClassVar[int]
    BATCH_ID_FIELD_NUMBER: _ClassVar[int]
    items: ItemIds
    batch_id: int
    def __init__(self, items: _Optional[_Union[ItemIds, _Mapping]] = ..., batch_id: _Optional[int] = ...) -> None: ...

class CancelledItem(_message.Message):
    __slots__ = ("item_id", "outcome", "state")
    ITEM_ID_FIELD_NUMBER: _ClassVar[int]
    OUTCOME_FIELD_NUMBER: _ClassVar[int]
    STATE_FIELD_NUMBER: _ClassVar[int]
    item_id: int
    outcome: CancelOutcome
    state: _item_pb2.ItemState
    def __init__(self, item_id: _Optional[int] = ..., outcome: _Optional[_Union[CancelOutcome, str]] = ..., state: _Optional[_Union[_item_pb2.ItemState, str]] = ...) -> None: ...

class CancelResponse(_message.Message):
    __slots__ = ("items",)
    ITEMS_FIELD_NUMBER: _ClassVar[int]
    items: _containers.RepeatedCompositeFieldContainer[CancelledItem]
    def __init__(self, items: _Optional[_Iterable[_Union[CancelledItem, _Mapping]]] = ...) -> None: ...

class DrainRequest(_message.Message):
    __slots__ = ("workqueue",)
    WORKQUEUE_FIELD_NUMBER: _ClassVar[int]
    workqueue: str
    def __init__(self, workqueue: _Optional[str] = ...) -> None: ...

class DrainResponse(_message.Message):
    __slots__ = ("counts", "waited")
    COUNTS_FIELD_NUMBER: _ClassVar[int]
    WAITED_FIELD_NUMBER: _ClassVar[int]
    counts: _item_pb2.StateCounts
    waited: _duration_pb2.Duration
    def __init__(self, counts: _Optional[_Union[_item_pb2.StateCounts, _Mapping]] = ..., waited: _Optional[_Union[datetime.timedelta, _duration_pb2.Duration, _Mapping]] = ...) -> None: ...

class GetResultsRequest(_message.Message):
    __slots__ = ("item_ids",)
    ITEM_IDS_FIELD_NUMBER: _ClassVar[int]
    item_ids: _containers.RepeatedScalarFieldContainer[int]
    def __init__(self, item_ids: _Optional[_Iterable[int]] = ...) -> None: ...

class ItemLookup(_message.Message):
    __slots__ = ("item_id", "status", "result")
    ITEM_ID_FIELD_NUMBER: _ClassVar[int]
    STATUS_FIELD_NUMBER: _ClassVar[int]
    RESULT_FIELD_NUMBER: _ClassVar[int]
    item_id: int
    status: LookupStatus
    result: _item_pb2.ItemResult
    def __init__(self, item_id: _Optional[int] = ..., status: _Optional[_Union[LookupStatus, str]] = ..., result: _Optional[_Union[_item_pb2.ItemResult, _Mapping]] = ...) -> None: ...

class GetResultsResponse(_message.Message):
    __slots__ = ("items",)
    ITEMS_FIELD_NUMBER: _ClassVar[int]
    items: _containers.RepeatedCompositeFieldContainer[ItemLookup]
    def __init__(self, items: _Optional[_Iterable[_Union[ItemLookup, _Mapping]]] = ...) -> None: ...
