"""Who is at the other end of a socket connection, beyond its uid (client_shim/protocol.py checks that): whether it
still is there, and whether it runs here or relays for another host.  Linux's /proc and poll(); no asyncio."""

from __future__ import annotations

import os
import select
from typing import Any


def hung_up(sock: Any) -> bool:
    """Whether the other end of a connected socket has closed it completely (a half-close is not that)."""
    try:
        fd = sock.fileno()
    except (OSError, AttributeError):
        return True
    if fd < 0:
        return True
    poller = select.poll()
    poller.register(fd, 0)  # POLLHUP and POLLERR are reported whatever is asked for
    return any(events & (select.POLLHUP | select.POLLERR) for _fd, events in poller.poll(0))


# The programs whose connections are forwarded from elsewhere (ssh -R, or sshd for ssh -L): docs/remote.md.
FORWARDERS = frozenset({"ssh", "sshd", "sshd-session"})


def is_local_peer(pid: int | None) -> bool:
    """Whether the process at the other end runs here rather than relaying for another host.  Unknown (no pid,
    no /proc as on macOS, a process already gone, one we may not inspect such as a non-dumpable ssh) counts as
    remote: the safe side, since all it costs a caller is the choice of browser."""
    if not pid:
        return False
    try:
        exe = os.readlink(f"/proc/{pid}/exe")
    except OSError:
        return False
    return os.path.basename(exe).removesuffix(" (deleted)") not in FORWARDERS
