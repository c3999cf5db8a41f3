"""The audit trail: one JSON line per token handed out, who asked, and how the token was obtained.

Where: ``audit.jsonl`` in the state dir (0700), each file 0600, rotated by size into ``audit.jsonl.1`` ..
``.N`` (the oldest dropped), so the trail never takes more than ``max_bytes * (keep + 1)``.

What: time, session (short key, issuer, client id, user), how (cache | refresh | login), the caller's pid, uid and
executable and its parent's pid and executable (SO_PEERCRED + /proc), and the cluster server when kubectl sent
cluster info.  Entries are built field by field from named values (``entry``), never from a TokenSet, settings
object or request, so no token, secret, CA data or cluster ``config`` can reach the file.

How: ``AuditLog.record`` only appends to a bounded in-memory batch; one writer task (owned by the log, flushed and
awaited on close) writes batches in a thread, so a served token never waits for the disk.

Also here: ``peer_info`` (who is on the other end of a Unix socket) and ``Counters`` (per-session tallies for
``brokerd status``).
"""

from __future__ import annotations

import asyncio
import contextlib
import errno
import fcntl
import json
import logging
import math
import os
import queue
import socket
import stat
import struct
import threading
import time
from collections import deque
from collections.abc import Callable, Iterator, Mapping
from dataclasses import dataclass, field
from datetime import UTC, datetime
from pathlib import Path
from typing import Any, Literal
from urllib.parse import urlsplit, urlunsplit

from brokerd.paths import ensure_private_dir

log = logging.getLogger("brokerd.audit")

How = Literal["cache", "refresh", "login"]
AUDIT_FILE = "audit.jsonl"
MAX_BYTES = 1 << 20
KEEP = 4  # rotated files kept besides the current one
MAX_PENDING = 10_000  # records waiting for the writer; past this the oldest are dropped (and the drop is logged)
CLOSE_TIMEOUT = 5.0  # how long shutdown waits for the trail to take the last records
COALESCE = 0.1  # s between the starts of two writes: a burst of records gathers into one write
USER_CLAIMS = ("preferred_username", "email", "name", "sub")


# -- who is calling -------------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class PeerInfo:
    pid: int
    uid: int
    gid: int
    exe: str | None = None
    ppid: int | None = None
    parent_exe: str | None = None

    def describe(self) -> str:
        """One short line for status: ``kubectl (pid 12) from k9s (pid 11)``."""
        text = f"{_base(self.exe)} (pid {self.pid})"
        if self.ppid:
            text += f" from {_base(self.parent_exe)} (pid {self.ppid})"
        return text


def _base(exe: str | None) -> str:
    return exe.rsplit("/", 1)[-1] if exe else "?"


# Read for every token served, so plain os calls on str paths: pathlib and buffered files cost the daemon more
# here than the rest of a cached-token request.
def _exe(pid: int, proc: Path) -> str | None:
    try:
        return os.readlink(f"{proc}/{pid}/exe")
    except OSError:  # gone, another user's, or a kernel thread
        return None


def _ppid(pid: int, proc: Path) -> int | None:
    try:
        fd = os.open(f"{proc}/{pid}/stat", os.O_RDONLY | os.O_CLOEXEC)
    except OSError:
        return None
    try:
        stat = os.read(fd, 4096)  # one line, about 300 bytes; comm is at most 64
    except OSError:
        return None
    finally:
        os.close(fd)
    # "pid (comm) state ppid ...": comm may hold spaces and parentheses, so split after the last ")".
    rest = stat.rpartition(b")")[2].split()
    try:
        return int(rest[1])
    except (IndexError, ValueError):
        return None


def peer_info(sock: socket.socket | None, proc: Path = Path("/proc")) -> PeerInfo | None:
    """pid/uid/gid of a connected Unix socket's peer (SO_PEERCRED), its executable and its parent's from /proc.

    Soft: None when the socket has no peer credentials; ``exe``/``ppid``/``parent_exe`` None when that process is
    gone or not readable.  The pid is the one that connected; a process that exits and whose pid is reused before
    /proc is read would be misnamed, which is why this is a record, not an authentication.
    """
    if sock is None or not hasattr(socket, "SO_PEERCRED"):
        return None
    try:
        raw = sock.getsockopt(socket.SOL_SOCKET, socket.SO_PEERCRED, struct.calcsize("iII"))
    except OSError:
        return None
    pid, uid, gid = struct.unpack("iII", raw)  # uid_t/gid_t are unsigned: uid 4294967294 is not -2
    if pid <= 0:
        return PeerInfo(pid=pid, uid=uid, gid=gid)
    ppid = _ppid(pid, proc)
    return PeerInfo(pid=pid, uid=uid, gid=gid, exe=_exe(pid, proc), ppid=ppid,
                    parent_exe=_exe(ppid, proc) if ppid else None)


def cluster_server(exec_info: str | None) -> str | None:
    """``spec.cluster.server`` of KUBERNETES_EXEC_INFO (kubectl sends it with ``provideClusterInfo: true``),
    without any userinfo, query or fragment.  Nothing else of the cluster info (CA data, ``config``) is kept."""
    if not exec_info:
        return None
    try:
        doc = json.loads(exec_info)
    except ValueError:
        return None
    spec = doc.get("spec") if isinstance(doc, dict) else None
    cluster = spec.get("cluster") if isinstance(spec, dict) else None
    server = cluster.get("server") if isinstance(cluster, dict) else None
    if not isinstance(server, str) or not server:
        return None
    try:
        parts = urlsplit(server)
        host = parts.hostname or ""
        netloc = f"[{host}]" if ":" in host else host
        if parts.port is not None:
            netloc += f":{parts.port}"
    except ValueError:
        return None
    return urlunsplit((parts.scheme, netloc, parts.path, "", ""))


def user_of(claims: Mapping[str, Any]) -> str | None:
    for name in USER_CLAIMS:
        value = claims.get(name)
        if isinstance(value, str) and value:
            return value
    return None


def entry(*, now: float, session: str, issuer: str, client_id: str, user: str | None, how: How,
          peer: PeerInfo | None, server: str | None) -> dict[str, Any]:
    """One audit record, from named values only."""
    if not _finite_number(now):  # never from the system clock; a record must not fail the token it records
        now = time.time()
    doc: dict[str, Any] = {
        "time": datetime.fromtimestamp(now, UTC).isoformat(timespec="milliseconds").replace("+00:00", "Z"),
        "ts": round(now, 3),
        "session": session[:12],
        "issuer": issuer,
        "client_id": client_id,
        "user": user,
        "how": how,
    }
    if peer is not None:
        doc["caller"] = {"pid": peer.pid, "uid": peer.uid, "exe": peer.exe, "ppid": peer.ppid,
                         "parent_exe": peer.parent_exe}
    if server is not None:
        doc["cluster"] = server
    return doc


# -- writing --------------------------------------------------------------------------------------------------------


def _rotate(path: Path, keep: int) -> None:
    for n in range(keep, 0, -1):
        older = path.with_name(f"{path.name}.{n}")
        if n == keep:
            with contextlib.suppress(FileNotFoundError):
                older.unlink()
        newer = path.with_name(f"{path.name}.{n - 1}") if n > 1 else path
        with contextlib.suppress(FileNotFoundError):
            newer.replace(older)


class NotRegularFile(OSError):
    """The trail's path holds something else than a file (a FIFO, a device): the trail is skipped, not waited on."""


def write_lines(directory: Path, lines: list[str], max_bytes: int = MAX_BYTES, keep: int = KEEP) -> None:
    """Append ``lines`` (each one JSON document) to the audit file, rotating first when a line would take it past
    ``max_bytes`` (with ``keep`` 0 nothing is rotated: the file grows).  Blocking: the writer thread runs it.

    One open and one write for a batch that fits, under an exclusive flock of the trail: memory-only daemons
    (``[store] persist = false``) take no state lock, so two of them may share a state dir and its trail.  Nothing
    written is ever cut back: a batch that failed part way (a full disk) leaves a torn last line, and the next
    batch starts on a new line, so the reader skips only the torn one.
    """
    ensure_private_dir(directory)
    path = directory / AUDIT_FILE
    data = [(line + "\n").encode() for line in lines]
    while data:
        fd = _open_locked(path)
        try:
            size = os.fstat(fd).st_size
            head = b"" if not size or _last_byte(fd, size) == b"\n" else b"\n"  # after a torn line
            size += len(head)
            fits = len(data) if keep < 1 else 0  # how many lines go into this file before it must rotate
            for chunk in data[fits:]:
                if size > len(head) and size + len(chunk) > max_bytes:
                    break
                size += len(chunk)
                fits += 1
            if fits:
                _write_all(fd, head + b"".join(data[:fits]))
            data = data[fits:]
            if data:
                _rotate(path, keep)  # still under the lock: no other writer rotates or appends meanwhile
        finally:
            os.close(fd)  # and with it the lock


LOCK_WAIT = 2.0  # s a writer waits for other daemons' writes (rotations included) before it appends without the
# lock: well under CLOSE_TIMEOUT, so that a shutdown still writes its last batches past a stuck lock holder


def _open_locked(path: Path) -> int:
    """The trail, opened and flocked; reopened when another writer rotated it while we waited for the lock.  After
    LOCK_WAIT s in all (a writer that holds the lock and never lets go) the current trail is appended to without it."""
    deadline = time.monotonic() + LOCK_WAIT
    while True:
        fd = _open_trail(path)
        while True:
            try:
                fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
                break
            except BlockingIOError:
                if time.monotonic() > deadline:
                    log.warning("audit: %s stayed locked by another writer for %g s; appending anyway", path,
                                LOCK_WAIT)
                    return fd if _is_current(path, fd) else _reopen(path, fd)
                time.sleep(0.005)
            except OSError:
                return fd  # a file system without flock: one daemon per trail is then the state lock's job
        if _is_current(path, fd):
            return fd
        if time.monotonic() > deadline:
            return _reopen(path, fd)  # the file we got the lock on was rotated away: append to the current one
        os.close(fd)  # rotated away while we waited: try the new file


def _is_current(path: Path, fd: int) -> bool:
    try:
        return os.stat(path, follow_symlinks=False).st_ino == os.fstat(fd).st_ino
    except OSError:
        return False


def _reopen(path: Path, fd: int) -> int:
    os.close(fd)
    return _open_trail(path)


def _open_trail(path: Path) -> int:
    # O_NONBLOCK: a FIFO put in the trail's place would otherwise block this open until somebody reads it.
    # O_RDWR: the last byte is read back (pread) to see whether a torn line must be ended first.
    flags = os.O_APPEND | os.O_CREAT | os.O_CLOEXEC | os.O_NOFOLLOW | os.O_NONBLOCK
    try:
        try:
            fd = os.open(path, os.O_RDWR | flags, 0o600)
        except PermissionError:  # a trail left write-only: append all the same (its mode is fixed below)
            fd = os.open(path, os.O_WRONLY | flags, 0o600)
    except OSError as exc:
        if exc.errno == errno.ENXIO:  # only a FIFO without a reader (or a socket) answers so
            raise NotRegularFile(errno.ENXIO, "not a regular file") from exc
        raise
    try:
        st = os.fstat(fd)
        if not stat.S_ISREG(st.st_mode):
            raise NotRegularFile(errno.EINVAL, "not a regular file")
        if st.st_mode & 0o777 != 0o600:  # looser, or left write-only (then it could not be read back)
            os.fchmod(fd, 0o600)
    except BaseException:
        os.close(fd)
        raise
    return fd


def _last_byte(fd: int, size: int) -> bytes:
    try:
        return os.pread(fd, 1, size - 1)
    except OSError:  # opened write-only: not known, so start on a new line (an empty line is skipped when read)
        return b""


def _write_all(fd: int, data: bytes) -> None:
    while data:
        data = data[os.write(fd, data):]


class AuditLog:
    """Buffered audit writer.  ``record`` never blocks; ``start`` and ``close`` belong to the daemon's lifecycle."""

    def __init__(self, directory: Path, max_bytes: int = MAX_BYTES, keep: int = KEEP,
                 max_pending: int = MAX_PENDING, coalesce: float = COALESCE) -> None:
        self.directory = directory
        self._max_bytes = max_bytes
        self._keep = keep
        self._pending: deque[str] = deque()
        self._max_pending = max_pending
        self._dropped = 0
        self._wake = asyncio.Event()
        self._task: asyncio.Task[None] | None = None
        self._problem: str | None = None  # the last write failure logged
        self._thread = _WriterThread()
        self._coalesce = coalesce
        self._closed = asyncio.Event()  # set by close(): ends the writer and cuts a gathering short

    def start(self) -> None:
        if self._task is None:
            self._task = asyncio.create_task(self._writer(), name="audit-writer")

    def record(self, doc: Mapping[str, Any]) -> None:
        try:
            line = json_line(doc)
        except (TypeError, ValueError, RecursionError) as exc:  # not from entry(): named str and number values
            log.error("audit: a record could not be written as JSON (%s); dropped", exc)
            return
        if len(self._pending) >= self._max_pending:
            self._pending.popleft()
            self._dropped += 1
        self._pending.append(line)
        self._wake.set()

    async def flush(self) -> None:
        """Write everything recorded so far (tests; close)."""
        while self._pending:
            await self._write_batch()

    async def _write_batch(self) -> None:
        """Write what is pending now, in one batch (records that come meanwhile wait for the next)."""
        if self._pending:
            batch = list(self._pending)
            self._pending.clear()
            if self._dropped:
                log.warning("audit: %d record(s) dropped: the writer could not keep up", self._dropped)
                self._dropped = 0
            try:
                await self._thread.run(write_lines, self.directory, batch, self._max_bytes, self._keep)
            except Exception as exc:  # OSError mostly; nothing may end the writer, or every later record is lost
                problem = str(getattr(exc, "strerror", None) or exc)
                if problem != self._problem:  # one line per problem, not one per batch
                    log.error("audit: cannot write %s: %s (records are not kept until this changes)",
                              self.directory / AUDIT_FILE, problem)
                self._problem = problem
            else:
                self._problem = None

    async def _writer(self) -> None:
        loop = asyncio.get_running_loop()
        last = -math.inf  # when the last write started
        while not self._closed.is_set():
            await self._wake.wait()
            # A token served after a quiet spell is written at once (a SIGKILL right after it keeps the record);
            # in a burst, writes start at most every COALESCE s, each taking what gathered meanwhile, rather than
            # one write per token served.
            wait = last + self._coalesce - loop.time()
            if wait > 0 and not self._closed.is_set():
                with contextlib.suppress(TimeoutError):
                    await asyncio.wait_for(self._closed.wait(), wait)
            self._wake.clear()
            last = loop.time()
            await self._write_batch()  # records that come during it set _wake: the next write, COALESCE later

    async def close(self, within: float = CLOSE_TIMEOUT) -> None:
        """Write what is pending and stop the writer, waiting at most ``within`` s: a trail that does not take
        writes (a hung file system) must not keep the daemon from stopping."""
        self._closed.set()
        self._wake.set()
        try:
            async with asyncio.timeout(within):
                if self._task is not None:
                    await self._task
                    self._task = None
                await self.flush()
        except TimeoutError:
            log.error("audit: %s took no writes for %g s; stopping without the last %d record(s)",
                      self.directory / AUDIT_FILE, within, len(self._pending))
            if self._task is not None:
                self._task.cancel()
                self._task = None
        finally:
            self._thread.stop()


class _WriterThread:
    """One daemon thread that runs the trail's blocking writes in order.  Not the default executor (a write stuck
    in the kernel would hold the interpreter's exit, which joins executor threads, after ``close`` gave up on
    it), and not a thread per batch (starting one cost more than the rest of serving a cached token)."""

    def __init__(self) -> None:
        self._jobs: queue.SimpleQueue[tuple[Callable[..., None], tuple[Any, ...], asyncio.AbstractEventLoop,
                                            asyncio.Future[None]] | None] = queue.SimpleQueue()
        self._thread: threading.Thread | None = None

    async def run(self, fn: Callable[..., None], *args: Any) -> None:
        loop = asyncio.get_running_loop()
        done: asyncio.Future[None] = loop.create_future()
        if self._thread is None:
            self._thread = threading.Thread(target=self._main, name="audit-write", daemon=True)
            self._thread.start()
        self._jobs.put((fn, args, loop, done))
        await done

    def stop(self) -> None:
        """Let the thread end once the writes queued before this are done (at once when it is idle)."""
        if self._thread is not None:
            self._jobs.put(None)
            self._thread = None

    def _main(self) -> None:
        while (job := self._jobs.get()) is not None:
            fn, args, loop, done = job
            error: BaseException | None = None
            try:
                fn(*args)
            except BaseException as exc:  # handed to the awaiting task, which owns the outcome
                error = exc
            with contextlib.suppress(RuntimeError):  # the loop closed while a stuck write waited
                loop.call_soon_threadsafe(_settle, done, error)


def _settle(done: asyncio.Future[None], error: BaseException | None) -> None:
    if done.done():  # its awaiter was cancelled (close gave up waiting)
        return
    if error is None:
        done.set_result(None)
    else:
        done.set_exception(error)


# -- reading (`brokerd audit`, no daemon needed) ----------------------------------------------------------------


def audit_files(directory: Path, keep: int = KEEP) -> list[Path]:
    """Oldest first."""
    path = directory / AUDIT_FILE
    candidates = [path.with_name(f"{path.name}.{n}") for n in range(keep, 0, -1)] + [path]
    return [p for p in candidates if p.is_file()]


def read_entries(directory: Path, *, since: float | None = None, session: str | None = None,
                 keep: int = KEEP) -> Iterator[dict[str, Any]]:
    """Records oldest first; ``since`` an epoch, ``session`` a prefix of the session key.  Lines that are not
    records (a torn write after a crash) are skipped."""
    for path in audit_files(directory, keep):
        try:
            with path.open("rb") as handle:
                for raw in handle:
                    try:
                        doc = json.loads(raw)
                    except (ValueError, RecursionError):  # a torn or edited line (one nested past the limit)
                        continue
                    if not isinstance(doc, dict) or not _finite_number(doc.get("ts", 0)):
                        continue  # not one of our records (an edited trail, a NaN or a string for a time)
                    if since is not None and doc.get("ts", 0) < since:
                        continue
                    if session and not str(doc.get("session", "")).startswith(session[:12]):
                        continue
                    yield doc
        except OSError:
            continue


def json_line(doc: Mapping[str, Any], *, ascii_only: bool = False) -> str:
    """One line of strict JSON (no NaN or Infinity tokens: jq and other readers refuse them; a float that is not
    finite becomes null), UTF-8 where it can be and \\u escapes where it cannot (lone surrogates: an exe path that is
    not UTF-8, a provider's broken claim), or everywhere with ``ascii_only``."""
    try:
        line = json.dumps(doc, separators=(",", ":"), ensure_ascii=ascii_only, allow_nan=False)
    except ValueError:
        try:
            doc = _finite(doc)
        except RecursionError:  # nested past what the cleaning can follow: not a record entry() makes
            raise ValueError("a record nested too deeply to clean") from None
        line = json.dumps(doc, separators=(",", ":"), ensure_ascii=ascii_only, allow_nan=False)
    if not line.isascii():
        try:
            line.encode()
        except UnicodeEncodeError:
            line = json.dumps(doc, separators=(",", ":"), allow_nan=False)
    return line


def _finite(value: Any) -> Any:
    """``value`` with every float that is not finite as None (null): JSON has no NaN or Infinity."""
    if isinstance(value, float) and not math.isfinite(value):
        return None
    if isinstance(value, Mapping):
        return {key: _finite(item) for key, item in value.items()}
    if isinstance(value, (list, tuple)):
        return [_finite(item) for item in value]
    return value


def _finite_number(value: object) -> bool:
    """A time a record may carry: a number within what datetime and localtime take (years 1 to 9999).  NaN and
    the infinities compare False; an int of any size compares exactly (no OverflowError)."""
    return isinstance(value, (int, float)) and not isinstance(value, bool) and -6.2e10 < value < 2.5e11


def format_entry(doc: Mapping[str, Any]) -> str:
    """One line for a person, whatever the record holds (an edited trail: a field of the wrong type shows as text)."""
    ts = doc.get("ts")
    when = time.strftime("%Y-%m-%d %H:%M:%S", time.localtime(ts)) if _finite_number(ts) else "????-??-?? ??:??:??"
    caller = doc.get("caller")
    who = "?"
    if isinstance(caller, dict) and caller:
        def number(name: str) -> int:
            value = caller.get(name)
            return value if isinstance(value, int) and not isinstance(value, bool) else 0

        def path(name: str) -> str | None:
            value = caller.get(name)
            return value if isinstance(value, str) else None

        who = PeerInfo(pid=number("pid"), uid=number("uid"), gid=0, exe=path("exe"), ppid=number("ppid") or None,
                       parent_exe=path("parent_exe")).describe()
    cluster = f" -> {_field(doc, 'cluster')}" if doc.get("cluster") else ""
    return (f"{when}  {_field(doc, 'how'):7} {_field(doc, 'session')}  {_field(doc, 'user', '-')} @ "
            f"{_field(doc, 'issuer')} ({_field(doc, 'client_id')})  {who}{cluster}")


def _field(doc: Mapping[str, Any], name: str, missing: str = "?") -> str:
    value = doc.get(name)
    return missing if value is None or value == "" else str(value)


# -- per-session tallies for `brokerd status` --------------------------------------------------------------------


@dataclass
class SessionCounters:
    tokens_served: int = 0
    refreshes: int = 0
    logins: int = 0
    last_caller: str | None = None
    last_served_at: float | None = None

    def describe(self) -> dict[str, Any]:
        return {"tokens_served": self.tokens_served, "refreshes": self.refreshes, "logins": self.logins,
                "last_caller": self.last_caller, "last_served_at": self.last_served_at}


@dataclass
class Counters:
    """Per session key: tokens handed out (and to whom last), and refreshes and logins made, whether a caller
    waited for them or the refresh timer made them.  In memory: a restarted daemon counts from zero."""

    sessions: dict[str, SessionCounters] = field(default_factory=dict)

    def served(self, session: str, peer: PeerInfo | None, now: float) -> SessionCounters:
        tally = self.sessions.setdefault(session, SessionCounters())
        tally.tokens_served += 1
        tally.last_caller = peer.describe() if peer is not None else None
        tally.last_served_at = now
        return tally

    def renewed(self, session: str, how: Literal["refresh", "login"]) -> None:
        tally = self.sessions.setdefault(session, SessionCounters())
        if how == "refresh":
            tally.refreshes += 1
        else:
            tally.logins += 1

    def forget(self, session: str) -> None:
        self.sessions.pop(session, None)
