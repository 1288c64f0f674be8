#!/usr/bin/env python3
"""RCU's expedited grace period, done on wqd: one item per leaf group of CPUs, then flush them all.

The kernel's sync_rcu_exp_select_cpus() queues one work item per leaf rcu_node (a slice of
the CPUs) on a CPU of that slice, then flushes them all; when the slice's CPUs went offline,
the work landed on a disassociated pool and the flush could hang. Here the leaves are the
daemon's groups of one level (``--level``, default ``cache``: one item per LLC), the fan-out
target ``each:LEVEL`` makes one item per leaf in one batch, and the handler (``rcu.gp``) is
served by Python workers this program attaches itself: one Worker per leaf group, one thread
per CPU. Each round submits the fan-out and flushes the batch, printing where every item ran.

When a leaf has no live CPU left, its item does not wait for it: the workqueue's fallback
(``widen``, the default) runs it on the nearest wider group with a live CPU, and the result
says so; the flush always returns.

    python examples/rcu_like.py [--level cache] [--rounds 3] [--interval 0]

The daemon's address: ``$WQD_ADDR``, ``$WQD_SOCKET``, else the default socket.
"""

from __future__ import annotations

import argparse
import sys
import time
from typing import List

import wqd

WORKQUEUE = "rcu-like"
HANDLER = "rcu.gp"


def report_quiescent(item: wqd.WorkItem) -> str:
    """The per-leaf work: here, say which CPU of the leaf did it."""
    return f"leaf {item.args['leaf']} quiescent on cpu {item.cpu}"


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--level", default="cache",
                    help="leaf level: cpu, core, shard, cache, node, package")
    ap.add_argument("--rounds", type=int, default=3, help="grace periods to run")
    ap.add_argument("--interval", type=float, default=0.0, help="seconds between rounds")
    ap.add_argument("--timeout", type=float, default=30.0, help="bound of each flush")
    args = ap.parse_args()

    client = wqd.Client(timeout=args.timeout)
    try:
        # placement=first: the lowest live CPU of the leaf, the rule of the kernel's fix.
        client.create_workqueue(WORKQUEUE, placement="first", fallback="widen")
    except wqd.WqdError as e:
        if e.code.name != "ALREADY_EXISTS":
            raise

    snap = client.topology()
    prefix = args.level + ":"
    leaves = [g.target for g in snap.groups if g.target.startswith(prefix)]
    if not leaves:
        print(f"the daemon's topology has no {args.level} groups", file=sys.stderr)
        return 2
    # The leaves partition the CPUs, so these workers have a slot on every CPU: an item that
    # falls back to a wider group still finds a slot there.
    workers: List[wqd.Worker] = []
    try:
        for leaf in leaves:
            w = wqd.Worker({HANDLER: report_quiescent}, target=leaf, name=f"rcu-like {leaf}")
            w.start()
            workers.append(w)
        print(f"{len(workers)} workers on {', '.join(leaves)} "
              f"(pinning {'on' if workers[0].pinning else 'off'})", flush=True)

        failed = 0
        for n in range(1, args.rounds + 1):
            sub = client.submit(
                [wqd.Item(f"each:{args.level}", HANDLER, args={"leaf": args.level})],
                workqueue=WORKQUEUE)
            flushed = client.flush(batch=sub.batch_id, timeout=args.timeout)
            by_id = {r.item_id: r for r in flushed.results}
            print(f"round {n}: {flushed.summary.counts.ok}/{flushed.summary.items_covered} "
                  f"ok in {flushed.summary.waited * 1000:.1f} ms", flush=True)
            for rec in sub.receipts:
                r = by_id[rec.item_id]
                where = f"cpu {r.cpu_started}" if r.cpu_started is not None else "no cpu"
                fb = f" fallback {r.fallback_level}: {r.fallback_reason}" \
                    if r.fallback_level else ""
                print(f"  {rec.target:<10} {r.state.value:<9} {where}{fb}", flush=True)
                failed += r.state != wqd.State.OK
            if args.interval:
                time.sleep(args.interval)
        return 1 if failed else 0
    finally:
        for w in workers:
            w.stop()
        client.close()


if __name__ == "__main__":
    sys.exit(main())
