"""Helpers of the end-to-end tests (tests/python.rs runs them against a real daemon whose
socket is in WQD_SOCKET): a client and workers with the test options, bounded polling.

WQD_PY_AUTHORITY_WORKAROUND=1 makes the tests (only them) send ``localhost`` as the HTTP/2
authority instead of the socket path stock grpcio sends, for daemons that refuse the latter.
"""

from __future__ import annotations

import os
import time
from typing import Any, Callable, List, Optional, Tuple, TypeVar

import wqd

T = TypeVar("T")

#: Bound of every wait and call in the end-to-end tests.
WAIT = 30.0


def options() -> List[Tuple[str, Any]]:
    if os.environ.get("WQD_PY_AUTHORITY_WORKAROUND") == "1":
        return [("grpc.default_authority", "localhost")]
    return []


def client() -> wqd.Client:
    return wqd.Client(timeout=WAIT, options=options())


def worker(handlers: Any, **kw: Any) -> wqd.Worker:
    return wqd.Worker(handlers, options=options(), **kw)


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
