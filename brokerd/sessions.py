"""The use case: hand out a valid token for a session, renewing it at most once at a time.

Single flight.  For each session (keyed by ProviderSettings.key) there is at most one renewal task, a refresh or a
login, and every caller that needs a token meanwhile waits on that same task.  The task belongs to the manager, not
to a caller: a caller that gives up does not cancel a login others wait for, or that the person is still finishing
in the browser.

Ahead of time.  A timer per session refreshes in the background at ``refresh.refresh_due`` (80% of the served
token's life, at the latest 60 s before exp, never in the first half of the life), so callers are served from
cache.  When that refresh fails with a transient error it is retried with exponential back-off
(``retry_initial`` .. ``retry_max``) until the token stops being served; a failure streak logs one warning, the
retries log at debug.  Meanwhile a caller is served the cached token while it is valid; a caller that arrives
after it has expired starts (or joins) one renewal of its own, which may log in.

Rotation.  A refresh token is never sent twice.  New tokens are written to the store (fsynced) before the session
in memory points at them, so nothing uses a rotated session whose refresh token is not on disk.  When a refresh
fails, ``refresh.refresh_token_lost`` decides whether the provider may have processed it: only a request that
never left (connection refused, connect timeout: ``ProviderError.maybe_delivered`` is False) or one the provider
answered with an error status leaves the refresh token usable; a timeout or a dropped connection after sending,
an unusable 2xx answer, or invalid_grant drops it.  The ID token is then still served until it expires, and the
next caller after that logs in once.  A refresh that returns no new ID token (kubelogin #536) keeps the old one
and stops the timer (refreshing again cannot extend it); one that returns no new refresh token keeps the old one.

A login is never retried in a loop: a renewal logs in at most once, and after a failed login non-interactive
callers are refused for ``login_retry_interval`` instead of opening the browser again.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import time
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field, replace
from typing import Any, Protocol

from brokerd.clock import Clock
from brokerd.errors import BrokerError, LoginError, LoginInterrupted, LoginPending, StoreError
from brokerd.flows import LoginFlows
from brokerd.models import Caller, LoginOptions, ProviderSettings, Session, SessionKey, TokenSet
from brokerd.oidc import OIDCClient
from brokerd.refresh import Policy, describe, margin, refresh_due, refresh_token_lost, serve_until

__all__ = ["Policy", "SessionManager", "Store", "margin", "refresh_due"]

log = logging.getLogger("brokerd.sessions")

CALLER_GRACE = 2.0

MAX_RETRIES = 100  # background refresh attempts per token; the back-off reaches exp long before this
LOGOUT_REFRESH_WAIT = 10.0  # logout lets a refresh in flight land, so it revokes the newest refresh token


class Store(Protocol):
    def load(self) -> dict[SessionKey, Session]: ...
    def save(self, sessions: Mapping[SessionKey, Session]) -> None: ...


@dataclass
class _Renewal:
    task: asyncio.Task[TokenSet]
    allow_login: bool
    logging_in: bool = False
    messages: list[str] = field(default_factory=list)
    callers: set[Caller] = field(default_factory=set)

    def announce(self, text: str) -> None:
        self.messages.append(text)
        for caller in list(self.callers):
            caller.tell(text)

    def join(self, caller: Caller) -> None:
        self.callers.add(caller)
        for text in self.messages:
            caller.tell(text)


@dataclass
class _Entry:
    settings: ProviderSettings
    tokens: TokenSet | None = None
    options: LoginOptions = field(default_factory=LoginOptions)
    renewal: _Renewal | None = None
    timer: asyncio.Task[None] | None = None
    next_refresh_at: float | None = None
    retrying: bool = False
    closed: bool = False  # logged out: nothing may schedule work on it any more
    login_failed_at: float | None = None
    login_failure: str = ""
    persist: bool = True  # False: memory only (--token-cache-storage=none), never in a snapshot for the store


class SessionManager:
    def __init__(self, oidc_for: Callable[[LoginOptions], OIDCClient], flows: LoginFlows, store: Store | None,
                 clock: Clock, policy: Policy | None = None) -> None:
        self._oidc_for = oidc_for
        self._flows = flows
        self._store = store
        self._clock = clock
        self.policy = policy or Policy()
        self._entries: dict[SessionKey, _Entry] = {}
        self._save_lock = asyncio.Lock()
        self._closing = False
        # Set by the daemon from its key source (brokerd.keywait): what --token-cache-storage=keyring requires, and
        # the line every caller hears while the stored sessions wait for the keyring to unlock.
        self.keyring_backed = False
        self.store_notice: str | None = None

    # -- lifecycle ------------------------------------------------------------------------------------------------

    async def start(self) -> None:
        if self._store is None:
            return
        try:
            sessions = await asyncio.to_thread(self._store.load)
        except StoreError as exc:
            log.error("sessions not loaded, starting empty: %s", exc)
            return
        for key, session in sessions.items():
            entry = _Entry(settings=session.settings, tokens=session.tokens, options=session.options)
            self._entries[key] = entry
            self._schedule(entry)
        log.info("loaded %d session(s) from the store", len(sessions))

    def interrupt_logins(self) -> None:
        """Stop pending logins (shutdown): their callers get LoginInterrupted now rather than hanging."""
        self._closing = True
        for entry in self._entries.values():
            if entry.renewal is not None and entry.renewal.logging_in:
                entry.renewal.task.cancel()

    async def close(self, refresh_grace: float = 10.0) -> None:
        self.interrupt_logins()
        tasks: list[asyncio.Task[Any]] = []
        for entry in self._entries.values():
            if entry.timer is not None:
                entry.timer.cancel()
                tasks.append(entry.timer)
            if entry.renewal is not None and not entry.renewal.task.done():
                tasks.append(entry.renewal.task)
        # A refresh in flight may already have rotated the refresh token at the provider: let it land and be
        # saved rather than cancel it and lose the new one.  Bounded: the HTTP request has its own timeout.
        if tasks:
            await asyncio.wait(tasks, timeout=refresh_grace)
        for task in tasks:
            task.cancel()
            with contextlib.suppress(asyncio.CancelledError, BrokerError):
                await task
        await self._save()

    def __len__(self) -> int:
        return sum(1 for e in self._entries.values() if e.tokens is not None)

    # -- the use case ---------------------------------------------------------------------------------------------

    def _servable(self, tokens: TokenSet | None, use_access_token: bool) -> bool:
        if tokens is None or not tokens.token_for(use_access_token):
            return False
        return self._clock.now() < serve_until(self.policy, tokens, use_access_token)

    def serve_expiry(self, tokens: TokenSet, use_access_token: bool) -> float:
        """The expirationTimestamp to give kubectl: a little before the real exp (kube-apiserver allows no leeway)."""
        return serve_until(self.policy, tokens, use_access_token)

    async def get_token(self, settings: ProviderSettings, options: LoginOptions, caller: Caller) -> TokenSet:
        key = settings.key
        if options.cache_storage == "keyring" and self._store is not None and not self.keyring_backed:
            raise StoreError("--token-cache-storage=keyring: brokerd's store key is in a file, not a keyring; run "
                             "`brokerd store migrate --to keyring` with a keyring running, or use "
                             "--token-cache-storage=none")
        if self.store_notice:
            caller.tell(self.store_notice)
        entry = self._entries.get(key)
        if entry is None:
            entry = self._entries[key] = _Entry(settings=settings)
        if options.cache_storage == "none":
            entry.persist = False  # sticky: a session once memory-only is never written later
        # Remembered for background refreshes (TLS, headers); --force-refresh is this caller's wish only.
        if entry.options.tls != options.tls or entry.options.request_headers != options.request_headers:
            entry.options = options.for_refresh()
        force = options.force_refresh
        # Two rounds at most: a background refresh that failed hands over to one renewal that may log in.
        for _ in range(2):
            if not force and self._servable(entry.tokens, settings.use_access_token):
                assert entry.tokens is not None
                return entry.tokens
            renewal = entry.renewal
            if renewal is None or renewal.task.done():
                renewal = self._start_renewal(entry, options, caller, allow_login=True, force=force)
            force = False
            renewal.join(caller)
            try:
                # A little longer than the login's own deadline, so the caller hears why it ended ("no login was
                # completed within N s") rather than that it is still pending.
                tokens = await asyncio.wait_for(asyncio.shield(renewal.task),
                                                options.authentication_timeout + CALLER_GRACE)
            except asyncio.CancelledError:
                task = asyncio.current_task()
                if renewal.task.cancelled() and not (task is not None and task.cancelling()):
                    raise LoginInterrupted("the login was interrupted: " + (
                        "brokerd is shutting down" if self._closing else "the session was logged out")) from None
                raise
            except TimeoutError:
                raise LoginPending("a login for this cluster is still waiting in your browser; finish it there, "
                                   "then run the command again") from None
            except BrokerError:
                if renewal.allow_login:
                    raise
                continue
            finally:
                renewal.callers.discard(caller)
            if self._servable(tokens, settings.use_access_token):
                return tokens
            if renewal.allow_login:
                raise LoginError("the provider issued a token that is already expired; check the clock on this "
                                 "machine and the provider's token lifetime")
        raise LoginError("could not renew the session")

    def _start_renewal(self, entry: _Entry, options: LoginOptions, caller: Caller | None, *, allow_login: bool,
                       force: bool = False) -> _Renewal:
        holder: list[_Renewal] = []
        task = asyncio.create_task(self._renew(entry, options, caller, allow_login, force, holder))
        renewal = _Renewal(task=task, allow_login=allow_login)
        holder.append(renewal)
        entry.renewal = renewal
        task.add_done_callback(lambda t: self._renewal_done(entry, renewal, t))
        return renewal

    @staticmethod
    def _renewal_done(entry: _Entry, renewal: _Renewal, task: asyncio.Task[TokenSet]) -> None:
        if entry.renewal is renewal:
            entry.renewal = None
        if not task.cancelled():
            task.exception()  # marks it retrieved: every waiter got it already, or nobody waits

    async def _renew(self, entry: _Entry, options: LoginOptions, caller: Caller | None, allow_login: bool,
                     force: bool, holder: list[_Renewal]) -> TokenSet:
        oidc = self._oidc_for(options)
        tokens = entry.tokens
        if tokens is not None and tokens.refresh_token:
            # Discovery first, on its own: a failure here certainly sent nothing, so the refresh token stays.
            await oidc.metadata(entry.settings.issuer)
            try:
                return await self._refresh(entry, oidc, tokens)
            except BrokerError as exc:
                if not refresh_token_lost(exc):
                    # Transient and unspent: keep the session as it is; the caller or the timer tries again.
                    if not force and self._servable(tokens, entry.settings.use_access_token):
                        return tokens
                    raise
                await self._drop_refresh_token(entry, tokens, exc)
                if not allow_login or caller is None:
                    raise
        if not allow_login or caller is None:
            raise LoginError("the session has no refresh token; a login is needed")
        return await self._login(entry, oidc, options, caller, holder[0])

    async def _drop_refresh_token(self, entry: _Entry, tokens: TokenSet, exc: BrokerError) -> None:
        log.warning("session %s: dropped the refresh token (%s); the ID token is served until it expires, then "
                    "the next call logs in", entry.settings.key.short(), exc)
        await self._save(entry, replace(tokens, refresh_token=None))
        self._cancel_timer(entry)

    async def _refresh(self, entry: _Entry, oidc: OIDCClient, tokens: TokenSet) -> TokenSet:
        new = await oidc.refresh(entry.settings, tokens)
        await self._save(entry, new)  # on disk before anything can use the session with the new refresh token
        use_access = entry.settings.use_access_token
        if new.serve_expiry(use_access) <= tokens.serve_expiry(use_access):
            # No new ID token (kubelogin #536), or one no longer-lived: refreshing ahead again cannot extend it.
            # The next caller after its exp renews (a refresh, else one login).
            log.info("session %s refreshed but its token was not extended; it stays valid until %s",
                     entry.settings.key.short(), _fmt(new.serve_expiry(use_access)))
            self._cancel_timer(entry)
        else:
            log.info("session %s refreshed; token valid until %s", entry.settings.key.short(),
                     _fmt(new.serve_expiry(use_access)))
            self._schedule(entry)
        return new

    async def _login(self, entry: _Entry, oidc: OIDCClient, options: LoginOptions, caller: Caller,
                     renewal: _Renewal) -> TokenSet:
        failed_at = entry.login_failed_at
        if (failed_at is not None and not caller.interactive and not options.force_refresh
                and self._clock.now() - failed_at < self.policy.login_retry_interval):
            wait = self.policy.login_retry_interval - (self._clock.now() - failed_at)
            raise LoginPending(f"the last login attempt failed ({entry.login_failure}); not opening the browser "
                               f"again for {wait:.0f} s (run kubectl in a terminal to retry now)")
        renewal.logging_in = True
        try:
            tokens = await self._flows.login(oidc, entry.settings, options, caller, renewal.announce)
        except asyncio.CancelledError:
            raise
        except BrokerError as exc:
            entry.login_failed_at = self._clock.now()
            entry.login_failure = str(exc)
            raise
        entry.login_failed_at = None
        await self._save(entry, tokens)
        log.info("session %s logged in; token valid until %s", entry.settings.key.short(),
                 _fmt(tokens.serve_expiry(entry.settings.use_access_token)))
        self._schedule(entry)
        return tokens

    # -- ahead-of-time refresh ------------------------------------------------------------------------------------

    def _cancel_timer(self, entry: _Entry) -> None:
        if entry.timer is not None and entry.timer is not asyncio.current_task():
            entry.timer.cancel()
        entry.timer = None
        entry.next_refresh_at = None
        entry.retrying = False

    def _schedule(self, entry: _Entry) -> None:
        self._cancel_timer(entry)
        if self._closing or entry.closed or entry.tokens is None or not entry.tokens.refresh_token:
            return
        entry.next_refresh_at = refresh_due(self.policy, entry.tokens, entry.settings.use_access_token)
        entry.timer = asyncio.create_task(self._refresh_ahead(entry, entry.tokens))

    async def _refresh_ahead(self, entry: _Entry, tokens: TokenSet) -> None:
        assert entry.next_refresh_at is not None
        await self._clock.sleep(entry.next_refresh_at - self._clock.now())
        short = entry.settings.key.short()
        until = serve_until(self.policy, tokens, entry.settings.use_access_token)
        delay = self.policy.retry_initial
        for attempt in range(1, MAX_RETRIES + 1):
            if entry.tokens is not tokens or entry.closed:
                return  # renewed meanwhile; that renewal scheduled the next timer
            renewal = entry.renewal
            if renewal is None or renewal.task.done():
                renewal = self._start_renewal(entry, entry.options, None, allow_login=False, force=True)
            try:
                await asyncio.shield(renewal.task)
                return
            except BrokerError as exc:
                if entry.tokens is not tokens or entry.tokens is None or not entry.tokens.refresh_token:
                    return  # the refresh token was dropped (and that was logged), or another renewal won
                # One warning per failure streak; the retries go to debug so a dead provider does not flood logs.
                if attempt == 1:
                    log.warning("session %s: background refresh failed (%s); retrying with back-off until the "
                                "token expires at %s", short, exc, _fmt(until))
                else:
                    log.debug("session %s: background refresh attempt %d failed: %s", short, attempt, exc)
            remaining = until - self._clock.now()
            if remaining <= 0:
                log.debug("session %s: no refresh before the token expired; the next call renews", short)
                entry.next_refresh_at, entry.retrying = None, False
                return
            wait = min(delay, remaining)
            entry.next_refresh_at, entry.retrying = self._clock.now() + wait, True
            await self._clock.sleep(wait)
            delay = min(delay * 2, self.policy.retry_max)

    # -- persistence ----------------------------------------------------------------------------------------------

    async def _save(self, entry: _Entry | None = None, tokens: TokenSet | None = None) -> None:
        """Persist every session, with ``entry`` holding ``tokens``, then point ``entry`` at them.

        The snapshot is taken under the lock, so saves land in order and an older snapshot never overwrites a
        newer one.  The write is not abandoned half way when the task is cancelled (logout, shutdown): the
        provider may already have rotated the refresh token being written.
        """
        cancelled = False
        async with self._save_lock:
            if self._store is not None:
                snapshot = {key: Session(key, e.settings, e.tokens, e.options) for key, e in self._entries.items()
                            if e.tokens is not None and e.persist}
                if (entry is not None and tokens is not None and entry.persist
                        and self._entries.get(entry.settings.key) is entry):
                    snapshot[entry.settings.key] = Session(entry.settings.key, entry.settings, tokens, entry.options)
                write = asyncio.ensure_future(asyncio.to_thread(self._store.save, snapshot))
                for _ in range(1000):  # bounded by the write finishing; a cancel only defers
                    try:
                        await asyncio.shield(write)
                        break
                    except asyncio.CancelledError:
                        cancelled = True
                        if write.done():
                            break
                try:
                    write.result()
                except StoreError as exc:
                    # Keep serving from memory: losing persistence is bad, losing the running session is worse.
                    log.error("sessions not saved: %s", exc)
            if entry is not None and tokens is not None:
                entry.tokens = tokens
        if cancelled:
            raise asyncio.CancelledError

    async def adopt(self, sessions: Mapping[SessionKey, Session], open_store: Callable[[], None]) -> int:
        """Take in stored sessions that loaded late (the keyring unlocked) and write the merged set.  A session
        logged in meanwhile is newer than its stored copy and wins."""
        async with self._save_lock:
            pass  # a save in flight holds a snapshot from before the merge: let it end while the store is closed
        open_store()  # from here to the snapshot below nothing awaits, so every later snapshot holds the merge
        adopted = 0
        for key, session in sessions.items():
            entry = self._entries.get(key)
            if entry is None:
                entry = self._entries[key] = _Entry(settings=session.settings, options=session.options)
            elif entry.tokens is not None:
                continue
            # A login may be pending for it in a browser; until it lands, the stored tokens serve (and are kept).
            entry.tokens = session.tokens
            self._schedule(entry)
            adopted += 1
        await self._save()
        return adopted

    # -- admin ----------------------------------------------------------------------------------------------------

    def status(self) -> list[dict[str, Any]]:
        out = []
        now = self._clock.now()
        for key, entry in sorted(self._entries.items()):
            if entry.tokens is None and entry.renewal is None:
                continue
            out.append(describe(key, entry.settings, entry.tokens, now, next_refresh_at=entry.next_refresh_at,
                                retrying=entry.retrying,
                                login_pending=entry.renewal is not None and entry.renewal.logging_in))
        return out

    async def logout(self, issuer: str | None = None, client_id: str | None = None) -> list[dict[str, Any]]:
        """End the matching sessions: revoke the refresh token (RFC 7009), forget them in memory and on disk."""
        ended = [(key, entry) for key, entry in self._entries.items()
                 if (issuer is None or entry.settings.issuer == issuer)
                 and (client_id is None or entry.settings.client_id == client_id)]
        for key, entry in ended:
            # Out of the table first: a caller arriving now starts a fresh session instead of reviving this one.
            del self._entries[key]
            entry.closed = True
            self._cancel_timer(entry)
        results = []
        for key, entry in ended:
            renewal = entry.renewal
            if renewal is not None and not renewal.task.done():
                if not renewal.logging_in:
                    # A refresh in flight may rotate the token: let it land so the newest one is revoked.
                    await asyncio.wait({renewal.task}, timeout=LOGOUT_REFRESH_WAIT)
                renewal.task.cancel()
            results.append({"session": key.short(), "issuer": entry.settings.issuer,
                            "client_id": entry.settings.client_id, "result": await self._revoke(entry)})
        await self._save()
        return results

    async def _revoke(self, entry: _Entry) -> str:
        tokens = entry.tokens
        if tokens is None or not tokens.refresh_token:
            return "no refresh token to revoke; session forgotten"
        try:
            ok = await self._oidc_for(entry.options).revoke(entry.settings, tokens.refresh_token)
        except BrokerError as exc:
            log.warning("session %s: revocation failed: %s", entry.settings.key.short(), exc)
            return f"revocation failed ({exc}); session forgotten"
        if ok:
            return "refresh token revoked; session forgotten"
        return "the provider has no revocation endpoint; session forgotten"


def _fmt(epoch: float) -> str:
    return time.strftime("%Y-%m-%d %H:%M:%S", time.localtime(epoch))
