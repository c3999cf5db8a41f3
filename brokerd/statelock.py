"""One daemon per state directory: an flock on ``<state dir>/daemon.lock``, held for the daemon's whole life.

The lock beside the socket keeps one daemon per socket path, but the socket path depends on the environment
(XDG_RUNTIME_DIR is missing under su, cron and sudo; BROKERD_SOCKET differs), while the store does not.  Two
daemons on one store both load the same refresh token and both refresh it: the provider sees it twice and revokes
the grant.  So whatever reads or writes the store as its owner (the daemon, ``brokerd clean``) holds this lock, and
a second one refuses to start, naming the holder (the lock file says its pid and socket; the shim reads it too).
"""

from __future__ import annotations

import fcntl
import os
from pathlib import Path
from typing import IO

from brokerd.errors import ConfigError, StateDirBusy
from client_shim.protocol import STATE_DIR_BUSY, STATE_LOCK_NAME, for_terminal


def holder(lock: IO[bytes]) -> str:
    """Who holds the lock, as its holder wrote it ("pid 123, socket /run/user/1000/brokerd/brokerd.sock")."""
    try:
        lock.seek(0)
        text = lock.read(512).decode("utf-8", "replace").strip()
    except OSError:
        text = ""
    return for_terminal(text) or "a process that did not say who it is"


def hold(state_dir: Path, who: str) -> IO[bytes]:
    """Take the state directory's lock for as long as the returned file stays open, or raise ``StateDirBusy``.

    A lock file that cannot be opened is refused too (ConfigError): without the lock nothing keeps a second daemon
    from sending the same refresh tokens."""
    path = state_dir / STATE_LOCK_NAME
    try:
        state_dir.mkdir(mode=0o700, parents=True, exist_ok=True)
        fd = os.open(path, os.O_RDWR | os.O_CREAT | os.O_CLOEXEC | os.O_NOFOLLOW, 0o600)
    except OSError as exc:
        raise ConfigError(f"cannot lock the state directory {state_dir}: {exc.strerror or exc}") from None
    lock = os.fdopen(fd, "r+b")
    try:
        fcntl.flock(lock, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except BlockingIOError:
        busy = StateDirBusy(STATE_DIR_BUSY.format(holder=holder(lock), path=for_terminal(str(state_dir))))
        lock.close()
        raise busy from None
    except OSError as exc:
        lock.close()
        raise ConfigError(f"cannot lock the state directory {state_dir}: {exc.strerror or exc}") from None
    lock.truncate(0)
    lock.write(f"pid {os.getpid()}, {who}\n".encode("utf-8", "replace"))
    lock.flush()
    return lock
