"""Process hardening of the daemon, applied once at start: no core dumps, no same-user ptrace or /proc/PID/mem.

The daemon holds the store's data key and every refresh token in memory.  A core file (a crash, or a default
``ulimit -c unlimited`` with a systemd-coredump that keeps them) would write both to disk outside the encrypted store;
``PR_SET_DUMPABLE 0`` stops core files and also stops other processes of the same user from attaching a debugger
or reading ``/proc/PID/mem`` or ``/proc/PID/environ``.  ``RLIMIT_CORE 0`` is the portable half, and is inherited
by the browser the daemon starts (the key is never in its environment; see docs/threat-model.md).
"""

from __future__ import annotations

import ctypes
import logging
import resource
import sys

log = logging.getLogger("brokerd.hardening")

PR_SET_DUMPABLE = 4
PR_GET_DUMPABLE = 3


def _libc() -> ctypes.CDLL | None:
    """The C library already loaded into this process (prctl is libc's): no ``find_library``, which runs
    ``ldconfig -p`` in a subprocess."""
    try:
        return ctypes.CDLL(None, use_errno=True)
    except OSError:
        return None


def no_core_dumps() -> None:
    """Best effort, logged when a part cannot be applied (a container without prctl still runs)."""
    try:
        resource.setrlimit(resource.RLIMIT_CORE, (0, 0))
    except (OSError, ValueError) as exc:
        log.warning("could not set RLIMIT_CORE to 0: %s", exc)
    if not sys.platform.startswith("linux"):
        return
    libc = _libc()
    if libc is None or libc.prctl(PR_SET_DUMPABLE, 0, 0, 0, 0) != 0:
        log.warning("could not turn off core dumps with prctl(PR_SET_DUMPABLE)")


def dumpable() -> bool | None:
    """The process's dumpable flag (None when it cannot be read): for `brokerd status` and the tests."""
    libc = _libc() if sys.platform.startswith("linux") else None
    if libc is None:
        return None
    return bool(libc.prctl(PR_GET_DUMPABLE, 0, 0, 0, 0))
