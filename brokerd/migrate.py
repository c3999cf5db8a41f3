"""``brokerd store migrate --to keyring|file``: move the store's data key, losing nothing at any point.

The order makes every intermediate state one the daemon can start from (a SIGKILL may land anywhere):

1. copy the key to the new place (a keyring item, or a key file created with O_EXCL and fsynced);
2. read it back from there and check that the store decrypts with it;
3. only then remove the old copy.

Until step 3 both places hold the same key, and ``[store] key = "auto"`` uses the key file while there is one, so
a start after a kill finds a working key either way; running migrate again finishes the move.  The daemon must not
run meanwhile (it reads the key on every save): migrate holds the same locks as the daemon, the runtime lock beside
the socket and the state directory's lock (``statelock``: a daemon started under another socket path holds that one).
"""

from __future__ import annotations

import hmac
import pathlib

from brokerd import statelock
from brokerd.daemon import AlreadyRunning, _lock_runtime_dir
from brokerd.errors import KeyringUnavailable, StateDirBusy, StoreError
from brokerd.keyring import GuardedFileKeySource, SecretServiceKeySource
from brokerd.paths import ensure_private_dir
from brokerd.store import KEY_NAME, SessionStore


def _say(text: str) -> None:
    print(text, flush=True)  # one line per step, flushed: what was done is visible even after a kill


def migrate_key(state_dir: pathlib.Path, to: str, socket_path: pathlib.Path, configured: str) -> None:
    ensure_private_dir(socket_path.parent)
    try:
        lock = _lock_runtime_dir(socket_path)
    except AlreadyRunning:
        raise StoreError("the daemon is running; stop it first (systemctl --user stop brokerd.socket "
                         "brokerd.service, or end `brokerd serve`), then migrate") from None
    try:
        ensure_private_dir(state_dir)
        try:
            state_lock = statelock.hold(state_dir, "brokerd store migrate")
        except StateDirBusy as busy:
            raise StoreError(f"{busy}; stop that daemon first, then migrate") from None
        with state_lock:
            _move(state_dir, to)
    except KeyringUnavailable as exc:
        raise KeyringUnavailable(f"cannot migrate, nothing was changed: {exc}") from None
    finally:
        lock.close()
    if configured not in ("auto", to):
        _say(f'now set [store] key = "{to}" (or "auto") in the config file; it says "{configured}"')


def _move(state_dir: pathlib.Path, to: str) -> None:
    file_keys = GuardedFileKeySource(state_dir / KEY_NAME, guard=False)
    ring = SecretServiceKeySource(state_dir, guard=False)
    src, dst = (file_keys, ring) if to == "keyring" else (ring, file_keys)
    where = {id(file_keys): f"the key file {file_keys.path}", id(ring): "the keyring"}
    store = SessionStore(state_dir)
    key = src.load()
    existing = dst.load()
    if key is None:
        if existing is not None and store.readable_with(existing) is not False:
            _say(f"the key is already in {where[id(dst)]}; nothing to move")
            return
        raise StoreError(f"there is no key in {where[id(src)]} to move")
    if existing is None:
        dst.store(key)
        _say(f"copied the key to {where[id(dst)]}")
    elif not hmac.compare_digest(existing, key):
        raise StoreError(f"{where[id(dst)]} already holds a different key for this store; nothing was changed")
    copied = dst.load()
    if copied is None or not hmac.compare_digest(copied, key):
        raise StoreError(f"{where[id(dst)]} did not keep the key; the old copy stays")
    if store.readable_with(copied) is False:
        raise StoreError(f"the store does not decrypt with the key in {where[id(dst)]}; the old copy stays")
    _say(f"the store decrypts with the key in {where[id(dst)]}")
    src.delete()
    _say(f"removed the key from {where[id(src)]}")
