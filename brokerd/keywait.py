"""The session store while its key waits for a keyring that is locked or not running (an SSH login before the
desktop unlocked it).

Nothing is lost on the way: the store file is neither read nor written while the key is unavailable (a write would
need the key, and setting it aside for want of one would cost every stored session).  The daemon serves what needs
no store (new logins, in memory); ``status`` and every caller say the stored sessions wait; a watcher retries with
back-off and, once the keyring answers, the stored sessions are merged with the ones logged in meanwhile (those are
newer and win) and the merged set is written.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
from collections.abc import Mapping

from brokerd.errors import KeyringUnavailable, StoreError
from brokerd.models import Session, SessionKey
from brokerd.sessions import SessionManager
from brokerd.store import SessionStore

log = logging.getLogger("brokerd.keywait")

RETRY_INITIAL = 0.5
RETRY_MAX = 30.0
MAX_ATTEMPTS = 20_000  # a week and more at RETRY_MAX; bounded like every loop


class WaitingStore:
    """``sessions.Store`` over a ``SessionStore`` whose key may be in a locked or absent keyring."""

    def __init__(self, inner: SessionStore) -> None:
        self.inner = inner
        self.waiting_reason: str | None = None

    @property
    def notice(self) -> str | None:
        if self.waiting_reason is None:
            return None
        return (f"note: brokerd's stored sessions wait for the keyring to unlock ({self.waiting_reason}); they load "
                "when it does, and logins made meanwhile are kept")

    def load(self) -> dict[SessionKey, Session]:
        try:
            sessions = self.inner.load()
        except KeyringUnavailable as exc:
            if self.waiting_reason is None:
                log.warning("stored sessions not loaded yet: %s; retrying until the keyring answers", exc)
            self.waiting_reason = str(exc)
            return {}
        self.waiting_reason = None
        return sessions

    def save(self, sessions: Mapping[SessionKey, Session]) -> None:
        if self.waiting_reason is not None:
            # Not an error: the merged set is written as soon as the keyring unlocks (see watch()).  This also makes
            # the write-ahead save before a refresh a no-op that counts as done, and rightly: the store file has been
            # neither read nor written, so no session in memory has its refresh token there.
            log.debug("sessions kept in memory until the keyring unlocks")
            return
        self.inner.save(sessions)


class Watcher:
    """Owns the one ``watch`` task: started when the store waits, at start or later (a re-read of a store that was
    unreadable at start may meet a locked keyring); cancelled by the daemon before the final save."""

    def __init__(self, store: WaitingStore, sessions: SessionManager) -> None:
        self._store = store
        self._sessions = sessions
        self._task: asyncio.Task[None] | None = None
        self._closed = False

    def ensure(self) -> None:
        if self._closed:
            return  # the final save may re-read the store: no adoption may start after the watcher closed
        if self._store.waiting_reason is not None and (self._task is None or self._task.done()):
            self._sessions.store_notice = self._store.notice
            self._task = asyncio.create_task(watch(self._store, self._sessions))

    async def close(self) -> None:
        self._closed = True
        if self._task is not None:
            self._task.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await self._task


async def watch(store: WaitingStore, sessions: SessionManager, initial: float = RETRY_INITIAL,
                ceiling: float = RETRY_MAX) -> None:
    """Until the keyring answers: retry loading with back-off, then merge and write.  Owned by the daemon."""
    delay = initial
    for _ in range(MAX_ATTEMPTS):
        if store.waiting_reason is None:
            break
        sessions.store_notice = store.notice
        await asyncio.sleep(delay)
        delay = min(delay * 2, ceiling)
        try:
            loaded = await asyncio.to_thread(store.inner.load)
        except KeyringUnavailable as exc:
            store.waiting_reason = str(exc)
            continue
        except StoreError as exc:
            log.error("stored sessions still not loaded: %s", exc)
            continue
        def opened() -> None:
            store.waiting_reason = None
            sessions.store_notice = None

        adopted = await sessions.adopt(loaded, opened)
        log.info("the keyring answered: loaded %d stored session(s) (%d kept from memory)", adopted,
                 len(loaded) - adopted)
        return
    sessions.store_notice = None if store.waiting_reason is None else store.notice
