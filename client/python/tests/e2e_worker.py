"""wqd.Worker against the real daemon on the two-socket fixture (no pinning: the fixture's
CPU numbers are not the host's): handlers served only by their worker, on the slot CPUs of
the item's group; output and errors back; cancel of a running item; graceful stop."""

from __future__ import annotations

import os
import threading
import unittest
from typing import Dict, List

import wqd
from e2e import WAIT, client, poll, worker

CACHE1 = {2, 3, 10, 11}
CACHE2 = {4, 5, 12, 13}


class Recorder:
    """A handler that records what it ran and returns ``name:payload@cpu``."""

    def __init__(self, name: str) -> None:
        self.name = name
        self.lock = threading.Lock()
        self.seen: Dict[int, wqd.WorkItem] = {}

    def __call__(self, it: wqd.WorkItem) -> bytes:
        with self.lock:
            assert it.id not in self.seen, f"item {it.id} sent twice"
            self.seen[it.id] = it
        return f"{self.name}:{it.payload.decode()}@{it.cpu}".encode()


class WorkerTest(unittest.TestCase):
    def setUp(self) -> None:
        self.c = client()
        self.workers: List[wqd.Worker] = []

    def tearDown(self) -> None:
        for w in self.workers:
            w.stop(timeout=WAIT)
        self.c.close()

    def start(self, handlers: Dict[str, wqd.Handler], **kw: object) -> wqd.Worker:
        w = worker(handlers, **kw)
        w.start(timeout=WAIT)
        self.workers.append(w)
        return w

    def test_each_handler_runs_on_its_worker_in_the_items_group(self) -> None:
        # Built-in items go to a workqueue of their own, so this test is about handlers only.
        self.c.create_workqueue("py-local")
        a, b = Recorder("a"), Recorder("b")
        wa = self.start({"py.a": a}, target="cache:1", name="wa")
        wb = self.start({"py.b": b}, target="cache:2", name="wb")
        self.assertFalse(wa.pinning, "a fixture daemon does not ask for pinning")
        self.assertEqual(sorted(wa.cpus), sorted(CACHE1))
        self.assertNotEqual(wa.worker_id, wb.worker_id)
        listed = {w.worker_id: w for w in self.c.list_workers()}
        self.assertEqual(list(listed[wa.worker_id].handlers), ["py.a"])
        self.assertEqual(sorted(s.cpu for s in listed[wa.worker_id].slots), sorted(CACHE1))

        items = [wqd.Item("cache:1", "py.a", payload=str(i).encode()) for i in range(12)]
        items += [wqd.Item("cache:2", "py.b", payload=str(i).encode()) for i in range(12)]
        s = self.c.submit(items)
        local = self.c.submit([wqd.Item("cache:1", "noop") for _ in range(4)],
                              workqueue="py-local")
        f = self.c.flush(batch=s.batch_id, timeout=WAIT)
        fl = self.c.flush(batch=local.batch_id, timeout=WAIT)
        self.assertEqual(fl.summary.counts.ok, 4, fl.results)
        self.assertTrue(all(r.worker_id == 0 for r in fl.results), "built-ins run in wqd")
        self.assertEqual(f.summary.counts.ok, 24, f.results)
        for r in f.results:
            rec, w, group = (a, wa, CACHE1) if r.handler == "py.a" else (b, wb, CACHE2)
            self.assertIn(r.item_id, rec.seen, f"{r.handler} ran by its own worker only")
            it = rec.seen[r.item_id]
            self.assertEqual((r.worker_id, r.worker_pid), (w.worker_id, os.getpid()), r)
            self.assertIn(r.cpu_started, group, r)
            self.assertEqual(r.cpu_started, it.cpu, "started on the slot's CPU")
            self.assertEqual(r.worker_slot, it.slot, r)
            self.assertEqual(r.output, f"{rec.name}:{it.payload.decode()}@{it.cpu}".encode())
        self.assertEqual(len(a.seen), 12)
        self.assertEqual(len(b.seen), 12)
        self.assertTrue(all(it.handler == "py.a" for it in a.seen.values()))
        self.assertTrue(all(it.handler == "py.b" for it in b.seen.values()))

    def test_lost_worker_fails_its_items_or_they_are_requeued(self) -> None:
        self.c.create_workqueue("py-requeue", on_worker_lost="requeue")
        started = threading.Event()

        def hold(it: wqd.WorkItem) -> bytes:
            started.set()
            it.cancelled.wait(WAIT)
            raise RuntimeError("never reported: the stream is gone")

        def result(item_id: int) -> "wqd.Result | None":
            r = self.c.results([item_id])[0].result
            return r if r is not None and r.state != wqd.State.RUNNING else None

        w1 = self.start({"py.hold": hold}, target="cpu:4", name="lost-1")
        (failing,) = self.c.submit([wqd.Item("cpu:4", "py.hold")]).item_ids
        self.assertTrue(started.wait(WAIT))
        w1.stop(graceful=False, timeout=WAIT)
        r = poll("the lost item to end", lambda: result(failing))
        self.assertEqual((r.state, r.worker_id), (wqd.State.FAILED, w1.worker_id), r)
        self.assertIn("worker lost", r.error)

        started.clear()
        w2 = self.start({"py.hold": hold}, target="cpu:4", name="lost-2")
        (again,) = self.c.submit([wqd.Item("cpu:4", "py.hold")],
                                 workqueue="py-requeue").item_ids
        self.assertTrue(started.wait(WAIT))
        w2.stop(graceful=False, timeout=WAIT)
        r = poll("the lost item to be queued again", lambda: result(again))
        self.assertEqual((r.state, r.worker_lost), (wqd.State.PENDING, 1), r)
        attempts: List[int] = []
        w3 = self.start({"py.hold": lambda it: attempts.append(it.attempt) or b"at last"},
                        target="cpu:4", name="lost-3")
        (r,) = self.c.flush(items=[again], timeout=WAIT).results
        self.assertEqual((r.state, r.output, r.worker_id, r.worker_lost),
                         (wqd.State.OK, b"at last", w3.worker_id, 1), r)
        self.assertEqual(attempts, [1], "the next worker is told it may have run before")

    def test_builtin_item_behind_a_worker_item_on_the_same_cpu_runs(self) -> None:
        # Found by this test: a remote answer freed the CPU's max_active slot and woke no local
        # worker (fixed in Sched::offer_freed_slot).
        self.start({"py.a": lambda it: b"a"}, target="cpu:2")
        for _ in range(20):
            ids = self.c.submit([wqd.Item("cpu:2", "py.a"), wqd.Item("cpu:2", "noop")]).item_ids
            f = self.c.flush(items=ids, timeout=5)
            self.assertEqual(f.summary.counts.ok, 2)

    def test_handler_exception_fails_the_item_with_its_text(self) -> None:
        def bad(it: wqd.WorkItem) -> None:
            raise ValueError(f"bad input {it.args['n']}")

        self.start({"py.bad": bad}, target="cpu:2")
        s = self.c.submit([wqd.Item("cpu:2", "py.bad", args={"n": "7"})], wait=True)
        (r,) = s.results
        self.assertEqual(r.state, wqd.State.FAILED, r)
        self.assertIn("bad input 7", r.error)

    def test_cancel_of_a_running_item_ends_it_cancelled(self) -> None:
        running = threading.Event()
        observed = threading.Event()

        def slow(it: wqd.WorkItem) -> bytes:
            running.set()
            if it.cancelled.wait(WAIT):
                observed.set()
            it.check()
            return b"ran to the end"

        self.start({"py.slow": slow}, target="cpu:3")
        (item_id,) = self.c.submit([wqd.Item("cpu:3", "py.slow")]).item_ids
        self.assertTrue(running.wait(WAIT), "the handler started")
        (out,) = self.c.cancel(items=[item_id])
        self.assertEqual((out.outcome, out.state), ("waited_running", wqd.State.CANCELLED))
        self.assertTrue(observed.is_set(), "the handler saw item.cancelled")
        (lk,) = self.c.results([item_id])
        self.assertEqual((lk.result.state, lk.result.cpu_started), (wqd.State.CANCELLED, 3))

    def test_graceful_stop_finishes_running_and_hands_back_the_rest(self) -> None:
        self.c.create_workqueue("py-stop", max_active=2)
        started = threading.Event()
        release = threading.Event()

        def blocking(it: wqd.WorkItem) -> bytes:
            started.set()
            release.wait(WAIT)
            return b"first"

        w1 = self.start({"py.blk": blocking}, target="cpu:2", prefetch=2, name="w1")
        s = self.c.submit([wqd.Item("cpu:2", "py.blk"), wqd.Item("cpu:2", "py.blk")],
                          workqueue="py-stop")
        first, second = s.item_ids
        self.assertTrue(started.wait(WAIT))

        def holds_two() -> object:
            for w in self.c.list_workers():
                if w.worker_id == w1.worker_id and sum(x.in_flight for x in w.slots) == 2:
                    return True
            return None

        poll("worker 1 to hold both items", holds_two)
        stopper = threading.Thread(target=w1.stop, kwargs={"timeout": WAIT})
        stopper.start()
        poll("the slot to close", lambda: True if all(
            x.closed for w in self.c.list_workers() if w.worker_id == w1.worker_id
            for x in w.slots) else None)
        release.set()
        stopper.join(WAIT)
        self.assertFalse(stopper.is_alive(), "stop() returned")
        self.assertTrue(w1.wait(0), "the stream ended OK")
        self.assertNotIn(w1.worker_id, [w.worker_id for w in self.c.list_workers()])
        r1, r2 = (x.result for x in self.c.results([first, second]))
        self.assertEqual((r1.state, r1.output, r1.worker_id), (wqd.State.OK, b"first",
                                                               w1.worker_id))
        self.assertEqual(r2.state, wqd.State.PENDING, "handed back, queued again")

        w2 = self.start({"py.blk": lambda it: b"second"}, target="cpu:2", name="w2")
        f = self.c.flush(items=[second], timeout=WAIT)
        (r2,) = f.results
        self.assertEqual((r2.state, r2.output, r2.worker_id), (wqd.State.OK, b"second",
                                                               w2.worker_id))


if __name__ == "__main__":
    unittest.main()
