"""wqd.Client against the real daemon: workqueues that keep no per-item results
(``results="summary"`` and ``results="none"``). Their waits answer with counts, their flushes
stream no results, and an ended item is looked up as forgotten."""

from __future__ import annotations

import unittest

import wqd
from e2e import client


class ResultsModeTest(unittest.TestCase):
    def setUp(self) -> None:
        self.c = client()

    def tearDown(self) -> None:
        self.c.close()

    def test_summary_and_none_keep_counts_only(self) -> None:
        n = 5
        for mode in ("summary", "none"):
            name = f"py-{mode}"
            self.c.create_workqueue(name, results=mode)
            s = self.c.submit([wqd.Item("all", "noop")] * n, workqueue=name, wait=True)
            self.assertEqual(s.results, [], mode)
            assert s.counts is not None
            self.assertEqual(s.counts.ok, n, mode)
            looked = self.c.results(s.item_ids)
            self.assertEqual([x.status for x in looked], ["forgotten"] * n, mode)
            # A flush of items still live streams no result; its summary counts them.
            s = self.c.submit([wqd.Item("all", "sleep", args={"ms": "500"})] * n,
                              workqueue=name)
            self.assertEqual([x.status for x in self.c.results(s.item_ids)], ["found"] * n)
            f = self.c.flush(batch=s.batch_id)
            self.assertEqual(f.results, [], mode)
            self.assertEqual(f.summary.counts.ok, n, mode)
            # Back to full: later items have results again.
            self.c.update_workqueue(name, results="full")
            s = self.c.submit([wqd.Item("all", "noop")] * n, workqueue=name, wait=True)
            self.assertEqual(len(s.results), n, mode)
            self.c.delete_workqueue(name)


if __name__ == "__main__":
    unittest.main()
