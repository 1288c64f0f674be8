"""Where the daemon listens, and cpulists.

Mirrors ``client/src/endpoint.rs``: the default socket is
``$XDG_RUNTIME_DIR/wqd/wqd.sock`` for a non-root user whose ``XDG_RUNTIME_DIR``
is an absolute path, else ``/run/wqd/wqd.sock``; ``$WQD_ADDR`` (any endpoint)
and then ``$WQD_SOCKET`` (a socket path) override it, as they do for wqctl.
"""

from __future__ import annotations

import os
from dataclasses import dataclass
from typing import Mapping, Optional, Set

SYSTEM_SOCKET_PATH = "/run/wqd/wqd.sock"


def socket_path_for(is_root: bool, xdg_runtime_dir: Optional[str]) -> str:
    """The default-socket rule with its inputs passed in."""
    if xdg_runtime_dir and not is_root and os.path.isabs(xdg_runtime_dir):
        return os.path.join(xdg_runtime_dir, "wqd", "wqd.sock")
    return SYSTEM_SOCKET_PATH


def default_socket_path() -> str:
    """The socket path wqd and wqctl use when given none."""
    return socket_path_for(os.geteuid() == 0, os.environ.get("XDG_RUNTIME_DIR"))


@dataclass(frozen=True)
class Endpoint:
    """A parsed daemon address.

    ``target`` is what grpcio dials (``unix:/path`` or ``host:port``);
    ``tls`` is true for ``https://``.
    """

    target: str
    tls: bool = False

    @staticmethod
    def parse(s: str) -> "Endpoint":
        """Accepts ``unix:/path``, ``unix:///path``, an absolute or ``./``
        path, ``http://host:port`` and ``https://host:port``.

        Raises ValueError for anything else.
        """
        if s.startswith("unix:"):
            path = s[len("unix:"):]
            if path.startswith("//"):
                path = path[2:]
            if not path:
                raise ValueError(f"{s!r}: empty socket path")
            return Endpoint("unix:" + path)
        for scheme in ("http://", "https://"):
            if s.startswith(scheme):
                authority = s[len(scheme):].rstrip("/")
                if not authority:
                    raise ValueError(f"{s!r}: missing host:port")
                return Endpoint(authority, tls=scheme == "https://")
        if s.startswith(("/", "./", "../")):
            return Endpoint("unix:" + s)
        raise ValueError(
            f"{s!r}: expected unix:/path, a socket path, or http(s)://host:port"
        )

    @staticmethod
    def default(env: Optional[Mapping[str, str]] = None) -> "Endpoint":
        """``$WQD_ADDR``, else ``$WQD_SOCKET``, else the default socket."""
        env = os.environ if env is None else env
        addr = env.get("WQD_ADDR")
        if addr:
            return Endpoint.parse(addr)
        sock = env.get("WQD_SOCKET")
        if sock:
            return Endpoint("unix:" + sock)
        return Endpoint("unix:" + default_socket_path())


def parse_cpulist(s: str) -> Set[int]:
    """Parses a kernel cpulist (``0-3,8``; empty or blank = no CPU).

    Raises ValueError on bad syntax.
    """
    out: Set[int] = set()
    for part in s.strip().split(","):
        part = part.strip()
        if not part:
            continue
        lo, sep, hi = part.partition("-")
        a = int(lo)
        b = int(hi) if sep else a
        if a < 0 or b < a:
            raise ValueError(f"bad cpulist range {part!r}")
        out.update(range(a, b + 1))
    return out
