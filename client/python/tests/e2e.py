"""Helpers of the end-to-end tests (tests/python.rs runs them against a real daemon whose
socket is in WQD_SOCKET): a client and workers on stock grpcio's default channel options,
and bounded polling."""

from __future__ import annotations

import time
from typing import Any, Callable, Optional, TypeVar

import wqd

T = TypeVar("T")

#: Bound of every wait and call in the end-to-end tests.
WAIT = 30.0


def client() -> wqd.Client:
    return wqd.Client(timeout=WAIT)


def worker(handlers: Any, **kw: Any) -> wqd.Worker:
    return wqd.Worker(handlers, **kw)


def poll(what: str, f: Callable[[], Optional[T]], limit: float = WAIT) -> T:
    """Calls ``f`` every 10 ms until it returns something other than None;
    AssertionError naming ``what`` after ``limit`` seconds."""
    end = time.monotonic() + limit
    while True:
        v = f()
        if v is not None:
            return v
        if time.monotonic() > end:
            raise AssertionError(f"timed out after {limit}s waiting for {what}")
        time.sleep(0.01)
