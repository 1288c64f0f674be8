"""A worker whose daemon goes away: tests/python.rs stops the daemon after ``ready``; the
worker does not reconnect, and wait() (as run()) raises WqdError. Prints ``lost CODE``."""

from __future__ import annotations

import wqd
from e2e import WAIT, worker


def main() -> None:
    w = worker({"py.lost": lambda it: b""}, target="cpu:2", name="lost")
    w.start(timeout=WAIT)
    print("ready", flush=True)
    try:
        ended = w.wait(WAIT)
    except wqd.WqdError as e:
        print(f"lost {e.code.name}: {e.message}", flush=True)
    else:
        raise SystemExit(f"wait() returned {ended} instead of raising")
    finally:
        w.stop(timeout=WAIT)


if __name__ == "__main__":
    main()
