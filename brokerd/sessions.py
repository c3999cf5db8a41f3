"""The use case: hand out a valid token for a session, renewing it at most once at a time.

``SessionManager`` keeps the map of sessions (``brokerd.session.LiveSession``, keyed by ``ProviderSettings.key``)
and the store; each session owns its renewal (single flight: a refresh or a login, shared by every caller that waits
meanwhile, owned by the session rather than by a caller) and its refresh-ahead timer.  What happens when a refresh
fails is decided in ``LiveSession._refresh_failed``; the write-ahead save that keeps a refresh token from ever being
sent twice is ``SessionManager.save(strict=True)``, called by the session before it sends one.

Ahead of time.  A session's timer refreshes in the background at ``refresh.refresh_due`` (80% of the served token's
life, at the latest 60 s before exp, never in the first half of the life), so callers are served from cache.  A
transient failure is retried with exponential back-off (``retry_initial`` .. ``retry_max``) until the token stops
being served; a failure streak logs one warning, the retries log at debug.

Entries for logins that failed (no tokens) are pruned: at most ``MAX_IDLE`` are kept, and none longer than the
login retry interval they exist to enforce.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
from collections.abc import Callable, Mapping
from typing import Any, Literal, Protocol

from brokerd.agent import Agent, DesktopCaller, caller_bus, caller_peer, login_needed
from brokerd.audit import How
from brokerd.clock import Clock
from brokerd.errors import BrokerError, StoreError
from brokerd.flows import LoginFlows
from brokerd.models import Caller, LoginOptions, ProviderSettings, Session, SessionKey, TokenSet
from brokerd.oidc import ClientFactory, OIDCClient
from brokerd.policy import BackgroundLogin, PolicyBook, idle_deadline, past_max_age, session_end
from brokerd.refresh import Policy, describe
from brokerd.session import LiveSession

__all__ = ["Policy", "SessionManager", "Store"]

log = logging.getLogger("brokerd.sessions")

LOGOUT_REFRESH_WAIT = 10.0  # logout lets a refresh in flight land, so it revokes the newest refresh token
# Shutdown lets a refresh in flight end on its own: longer than a provider request may take (ProviderClients'
# 30 s), within the unit's TimeoutStopSec.  A refresh cancelled after this counts as spent anyway.
CLOSE_REFRESH_WAIT = 35.0
MAX_IDLE = 64  # entries of failed logins kept (they carry the login retry throttle)


class Store(Protocol):
    def load(self) -> dict[SessionKey, Session]: ...
    def save(self, sessions: Mapping[SessionKey, Session]) -> None: ...


class SessionManager:
    def __init__(self, client_for: ClientFactory, flows: LoginFlows, store: Store | None, clock: Clock,
                 policy: Policy | Callable[[], Policy] | None = None,
                 policies: Callable[[], PolicyBook] = PolicyBook, ask_timeout: float = 300.0) -> None:
        """``policies`` reads the agent's policy tables (config.py; SIGHUP swaps them); ``ask_timeout`` bounds a
        confirmation question (server.Limits.answer_timeout)."""
        self._client_for = client_for
        self.flows = flows
        self._store = store
        self.clock = clock
        # A getter follows the daemon's settings (SIGHUP swaps them whole); a Policy stays as it is.
        fixed = policy or Policy()
        self._policy: Callable[[], Policy] = fixed if callable(fixed) else lambda: fixed
        self._sessions: dict[SessionKey, LiveSession] = {}
        self._save_lock = asyncio.Lock()
        self.closing = False
        # Set by the daemon from its key source (brokerd.keywait): what --token-cache-storage=keyring requires, and
        # the line every caller hears while the stored sessions wait for the keyring to unlock.
        self.keyring_backed = False
        self.store_notice: str | None = None
        self.agent = Agent(clock, policies, lambda: self.policy.login_retry_interval)
        self._ask_timeout = ask_timeout
        # The store could not be read at start: it must not be saved over until it has been read (see _reload).
        self.store_unread: str | None = None
        self._save_failing: str | None = None  # why the last save failed: logged once per streak
        # Logouts made while the stored sessions were not in memory (unread, or waiting for the keyring): applied
        # to them when they load (_take_stored).
        self._logouts: list[Callable[[ProviderSettings, SessionKey], bool]] = []
        self.on_store_waiting: Callable[[], None] | None = None  # the daemon starts keywait's watcher

    @property
    def policy(self) -> Policy:
        return self._policy()

    # -- lifecycle ------------------------------------------------------------------------------------------------

    async def start(self) -> None:
        if self._store is None:
            return
        try:
            stored = await asyncio.to_thread(self._store.load)
        except StoreError as exc:
            self.store_unread = str(exc)
            log.error("sessions not loaded (%s); serving from memory, and the store will not be saved over until "
                      "it can be read", exc)
            return
        await self._take_stored(stored)
        log.info("loaded %d session(s) from the store", len(stored))

    async def _take_stored(self, stored: Mapping[SessionKey, Session]) -> int:
        """Sessions read from the store, at start or late (the store was unreadable, the keyring locked); the one
        place they are taken in.  One in memory with tokens (a login made meanwhile) is newer and wins; one without
        (a failed or pending login) takes the stored tokens.  One a logout ended while it was not loaded is revoked
        and dropped instead, so the unlock never undoes a logout.  Returns how many were taken."""
        ended = {k: p for k, p in stored.items() if any(match(p.settings, k) for match in self._logouts)}
        self._logouts.clear()
        taken = 0
        for key, persisted in stored.items():
            session = self._sessions.get(key)
            if key in ended or (session is not None and session.tokens is not None):
                continue
            if session is None:
                session = self._sessions[key] = LiveSession(self, persisted.settings)
                session.policy = self.agent.policy_for(session.settings, ())
            # A login may be pending for it in a browser; until it lands, the stored tokens serve (and are kept).
            session.tokens = persisted.tokens
            if persisted.tokens.refresh_token:
                session.on_disk.add(persisted.tokens.refresh_token)
            # A store written before these were kept: max_session_age and idle_logout count from now.
            now = self.clock.now()
            session.logged_in_at = persisted.logged_in_at or now
            session.last_served_at = persisted.last_served_at or now
            session.schedule()
            taken += 1
        for persisted in ended.values():
            result = await self._revoke(persisted.settings, persisted.tokens)
            log.info("stored session %s was logged out before it loaded: %s", persisted.key.short(), result)
        return taken

    async def _reload(self) -> bool:
        """Before the first save after a failed load: read the store now, so a save never replaces sessions it
        never read.  False (and nothing may be written) while it still cannot be read."""
        assert self._store is not None
        try:
            stored = await asyncio.to_thread(self._store.load)
        except StoreError as exc:
            self.store_unread = str(exc)
            return False
        self.store_unread = None
        if getattr(self._store, "waiting_reason", None) is not None:
            # The re-read met a locked keyring: nothing was read, and the store waits now (no write until it is
            # read); keywait's watcher reads it, and takes the sessions in, when the keyring answers.
            if self.on_store_waiting is not None:
                self.on_store_waiting()
            return True
        await self._take_stored(stored)
        log.info("the store can be read now: merged %d session(s) from it", len(stored))
        return True
    def watch(self) -> None:
        """Start the agent's watch (idle logout, end of age, warnings); the daemon calls it once serving."""
        self.agent.start(lambda: [s for s in self._sessions.values() if s.tokens is not None], self._end,
                         self._login_now)

    def reload(self) -> None:
        """SIGHUP: every session's policy from the new tables."""
        for session in self._sessions.values():
            session.policy = self.agent.policy_for(session.settings, self.agent.guard(session.settings.key).profiles)
            if session.renewal is None:
                session.schedule()
        self.agent.changed()

    def interrupt_logins(self) -> None:
        """Stop pending logins (shutdown): their callers get LoginInterrupted now rather than hanging."""
        self.closing = True
        for session in self._sessions.values():
            if session.renewal is not None and session.renewal.logging_in:
                session.renewal.running.cancel()

    async def close(self, refresh_grace: float = CLOSE_REFRESH_WAIT) -> None:
        self.interrupt_logins()
        await self.agent.close()
        tasks: list[asyncio.Task[Any]] = []
        for session in self._sessions.values():
            if session.timer is not None:
                session.timer.cancel()
                tasks.append(session.timer)
            if session.renewal is not None and not session.renewal.running.done():
                tasks.append(session.renewal.running)
        # A refresh in flight may already have rotated the refresh token at the provider: let it land and be
        # saved.  One that does not end in time is cancelled, and a cancelled refresh counts as spent.
        if tasks:
            await asyncio.wait(tasks, timeout=refresh_grace)
        for task in tasks:
            task.cancel()
            with contextlib.suppress(asyncio.CancelledError, BrokerError):
                await task
        await self.save()

    def __len__(self) -> int:
        return sum(1 for s in self._sessions.values() if s.tokens is not None)

    @property
    def entries(self) -> int:
        """Sessions in memory, with or without tokens."""
        return len(self._sessions)

    # -- the use case ---------------------------------------------------------------------------------------------

    async def client_for(self, settings: ProviderSettings) -> OIDCClient:
        return await self._client_for(settings)

    async def get_token(self, settings: ProviderSettings, options: LoginOptions, caller: Caller) -> TokenSet:
        return (await self.obtain(settings, options, caller))[0]

    async def obtain(self, settings: ProviderSettings, options: LoginOptions, caller: Caller,
                     profile: str | None = None) -> tuple[TokenSet, How]:
        """A token for ``caller`` under the session's policy, and how it was obtained (for the audit trail).

        The order matters: the session's end by age first (so nothing is served or refreshed past it), then the
        confirmation, before anything that could open a browser or spend a refresh token."""
        if options.cache_storage == "keyring" and self._store is not None and not self.keyring_backed:
            raise StoreError("--token-cache-storage=keyring: brokerd's store key is in a file, not a keyring; run "
                             "`brokerd store migrate --to keyring` with a keyring running, or use "
                             "--token-cache-storage=none")
        if self.store_notice:
            caller.tell(self.store_notice)
        elif self.store_unread is not None:
            caller.tell(f"note: brokerd {self.store_problem}; sessions are kept in memory meanwhile")
        session = self._sessions.get(settings.key)
        if session is None:
            self._prune()
            session = self._sessions[settings.key] = LiveSession(self, settings)
        if options.cache_storage == "none":
            session.persist = False  # sticky: a session once memory-only is never written later
        guard = self.agent.guard(settings.key)
        if profile not in guard.profiles:
            guard.profiles.add(profile)
            session.policy = self.agent.policy_for(settings, guard.profiles)
        bus = caller_bus(caller)
        if bus is not None:
            guard.bus_address = bus  # where the warning ahead of a login goes
        now = self.clock.now()
        if session.tokens is not None and past_max_age(session.policy, session.logged_in_at, now):
            await self._end(settings.key, f"reached max_session_age ({session.policy.max_session_age:g} s); a new "
                                          "login is needed")
            return await self.obtain(settings, options, caller, profile)
        await self.agent.confirm(session, caller, options, self._ask_timeout)
        tokens, how = await session.get(options, caller)
        session.last_served_at = self.clock.now()
        self.agent.counters.served(str(settings.key), caller_peer(caller), session.last_served_at)
        if session.policy.idle_logout is not None:
            self.agent.changed()
        return tokens, how

    def renewed(self, session: LiveSession, how: Literal["refresh", "login"]) -> None:
        self.agent.counters.renewed(str(session.settings.key), how)
        self.agent.changed()

    async def background(self, session: LiveSession, caller: Caller, options: LoginOptions
                         ) -> BackgroundLogin | None:
        return await self.agent.background(session.policy, caller, options, session.settings.issuer)

    async def _login_now(self, key: SessionKey, bus: str) -> None:
        """A click on the warning ahead of a login: log in again now (as `brokerd login` does), the browser opened
        by the daemon on the desktop that was warned; messages go to the log."""
        session = self._sessions.get(key)
        if session is None:
            return
        await self.logout(keys={key})
        await self.obtain(session.settings, LoginOptions(), DesktopCaller(bus))

    async def _end(self, key: SessionKey, why: str) -> None:
        """End a session by policy (age, disuse) as logout does: its refresh token revoked, forgotten."""
        session = self._sessions.get(key)
        if session is None:
            return
        log.info("session %s %s", session.short, why)
        await self.logout(keys={key})

    def credential(self, settings: ProviderSettings, tokens: TokenSet) -> tuple[str, float]:
        """The token kubectl gets from ``tokens`` and its expirationTimestamp, as the session serves them."""
        session = self._sessions.get(settings.key) or LiveSession(self, settings)
        return session.credential(tokens)

    def _prune(self) -> None:
        idle = [(key, s) for key, s in self._sessions.items() if s.idle]
        now = self.clock.now()
        for key, session in idle:
            failed = session.login_failed_at
            if failed is None or now - failed >= self.policy.login_retry_interval:
                del self._sessions[key]
        idle = [(key, s) for key, s in idle if key in self._sessions]
        idle.sort(key=lambda item: item[1].login_failed_at or 0.0)
        for key, _ in idle[:max(0, len(idle) - MAX_IDLE + 1)]:
            del self._sessions[key]

    # -- persistence ----------------------------------------------------------------------------------------------

    async def save(self, *, strict: bool = False) -> None:
        """Persist every session as it stands now (``LiveSession.stored``: never a refresh token in flight).

        Snapshots are taken under the lock, so saves land in order and an older snapshot never overwrites a newer
        one.  A write cannot be abandoned half way: a caller that is cancelled leaves it (and the lock) to finish.
        A failure is logged and the daemon serves on from memory; with ``strict`` it is raised as well.
        """
        if self._store is None:
            return
        await self._save_lock.acquire()
        try:
            if self.store_unread is not None and not await self._reload():
                raise StoreError(f"the session store could not be read ({self.store_unread}); it is not saved "
                                 "over")
            snapshot = {key: Session(key, s.settings, tokens, s.logged_in_at, s.last_served_at)
                        for key, s in self._sessions.items()
                        if (tokens := s.stored()) is not None}
            write = asyncio.ensure_future(asyncio.to_thread(self._store.save, snapshot))
        except StoreError:
            self._save_lock.release()
            if strict:
                raise
            return
        except BaseException:
            self._save_lock.release()
            raise
        write.add_done_callback(lambda done: self._saved(done, snapshot))
        try:
            await asyncio.shield(write)
        except StoreError:
            if strict:
                raise
        except Exception as exc:  # a surprise from the store is still a failed save, never a lost session
            if strict:
                raise StoreError(f"sessions not saved ({type(exc).__name__})") from exc

    def _saved(self, write: asyncio.Future[None], snapshot: Mapping[SessionKey, Session]) -> None:
        self._save_lock.release()
        exc: BaseException | None
        if write.cancelled():  # not expected (shielded); if so, the write may or may not have landed
            exc = StoreError("the save was cancelled")
            exc.maybe_written = True
        else:
            exc = write.exception()
        # What the disk may hold now, per session: the write-ahead rule needs to know (LiveSession._refresh).
        landed = exc is None or (isinstance(exc, StoreError) and exc.maybe_written)
        for key, session in self._sessions.items():
            saved = snapshot.get(key)
            token = saved.tokens.refresh_token if saved is not None else None
            if exc is None:
                session.on_disk.clear()
            if landed and token:
                session.on_disk.add(token)
        if exc is None:
            if self._save_failing:
                log.info("sessions saved again")
            self._save_failing = None
            return
        # Keep serving from memory: losing persistence is bad, losing the running session is worse.  One error
        # per failure streak (every renewal saves), the rest at debug.
        text = str(exc) if isinstance(exc, StoreError) else type(exc).__name__
        if not self._save_failing:
            log.error("sessions not saved (kept in memory until the store can be written): %s", text)
        else:
            log.debug("sessions not saved: %s", text)
        self._save_failing = text

    async def adopt(self, sessions: Mapping[SessionKey, Session], open_store: Callable[[], None]) -> int:
        """Take in stored sessions that loaded late (the keyring unlocked) and write the merged set.  A session
        logged in meanwhile is newer than its stored copy and wins."""
        async with self._save_lock:
            pass  # a save in flight holds a snapshot from before the merge: let it end while the store is closed
        open_store()  # _take_stored merges before its first await, so every later snapshot holds the merge
        adopted = await self._take_stored(sessions)
        await self.save()
        return adopted

    # -- admin ----------------------------------------------------------------------------------------------------

    @property
    def store_problem(self) -> str | None:
        """Why sessions are not being persisted now (for status), or None."""
        if self.store_unread is not None:
            return f"the session store could not be read ({self.store_unread}); it is not saved over"
        if self._save_failing is not None:
            return f"sessions are not being saved ({self._save_failing})"
        return None

    def status(self) -> list[dict[str, Any]]:
        out = []
        now = self.clock.now()
        for key, s in sorted(self._sessions.items()):
            if s.tokens is None and s.renewal is None:
                continue
            doc = describe(key, s.settings, s.tokens, now,
                           expires_at=s.served.expiry(s.tokens) if s.tokens is not None else None,
                           next_refresh_at=s.next_refresh_at, retrying=s.retrying,
                           login_pending=s.renewal is not None and s.renewal.logging_in)
            tally = self.agent.counters.sessions.get(str(key))
            doc.update(policy=s.policy.describe(), counters=tally.describe() if tally is not None else None,
                       session_ends_at=session_end(s.policy, s.logged_in_at),
                       idle_logout_at=idle_deadline(s.policy, s.last_served_at),
                       refresh_token_expires_at=s.tokens.refresh_expires_at if s.tokens is not None else None,
                       login_needed_at=login_needed(s))
            out.append(doc)
        return out

    async def logout(self, issuer: str | None = None, client_id: str | None = None,
                     keys: set[SessionKey] | None = None) -> list[dict[str, Any]]:
        """End the matching sessions: revoke the refresh token (RFC 7009), forget them in memory and on disk."""
        def match(settings: ProviderSettings, key: SessionKey) -> bool:
            return ((issuer is None or settings.issuer == issuer) and (client_id is None or settings.client_id ==
                    client_id) and (keys is None or key in keys))

        if self.store_unread is not None or getattr(self._store, "waiting_reason", None) is not None:
            self._logouts.append(match)
            log.info("the stored sessions have not loaded yet: those this logout matches are revoked when they do")
        ended = [(key, s) for key, s in self._sessions.items() if match(s.settings, key)]
        for key, session in ended:
            # Out of the table first: a caller arriving now starts a fresh session instead of reviving this one.
            del self._sessions[key]
            session.closed = True
            session.cancel_timer()
            self.agent.forget(key)
        results = []
        for key, session in ended:
            renewal = session.renewal
            if renewal is not None and not renewal.running.done():
                if not renewal.logging_in:
                    # A refresh in flight may rotate the token: let it land so the newest one is revoked.
                    await asyncio.wait({renewal.running}, timeout=LOGOUT_REFRESH_WAIT)
                renewal.running.cancel()
            results.append({"session": key.short(), "issuer": session.settings.issuer,
                            "client_id": session.settings.client_id,
                            "result": await self._revoke(session.settings, session.tokens)})
        await self.save()
        return results

    async def _revoke(self, settings: ProviderSettings, tokens: TokenSet | None) -> str:
        if tokens is None or not tokens.refresh_token:
            return "no refresh token to revoke; session forgotten"
        try:
            ok = await (await self.client_for(settings)).revoke(settings, tokens.refresh_token)
        except BrokerError as exc:
            log.warning("session %s: revocation failed: %s", settings.key.short(), exc)
            return f"revocation failed ({exc}); session forgotten"
        if ok:
            return "refresh token revoked; session forgotten"
        return "the provider has no revocation endpoint; session forgotten"

