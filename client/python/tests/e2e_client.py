"""wqd.Client against the real daemon on the two-socket fixture (built-in handlers only):
every call's round trip and the errors it raises."""

from __future__ import annotations

import unittest

import grpc

import wqd
from e2e import WAIT, client


class ClientTest(unittest.TestCase):
    def setUp(self) -> None:
        self.c = client()

    def tearDown(self) -> None:
        self.c.close()

    def test_submit_wait_places_items_in_their_group(self) -> None:
        s = self.c.submit([wqd.Item("cache:1", "spin", args={"ms": "1"}) for _ in range(8)],
                          wait=True)
        self.assertEqual(len(s.results), 8)
        for r in s.results:
            self.assertEqual(r.state, wqd.State.OK, r)
            self.assertIn(r.cpu_started, {2, 3, 10, 11}, r)
            self.assertEqual((r.target, r.handler, r.batch_id), ("cache:1", "spin", s.batch_id))

    def test_each_fans_out_and_flush_streams_every_result(self) -> None:
        s = self.c.submit([wqd.Item("each:cache", "noop", key="k")])
        self.assertEqual([r.target for r in s.receipts],
                         ["cache:0", "cache:1", "cache:2", "cache:3"])
        seen = []
        summary = None
        for x in self.c.flush_iter(batch=s.batch_id):
            if isinstance(x, wqd.FlushSummary):
                summary = x
            else:
                seen.append(x.item_id)
        self.assertEqual(sorted(seen), s.item_ids)
        assert summary is not None
        self.assertEqual((summary.items_covered, summary.counts.ok), (4, 4))

    def test_submit_without_receipts(self) -> None:
        # Delayed, so that the keyed items are still pending when the third comes.
        items = [wqd.Item("all", "noop", delay=0.3, key="r" if i in (1, 3) else "")
                 for i in range(5)]
        s = self.c.submit(items, receipts=False)
        self.assertEqual(s.receipts, [])
        self.assertEqual((s.item_count, s.queued_count), (5, 4))
        self.assertEqual(s.duplicates, {3: s.first_item_id + 1})
        self.assertEqual(s.item_ids, [s.first_item_id + i for i in (0, 1, 2, 4)])
        seen = [x.item_id for x in self.c.flush_iter(batch=s.batch_id)
                if not isinstance(x, wqd.FlushSummary)]
        self.assertEqual(sorted(seen), s.item_ids)
        w = self.c.submit([wqd.Item("all", "noop")] * 3, wait=True, receipts=False)
        self.assertEqual((w.receipts, w.counts.ok if w.counts else None), ([], 3))
        self.assertEqual([r.item_id for r in w.results], w.item_ids)

    def test_submit_stream_of_a_large_batch(self) -> None:
        n = 2500
        items = (wqd.Item("all", "noop", key=f"s{i}" if i % 1000 else "") for i in range(n))
        s = self.c.submit_stream(items, chunk=700)
        self.assertEqual((s.item_count, s.queued_count, len(s.item_ids)), (n, n, n))
        f = self.c.flush(batch=s.batch_id, summary_only=True)
        self.assertEqual(f.results, [])
        self.assertEqual((f.summary.items_covered, f.summary.counts.ok), (n, n))

    def test_cancel_pending_and_results(self) -> None:
        s = self.c.submit([wqd.Item("all", "noop", delay=3600), wqd.Item("all", "noop")])
        delayed, other = s.item_ids
        out = self.c.cancel(items=[delayed])
        self.assertEqual([(x.item_id, x.outcome, x.state) for x in out],
                         [(delayed, "cancelled_pending", wqd.State.CANCELLED)])
        self.c.flush(items=[other])
        looked = self.c.results([delayed, other, 10**12])
        self.assertEqual([x.status for x in looked], ["found", "found", "unknown"])
        self.assertEqual(looked[0].result.state, wqd.State.CANCELLED)
        self.assertEqual(looked[1].result.state, wqd.State.OK)
        self.assertIsNone(looked[2].result)

    def test_workqueues_and_drain(self) -> None:
        a = self.c.create_workqueue("py-wq", max_active=2, placement="first", fallback="wait")
        self.assertEqual((a.name, a.max_active), ("py-wq", 2))
        with self.assertRaises(wqd.WqdError) as e:
            self.c.create_workqueue("py-wq")
        self.assertEqual(e.exception.code, grpc.StatusCode.ALREADY_EXISTS)
        a = self.c.update_workqueue("py-wq", fallback="reject", unserved="reject")
        self.assertEqual(a.fallback, wqd.v1.workqueue_pb2.FALLBACK_POLICY_REJECT)
        names = [w.attrs.name for w in self.c.list_workqueues()]
        self.assertIn("py-wq", names)
        self.c.submit([wqd.Item("cpu:2", "sleep", args={"ms": "50"})] * 3, workqueue="py-wq")
        counts = self.c.drain("py-wq")
        self.assertEqual(counts.ok, 3)
        self.c.delete_workqueue("py-wq")
        with self.assertRaises(wqd.WqdError) as e:
            self.c.list_workqueues("py-wq")
        self.assertEqual(e.exception.code, grpc.StatusCode.NOT_FOUND)

    def test_results_attribute_and_wait_counts(self) -> None:
        wq = wqd.v1.workqueue_pb2
        a = self.c.create_workqueue("py-res", results="summary")
        self.assertEqual(a.results, wq.RESULTS_MODE_SUMMARY)
        self.assertEqual(self.c.list_workqueues("py-res")[0].attrs.results,
                         wq.RESULTS_MODE_SUMMARY)
        a = self.c.update_workqueue("py-res", results="full")
        self.assertEqual(a.results, wq.RESULTS_MODE_FULL)
        self.assertEqual(self.c.create_workqueue("py-res2").results, wq.RESULTS_MODE_FULL)
        with self.assertRaises(ValueError):
            self.c.create_workqueue("py-res3", results="some")
        with self.assertRaises(wqd.WqdError) as e:
            self.c.update_workqueue("py-res", results=0)
        self.assertEqual(e.exception.code, grpc.StatusCode.INVALID_ARGUMENT)
        self.assertIn("results", e.exception.message)
        # A waited submit counts its items by final state, whatever the workqueue keeps.
        s = self.c.submit([wqd.Item("all", "noop")] * 3, workqueue="py-res", wait=True)
        assert s.counts is not None
        self.assertEqual((s.counts.ok, len(s.results)), (3, 3))
        self.assertIsNone(self.c.submit([wqd.Item("all", "noop")], workqueue="py-res").counts)
        for name in ("py-res", "py-res2"):
            self.c.delete_workqueue(name)

    def test_session_answers_each_request_by_tag(self) -> None:
        # Stock grpcio's bidi stream: the answers come as requests finish, each by its tag;
        # a refused request is an answer and the session goes on; after close() the open
        # requests are answered and the stream ends.
        with self.c.session() as s:
            r = s.submit([wqd.Item("cache:1", "noop")] * 3, wait=True)
            self.assertEqual([x.state for x in r.results], [wqd.State.OK] * 3)
            self.assertTrue(all(x.cpu_started in {2, 3, 10, 11} for x in r.results), r)
            slow = s.send([wqd.Item("cpu:1", "sleep", args={"ms": "500"})], wait=True)
            bad = s.send([wqd.Item("cache:x", "noop")])
            quick = s.send([wqd.Item("cpu:2", "noop")])
            self.assertEqual(s.open, 3)
            s.close()
            answers = {}
            while True:
                a = s.next()
                if a is None:
                    break
                answers[a.tag] = a
            self.assertEqual(sorted(answers), [slow, bad, quick])
            err = answers[bad].error
            assert err is not None
            self.assertEqual(err.code, grpc.StatusCode.INVALID_ARGUMENT)
            self.assertIn("items[0].target", err.message)
            done = answers[slow].submitted
            assert done is not None and done.counts is not None
            self.assertEqual(done.counts.ok, 1)
            q = answers[quick].submitted
            assert q is not None
            self.assertIsNone(q.counts)
            self.assertEqual(len(q.item_ids), 1)

    def test_a_session_wait_timeout_ends_only_that_wait(self) -> None:
        # The limited request is answered DEADLINE_EXCEEDED with its batch's id while its
        # item still runs; the batch flushes by that id, and the session goes on.
        with self.c.session() as s:
            limited = s.send([wqd.Item("cpu:1", "sleep", args={"ms": "1000"})], wait=True,
                             wait_timeout=0.2)
            a = s.next()
            assert a is not None and a.error is not None, a
            self.assertEqual(a.tag, limited)
            self.assertEqual(a.error.code, grpc.StatusCode.DEADLINE_EXCEEDED)
            assert a.queued_batch is not None
            self.assertIn(f"batch {a.queued_batch}", a.error.message)
            r = s.submit([wqd.Item("cpu:2", "noop")], wait=True)
            self.assertEqual([x.state for x in r.results], [wqd.State.OK])
            with self.assertRaises(ValueError):
                s.send([wqd.Item("cpu:2", "noop")], wait_timeout=1.0)
        f = self.c.flush(batch=a.queued_batch)
        self.assertEqual(f.summary.items_covered, 1)
        self.assertEqual([x.state for x in f.results], [wqd.State.OK])

    def test_errors_carry_code_and_message(self) -> None:
        with self.assertRaises(wqd.WqdError) as e:
            self.c.submit([wqd.Item("all", "noop"), wqd.Item("cache:x", "noop")])
        self.assertEqual(e.exception.code, grpc.StatusCode.INVALID_ARGUMENT)
        self.assertIn("items[1].target", e.exception.message)
        with self.assertRaises(wqd.WqdError) as e:
            self.c.submit([wqd.Item("all", "noop")], workqueue="no-such-wq")
        self.assertEqual(e.exception.code, grpc.StatusCode.NOT_FOUND)

    def test_topology_and_stats(self) -> None:
        t = self.c.topology()
        self.assertEqual(wqd.parse_cpulist(t.live), set(range(14)))
        self.assertIn("cache:1", [g.target for g in t.groups])
        self.assertEqual(wqd.resolve_cpus("cache:1", self.c), [2, 3, 10, 11])
        first = next(iter(self.c.watch_topology(timeout=WAIT)))
        self.assertGreaterEqual(first.epoch, t.epoch)
        st = self.c.stats()
        self.assertIn("spin", list(st.handlers))
        self.assertTrue(st.version)
        self.assertGreaterEqual(st.topology_epoch, t.epoch)


if __name__ == "__main__":
    unittest.main()
