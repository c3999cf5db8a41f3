"""One daemon per state directory: an flock on the state directory itself (and on ``<state dir>/daemon.lock``,
which says who holds it), held for the daemon's whole life.

The lock beside the socket keeps one daemon per socket path, but the socket path depends on the environment
(XDG_RUNTIME_DIR is missing under su, cron and sudo; BROKERD_SOCKET differs), while the store does not.  Two
daemons on one store both load the same refresh token and both refresh it: the provider sees it twice and revokes
the grant.  So whatever reads or writes the store as its owner (the daemon, ``brokerd clean``) holds this lock, and
a second one refuses to start, naming the holder (the lock file says its pid and socket; the shim reads it too).

An flock locks an inode, not a path.  daemon.lock can be removed while it is held (a person clearing what looks
like a stale file), and a second daemon would then lock a new file on the same store; so the lock that decides is
the one on the directory, which cannot be removed while it holds the store (the file stays, for its text and for
an older brokerd).  A directory removed and made anew is a new store, and a daemon whose store moved under it must
not write (and so never refresh: the write-ahead save fails first): ``StateLock.holds`` says whether the path still
names the directory locked, and the store checks it before every save.  The lock file must be a regular file (a
FIFO or a device there is refused with one line, never waited on), and after locking it the path must still name it
(else it was replaced meanwhile: take the new one, a bounded number of times).  Where a directory cannot be locked
(NFS emulates flock with write locks, which a directory fd cannot take) the lock file alone decides, and ``holds``
then also checks that daemon.lock still names the locked file.
"""

from __future__ import annotations

import contextlib
import fcntl
import os
import stat
from pathlib import Path
from types import TracebackType

from brokerd.errors import ConfigError, StateDirBusy
from client_shim.protocol import STATE_DIR_BUSY, STATE_LOCK_NAME, for_terminal

_ATTEMPTS = 5
_OPEN = os.O_CLOEXEC | os.O_NOFOLLOW | os.O_NONBLOCK  # never follow, never wait for a FIFO's writer


def holder(path: Path) -> str:
    """Who holds the lock, as its holder wrote it ("pid 123, socket /run/user/1000/brokerd/brokerd.sock")."""
    text = ""
    with contextlib.suppress(OSError):
        fd = os.open(path, os.O_RDONLY | _OPEN)
        try:
            if stat.S_ISREG(os.fstat(fd).st_mode):
                text = os.read(fd, 512).decode("utf-8", "replace").strip()
        finally:
            os.close(fd)
    return for_terminal(text) or "a process that did not say who it is"


class StateLock:
    """The held lock: the state directory's fd and the lock file's; ``close`` releases both."""

    def __init__(self, state_dir: Path, dir_fd: int, file_fd: int, dir_locked: bool) -> None:
        self.state_dir = state_dir
        self._dir_fd = dir_fd
        self._file_fd = file_fd
        self._dir_locked = dir_locked

    def holds(self) -> bool:
        """Whether the state directory's path still names the directory this lock holds."""
        if self._dir_fd < 0:
            return False
        try:
            if not _same(os.stat(self.state_dir), os.fstat(self._dir_fd)):
                return False
            return self._dir_locked or _same(os.lstat(self.state_dir / STATE_LOCK_NAME), os.fstat(self._file_fd))
        except OSError:
            return False

    def close(self) -> None:
        for fd in (self._file_fd, self._dir_fd):
            if fd >= 0:
                os.close(fd)
        self._dir_fd = self._file_fd = -1

    def __enter__(self) -> StateLock:
        return self

    def __exit__(self, kind: type[BaseException] | None, exc: BaseException | None, tb: TracebackType | None) -> None:
        self.close()


def _same(a: os.stat_result, b: os.stat_result) -> bool:
    return (a.st_dev, a.st_ino) == (b.st_dev, b.st_ino)


def _refused(state_dir: Path, exc: OSError | str) -> ConfigError:
    why = exc if isinstance(exc, str) else exc.strerror or str(exc)
    return ConfigError(f"cannot lock the state directory {for_terminal(str(state_dir))}: {why}")


def hold(state_dir: Path, who: str) -> StateLock:
    """Take the state directory's lock for as long as the returned lock stays open, or raise ``StateDirBusy``.

    A lock that cannot be taken is refused too (ConfigError): without it nothing keeps a second daemon from sending
    the same refresh tokens."""
    path = state_dir / STATE_LOCK_NAME
    try:
        state_dir.mkdir(mode=0o700, parents=True, exist_ok=True)
        dir_fd = os.open(state_dir, os.O_RDONLY | os.O_DIRECTORY | os.O_CLOEXEC)
    except OSError as exc:
        raise _refused(state_dir, exc) from None
    file_fd = -1

    def busy() -> StateDirBusy:
        return StateDirBusy(STATE_DIR_BUSY.format(holder=holder(path), path=for_terminal(str(state_dir))))

    try:
        dir_locked = True
        try:
            fcntl.flock(dir_fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            raise busy() from None
        except OSError:
            dir_locked = False  # NFS and the like: the lock file alone decides (see the module's docstring)
        for _ in range(_ATTEMPTS):
            file_fd = os.open(path, os.O_RDWR | os.O_CREAT | _OPEN, 0o600)
            if not stat.S_ISREG(os.fstat(file_fd).st_mode):
                raise _refused(state_dir, f"{STATE_LOCK_NAME} there is not a regular file; remove it")
            try:
                fcntl.flock(file_fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
            except BlockingIOError:  # another brokerd (an older one locks the file only)
                raise busy() from None
            with contextlib.suppress(FileNotFoundError):
                if _same(os.lstat(path), os.fstat(file_fd)):
                    break
            os.close(file_fd)  # replaced between the open and the lock: the path's file is the one that counts
            file_fd = -1
        else:
            raise _refused(state_dir, f"{STATE_LOCK_NAME} there keeps being replaced")
        os.ftruncate(file_fd, 0)
        os.pwrite(file_fd, f"pid {os.getpid()}, {who}\n".encode("utf-8", "replace"), 0)
    except BaseException as exc:
        for fd in (file_fd, dir_fd):
            if fd >= 0:
                os.close(fd)
        if isinstance(exc, OSError):
            raise _refused(state_dir, exc) from None
        raise
    return StateLock(state_dir, dir_fd, file_fd, dir_locked)
