"""The client: submit, flush, cancel, drain, results, workqueues, topology, stats.

Owns one grpcio channel (stock grpcio, default channel options) and the stubs
on it. Every call raises :class:`WqdError` on a non-OK status; every call
takes an optional ``timeout`` in seconds (the gRPC deadline), defaulting to
the client's.
"""

from __future__ import annotations

import enum
import functools
import queue
from dataclasses import dataclass, field
from typing import (
    Any,
    Callable,
    Dict,
    Iterable,
    Iterator,
    List,
    Mapping,
    Optional,
    Sequence,
    Tuple,
    TypeVar,
    Union,
)

import grpc
from google.protobuf import duration_pb2

from ._endpoint import Endpoint
from .v1 import (
    dispatch_pb2,
    dispatch_pb2_grpc,
    item_pb2,
    stats_pb2,
    stats_pb2_grpc,
    topology_pb2,
    topology_pb2_grpc,
    worker_pb2,
    worker_pb2_grpc,
    workqueue_pb2,
    workqueue_pb2_grpc,
)

T = TypeVar("T")

#: Items per message of :meth:`Client.submit_stream`.
STREAM_CHUNK = 1000


class WqdError(Exception):
    """A call ended with a non-OK gRPC status.

    ``code`` is the :class:`grpc.StatusCode`, ``message`` the daemon's text
    (docs/status-codes.md lists every status of every call).
    """

    def __init__(self, code: grpc.StatusCode, message: str) -> None:
        super().__init__(f"{code.name}: {message}")
        self.code = code
        self.message = message

    @staticmethod
    def from_rpc(e: grpc.RpcError) -> "WqdError":
        code = e.code() if hasattr(e, "code") else grpc.StatusCode.UNKNOWN
        details = e.details() if hasattr(e, "details") else str(e)
        return WqdError(code or grpc.StatusCode.UNKNOWN, details or "")


def _rpc(f: Callable[..., T]) -> Callable[..., T]:
    """Turns grpc.RpcError into WqdError."""

    @functools.wraps(f)
    def wrapper(*args: Any, **kwargs: Any) -> T:
        try:
            return f(*args, **kwargs)
        except grpc.RpcError as e:
            raise WqdError.from_rpc(e) from None

    return wrapper


class State(str, enum.Enum):
    """An item's state (ItemState without its prefix, lowercase)."""

    UNSPECIFIED = "unspecified"
    PENDING = "pending"
    RUNNING = "running"
    OK = "ok"
    FAILED = "failed"
    CANCELLED = "cancelled"
    EXPIRED = "expired"
    REJECTED = "rejected"
    DELAYED = "delayed"

    @property
    def terminal(self) -> bool:
        return self in (State.OK, State.FAILED, State.CANCELLED, State.EXPIRED,
                        State.REJECTED)


def _enum_name(enum_type: Any, value: int, prefix: str) -> str:
    try:
        name: str = enum_type.Name(value)
    except ValueError:
        return str(value)
    return name[len(prefix):].lower() if name.startswith(prefix) else name


def _enum_value(enum_type: Any, prefix: str, v: Union[str, int]) -> int:
    if isinstance(v, int):
        return v
    try:
        return int(enum_type.Value(prefix + v.upper()))
    except ValueError:
        raise ValueError(f"unknown {prefix.rstrip('_').lower()}: {v!r}") from None


def _duration(seconds: Optional[float]) -> Optional[duration_pb2.Duration]:
    if seconds is None:
        return None
    if seconds < 0:
        raise ValueError("durations are never negative")
    d = duration_pb2.Duration()
    d.FromNanoseconds(int(round(seconds * 1e9)))
    return d


@dataclass
class Item:
    """One work item to submit (WorkItem).

    ``delay`` and ``deadline`` are seconds; ``target`` follows docs/targets.md
    (``cache:1``, ``cpus:0-3``, ``each:cache``, ...).
    """

    target: str
    handler: str
    args: Mapping[str, str] = field(default_factory=dict)
    payload: bytes = b""
    key: str = ""
    delay: Optional[float] = None
    deadline: Optional[float] = None

    def to_pb(self) -> item_pb2.WorkItem:
        m = item_pb2.WorkItem(
            target=self.target,
            handler=self.handler,
            args=dict(self.args),
            payload=self.payload,
            key=self.key,
        )
        d = _duration(self.delay)
        if d is not None:
            m.delay.CopyFrom(d)
        d = _duration(self.deadline)
        if d is not None:
            m.deadline.CopyFrom(d)
        return m


@dataclass
class Result:
    """What the daemon knows about one item (ItemResult).

    ``cpu_started``/``cpu_finished`` are None when it never started or has not
    finished; ``fallback_level`` is "" without fallback, else "core", "shard",
    "cache", "node", "package" or "all". ``raw`` is the message itself.
    """

    item_id: int
    batch_id: int
    workqueue: str
    state: State
    output: bytes
    error: str
    target: str
    handler: str
    cpu_started: Optional[int]
    cpu_finished: Optional[int]
    fallback_level: str
    fallback_reason: str
    rebinds: int
    topology_epoch: int
    worker_id: int
    worker_pid: int
    worker_slot: int
    worker_lost: int
    raw: item_pb2.ItemResult = field(repr=False)

    @staticmethod
    def from_pb(m: item_pb2.ItemResult) -> "Result":
        level = _enum_name(item_pb2.FallbackLevel, m.fallback_level, "FALLBACK_LEVEL_")
        return Result(
            item_id=m.item_id,
            batch_id=m.batch_id,
            workqueue=m.workqueue,
            state=State(_enum_name(item_pb2.ItemState, m.state, "ITEM_STATE_")),
            output=m.output,
            error=m.error,
            target=m.target,
            handler=m.handler,
            cpu_started=m.cpu_started if m.HasField("cpu_started") else None,
            cpu_finished=m.cpu_finished if m.HasField("cpu_finished") else None,
            fallback_level="" if level == "unspecified" else level,
            fallback_reason=m.fallback_reason,
            rebinds=m.rebinds,
            topology_epoch=m.topology_epoch,
            worker_id=m.worker_id,
            worker_pid=m.worker_pid,
            worker_slot=m.worker_slot,
            worker_lost=m.worker_lost,
            raw=m,
        )


@dataclass
class Receipt:
    """What happened to one submitted item (ItemReceipt)."""

    item_id: int
    queued: bool
    duplicate_of: int
    target: str
    source_index: Optional[int]


@dataclass
class Submitted:
    """A Submit's answer: the batch id, one receipt per (expanded) item, and
    with ``wait=True`` the queued items by final state (``counts``) and every
    queued item's result. A workqueue created with ``results="summary"`` or
    ``results="none"`` keeps no per-item results: ``results`` is then empty
    and ``counts`` is the answer. ``counts`` is None without ``wait``.

    Whatever the receipts, item i (expanded) has id ``first_item_id + i`` when
    queued; ``item_count`` and ``queued_count`` count them. Submitted with
    ``receipts=False`` there are no receipts and ``duplicates`` (index ->
    pending id) names the items that were not queued, as in :class:`Streamed`."""

    batch_id: int
    receipts: List[Receipt]
    results: List[Result]
    counts: Optional["Counts"] = None
    first_item_id: int = 0
    item_count: int = 0
    queued_count: int = 0
    duplicates: Dict[int, int] = field(default_factory=dict)

    @staticmethod
    def from_pb(r: dispatch_pb2.SubmitResponse) -> "Submitted":
        return Submitted(
            batch_id=r.batch_id,
            receipts=[
                Receipt(x.item_id, x.queued, x.duplicate_of, x.target,
                        x.source_index if x.HasField("source_index") else None)
                for x in r.items
            ],
            results=[Result.from_pb(x) for x in r.results],
            counts=Counts.from_pb(r.counts) if r.HasField("counts") else None,
            first_item_id=r.first_item_id,
            item_count=r.item_count,
            queued_count=r.queued_count,
            duplicates={d.index: d.duplicate_of for d in r.duplicates},
        )

    @property
    def item_ids(self) -> List[int]:
        """The ids of the queued items, in submission order."""
        if self.receipts or not self.item_count:
            return [r.item_id for r in self.receipts if r.queued]
        return [self.first_item_id + i for i in range(self.item_count)
                if i not in self.duplicates]


@dataclass
class SessionAnswer:
    """One answer of a :class:`Session`: the request's tag, and what
    :meth:`Client.submit` would have returned (``submitted``) or raised
    (``error``)."""

    tag: int
    submitted: Optional[Submitted]
    error: Optional["WqdError"]
    #: With ``error``: the batch's id when it was queued all the same (its
    #: ``wait_timeout`` passed, DEADLINE_EXCEEDED; its results were over the
    #: daemon's message limit, RESOURCE_EXHAUSTED). Its work goes on: flush it
    #: or fetch its results by this id.
    queued_batch: Optional[int] = None


class Session:
    """An open DispatchService.Session (see :meth:`Client.session`).

    :meth:`send` queues a batch and returns its tag (1, 2, ...);
    :meth:`next` returns the next answer, in the order requests finish (not
    the order sent), or None once the session is over; :meth:`submit` sends
    one batch and waits for its answer when no other request is open;
    :meth:`close` half-closes (the open requests are still answered). A
    refused request is an answer whose ``error`` is set; the session goes
    on. Usable as a context manager (closes, then cancels on exit).
    """

    _END = object()

    def __init__(self, stub: Any, kw: Dict[str, Any]) -> None:
        self._q: "queue.Queue[Any]" = queue.Queue()
        self._tag = 0
        self._open = 0
        self._closed = False

        def requests() -> Iterator[dispatch_pb2.SessionRequest]:
            while True:
                m = self._q.get()
                if m is Session._END:
                    return
                yield m

        self._responses = stub.Session(requests(), **kw)

    def send(self, items: Iterable[Item], *, workqueue: str = "",
             wait: bool = False, wait_timeout: Optional[float] = None,
             receipts: bool = True) -> int:
        """Sends one batch; returns its tag (``receipts`` as in
        :meth:`Client.submit`).

        ``wait_timeout`` (seconds, with ``wait`` only) ends this request's
        wait: past it the answer's ``error`` is DEADLINE_EXCEEDED and its
        ``queued_batch`` names the batch, whose work goes on; the session goes
        on too."""
        if self._closed:
            raise ValueError("the session was closed for sending")
        if wait_timeout is not None and not wait:
            raise ValueError("wait_timeout needs wait=True: there is no wait to limit")
        self._tag += 1
        self._q.put(dispatch_pb2.SessionRequest(
            tag=self._tag,
            submit=_submit_request(items, workqueue, wait, receipts),
            wait_timeout=_duration(wait_timeout)))
        self._open += 1
        return self._tag

    @_rpc
    def next(self) -> Optional[SessionAnswer]:
        """The next answer, or None once the session is over. Raises
        :class:`WqdError` with the status the session ended with (its
        deadline, the daemon stopping, a message over the limits)."""
        try:
            m = next(self._responses)
        except StopIteration:
            return None
        self._open = max(0, self._open - 1)
        which = m.WhichOneof("outcome")
        if which == "submitted":
            return SessionAnswer(m.tag, Submitted.from_pb(m.submitted), None)
        if which == "error":
            code = next((c for c in grpc.StatusCode if c.value[0] == m.error.code),
                        grpc.StatusCode.UNKNOWN)
            return SessionAnswer(m.tag, None, WqdError(code, m.error.message),
                                 m.error.batch_id or None)
        raise WqdError(grpc.StatusCode.INTERNAL, f"session answer {m.tag} has no outcome")

    def submit(self, items: Iterable[Item], *, workqueue: str = "",
               wait: bool = False, receipts: bool = True) -> Submitted:
        """Sends one batch and returns its answer (raising its error), for a
        caller with no other request open."""
        if self._open:
            raise ValueError(f"{self._open} requests are open; read them with next() first")
        tag = self.send(items, workqueue=workqueue, wait=wait, receipts=receipts)
        a = self.next()
        if a is None or a.tag != tag:
            raise WqdError(grpc.StatusCode.INTERNAL,
                           f"the session answered {a and a.tag} while waiting for {tag}")
        if a.error is not None:
            raise a.error
        assert a.submitted is not None
        return a.submitted

    @property
    def open(self) -> int:
        """Requests sent and not yet answered."""
        return self._open

    def close(self) -> None:
        """Half-closes: no more requests; the open ones are still answered."""
        if not self._closed:
            self._closed = True
            self._q.put(Session._END)

    def cancel(self) -> None:
        """Ends the session at once; accepted work goes on."""
        self.close()
        self._responses.cancel()

    def __enter__(self) -> "Session":
        return self

    def __exit__(self, *exc: object) -> None:
        self.cancel()


def _submit_request(items: Iterable[Item], workqueue: str, wait: bool,
                    receipts: bool) -> dispatch_pb2.SubmitRequest:
    return dispatch_pb2.SubmitRequest(
        workqueue=workqueue, items=[i.to_pb() for i in items], wait=wait,
        receipts=(dispatch_pb2.RECEIPTS_MODE_UNSPECIFIED if receipts
                  else dispatch_pb2.RECEIPTS_MODE_NONE))


@dataclass
class Streamed:
    """A SubmitStream's answer. Item i has id ``first_item_id + i``; the ids
    of de-duplicated items (``duplicates``: index -> pending id) are unused."""

    batch_id: int
    first_item_id: int
    item_count: int
    queued_count: int
    duplicates: Dict[int, int]

    @property
    def item_ids(self) -> List[int]:
        """The ids of the queued items, in stream order."""
        return [self.first_item_id + i for i in range(self.item_count)
                if i not in self.duplicates]


@dataclass
class Counts:
    """Items by state (StateCounts)."""

    pending: int = 0
    running: int = 0
    ok: int = 0
    failed: int = 0
    cancelled: int = 0
    expired: int = 0
    rejected: int = 0
    delayed: int = 0

    @staticmethod
    def from_pb(m: item_pb2.StateCounts) -> "Counts":
        return Counts(m.pending, m.running, m.ok, m.failed, m.cancelled,
                      m.expired, m.rejected, m.delayed)


@dataclass
class FlushSummary:
    """The end of a flush: covered items by final state."""

    counts: Counts
    items_covered: int
    waited: float
    unknown_item_ids: List[int]
    delayed_not_covered: int


@dataclass
class Flushed:
    """Every result a flush streamed, and its summary."""

    results: List[Result]
    summary: FlushSummary


@dataclass
class CancelResult:
    """What Cancel did to one item: ``outcome`` is "cancelled_pending",
    "waited_running", "already_terminal" or "unknown"."""

    item_id: int
    outcome: str
    state: State


@dataclass
class Lookup:
    """One GetResults entry: ``status`` is "found", "unknown" or "forgotten";
    ``result`` is set when found."""

    item_id: int
    status: str
    result: Optional[Result]


_WQ_ENUMS = {
    "placement": (workqueue_pb2.Placement, "PLACEMENT_"),
    "fallback": (workqueue_pb2.FallbackPolicy, "FALLBACK_POLICY_"),
    "on_worker_lost": (workqueue_pb2.WorkerLostPolicy, "WORKER_LOST_POLICY_"),
    "unserved": (workqueue_pb2.UnservedPolicy, "UNSERVED_POLICY_"),
    "results": (workqueue_pb2.ResultsMode, "RESULTS_MODE_"),
}


def _wq_fields(attrs: Mapping[str, Any]) -> Dict[str, Any]:
    out = dict(attrs)
    for k, (et, prefix) in _WQ_ENUMS.items():
        if k in out:
            out[k] = _enum_value(et, prefix, out[k])
    return out


class Client:
    """A connection to the daemon.

    ``endpoint``: ``unix:/path``, a socket path, ``http://host:port`` or
    ``https://host:port``; None means ``$WQD_ADDR``, ``$WQD_SOCKET``, else the
    default socket (see :func:`wqd.default_socket_path`). ``timeout`` is the
    default deadline of each call in seconds (None: no deadline). ``token``
    is sent as ``authorization: Bearer`` (a TCP listener with a token file).
    ``options`` are grpcio channel options, passed through unchanged; the
    default is none.

    Usable as a context manager; :meth:`close` closes the channel.
    """

    def __init__(
        self,
        endpoint: Optional[str] = None,
        *,
        timeout: Optional[float] = None,
        token: Optional[str] = None,
        options: Sequence[Tuple[str, Any]] = (),
        root_certificates: Optional[bytes] = None,
    ) -> None:
        ep = Endpoint.default() if endpoint is None else Endpoint.parse(endpoint)
        self.endpoint = ep
        self.timeout = timeout
        if ep.tls:
            creds = grpc.ssl_channel_credentials(root_certificates)
            self.channel = grpc.secure_channel(ep.target, creds, options=list(options))
        else:
            self.channel = grpc.insecure_channel(ep.target, options=list(options))
        self._metadata: Tuple[Tuple[str, str], ...] = ()
        if token is not None:
            self._metadata = (("authorization", "Bearer " + token.strip()),)
        self._dispatch = dispatch_pb2_grpc.DispatchServiceStub(self.channel)
        self._wq = workqueue_pb2_grpc.WorkqueueServiceStub(self.channel)
        self._topo = topology_pb2_grpc.TopologyServiceStub(self.channel)
        self._stats = stats_pb2_grpc.StatsServiceStub(self.channel)
        self._workers = worker_pb2_grpc.WorkerServiceStub(self.channel)

    def close(self) -> None:
        """Closes the channel; calls in progress end with CANCELLED."""
        self.channel.close()

    def __enter__(self) -> "Client":
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def _kw(self, timeout: Optional[float]) -> Dict[str, Any]:
        t = self.timeout if timeout is None else timeout
        kw: Dict[str, Any] = {"metadata": self._metadata}
        if t is not None:
            kw["timeout"] = t
        return kw

    # -- dispatch --------------------------------------------------------------------------

    @_rpc
    def submit(
        self,
        items: Iterable[Item],
        *,
        workqueue: str = "",
        wait: bool = False,
        receipts: bool = True,
        timeout: Optional[float] = None,
    ) -> Submitted:
        """Submits one batch (all or nothing). With ``wait=True`` returns once
        every item is terminal, with their counts by state and (on a workqueue
        that keeps full results) their results; the timeout bounds that wait
        (on DEADLINE_EXCEEDED the items stay queued). ``receipts=False`` asks
        for no receipt per item (see :class:`Submitted`)."""
        req = _submit_request(items, workqueue, wait, receipts)
        r = self._dispatch.Submit(req, **self._kw(timeout))
        return Submitted.from_pb(r)

    @_rpc
    def session(self, *, timeout: Optional[float] = None) -> "Session":
        """Opens a session: many batches over one stream (DispatchService
        .Session), each answered as :meth:`submit` would answer it, by tag.
        Cheaper per batch than :meth:`submit` for small batches sent often.
        The timeout bounds the whole session."""
        return Session(self._dispatch, self._kw(timeout))

    @_rpc
    def submit_stream(
        self,
        items: Iterable[Item],
        *,
        workqueue: str = "",
        chunk: int = STREAM_CHUNK,
        timeout: Optional[float] = None,
    ) -> Streamed:
        """Submits a batch too large for one message through SubmitStream,
        ``chunk`` items per message, committing with the last one. Nothing is
        queued unless the whole stream reaches the commit (an exception from
        ``items`` cancels the call)."""
        if chunk < 1:
            raise ValueError("chunk must be at least 1")

        def requests() -> Iterator[dispatch_pb2.SubmitStreamRequest]:
            options: Optional[dispatch_pb2.SubmitOptions] = \
                dispatch_pb2.SubmitOptions(workqueue=workqueue)
            buf: List[item_pb2.WorkItem] = []
            for it in items:
                buf.append(it.to_pb())
                if len(buf) == chunk:
                    yield dispatch_pb2.SubmitStreamRequest(options=options, items=buf)
                    options, buf = None, []
            yield dispatch_pb2.SubmitStreamRequest(options=options, items=buf, commit=True)

        r = self._dispatch.SubmitStream(requests(), **self._kw(timeout))
        return Streamed(
            batch_id=r.batch_id,
            first_item_id=r.first_item_id,
            item_count=r.item_count,
            queued_count=r.queued_count,
            duplicates={d.index: d.duplicate_of for d in r.duplicates},
        )

    @staticmethod
    def _scope(req: Any, items: Optional[Iterable[int]], batch: Optional[int],
               workqueue: Optional[str] = None) -> None:
        given = [x is not None for x in (items, batch, workqueue)]
        if sum(given) != 1:
            raise ValueError("give exactly one of items, batch or workqueue")
        if items is not None:
            req.items.ids.extend(items)
        elif batch is not None:
            req.batch_id = batch
        else:
            req.workqueue = workqueue

    def flush_iter(
        self,
        *,
        items: Optional[Iterable[int]] = None,
        batch: Optional[int] = None,
        workqueue: Optional[str] = None,
        include_delayed: bool = False,
        summary_only: bool = False,
        timeout: Optional[float] = None,
    ) -> Iterator[Union[Result, FlushSummary]]:
        """Flushes one scope (exactly one of ``items``, ``batch``,
        ``workqueue``; ``""`` is the default workqueue), yielding each
        :class:`Result` as its item becomes terminal and then, last, the
        :class:`FlushSummary`. Postcondition once the summary is yielded:
        none of the covered items is pending or running. If the deadline
        passes, WqdError(DEADLINE_EXCEEDED) is raised and the work goes on."""
        req = dispatch_pb2.FlushRequest(
            include_delayed=include_delayed, summary_only=summary_only)
        self._scope(req, items, batch, workqueue)
        stream = self._dispatch.Flush(req, **self._kw(timeout))
        try:
            for m in stream:
                if m.HasField("results"):
                    for x in m.results.results:
                        yield Result.from_pb(x)
                elif m.HasField("summary"):
                    s = m.summary
                    yield FlushSummary(
                        counts=Counts.from_pb(s.counts),
                        items_covered=s.items_covered,
                        waited=s.waited.ToNanoseconds() / 1e9,
                        unknown_item_ids=list(s.unknown_item_ids),
                        delayed_not_covered=s.delayed_not_covered,
                    )
                    return
        except grpc.RpcError as e:
            raise WqdError.from_rpc(e) from None
        finally:
            stream.cancel()
        raise WqdError(grpc.StatusCode.INTERNAL, "flush stream ended without a summary")

    def flush(self, **scope: Any) -> Flushed:
        """As :meth:`flush_iter`, collected: every result, then the summary."""
        results: List[Result] = []
        for x in self.flush_iter(**scope):
            if isinstance(x, FlushSummary):
                return Flushed(results, x)
            results.append(x)
        raise AssertionError("unreachable: flush_iter ends with a summary")

    @_rpc
    def cancel(
        self,
        *,
        items: Optional[Iterable[int]] = None,
        batch: Optional[int] = None,
        timeout: Optional[float] = None,
    ) -> List[CancelResult]:
        """Cancels items (like cancel_work_sync): pending ones never run,
        running ones are signalled and waited for. One entry per item."""
        req = dispatch_pb2.CancelRequest()
        self._scope(req, items, batch)
        r = self._dispatch.Cancel(req, **self._kw(timeout))
        return [
            CancelResult(
                x.item_id,
                _enum_name(dispatch_pb2.CancelOutcome, x.outcome, "CANCEL_OUTCOME_"),
                State(_enum_name(item_pb2.ItemState, x.state, "ITEM_STATE_")),
            )
            for x in r.items
        ]

    @_rpc
    def drain(self, workqueue: str = "", *, timeout: Optional[float] = None) -> Counts:
        """Drains a workqueue; returns once it has nothing pending or running,
        with the final states of what it held."""
        r = self._dispatch.Drain(dispatch_pb2.DrainRequest(workqueue=workqueue),
                                 **self._kw(timeout))
        return Counts.from_pb(r.counts)

    @_rpc
    def results(self, item_ids: Iterable[int], *,
                timeout: Optional[float] = None) -> List[Lookup]:
        """Looks up items by id, in request order."""
        r = self._dispatch.GetResults(
            dispatch_pb2.GetResultsRequest(item_ids=list(item_ids)), **self._kw(timeout))
        return [
            Lookup(
                x.item_id,
                _enum_name(dispatch_pb2.LookupStatus, x.status, "LOOKUP_STATUS_"),
                Result.from_pb(x.result) if x.HasField("result") else None,
            )
            for x in r.items
        ]

    # -- workqueues ------------------------------------------------------------------------

    @_rpc
    def create_workqueue(self, name: str, *, timeout: Optional[float] = None,
                         **attrs: Any) -> workqueue_pb2.WorkqueueAttrs:
        """Creates a workqueue. ``attrs`` are WorkqueueAttrs fields; the enum
        ones take names: ``placement="first"``, ``fallback="wait"``,
        ``on_worker_lost="requeue"``, ``unserved="reject"``,
        ``results="summary"`` (``full``, ``summary`` or ``none``: what is kept
        of each item once it ends; see docs/workqueues.md)."""
        a = workqueue_pb2.WorkqueueAttrs(name=name, **_wq_fields(attrs))
        return self._wq.CreateWorkqueue(
            workqueue_pb2.CreateWorkqueueRequest(attrs=a), **self._kw(timeout)).attrs

    @_rpc
    def list_workqueues(self, name: str = "", *, timeout: Optional[float] = None
                        ) -> List[workqueue_pb2.WorkqueueInfo]:
        """The workqueues with attributes and counters, by name."""
        return list(self._wq.ListWorkqueues(
            workqueue_pb2.ListWorkqueuesRequest(name=name), **self._kw(timeout)).workqueues)

    @_rpc
    def update_workqueue(self, name: str, *, timeout: Optional[float] = None,
                         **changes: Any) -> workqueue_pb2.WorkqueueAttrs:
        """Changes the given attributes (names as for create_workqueue)."""
        req = workqueue_pb2.UpdateWorkqueueRequest(name=name, **_wq_fields(changes))
        return self._wq.UpdateWorkqueue(req, **self._kw(timeout)).attrs

    @_rpc
    def delete_workqueue(self, name: str, *, cancel_pending: bool = False,
                         timeout: Optional[float] = None) -> Counts:
        """Drains and deletes a workqueue."""
        r = self._wq.DeleteWorkqueue(
            workqueue_pb2.DeleteWorkqueueRequest(name=name, cancel_pending=cancel_pending),
            **self._kw(timeout))
        return Counts.from_pb(r.counts)

    # -- topology, stats, workers ----------------------------------------------------------

    @_rpc
    def topology(self, *, timeout: Optional[float] = None) -> topology_pb2.TopologySnapshot:
        """The daemon's current topology snapshot."""
        return self._topo.GetTopology(
            topology_pb2.GetTopologyRequest(), **self._kw(timeout)).snapshot

    def watch_topology(self, *, timeout: Optional[float] = None
                       ) -> Iterator[topology_pb2.TopologySnapshot]:
        """The current snapshot, then one per new epoch (epochs may be
        skipped), until the iterator is closed or the deadline passes."""
        stream = self._topo.WatchTopology(
            topology_pb2.WatchTopologyRequest(), **self._kw(timeout))
        try:
            for m in stream:
                yield m.snapshot
        except grpc.RpcError as e:
            raise WqdError.from_rpc(e) from None
        finally:
            stream.cancel()

    @_rpc
    def stats(self, *, timeout: Optional[float] = None) -> stats_pb2.GetStatsResponse:
        """The daemon's counters."""
        return self._stats.GetStats(stats_pb2.GetStatsRequest(), **self._kw(timeout))

    @_rpc
    def list_workers(self, *, timeout: Optional[float] = None
                     ) -> List[worker_pb2.WorkerInfo]:
        """The attached workers, their slots and counters."""
        return list(self._workers.ListWorkers(
            worker_pb2.ListWorkersRequest(), **self._kw(timeout)).workers)
