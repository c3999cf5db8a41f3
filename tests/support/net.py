"""Loopback ports for tests: the one place a test asks the kernel for a free port.

Call it where the port is about to be used (in a fixture or the test), never at import: a port picked while
pytest collects sits unbound for minutes, and anything else on the machine may take it meanwhile.
"""

from __future__ import annotations

import functools
import socket


def ipv6_loopback() -> bool:
    """Whether ::1 can be bound here (containers without IPv6 cannot)."""
    try:
        with socket.socket(socket.AF_INET6, socket.SOCK_STREAM) as s:
            s.bind(("::1", 0))
    except OSError:
        return False
    return True


def free_port(*, both_loopbacks: bool = False) -> int:
    """A TCP port free on 127.0.0.1 right now; with ``both_loopbacks``, free on ::1 too (when ::1 exists),
    for listeners that bind both.  The caller binds it right away: nothing holds it in between."""
    dual = both_loopbacks and ipv6_loopback()
    for _ in range(50):  # a port free on 127.0.0.1 may be taken on ::1: try another, a bounded number of times
        with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s4:
            s4.bind(("127.0.0.1", 0))
            port = int(s4.getsockname()[1])
            if not dual:
                return port
            with socket.socket(socket.AF_INET6, socket.SOCK_STREAM) as s6:
                try:
                    s6.bind(("::1", port))
                except OSError:
                    continue
                return port
    raise RuntimeError("no port free on both loopback addresses in 50 tries")


@functools.cache
def module_port(module: str) -> int:
    """A test module's own loopback redirect port (so it never waits for 8000/18000, which other tests use):
    picked the first time the module asks, when its provider starts, then the same for the rest of the run."""
    return free_port()
