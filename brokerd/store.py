"""Encrypted, crash-safe persistence of sessions.

Layout of the state dir (0700; every file 0600 from the moment it is created):

    sessions.key                      the 32-byte AES-256-GCM data key (raw bytes), see ``FileKeySource``
    sessions.bin                      the store: MAGIC | version byte | 12-byte nonce | ciphertext+tag
    .sessions.bin.<pid>.<hex>.tmp     a write in progress; a dead writer's leftovers are removed on load
    sessions.bin.corrupt-<UTC stamp>  a store that could not be read, set aside rather than overwritten

The AES-GCM associated data is ``MAGIC | version`` so a header edited to another version fails to decrypt.  The
plaintext is JSON ``{"sessions": [{"key", "settings", "tokens", "options"}, ...]}``; unknown fields are ignored so an
older brokerd can read a newer plaintext layout, and a bad entry costs only that entry, on reading and on writing
(each session is serialized on its own).

Every write goes to a fresh temp file in the same directory (O_EXCL, 0600), is fsynced, renamed over the store and
the directory is fsynced, so a SIGKILL or power loss leaves either the previous or the new generation.

Content problems (bad tag, bad JSON, missing key) never raise: the file is moved aside, logged, and ``load``
returns what it can.  Only environment failures (cannot create or write the dir, dir owned by another user) raise
``StoreError``; the daemon should log those and carry on in memory.
"""

from __future__ import annotations

import contextlib
import json
import logging
import os
import pathlib
import secrets
import stat
import threading
import time
from collections.abc import Callable, Iterator, Mapping
from typing import Any, Protocol

from cryptography.exceptions import InvalidTag
from cryptography.hazmat.primitives.ciphers.aead import AESGCM

from brokerd.codec import BadEntry, session_from_dict, session_to_dict
from brokerd.errors import KeyringUnavailable, StoreError
from brokerd.models import Session, SessionKey
from brokerd.paths import ensure_private_dir

log = logging.getLogger("brokerd.store")

MAGIC = b"BRKS"
FORMAT_VERSION = 1
NONCE_SIZE = 12
KEY_SIZE = 32
STORE_NAME = "sessions.bin"
KEY_NAME = "sessions.key"
_TAG_SIZE = 16
# Sessions are a few KiB; anything this large is not ours and must not be read into memory whole.
_MAX_STORE_BYTES = 16 * 1024 * 1024
_FILE_MODE = 0o600


def header(version: int = FORMAT_VERSION) -> bytes:
    return MAGIC + bytes([version])


def _tighten_file(path: pathlib.Path, what: str) -> None:
    with contextlib.suppress(FileNotFoundError):
        mode = stat.S_IMODE(path.stat().st_mode)
        if mode != _FILE_MODE:
            log.warning("%s %s had mode %03o; tightening to 0600", what, path, mode)
            path.chmod(_FILE_MODE)


def _fsync_dir(path: pathlib.Path) -> None:
    fd = os.open(path, os.O_RDONLY | os.O_DIRECTORY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def _write_temp(target: pathlib.Path, data: bytes) -> pathlib.Path:
    """Write ``data`` durably to a new private temp file beside ``target`` and return its path."""
    tmp = target.with_name(f".{target.name}.{os.getpid()}.{secrets.token_hex(6)}.tmp")
    # O_EXCL: never reuse or follow something already there; 0600 from creation, so no window where it is readable.
    fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_NOFOLLOW | os.O_CLOEXEC, _FILE_MODE)
    try:
        try:
            os.fchmod(fd, _FILE_MODE)  # a umask like 0o277 would otherwise leave the owner unable to read it back
            view = memoryview(data)
            while view:
                view = view[os.write(fd, view):]
            os.fsync(fd)
        finally:
            os.close(fd)
    except BaseException:
        with contextlib.suppress(OSError):
            tmp.unlink()
        raise
    return tmp


def atomic_write(target: pathlib.Path, data: bytes) -> None:
    """Replace ``target`` with ``data``: the old or the new content survives any crash, never a mix."""
    tmp = _write_temp(target, data)
    try:
        os.replace(tmp, target)
    finally:
        with contextlib.suppress(FileNotFoundError):
            tmp.unlink()  # still there only if the rename failed
    try:
        _fsync_dir(target.parent)
    except OSError as exc:
        exc.brokerd_replaced = True  # type: ignore[attr-defined]  # the new content may be what survives
        raise


def atomic_create(target: pathlib.Path, data: bytes) -> bool:
    """Like ``atomic_write`` but never replaces an existing file.  Returns False if ``target`` already existed."""
    tmp = _write_temp(target, data)
    try:
        # link() fails with EEXIST where rename() would clobber: two creators cannot overwrite each other's key.
        os.link(tmp, target)
    except FileExistsError:
        return False
    finally:
        with contextlib.suppress(OSError):
            tmp.unlink()
    _fsync_dir(target.parent)
    return True


def remove_stale_temps(target: pathlib.Path) -> None:
    """Remove temp files of ``target`` left by writers that died (SIGKILL, power loss) mid-write."""
    prefix = f".{target.name}."
    for name in os.listdir(target.parent):
        pid = name[len(prefix):].split(".", 1)[0]
        if not (name.startswith(prefix) and name.endswith(".tmp") and pid.isdigit()) or int(pid) == os.getpid():
            continue
        try:
            os.kill(int(pid), 0)  # signal 0 only asks whether the writer still exists
        except ProcessLookupError:
            with contextlib.suppress(OSError):
                (target.parent / name).unlink()
        except PermissionError:
            pass  # alive, someone else's process


def move_aside(path: pathlib.Path, reason: str) -> None:
    """Rename an unreadable file to ``<name>.corrupt-<UTC stamp>[-n]`` so it is kept for inspection."""
    stamp = time.strftime("%Y%m%dT%H%M%SZ", time.gmtime())
    for n in range(1000):
        dest = path.with_name(f"{path.name}.corrupt-{stamp}" + (f"-{n}" if n else ""))
        if dest.exists():
            continue
        os.rename(path, dest)
        _fsync_dir(path.parent)
        log.error("%s: %s; moved it aside to %s", path, reason, dest.name)
        return
    raise StoreError(f"cannot move unreadable {path} aside: too many corrupt copies")


class KeySource(Protocol):
    """Where the data key lives.  ``FileKeySource`` now; an OS keyring backend can implement the same three calls."""

    def load(self) -> bytes | None:
        """The data key, or None when there is none (an unusable one is set aside and also reported as None)."""

    def create(self) -> bytes:
        """Make a new key, persist it durably, and return it.  Must not clobber a key another process just made."""

    def describe(self) -> str:
        """Where the key is, for log lines; never the key."""


class FileKeySource:
    """The data key as 32 raw bytes in a 0600 file inside the 0700 state dir."""

    def __init__(self, path: pathlib.Path) -> None:
        self.path = path

    def describe(self) -> str:
        return f"key file {self.path}"

    def load(self) -> bytes | None:
        try:
            # O_NONBLOCK and a regular file only (as the CA and client key files): a FIFO put here must not wedge
            # the load, which holds the store's lock, and so every save and the daemon's stop.
            fd = os.open(self.path, os.O_RDONLY | os.O_NONBLOCK | os.O_CLOEXEC)
        except FileNotFoundError:
            return None
        with open(fd, "rb") as f:
            if not stat.S_ISREG(os.fstat(fd).st_mode):
                raise StoreError(f"key file {self.path} is not a regular file; remove it or put the key there")
            data = f.read(KEY_SIZE + 1)
        if len(data) != KEY_SIZE:
            move_aside(self.path, f"key file has {len(data)} bytes, expected {KEY_SIZE}")
            return None
        _tighten_file(self.path, "key file")
        return data

    def create(self) -> bytes:
        key = AESGCM.generate_key(bit_length=KEY_SIZE * 8)
        if atomic_create(self.path, key):
            log.info("created a new data key in %s", self.path)
            return key
        existing = self.load()
        if existing is None:
            raise StoreError(f"key file {self.path} appeared and was unusable")
        return existing


class _Unreadable(Exception):
    """The store file exists but cannot be used; the message is safe to log."""


@contextlib.contextmanager
def _os_errors(action: str) -> Iterator[None]:
    """The one place OS errors become StoreError.  OSError text is errno text and a path: no secrets."""
    try:
        yield
    except OSError as exc:
        err = StoreError(f"session store: cannot {action}: {exc.strerror or exc} ({exc.filename})")
        err.maybe_written = getattr(exc, "brokerd_replaced", False)
        raise err from exc


class SessionStore:
    """Whole-store, encrypted, atomic persistence of sessions.  Synchronous and thread-safe (one lock)."""

    def __init__(self, state_dir: pathlib.Path, key_source: KeySource | None = None,
                 owned: Callable[[], bool] | None = None) -> None:
        """``owned``: whether the state dir's lock still holds this store (``statelock.StateLock.holds``)."""
        self._dir = pathlib.Path(state_dir)
        self._owned = owned
        self._path = self._dir / STORE_NAME
        self._key_path = self._dir / KEY_NAME
        self._keys: KeySource = key_source if key_source is not None else FileKeySource(self._key_path)
        self._lock = threading.Lock()
        self._known_key: bytes | None = None  # the key last read or made: serves while the keyring is locked

    @property
    def state_dir(self) -> pathlib.Path:
        return self._dir

    @property
    def path(self) -> pathlib.Path:
        return self._path

    @property
    def key_source(self) -> KeySource:
        return self._keys

    def readable_with(self, key: bytes) -> bool | None:
        """Whether the store decrypts with ``key`` (None: there is no store).  Changes nothing, moves nothing."""
        with self._lock:
            try:
                return self._decrypt_file(key) is not None or None
            except _Unreadable:
                return False

    @property
    def key_path(self) -> pathlib.Path:
        """The key file used by the default ``FileKeySource`` (unused with another key source)."""
        return self._key_path

    def load(self) -> dict[SessionKey, Session]:
        with self._lock, _os_errors("load"):
            ensure_private_dir(self._dir)
            remove_stale_temps(self._path)
            key = self._key()
            try:
                plaintext = self._decrypt_file(key)
            except _Unreadable as exc:
                move_aside(self._path, str(exc))
                return {}
            if plaintext is None:
                return {}
            try:
                doc = json.loads(plaintext)
                entries = doc["sessions"]
                if not isinstance(entries, list):
                    raise TypeError
            except (ValueError, TypeError, KeyError, RecursionError):
                move_aside(self._path, "decrypted but the content is not a session list")
                return {}
            return self._parse_entries(entries)

    def save(self, sessions: Mapping[SessionKey, Session]) -> None:
        """Write every session.  One session that cannot be serialized (a value that is not JSON, a number that
        is not finite) is skipped and logged, never the others: its previous entry is gone from the new
        generation, which for a refresh token is the safe side."""
        entries = []
        for filed_under, session in sorted(sessions.items()):
            if filed_under != session.key:
                raise StoreError(f"session filed under {filed_under.short()} has key {session.key.short()}")
            try:
                entries.append(json.dumps(session_to_dict(session), separators=(",", ":"), allow_nan=False))
            except (TypeError, ValueError, RecursionError) as exc:  # the message may quote a value: name the type
                log.error("session %s not saved: it cannot be serialized (%s)", session.key.short(),
                          type(exc).__name__)
        plaintext = ('{"sessions":[' + ",".join(entries) + "]}").encode()
        with self._lock, _os_errors("save"):
            if self._owned is not None and not self._owned():
                # Removed or replaced under the daemon: another daemon may own the path now.  Never write (and so,
                # by the write-ahead rule, never refresh) a store this process does not hold.
                raise StoreError(f"the state directory {self._dir} is no longer the one this daemon locked; "
                                 "sessions are not saved or refreshed until brokerd restarts")
            ensure_private_dir(self._dir)
            key = self._key()
            # Never replace a file we could not read: it may hold sessions a human wants back.
            try:
                self._decrypt_file(key)
            except _Unreadable as exc:
                move_aside(self._path, str(exc))
            nonce = secrets.token_bytes(NONCE_SIZE)
            blob = header() + nonce + AESGCM(key).encrypt(nonce, plaintext, header())
            atomic_write(self._path, blob)

    def clear(self) -> None:
        """Forget every session (delete the store); the key stays for the next save."""
        with self._lock, _os_errors("clear"):
            try:
                self._path.unlink()
            except FileNotFoundError:
                return
            _fsync_dir(self._dir)

    # -- internals, called with the lock held ---------------------------------------------------------------

    def _key(self) -> bytes:
        try:
            key = self._keys.load()
        except KeyringUnavailable:
            if self._known_key is None:
                raise
            # Locked mid-run (a screen lock): the keyring is the key's home at rest, not a per-save oracle.  The
            # key read earlier is the one the store is under; without it every write-ahead save would fail and a
            # refresh would become a login.  (The process holds every refresh token anyway.)
            return self._known_key
        if key is None:
            # A store without its key can never be decrypted again; keep it aside rather than overwrite it.
            if self._path.exists():
                move_aside(self._path, f"no data key ({self._keys.describe()} missing or unusable)")
            key = self._keys.create()
        self._known_key = key
        return key

    def _decrypt_file(self, key: bytes) -> bytes | None:
        """The store's plaintext, None if there is no store; raises _Unreadable if it cannot be decrypted."""
        try:
            with open(self._path, "rb") as f:
                blob = f.read(_MAX_STORE_BYTES + 1)
        except FileNotFoundError:
            return None
        except IsADirectoryError:
            raise _Unreadable("not a regular file") from None
        _tighten_file(self._path, "session store")
        hlen = len(MAGIC) + 1
        if len(blob) > _MAX_STORE_BYTES:
            raise _Unreadable("file is too large to be a session store")
        if len(blob) < hlen + NONCE_SIZE + _TAG_SIZE or blob[: len(MAGIC)] != MAGIC:
            raise _Unreadable("not a brokerd session store (bad header or truncated)")
        version = blob[len(MAGIC)]
        if version != FORMAT_VERSION:
            raise _Unreadable(f"format version {version} is not supported (this brokerd reads {FORMAT_VERSION})")
        nonce = blob[hlen : hlen + NONCE_SIZE]
        try:
            return AESGCM(key).decrypt(nonce, blob[hlen + NONCE_SIZE :], blob[:hlen])
        except InvalidTag:
            raise _Unreadable("cannot decrypt (tampered, damaged, or written under another key)") from None

    def _parse_entries(self, entries: list[Any]) -> dict[SessionKey, Session]:
        sessions: dict[SessionKey, Session] = {}
        for index, entry in enumerate(entries):
            try:
                session = session_from_dict(entry)
            except BadEntry as exc:
                log.warning("%s: skipping session entry %d: %s", self._path, index, exc)
                continue
            except Exception as exc:  # a surprise must cost one entry, not the store; its text may hold values
                log.warning("%s: skipping session entry %d: %s", self._path, index, type(exc).__name__)
                continue
            sessions[session.key] = session
        return sessions
