"""Unit tests without a daemon: endpoint rules, cpulists, message building, and the
worker's side of the Attach protocol against a fake in-process WorkerService.

Run: PYTHONPATH=client/python python -m unittest discover -s client/python/tests -p 'test_unit.py'
"""

from __future__ import annotations

import os
import queue
import tempfile
import threading
import time
import unittest
from concurrent import futures
from typing import Any, Iterator, List, Optional

import grpc

import wqd
from wqd._endpoint import Endpoint, socket_path_for
from wqd.v1 import (
    dispatch_pb2,
    dispatch_pb2_grpc,
    item_pb2,
    topology_pb2,
    topology_pb2_grpc,
    worker_pb2,
    worker_pb2_grpc,
)

WAIT = 10.0  # Bound of every wait on the fake server.


class EndpointTest(unittest.TestCase):
    def test_default_socket_rule_mirrors_the_rust_client(self) -> None:
        self.assertEqual(socket_path_for(False, "/run/user/1000"),
                         "/run/user/1000/wqd/wqd.sock")
        self.assertEqual(socket_path_for(True, "/run/user/1000"), "/run/wqd/wqd.sock")
        self.assertEqual(socket_path_for(False, None), "/run/wqd/wqd.sock")
        self.assertEqual(socket_path_for(False, "relative/dir"), "/run/wqd/wqd.sock")

    def test_env_overrides(self) -> None:
        self.assertEqual(Endpoint.default({"WQD_SOCKET": "/tmp/s"}).target, "unix:/tmp/s")
        self.assertEqual(
            Endpoint.default({"WQD_SOCKET": "/tmp/s", "WQD_ADDR": "http://h:1"}).target, "h:1")

    def test_parse(self) -> None:
        self.assertEqual(Endpoint.parse("unix:/a/b").target, "unix:/a/b")
        self.assertEqual(Endpoint.parse("unix:///a/b").target, "unix:/a/b")
        self.assertEqual(Endpoint.parse("/a/b").target, "unix:/a/b")
        self.assertEqual(Endpoint.parse("./s").target, "unix:./s")
        self.assertEqual(Endpoint.parse("http://127.0.0.1:7000/"),
                         Endpoint("127.0.0.1:7000", tls=False))
        self.assertTrue(Endpoint.parse("https://h:1").tls)
        for bad in ("unix:", "http://", "h:1", "wqd.sock"):
            with self.assertRaises(ValueError, msg=bad):
                Endpoint.parse(bad)

    def test_cpulist(self) -> None:
        self.assertEqual(wqd.parse_cpulist("0-3,8,10-11\n"), {0, 1, 2, 3, 8, 10, 11})
        self.assertEqual(wqd.parse_cpulist(""), set())
        with self.assertRaises(ValueError):
            wqd.parse_cpulist("3-1")


class ItemTest(unittest.TestCase):
    def test_to_pb(self) -> None:
        m = wqd.Item("cache:1", "resize", args={"w": "10"}, payload=b"x", key="k",
                     delay=1.5, deadline=0.25).to_pb()
        self.assertEqual((m.target, m.handler, dict(m.args), m.payload, m.key),
                         ("cache:1", "resize", {"w": "10"}, b"x", "k"))
        self.assertEqual(m.delay.ToNanoseconds(), 1_500_000_000)
        self.assertEqual(m.deadline.ToNanoseconds(), 250_000_000)
        self.assertFalse(wqd.Item("all", "noop").to_pb().HasField("delay"))
        with self.assertRaises(ValueError):
            wqd.Item("all", "noop", delay=-1).to_pb()

    def test_result_from_pb(self) -> None:
        r = wqd.Result.from_pb(item_pb2.ItemResult(
            item_id=4, state=item_pb2.ITEM_STATE_OK, cpu_started=3,
            fallback_level=item_pb2.FALLBACK_LEVEL_NODE))
        self.assertEqual((r.state, r.cpu_started, r.cpu_finished, r.fallback_level),
                         (wqd.State.OK, 3, None, "node"))
        self.assertTrue(r.state.terminal)
        self.assertEqual(wqd.Result.from_pb(item_pb2.ItemResult()).fallback_level, "")


# ---------------------------------------------------------------------------------------
# A fake daemon: Dispatch (Submit, SubmitStream, Flush), Topology and WorkerService.

class FakeAttach:
    """One Attach stream, driven by the test: ``got`` holds what the worker sent,
    ``send`` what the fake daemon sends next (None ends the stream OK; a
    grpc.StatusCode aborts it)."""

    def __init__(self) -> None:
        self.got: "queue.Queue[Any]" = queue.Queue()
        self.send: "queue.Queue[Any]" = queue.Queue()

    def next(self, kind: str) -> Any:
        """The next message the worker sent, which must be of ``kind``
        ("half-close" for the end of its stream)."""
        m = self.got.get(timeout=WAIT)
        got = "half-close" if m is None else m.WhichOneof("msg")
        if got != kind:
            raise AssertionError(f"expected {kind}, got {got}: {m}")
        return None if m is None else getattr(m, kind)


class Fake(dispatch_pb2_grpc.DispatchServiceServicer,
           topology_pb2_grpc.TopologyServiceServicer,
           worker_pb2_grpc.WorkerServiceServicer):
    def __init__(self) -> None:
        self.attaches: "queue.Queue[FakeAttach]" = queue.Queue()
        self.streamed: List[dispatch_pb2.SubmitStreamRequest] = []

    def Submit(self, req: Any, ctx: Any) -> Any:
        if req.items[0].handler == "bad":
            ctx.abort(grpc.StatusCode.INVALID_ARGUMENT, "items[0].handler: unknown")
        return dispatch_pb2.SubmitResponse(
            batch_id=9, items=[dispatch_pb2.ItemReceipt(item_id=100 + i, queued=True)
                               for i in range(len(req.items))])

    def SubmitStream(self, reqs: Any, ctx: Any) -> Any:
        self.streamed = list(reqs)
        n = sum(len(r.items) for r in self.streamed)
        return dispatch_pb2.SubmitStreamResponse(
            batch_id=3, first_item_id=10, item_count=n, queued_count=n - 1,
            duplicates=[dispatch_pb2.DuplicateItem(index=1, duplicate_of=7)])

    def Flush(self, req: Any, ctx: Any) -> Iterator[Any]:
        for i in req.items.ids:
            yield dispatch_pb2.FlushResponse(results=dispatch_pb2.ItemResults(
                results=[item_pb2.ItemResult(item_id=i, state=item_pb2.ITEM_STATE_OK)]))
        yield dispatch_pb2.FlushResponse(summary=dispatch_pb2.FlushSummary(
            items_covered=len(req.items.ids),
            counts=item_pb2.StateCounts(ok=len(req.items.ids))))

    def GetTopology(self, req: Any, ctx: Any) -> Any:
        return topology_pb2.GetTopologyResponse(snapshot=topology_pb2.TopologySnapshot(
            epoch=1, cpus=[topology_pb2.CpuState(cpu=c) for c in range(4)],
            groups=[topology_pb2.GroupInfo(target="cache:1", members="2-3",
                                           live_members="2")]))

    def Attach(self, reqs: Any, ctx: Any) -> Iterator[Any]:
        a = FakeAttach()

        def pump() -> None:
            try:
                for m in reqs:
                    a.got.put(m)
                a.got.put(None)
            except grpc.RpcError:
                a.got.put(None)

        threading.Thread(target=pump, daemon=True).start()
        self.attaches.put(a)
        end = time.monotonic() + WAIT
        while True:
            try:
                m = a.send.get(timeout=0.05)
            except queue.Empty:
                if not ctx.is_active() or time.monotonic() > end:
                    return  # The worker went away (or the test forgot the stream).
                continue
            if m is None:
                return
            if isinstance(m, grpc.StatusCode):
                ctx.abort(m, "fake abort")
            yield m


class FakeServer(unittest.TestCase):
    def setUp(self) -> None:
        self.dir = tempfile.TemporaryDirectory()
        self.sock = os.path.join(self.dir.name, "fake.sock")
        self.fake = Fake()
        self.server = grpc.server(futures.ThreadPoolExecutor(max_workers=8))
        dispatch_pb2_grpc.add_DispatchServiceServicer_to_server(self.fake, self.server)
        topology_pb2_grpc.add_TopologyServiceServicer_to_server(self.fake, self.server)
        worker_pb2_grpc.add_WorkerServiceServicer_to_server(self.fake, self.server)
        self.server.add_insecure_port("unix:" + self.sock)
        self.server.start()
        self.endpoint = "unix:" + self.sock

    def tearDown(self) -> None:
        self.server.stop(None).wait(WAIT)
        self.dir.cleanup()


class ClientTest(FakeServer):
    def test_submit_flush_and_errors(self) -> None:
        with wqd.Client(self.endpoint, timeout=WAIT) as c:
            s = c.submit([wqd.Item("all", "noop"), wqd.Item("all", "noop")])
            self.assertEqual((s.batch_id, s.item_ids), (9, [100, 101]))
            f = c.flush(items=s.item_ids)
            self.assertEqual([r.item_id for r in f.results], [100, 101])
            self.assertEqual((f.summary.items_covered, f.summary.counts.ok), (2, 2))
            with self.assertRaises(wqd.WqdError) as e:
                c.submit([wqd.Item("all", "bad")])
            self.assertEqual(e.exception.code, grpc.StatusCode.INVALID_ARGUMENT)
            self.assertIn("items[0].handler", e.exception.message)
            with self.assertRaises(ValueError):
                c.flush(items=[1], batch=2)

    def test_submit_stream_chunks_and_commits_once(self) -> None:
        with wqd.Client(self.endpoint, timeout=WAIT) as c:
            s = c.submit_stream((wqd.Item("all", "noop") for _ in range(5)),
                                workqueue="q", chunk=2)
        reqs = self.fake.streamed
        self.assertEqual([len(r.items) for r in reqs], [2, 2, 1])
        self.assertEqual([r.commit for r in reqs], [False, False, True])
        self.assertEqual([r.HasField("options") for r in reqs], [True, False, False])
        self.assertEqual(reqs[0].options.workqueue, "q")
        self.assertEqual(s.item_ids, [10, 12, 13, 14])

    def test_resolve_cpus(self) -> None:
        with wqd.Client(self.endpoint, timeout=WAIT) as c:
            self.assertEqual(wqd.resolve_cpus("cache:1", c), [2, 3])
            self.assertEqual(wqd.resolve_cpus("all", c), [0, 1, 2, 3])
            self.assertEqual(wqd.resolve_cpus("cpus:5,7-8", c), [5, 7, 8])
            with self.assertRaises(ValueError):
                wqd.resolve_cpus("cache:9", c)


def slot_closed(slot: int) -> Any:
    return worker_pb2.DaemonMessage(slot_closed=worker_pb2.SlotClosed(slot=slot))


def work(item_id: int, slot: int, cpu: int, handler: str = "h") -> Any:
    return worker_pb2.DaemonMessage(work=worker_pb2.Work(
        item_id=item_id, slot=slot, cpu=cpu, handler=handler, args={"a": "1"},
        payload=b"in", epoch=1))


class WorkerProtocolTest(FakeServer):
    def attach(self, handlers: Any, cpus: List[int], pinning: bool = False, **kw: Any
               ) -> "tuple[wqd.Worker, FakeAttach]":
        w = wqd.Worker(handlers, cpus=cpus, endpoint=self.endpoint, name="t", **kw)
        started: "queue.Queue[Optional[BaseException]]" = queue.Queue()

        def go() -> None:
            try:
                w.start(timeout=WAIT)
                started.put(None)
            except BaseException as e:  # noqa: BLE001
                started.put(e)

        threading.Thread(target=go, daemon=True).start()
        a = self.fake.attaches.get(timeout=WAIT)
        hello = a.next("hello")
        self.assertEqual(list(hello.handlers), sorted(handlers))
        self.assertEqual((hello.pid, hello.name), (os.getpid(), "t"))
        a.send.put(worker_pb2.DaemonMessage(welcome=worker_pb2.Welcome(
            worker_id=7, pinning=pinning, epoch=1, max_credits=2)))
        err = started.get(timeout=WAIT)
        if err is not None:
            raise err
        for i, cpu in enumerate(cpus):
            self.assertEqual((a.next("open_slot").slot, cpu), (i, cpu))
            c = a.next("credit")
            self.assertEqual(c.slot, i)
            self.assertEqual(c.credits, min(kw.get("prefetch", 1), 2))
        return w, a

    def test_done_ok_error_and_credit_back(self) -> None:
        seen: List[wqd.WorkItem] = []

        def h(it: wqd.WorkItem) -> str:
            seen.append(it)
            if it.args.get("fail"):
                raise RuntimeError("boom")
            return "out:" + it.payload.decode()

        w, a = self.attach({"h": h}, [5, 9], prefetch=3)
        self.assertEqual((w.worker_id, w.pinning, w.cpus), (7, False, [5, 9]))
        a.send.put(work(1, 1, 9))
        d = a.next("done")
        self.assertEqual((d.item_id, d.WhichOneof("outcome"), d.ok, d.credits),
                         (1, "ok", b"out:in", 1))
        self.assertFalse(d.HasField("cpu_finished"), "no pinning: no CPU to report")
        self.assertEqual((seen[0].cpu, seen[0].slot, seen[0].args), (9, 1, {"a": "1"}))
        m = work(2, 0, 5)
        m.work.args["fail"] = "1"
        a.send.put(m)
        d = a.next("done")
        self.assertEqual((d.item_id, d.error, d.credits), (2, "boom", 1))
        a.send.put(work(3, 0, 5, handler="other"))
        self.assertIn("does not serve", a.next("done").error)
        stopper = threading.Thread(target=w.stop, kwargs={"timeout": WAIT})
        stopper.start()
        self.assertEqual(a.next("close_slot").slot, 0)
        self.assertEqual(a.next("close_slot").slot, 1)
        a.send.put(slot_closed(0))
        a.send.put(slot_closed(1))
        a.next("half-close")
        a.send.put(None)
        stopper.join(WAIT)
        self.assertTrue(w.wait(0))

    def test_cancel_of_a_running_item_answers_cancelled(self) -> None:
        running = threading.Event()

        def h(it: wqd.WorkItem) -> bytes:
            running.set()
            if not it.cancelled.wait(WAIT):
                return b"not cancelled"
            it.check()
            return b"unreachable"

        w, a = self.attach({"h": h}, [0])
        a.send.put(work(11, 0, 0))
        self.assertTrue(running.wait(WAIT))
        a.send.put(worker_pb2.DaemonMessage(cancel=worker_pb2.Cancel(item_id=11)))
        d = a.next("done")
        self.assertEqual((d.item_id, d.WhichOneof("outcome"), d.credits), (11, "cancelled", 1))
        w.stop(graceful=False, timeout=WAIT)

    def test_graceful_stop_hands_back_unstarted_and_finishes_running(self) -> None:
        running, release = threading.Event(), threading.Event()

        def h(it: wqd.WorkItem) -> bytes:
            running.set()
            release.wait(WAIT)
            return b"finished"

        w, a = self.attach({"h": h}, [0], prefetch=2)
        a.send.put(work(21, 0, 0))
        a.send.put(work(22, 0, 0))
        self.assertTrue(running.wait(WAIT))
        stopper = threading.Thread(target=w.stop, kwargs={"timeout": WAIT})
        stopper.start()
        self.assertEqual(a.next("close_slot").slot, 0)
        release.set()
        d = a.next("done")
        self.assertEqual((d.item_id, d.ok, d.credits), (21, b"finished", 0))
        hb = a.next("hand_back")
        self.assertEqual((hb.item_id, hb.reason, hb.credits), (22, "stopping", 0))
        # Holding nothing, the worker still waits for SlotClosed: a Work the daemon sent
        # before it read CloseSlot may be on the wire, and is handed back, not lost.
        a.send.put(work(23, 0, 0))
        hb = a.next("hand_back")
        self.assertEqual((hb.item_id, hb.reason), (23, "stopping"))
        a.send.put(slot_closed(0))
        a.next("half-close")
        a.send.put(None)
        stopper.join(WAIT)
        self.assertFalse(stopper.is_alive())
        self.assertTrue(w.wait(0))

    def test_pinning_pins_each_slot_and_hands_back_off_cpu_items(self) -> None:
        host = sorted(os.sched_getaffinity(0))
        before = os.sched_getaffinity(0)
        ran: "queue.Queue[tuple]" = queue.Queue()

        def h(it: wqd.WorkItem) -> None:
            ran.put((it.cpu, wqd.sched_getcpu(), os.sched_getaffinity(0)))

        # Slot 1's CPU does not exist on this host: pinning fails as for an offline CPU, the
        # slot stays open, and an item sent to it is handed back ("affinity"), not run.
        w, a = self.attach({"h": h}, [host[-1], 4095], pinning=True)
        self.assertTrue(w.pinning)
        a.send.put(work(1, 0, host[-1]))
        d = a.next("done")
        self.assertEqual((d.item_id, d.cpu_finished), (1, host[-1]))
        self.assertEqual(ran.get(timeout=WAIT), (host[-1], host[-1], {host[-1]}))
        a.send.put(work(2, 1, 4095))
        hb = a.next("hand_back")
        self.assertEqual((hb.item_id, hb.reason, hb.credits), (2, "affinity", 1))
        self.assertTrue(ran.empty(), "an item off its CPU never runs")
        self.assertEqual(os.sched_getaffinity(0), before, "only slot threads are pinned")
        w.stop(graceful=False, timeout=WAIT)

    def test_lost_stream_is_an_error_run_sees(self) -> None:
        w, a = self.attach({"h": lambda it: None}, [0])
        a.send.put(grpc.StatusCode.INVALID_ARGUMENT)
        with self.assertRaises(wqd.WqdError) as e:
            w.wait(WAIT)
        self.assertEqual(e.exception.code, grpc.StatusCode.INVALID_ARGUMENT)
        w.stop(timeout=WAIT)

    def test_refused_before_welcome(self) -> None:
        w = wqd.Worker({"h": lambda it: None}, cpus=[0], endpoint=self.endpoint)
        errs: "queue.Queue[BaseException]" = queue.Queue()

        def go() -> None:
            try:
                w.start(timeout=WAIT)
            except wqd.WqdError as e:
                errs.put(e)

        threading.Thread(target=go, daemon=True).start()
        a = self.fake.attaches.get(timeout=WAIT)
        a.next("hello")
        a.send.put(grpc.StatusCode.PERMISSION_DENIED)
        e = errs.get(timeout=WAIT)
        self.assertEqual(e.code, grpc.StatusCode.PERMISSION_DENIED)


if __name__ == "__main__":
    unittest.main()
