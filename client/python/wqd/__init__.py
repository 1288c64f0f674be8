"""wqd: a client and a worker library for the wqd daemon.

* :class:`Client` submits work to CPU groups and follows it (flush, cancel,
  drain, results), manages workqueues and reads the topology and stats.
* :class:`Worker` attaches to the daemon and serves handlers of your own on
  threads pinned to the CPUs of a group (WorkerService).

The wire contract is in :mod:`wqd.v1`, generated from proto/wqd/v1/*.proto.
"""

from ._endpoint import Endpoint, default_socket_path, parse_cpulist
from .client import (
    CancelResult,
    Client,
    Counts,
    Flushed,
    FlushSummary,
    Item,
    Lookup,
    Receipt,
    Result,
    Session,
    SessionAnswer,
    State,
    Streamed,
    Submitted,
    WqdError,
)
from .worker import Cancelled, Handler, WorkItem, Worker, resolve_cpus, sched_getcpu

__all__ = [
    "CancelResult",
    "Cancelled",
    "Client",
    "Counts",
    "Endpoint",
    "FlushSummary",
    "Flushed",
    "Handler",
    "Item",
    "Lookup",
    "Receipt",
    "Result",
    "Session",
    "SessionAnswer",
    "State",
    "Streamed",
    "Submitted",
    "WorkItem",
    "Worker",
    "WqdError",
    "default_socket_path",
    "parse_cpulist",
    "resolve_cpus",
    "sched_getcpu",
]
