"""The data key in the desktop keyring: a ``KeySource`` over the freedesktop Secret Service (GNOME Keyring, KeePassXC,
KWallet), and the choice between it and the key file (``[store] key = "auto" | "keyring" | "file"``).

The Secret Service is spoken through secretstorage (over jeepney, pure Python D-Bus): the secret travels over the bus
encrypted with a Diffie-Hellman session key, and nothing here ever asks the keyring to unlock, because an unlock
prompt would pop up on a desktop nobody may be watching.  A keyring that is locked, or absent from the session bus,
raises ``KeyringUnavailable``: the store then waits (``brokerd.keywait``) instead of being set aside for want of a
key.

The item is found by its attributes: the application name and the state dir it belongs to, so two state dirs (tests,
several users of one keyring) never share a key.  No call here logs or raises the key; exception texts from the
library are reduced to their class name plus our own words.
"""

from __future__ import annotations

import contextlib
import logging
import os
import pathlib
import stat
from collections.abc import Iterator
from typing import TYPE_CHECKING, Any, Literal

from cryptography.hazmat.primitives.ciphers.aead import AESGCM

from brokerd.busaddr import plainly_absent
from brokerd.errors import KeyringUnavailable, StoreError
from brokerd.store import KEY_NAME, KEY_SIZE, STORE_NAME, FileKeySource, KeySource

if TYPE_CHECKING:
    from jeepney.io.blocking import DBusConnection

log = logging.getLogger("brokerd.keyring")

KeyMode = Literal["auto", "keyring", "file"]
KEY_MODES: tuple[KeyMode, ...] = ("auto", "keyring", "file")
SCHEMA = "io.github.brokerd.DataKey"
LABEL = "brokerd session store key"


def _attributes(state_dir: pathlib.Path) -> dict[str, str]:
    return {"xdg:schema": SCHEMA, "application": "brokerd", "state-dir": str(state_dir.absolute())}


def session_bus_address() -> str | None:
    """DBUS_SESSION_BUS_ADDRESS, else the user's bus socket in $XDG_RUNTIME_DIR (what sd-bus does): a daemon
    autostarted from an SSH login has no address, but the desktop session's bus is there once someone logs in."""
    address = os.environ.get("DBUS_SESSION_BUS_ADDRESS")
    if address:
        return address
    runtime = os.environ.get("XDG_RUNTIME_DIR")
    if not runtime:
        return None
    path = pathlib.Path(runtime) / "bus"
    try:
        st = path.stat()  # the runtime dir is the user's own (0700): a symlink there was put by the user
    except OSError:
        return None
    if not stat.S_ISSOCK(st.st_mode) or st.st_uid != os.getuid():
        return None
    return f"unix:path={path}"


@contextlib.contextmanager
def _bus() -> Iterator[DBusConnection]:
    """A connection to the session bus with a Secret Service on it, else KeyringUnavailable."""
    address = session_bus_address()
    if address is None:
        raise KeyringUnavailable("no session bus (DBUS_SESSION_BUS_ADDRESS is unset)")
    if plainly_absent(address):  # e.g. an address left over from a session that ended
        raise KeyringUnavailable("the session bus is unreachable")
    try:  # only now: a daemon without a session bus never loads them (issue 14.5: memory)
        import secretstorage
        from jeepney.io.blocking import open_dbus_connection
    except ImportError:  # pragma: no cover - a dependency on Linux
        raise KeyringUnavailable("the secretstorage library is not installed") from None
    try:
        conn = open_dbus_connection(bus=address)
    except _errors():  # e.g. FileNotFoundError: an address left over from a session that ended
        raise KeyringUnavailable("the session bus is unreachable") from None
    try:
        try:
            if not secretstorage.check_service_availability(conn):
                raise KeyringUnavailable("no Secret Service (keyring daemon) on the session bus")
        except _errors():
            raise KeyringUnavailable("the session bus did not answer") from None
        yield conn
    finally:
        conn.close()


def _errors() -> tuple[type[Exception], ...]:
    """What a Secret Service call may raise besides our own errors: OS errors, the library's, and D-Bus error
    replies it does not translate (org.freedesktop.Secret.Error.IsLocked, ...)."""
    import secretstorage
    from jeepney.wrappers import DBusErrorResponse

    return OSError, ValueError, secretstorage.SecretStorageException, DBusErrorResponse


def _failure(exc: BaseException) -> KeyringUnavailable:
    # The library's text is about D-Bus objects, never the secret, but say it in our words anyway: one clear line.
    return KeyringUnavailable(f"the keyring did not answer as expected ({type(exc).__name__})")


class SecretServiceKeySource:
    """The data key as a Secret Service item in the default collection (the "login" keyring on GNOME)."""

    kind = "keyring"

    def __init__(self, state_dir: pathlib.Path, guard: bool = True) -> None:
        self.state_dir = state_dir
        self.attributes = _attributes(state_dir)
        self.guard = guard  # off for `migrate`, which looks in both places itself

    def describe(self) -> str:
        return f"Secret Service item for {self.state_dir}"

    def load(self) -> bytes | None:
        """The key; None when the keyring answers and holds none; KeyringUnavailable when locked or absent."""
        import secretstorage

        with _bus() as conn:
            try:
                items = list(secretstorage.search_items(conn, self.attributes))
                if not items:
                    # Some keyrings (KeePassXC) hide the items of a locked database: "none" is only sure when the
                    # default collection is open.  Otherwise the store would be set aside for a key that exists.
                    if _default_collection(conn).is_locked():
                        raise KeyringUnavailable("the keyring is locked")
                    self._absent()
                    return None
                item = items[0]
                if item.is_locked():
                    raise KeyringUnavailable("the keyring is locked")
                key = item.get_secret()
            except KeyringUnavailable:
                raise
            except secretstorage.LockedException:
                raise KeyringUnavailable("the keyring is locked") from None
            except _errors() as exc:
                raise _failure(exc) from None
        return self._checked(key)

    def _absent(self) -> None:
        # [store] key = "keyring" set before `migrate --to keyring` ran: the key is still in the file.  Returning
        # None would have the store set aside and a new key made; refuse instead.
        if self.guard and (self.state_dir / KEY_NAME).exists() and (self.state_dir / STORE_NAME).exists():
            raise StoreError(f"the store's key is in {self.state_dir / KEY_NAME} but [store] key = \"keyring\"; run: "
                             "brokerd store migrate --to keyring (or set it to \"auto\")")

    def _checked(self, key: bytes) -> bytes:
        if len(key) != KEY_SIZE:
            # Not ours to delete (a human may want to look): refuse rather than create a second item beside it.
            raise StoreError(f"the keyring item '{LABEL}' for {self.state_dir} holds {len(key)} bytes, expected "
                             f"{KEY_SIZE}; remove it with seahorse or secret-tool")
        return bytes(key)

    def store(self, key: bytes) -> None:
        """Write ``key`` as this state dir's item; never replaces an item that is already there."""
        import secretstorage

        with _bus() as conn:
            try:
                if list(secretstorage.search_items(conn, self.attributes)):
                    raise StoreError(f"the keyring already holds a key for {self.state_dir}")
                collection = _default_collection(conn)
                if collection.is_locked():
                    raise KeyringUnavailable("the keyring is locked")
                collection.create_item(LABEL, self.attributes, key, content_type="application/octet-stream")
            except (KeyringUnavailable, StoreError):
                raise
            except secretstorage.ItemNotFoundException:
                raise KeyringUnavailable("the keyring has no default collection") from None
            except secretstorage.LockedException:
                raise KeyringUnavailable("the keyring is locked") from None
            except _errors() as exc:
                raise _failure(exc) from None

    def create(self) -> bytes:
        key = AESGCM.generate_key(bit_length=KEY_SIZE * 8)
        try:
            self.store(key)
        except StoreError:
            existing = self.load()  # another process made one first: use that
            if existing is None:
                raise
            return existing
        log.info("created a new data key in the keyring (%s)", self.describe())
        existing = self.load()  # what the keyring now holds is what every later start reads
        if existing is None:
            raise KeyringUnavailable("the keyring did not keep the new key")
        return existing

    def delete(self) -> None:
        import secretstorage

        with _bus() as conn:
            try:
                for item in secretstorage.search_items(conn, self.attributes):
                    item.delete()
            except secretstorage.LockedException:
                raise KeyringUnavailable("the keyring is locked") from None
            except _errors() as exc:
                raise _failure(exc) from None


class GuardedFileKeySource(FileKeySource):
    """The key file, refusing (instead of setting the store aside) when the store's key has moved to the keyring:
    ``[store] key = "file"`` left in the config after ``brokerd store migrate --to keyring`` must not cost sessions."""

    kind = "file"

    def __init__(self, path: pathlib.Path, guard: bool = True) -> None:
        super().__init__(path)
        self.guard = guard  # off for `migrate`, which looks in both places itself

    def load(self) -> bytes | None:
        key = super().load()
        if key is None and self.guard and (self.path.parent / STORE_NAME).exists():
            try:
                in_ring = SecretServiceKeySource(self.path.parent).load() is not None
            except KeyringUnavailable as exc:
                # "Cannot ask" is not "no key": the store's key may be there (moved by migrate).  Wait for the
                # keyring (as auto mode does) rather than set the store aside and make a new key.
                raise KeyringUnavailable(f"no key file, and the keyring that may hold the store's key cannot be "
                                         f"asked: {exc}") from None
            if in_ring:
                raise StoreError("the store's key is in the keyring but [store] key = \"file\"; set it to "
                                 "\"auto\" or \"keyring\", or run: brokerd store migrate --to file")
        return key

    def store(self, key: bytes) -> None:
        from brokerd.store import atomic_create

        if not atomic_create(self.path, key):
            raise StoreError(f"key file {self.path} already exists")

    def delete(self) -> None:
        from brokerd.store import _fsync_dir

        with contextlib.suppress(FileNotFoundError):
            self.path.unlink()
            _fsync_dir(self.path.parent)


def _default_collection(conn: DBusConnection) -> Any:
    import secretstorage

    try:
        return secretstorage.Collection(conn)  # the "default" alias; never created here (that prompts)
    except secretstorage.ItemNotFoundException:
        raise KeyringUnavailable("the keyring has no default collection (create one, e.g. in seahorse)") from None


def keyring_answers() -> bool:
    """Whether a Secret Service with a default collection is on the session bus (locked or not)."""
    try:
        with _bus() as conn:
            try:
                _default_collection(conn)
            except _errors():
                return False
            return True
    except KeyringUnavailable:
        return False


def choose_key_source(mode: str, state_dir: pathlib.Path) -> KeySource:
    """Where this daemon's data key lives.

    ``auto``: the key file while there is one (a store made before the keyring existed, or moved back with
    ``migrate --to file``); else the keyring when one answers, or when a store exists without a key file (its key
    is in a keyring that is not running yet: wait for it rather than set the store aside); else the key file.
    """
    if mode == "file":
        return GuardedFileKeySource(state_dir / KEY_NAME)
    if mode == "keyring":
        return SecretServiceKeySource(state_dir)
    if mode != "auto":
        raise StoreError(f"[store] key must be one of {', '.join(KEY_MODES)}; got {mode!r}")
    if (state_dir / KEY_NAME).exists():
        return GuardedFileKeySource(state_dir / KEY_NAME)
    if keyring_answers() or (state_dir / STORE_NAME).exists():
        return SecretServiceKeySource(state_dir)
    return GuardedFileKeySource(state_dir / KEY_NAME)


def in_keyring(source: KeySource) -> bool:
    return isinstance(source, SecretServiceKeySource)
