"""The worker: serve handlers of your own on threads pinned to the CPUs of a group.

Owns one ``WorkerService.Attach`` stream (proto/wqd/v1/worker.proto has the
protocol) and one thread per slot. Who touches what:

* the *sender*: grpcio's request-consuming thread drains ``_out`` (a
  queue.Queue of WorkerMessage; None half-closes). Every thread may put to it.
* the *reader* thread reads DaemonMessages: Work goes into ``_held`` and the
  slot's inbox, Cancel sets the held item's ``cancelled`` event. When the
  stream ends it records the status and wakes every slot.
* each *slot* thread owns its inbox and its CPU: it pins itself (only when
  Welcome.pinning), takes one item at a time, checks ``sched_getcpu`` before
  it, runs the handler, answers Done or HandBack with the next credit, and
  removes the item from ``_held`` after the answer is queued.
* ``_held`` (item id -> WorkItem), ``_slots_closed``, ``_stopping`` and ``_abandoned``
  are under ``_lock`` (``_changed``, its condition, is notified when _held shrinks or a
  SlotClosed arrives).

Invariant: every Work received while the stream is up is answered exactly
once (Done, or HandBack when stopping, cancelled before it started, or off
its CPU). A lost stream is not reconnected: :meth:`Worker.run` raises, the
daemon fails (or requeues) what the worker held.
"""

from __future__ import annotations

import ctypes
import os
import queue
import sys
import threading
import time
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
    Set,
    Tuple,
    Union,
)

import grpc

from ._endpoint import parse_cpulist
from .client import Client, WqdError
from .v1 import worker_pb2, worker_pb2_grpc

Output = Union[bytes, str, None]
Handler = Callable[["WorkItem"], Output]

_libc = ctypes.CDLL(None, use_errno=True)
_libc.sched_getcpu.restype = ctypes.c_int


def sched_getcpu() -> int:
    """The CPU the calling thread runs on now (libc's sched_getcpu)."""
    cpu = int(_libc.sched_getcpu())
    if cpu < 0:
        raise OSError(ctypes.get_errno(), "sched_getcpu failed")
    return cpu


class Cancelled(Exception):
    """Raise from a handler to end its item cancelled (see WorkItem.check)."""


@dataclass
class WorkItem:
    """One item the daemon sent to a slot (Work).

    ``cancelled`` is set when the daemon cancels the item (or the stream is
    lost): a long handler should watch it and stop, raising
    :class:`Cancelled` (or any exception) to end the item cancelled.
    ``attempt`` > 0 means it may have run before (on_worker_lost = REQUEUE).
    """

    id: int
    handler: str
    args: Dict[str, str]
    payload: bytes
    cpu: int
    slot: int
    epoch: int
    batch_id: int
    workqueue: str
    rebinds: int
    attempt: int
    cancelled: threading.Event = field(default_factory=threading.Event, repr=False)

    def check(self) -> None:
        """Raises :class:`Cancelled` if the item was cancelled."""
        if self.cancelled.is_set():
            raise Cancelled(f"item {self.id} cancelled")


class _Slot:
    def __init__(self, slot: int, cpu: int) -> None:
        self.slot = slot
        self.cpu = cpu
        self.inbox: "queue.Queue[Optional[WorkItem]]" = queue.Queue()
        self.thread: Optional[threading.Thread] = None


def resolve_cpus(target: str, client: Client) -> List[int]:
    """The CPUs of a target, as the daemon's topology describes them (every
    member, live or not): ``cpus:LIST`` is parsed locally, ``all`` is every
    CPU, any other target is looked up among the topology's groups."""
    if target.startswith("cpus:"):
        return sorted(parse_cpulist(target[len("cpus:"):]))
    snap = client.topology()
    if target == "all":
        return sorted(c.cpu for c in snap.cpus)
    for g in snap.groups:
        if g.target == target:
            return sorted(parse_cpulist(g.members))
    raise ValueError(f"target {target!r} names no group of the daemon's topology")


class Worker:
    """An attached worker serving ``handlers`` on one thread per CPU.

    Give ``target`` (a group: ``cache:1``, ``node:0``, ``cpus:0-3``, ``all``,
    a named group) or ``cpus``. ``handlers`` maps names to functions
    ``fn(item: WorkItem) -> bytes | str | None``; an exception fails the item
    with its text as the error. ``prefetch`` is how many items each slot may
    hold at once (1: one running, none waiting). ``endpoint``, ``options``
    and ``token`` are as for :class:`wqd.Client`.

    ``start()`` attaches and returns; ``run()`` attaches and blocks until the
    worker stops; ``stop()`` ends it. The stream is not re-established when
    it is lost: ``run()``/``wait()`` raise :class:`wqd.WqdError` then.
    """

    def __init__(
        self,
        handlers: Mapping[str, Handler],
        *,
        target: Optional[str] = None,
        cpus: Optional[Iterable[int]] = None,
        endpoint: Optional[str] = None,
        name: Optional[str] = None,
        prefetch: int = 1,
        options: Sequence[Tuple[str, Any]] = (),
        token: Optional[str] = None,
    ) -> None:
        if not handlers:
            raise ValueError("a worker serves at least one handler")
        if (target is None) == (cpus is None):
            raise ValueError("give exactly one of target or cpus")
        if prefetch < 1:
            raise ValueError("prefetch must be at least 1")
        self.handlers = dict(handlers)
        self.target = target
        self._cpus = None if cpus is None else sorted(set(cpus))
        self.name = name or os.path.basename(sys.argv[0] or "python")
        self.prefetch = prefetch
        self._client = Client(endpoint, options=options, token=token)
        self._out: "queue.Queue[Optional[worker_pb2.WorkerMessage]]" = queue.Queue()
        self._lock = threading.Lock()
        # Notified when an answer leaves _held or a SlotClosed arrives (graceful stop waits).
        self._changed = threading.Condition(self._lock)
        self._slots_closed: Set[int] = set()
        self._held: Dict[int, WorkItem] = {}
        self._stopping = False
        self._abandoned = False  # stop(graceful=False): answer nothing more.
        self._slots: Dict[int, _Slot] = {}
        self._call: Any = None
        self._reader: Optional[threading.Thread] = None
        self._ended = threading.Event()
        self._end_error: Optional[WqdError] = None
        self._closed_sent = False
        #: Set by start(): the daemon's Welcome.
        self.worker_id = 0
        self.pinning = False
        self.max_output_bytes = 0

    # -- lifecycle -------------------------------------------------------------------------

    @property
    def cpus(self) -> List[int]:
        """The slot CPUs, one slot thread each (after start())."""
        return [s.cpu for s in self._slots.values()]

    def start(self, timeout: float = 30.0) -> None:
        """Attaches: resolves the CPUs, says Hello, waits up to ``timeout``
        seconds for Welcome, opens a slot per CPU and starts its thread.

        Raises WqdError when the daemon refuses (PERMISSION_DENIED,
        INVALID_ARGUMENT, RESOURCE_EXHAUSTED) or does not answer in time."""
        cpus = self._cpus if self._cpus is not None else \
            resolve_cpus(self.target or "", self._client)
        if not cpus:
            raise ValueError("the target has no CPU")
        self._send(hello=worker_pb2.Hello(
            handlers=sorted(self.handlers), pid=os.getpid(), name=self.name))
        stub = worker_pb2_grpc.WorkerServiceStub(self._client.channel)
        self._call = stub.Attach(self._requests(), metadata=self._client._metadata)
        welcome: "queue.Queue[Any]" = queue.Queue()
        self._reader = threading.Thread(
            target=self._read, args=(welcome,), name="wqd-worker-reader", daemon=True)
        self._reader.start()
        try:
            w = welcome.get(timeout=timeout)
        except queue.Empty:
            self._call.cancel()
            raise WqdError(grpc.StatusCode.DEADLINE_EXCEEDED,
                           f"no Welcome within {timeout}s") from None
        if isinstance(w, WqdError):
            raise w
        self.worker_id = w.worker_id
        self.pinning = w.pinning
        self.max_output_bytes = w.max_output_bytes
        credits = min(self.prefetch, w.max_credits) if w.max_credits else self.prefetch
        for i, cpu in enumerate(cpus):
            s = _Slot(i, cpu)
            self._slots[i] = s
            self._send(open_slot=worker_pb2.OpenSlot(slot=i, cpu=cpu))
            self._send(credit=worker_pb2.Credit(slot=i, credits=credits))
            s.thread = threading.Thread(
                target=self._serve, args=(s,), name=f"wqd-slot-{i}-cpu{cpu}", daemon=True)
            s.thread.start()

    def wait(self, timeout: Optional[float] = None) -> bool:
        """Waits for the stream to end; False if ``timeout`` passed first.

        Raises WqdError if it ended with an error status (a lost stream)."""
        if not self._ended.wait(timeout):
            return False
        if self._end_error is not None:
            raise self._end_error
        return True

    def run(self) -> None:
        """start(), then blocks until the worker is stopped (from another
        thread, or by Ctrl-C, which stops it gracefully).

        Raises WqdError when the stream is refused or lost."""
        self.start()
        try:
            self.wait()
        except KeyboardInterrupt:
            self.stop()

    def stop(self, graceful: bool = True, timeout: float = 30.0) -> None:
        """Stops the worker; returns once its threads are done (at most
        ``timeout`` seconds per step).

        Graceful: no more credits; every slot is closed (CloseSlot), so the
        daemon sends nothing new; items not started are handed back
        ("stopping"); running ones finish and are answered; once the daemon
        has answered SlotClosed for every slot and nothing is held, the stream
        is half-closed and ends OK: the daemon holds nothing of this worker.
        Not graceful: every held item's ``cancelled`` is set and the call is
        cancelled: the daemon treats what it held as lost."""
        with self._lock:
            if self._stopping and self._ended.is_set():
                return
            self._stopping = True
            held = list(self._held.values())
        if self._call is None:
            self._client.close()  # Never attached.
            return
        if not graceful or self._ended.is_set():
            # The call goes first: a handler woken by its cancel must find nothing to answer
            # to, or the daemon would see the item end cancelled instead of lost.
            with self._lock:
                self._abandoned = True
            self._call.cancel()
            for it in held:
                it.cancelled.set()
        else:
            self._close_slots()
            self._wait_answered(time.monotonic() + timeout)
            self._out.put(None)
        self._ended.wait(timeout)
        for s in self._slots.values():
            s.inbox.put(None)
        for s in self._slots.values():
            if s.thread is not None:
                s.thread.join(timeout)
        self._client.close()

    def _close_slots(self) -> None:
        with self._lock:
            if self._closed_sent:
                return
            self._closed_sent = True
        for s in self._slots.values():
            self._send(close_slot=worker_pb2.CloseSlot(slot=s.slot))

    def _wait_answered(self, end: float) -> None:
        """Waits (until ``end``) for a SlotClosed for every slot — after it no Work for
        that slot can still be on the wire — and for every held item to be answered."""
        with self._changed:
            self._changed.wait_for(
                lambda: self._ended.is_set()
                or (not self._held and len(self._slots_closed) == len(self._slots)),
                timeout=max(0.0, end - time.monotonic()))

    # -- the stream ------------------------------------------------------------------------

    def _send(self, **msg: Any) -> None:
        self._out.put(worker_pb2.WorkerMessage(**msg))

    def _requests(self) -> Iterator[worker_pb2.WorkerMessage]:
        while True:
            m = self._out.get()
            if m is None:
                return
            yield m

    def _read(self, welcome: "queue.Queue[Any]") -> None:
        error: Optional[WqdError] = None
        got_welcome = False
        try:
            for m in self._call:
                kind = m.WhichOneof("msg")
                if not got_welcome:
                    if kind != "welcome":
                        raise WqdError(grpc.StatusCode.INTERNAL,
                                       f"expected Welcome first, got {kind}")
                    got_welcome = True
                    welcome.put(m.welcome)
                elif kind == "work":
                    self._on_work(m.work)
                elif kind == "slot_closed":
                    with self._changed:
                        self._slots_closed.add(m.slot_closed.slot)
                        self._changed.notify_all()
                elif kind == "cancel":
                    with self._lock:
                        it = self._held.get(m.cancel.item_id)
                    if it is not None:
                        it.cancelled.set()
        except grpc.RpcError as e:
            error = WqdError.from_rpc(e)
        except WqdError as e:
            error = e
            self._call.cancel()
        with self._lock:
            stopping = self._stopping
            held = list(self._held.values())
        if error is not None and stopping and error.code == grpc.StatusCode.CANCELLED:
            error = None  # stop(graceful=False) cancelled the call.
        if error is None and not got_welcome:
            error = WqdError(grpc.StatusCode.UNAVAILABLE, "the stream ended before Welcome")
        if error is None and not stopping:
            error = WqdError(grpc.StatusCode.UNAVAILABLE, "the daemon ended the stream")
        self._end_error = error
        if not got_welcome:
            welcome.put(error)
        for it in held:
            it.cancelled.set()  # Lost: nobody will take its answer.
        self._ended.set()
        with self._changed:
            self._changed.notify_all()  # A graceful stop waits no more: the stream is gone.
        self._out.put(None)  # Unblocks the request iterator.
        for s in self._slots.values():
            s.inbox.put(None)

    def _on_work(self, w: worker_pb2.Work) -> None:
        it = WorkItem(
            id=w.item_id, handler=w.handler, args=dict(w.args), payload=w.payload,
            cpu=w.cpu, slot=w.slot, epoch=w.epoch, batch_id=w.batch_id,
            workqueue=w.workqueue, rebinds=w.rebinds, attempt=w.attempt)
        slot = self._slots.get(w.slot)
        with self._lock:
            self._held[it.id] = it
        if slot is None:
            # The daemon broke the protocol; hand the item back rather than drop it.
            self._answer(it, hand_back="unknown slot", credits=0)
            return
        slot.inbox.put(it)

    # -- slots -----------------------------------------------------------------------------

    def _answer(self, it: WorkItem, *, credits: int, hand_back: Optional[str] = None,
                **outcome: Any) -> None:
        with self._lock:
            if self._abandoned:
                return
        if hand_back is not None:
            self._send(hand_back=worker_pb2.HandBack(
                item_id=it.id, reason=hand_back, credits=credits))
        else:
            self._send(done=worker_pb2.Done(item_id=it.id, credits=credits, **outcome))
        with self._changed:
            self._held.pop(it.id, None)
            self._changed.notify_all()

    def _pin(self, cpu: int) -> bool:
        try:
            os.sched_setaffinity(0, {cpu})
        except OSError:
            return False  # Offline now: the daemon sends nothing until it is live.
        return True

    def _serve(self, s: _Slot) -> None:
        if self.pinning:
            self._pin(s.cpu)
        while True:
            it = s.inbox.get()
            if it is None or self._ended.is_set():
                return
            with self._lock:
                stopping = self._stopping
            credits = 0 if stopping else 1
            if stopping:
                self._answer(it, hand_back="stopping", credits=0)
                continue
            if it.cancelled.is_set():
                self._answer(it, hand_back="cancelled", credits=credits)
                continue
            if self.pinning and sched_getcpu() != s.cpu:
                if not (self._pin(s.cpu) and sched_getcpu() == s.cpu):
                    self._answer(it, hand_back="affinity", credits=credits)
                    continue
            self._run(it, credits)

    def _run(self, it: WorkItem, credits: int) -> None:
        fn = self.handlers.get(it.handler)
        outcome: Dict[str, Any]
        if fn is None:
            outcome = {"error": f"this worker does not serve {it.handler!r}"}
        else:
            try:
                out = fn(it)
                if out is None:
                    out = b""
                elif isinstance(out, str):
                    out = out.encode()
                elif not isinstance(out, (bytes, bytearray, memoryview)):
                    raise TypeError(
                        f"handler {it.handler!r} returned {type(out).__name__}, "
                        "not bytes, str or None")
                outcome = {"ok": bytes(out)}
            except Exception as e:  # noqa: BLE001 - any failure of user code fails the item
                if it.cancelled.is_set():
                    outcome = {"cancelled": True}
                else:
                    outcome = {"error": str(e) or type(e).__name__}
        if self.pinning:
            outcome["cpu_finished"] = sched_getcpu()
        if self._ended.is_set():
            return
        with self._lock:
            if self._stopping:
                credits = 0
        self._answer(it, credits=credits, **outcome)
