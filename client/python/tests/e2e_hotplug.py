"""A Python worker serving items while CPUs of its group go away and come back.

Driven by tests/python.rs on the two-socket fixture: this program attaches a worker to
cache:1 (CPUs 2, 3, 10, 11), prints ``ready``, then submits batches (targets cache:1 and
cpu:3) until a line ``stop`` arrives on stdin, while the test takes CPUs 3 and 11 offline and
back. Then it flushes everything and checks: every item terminal exactly once (one flush
result each, one handler call each), all ok, each started on a CPU of its group (or, for
cpu:3 with a fallback recorded, of the groups it widens to inside cache:1), on the slot's
CPU, and on a CPU live in the topology epoch the daemon chose it in. Prints ``ok ...`` and
exits 0, or raises.
"""

from __future__ import annotations

import sys
import threading
import time
from collections import Counter
from typing import Dict, Set

import wqd
from e2e import WAIT, client, worker

CACHE1 = {2, 3, 10, 11}


def main() -> None:
    c = client()
    c.create_workqueue("py-hot", max_active=1, fallback="widen")

    # Epoch -> live CPUs, from WatchTopology (it may skip epochs; those items are not checked).
    live: Dict[int, Set[int]] = {}
    watch = c.watch_topology(timeout=600)

    def watcher() -> None:
        try:
            for snap in watch:
                live[snap.epoch] = wqd.parse_cpulist(snap.live)
        except wqd.WqdError:
            pass  # Closed at the end.

    threading.Thread(target=watcher, daemon=True).start()

    calls: Counter = Counter()
    slot_cpu: Dict[int, int] = {}
    lock = threading.Lock()

    def hot(it: wqd.WorkItem) -> bytes:
        with lock:
            calls[it.id] += 1
            slot_cpu[it.id] = it.cpu
        time.sleep(0.005)  # The work itself.
        return b"done"

    w = worker({"py.hot": hot}, target="cache:1", name="hotplug")
    w.start(timeout=WAIT)
    stop = threading.Event()

    def read_stdin() -> None:
        for line in sys.stdin:
            if line.strip() == "stop":
                break
        stop.set()

    threading.Thread(target=read_stdin, daemon=True).start()
    print("ready", flush=True)
    ids = []
    end = time.monotonic() + 120
    while not stop.is_set():
        assert time.monotonic() < end, "no stop line within 120 s"
        s = c.submit([wqd.Item("cache:1", "py.hot") for _ in range(8)]
                     + [wqd.Item("cpu:3", "py.hot") for _ in range(4)], workqueue="py-hot")
        ids.extend(s.item_ids)
        # Keep a bounded backlog: wait for this batch before the next one.
        c.flush(batch=s.batch_id, summary_only=True, timeout=WAIT)

    f = c.flush(items=ids, timeout=WAIT)
    w.stop(timeout=WAIT)
    c.close()  # Ends the watch too.

    seen = Counter(r.item_id for r in f.results)
    assert sorted(seen) == sorted(ids), "one flush result per item"
    assert max(seen.values()) == 1, "every item reported terminal once"
    assert f.summary.counts.ok == len(ids), f.summary
    assert set(calls) == set(ids) and max(calls.values()) == 1, "one handler call per item"
    checked = offline_epochs = 0
    for r in f.results:
        assert r.state == wqd.State.OK, r
        assert r.worker_id == w.worker_id, r
        assert r.cpu_started == slot_cpu[r.item_id], (r, slot_cpu[r.item_id])
        if r.target == "cpu:3" and not r.fallback_level:
            assert r.cpu_started == 3, r
        else:
            assert r.cpu_started in CACHE1, r
        epoch_live = live.get(r.topology_epoch)
        if epoch_live is not None:
            checked += 1
            assert r.cpu_started in epoch_live, (r, epoch_live)
            offline_epochs += 3 not in epoch_live
    fallbacks = sum(1 for r in f.results if r.fallback_level)
    assert checked >= len(ids) // 2, f"only {checked} of {len(ids)} epochs seen"
    assert offline_epochs > 0, "no item started while CPU 3 was offline"
    assert fallbacks > 0, "no cpu:3 item fell back while CPU 3 was offline"
    print(f"ok {len(ids)} items, {checked} epoch-checked, {offline_epochs} while CPU 3 was "
          f"offline, {fallbacks} fell back", flush=True)


if __name__ == "__main__":
    main()
