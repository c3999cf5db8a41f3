"""The use case: hand out a valid token for a session, renewing it at most once at a time.

For each session (keyed by ProviderSettings.key) there is at most one renewal task, a refresh or a login, and
every caller that needs a token meanwhile waits on that same task (single flight).  The task belongs to the
manager, not to a caller: a caller that gives up does not cancel a login others wait for, or that the person is
still finishing in the browser.  A new refresh token is saved to the store before the task completes, so nothing
can use the session with a refresh token that is not on disk yet.  A timer per session refreshes ahead of expiry.
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
from brokerd.errors import (
    BrokerError,
    InvalidGrant,
    LoginError,
    LoginInterrupted,
    LoginPending,
    ProviderError,
    StoreError,
)
from brokerd.flows import LoginFlows
from brokerd.models import Caller, LoginOptions, ProviderSettings, Session, SessionKey, TokenSet
from brokerd.oidc import OIDCClient

log = logging.getLogger("brokerd.sessions")


class Store(Protocol):
    def load(self) -> dict[SessionKey, Session]: ...
    def save(self, sessions: Mapping[SessionKey, Session]) -> None: ...


@dataclass(frozen=True)
class Policy:
    refresh_ratio: float = 0.8  # refresh when this share of the token's life has passed ...
    refresh_lead: float = 60.0  # ... and never later than this many seconds before exp
    serve_margin: float = 10.0  # tell kubectl the token expires this much early (at most 10% of its life)
    login_retry_interval: float = 30.0  # after a failed login, non-interactive callers wait this long to retry
    retry_initial: float = 2.0  # background refresh back-off
    retry_max: float = 60.0


def margin(policy: Policy, tokens: TokenSet) -> float:
    life = max(0.0, tokens.expires_at - tokens.issued_at)
    return min(policy.serve_margin, life * 0.1)


def refresh_due(policy: Policy, tokens: TokenSet) -> float:
    life = max(0.0, tokens.expires_at - tokens.issued_at)
    due = min(tokens.issued_at + life * policy.refresh_ratio, tokens.expires_at - policy.refresh_lead)
    # Short-lived tokens (tests, strict providers): do not refresh in the first half of the life.
    return max(due, tokens.issued_at + life * 0.5)


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
    login_failed_at: float | None = None
    login_failure: str = ""


class SessionManager:
    def __init__(self, oidc_for: Callable[[LoginOptions], OIDCClient], flows: LoginFlows, store: Store | None,
                 clock: Clock, policy: Policy = Policy()) -> None:
        self._oidc_for = oidc_for
        self._flows = flows
        self._store = store
        self._clock = clock
        self.policy = policy
        self._entries: dict[SessionKey, _Entry] = {}
        self._save_lock = asyncio.Lock()
        self._closing = False

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
            entry = _Entry(settings=session.settings, tokens=session.tokens)
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
        return self._clock.now() < tokens.serve_expiry(use_access_token) - margin(self.policy, tokens)

    def serve_expiry(self, tokens: TokenSet, use_access_token: bool) -> float:
        """The expirationTimestamp to give kubectl: a little before the real exp (kube-apiserver allows no leeway)."""
        return tokens.serve_expiry(use_access_token) - margin(self.policy, tokens)

    async def get_token(self, settings: ProviderSettings, options: LoginOptions, caller: Caller) -> TokenSet:
        key = settings.key
        entry = self._entries.get(key)
        if entry is None:
            entry = self._entries[key] = _Entry(settings=settings)
        entry.options = options
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
                tokens = await asyncio.wait_for(asyncio.shield(renewal.task), options.authentication_timeout)
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
            try:
                return await self._refresh(entry, oidc, tokens)
            except InvalidGrant as exc:
                log.warning("session %s: the provider rejected the refresh token (%s); a login is needed",
                            entry.settings.key.short(), exc.error or "invalid_grant")
                entry.tokens = replace(tokens, refresh_token=None)
                await self._save()
                if not allow_login:
                    raise
            except ProviderError:
                # A transient fault must not cost a still-valid session: serve what we have, retry later.
                if not force and self._servable(tokens, entry.settings.use_access_token):
                    return tokens
                raise
        if not allow_login or caller is None:
            raise LoginError("the session has no refresh token; a login is needed")
        return await self._login(entry, oidc, options, caller, holder[0])

    async def _refresh(self, entry: _Entry, oidc: OIDCClient, tokens: TokenSet) -> TokenSet:
        new = await oidc.refresh(entry.settings, tokens)
        entry.tokens = new
        await self._save()  # before anyone can use the session with the new refresh token
        log.info("session %s refreshed; token valid until %s", entry.settings.key.short(), _fmt(new.expires_at))
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
        entry.tokens = tokens
        await self._save()
        log.info("session %s logged in; token valid until %s", entry.settings.key.short(), _fmt(tokens.expires_at))
        self._schedule(entry)
        return tokens

    # -- ahead-of-time refresh ------------------------------------------------------------------------------------

    def _schedule(self, entry: _Entry) -> None:
        if entry.timer is not None and entry.timer is not asyncio.current_task():
            entry.timer.cancel()
        entry.timer = None
        if self._closing or entry.tokens is None or not entry.tokens.refresh_token:
            return
        entry.timer = asyncio.create_task(self._refresh_ahead(entry))

    async def _refresh_ahead(self, entry: _Entry) -> None:
        tokens = entry.tokens
        assert tokens is not None
        await self._clock.sleep(refresh_due(self.policy, tokens) - self._clock.now())
        delay = self.policy.retry_initial
        for attempt in range(1, 100):
            if entry.tokens is not tokens:
                return  # renewed meanwhile; that renewal scheduled the next timer
            renewal = entry.renewal
            if renewal is None or renewal.task.done():
                renewal = self._start_renewal(entry, entry.options, None, allow_login=False, force=True)
            try:
                await asyncio.shield(renewal.task)
                return
            except InvalidGrant:
                return
            except BrokerError as exc:
                # One warning per failure streak; the retries go to debug so a dead provider does not flood logs.
                level = logging.WARNING if attempt == 1 else logging.DEBUG
                log.log(level, "session %s: refresh failed, will retry: %s", entry.settings.key.short(), exc)
            remaining = tokens.expires_at - self._clock.now()
            if remaining <= 0:
                log.warning("session %s: could not refresh before the token expired; the next kubectl call will "
                            "try again", entry.settings.key.short())
                return
            await self._clock.sleep(min(delay, remaining))
            delay = min(delay * 2, self.policy.retry_max)

    # -- persistence ----------------------------------------------------------------------------------------------

    async def _save(self) -> None:
        if self._store is None:
            return
        snapshot = {key: Session(key, e.settings, e.tokens) for key, e in self._entries.items()
                    if e.tokens is not None}
        async with self._save_lock:
            try:
                await asyncio.to_thread(self._store.save, snapshot)
            except StoreError as exc:
                # Keep serving from memory: losing persistence is bad, losing the running session is worse.
                log.error("sessions not saved: %s", exc)

    # -- admin ----------------------------------------------------------------------------------------------------

    def status(self) -> list[dict[str, Any]]:
        out = []
        now = self._clock.now()
        for key, entry in sorted(self._entries.items()):
            if entry.tokens is None and entry.renewal is None:
                continue
            out.append(describe(key, entry.settings, entry.tokens, now, self.policy,
                                login_pending=entry.renewal is not None and entry.renewal.allow_login))
        return out

    async def logout(self, issuer: str | None = None, client_id: str | None = None) -> list[dict[str, Any]]:
        results = []
        for key, entry in list(self._entries.items()):
            if issuer is not None and entry.settings.issuer != issuer:
                continue
            if client_id is not None and entry.settings.client_id != client_id:
                continue
            if entry.timer is not None:
                entry.timer.cancel()
            if entry.renewal is not None and not entry.renewal.task.done():
                entry.renewal.task.cancel()
            revoked = "no refresh token"
            tokens = entry.tokens
            if tokens is not None and tokens.refresh_token:
                try:
                    ok = await self._oidc_for(entry.options).revoke(entry.settings, tokens.refresh_token)
                    revoked = "refresh token revoked" if ok else "the provider has no revocation endpoint"
                except BrokerError as exc:
                    revoked = f"revocation failed: {exc}"
            del self._entries[key]
            results.append({"session": key.short(), "issuer": entry.settings.issuer,
                            "client_id": entry.settings.client_id, "result": revoked})
        await self._save()
        return results


def _fmt(epoch: float) -> str:
    return time.strftime("%Y-%m-%d %H:%M:%S", time.localtime(epoch))


def describe(key: SessionKey, settings: ProviderSettings, tokens: TokenSet | None, now: float, policy: Policy,
             *, login_pending: bool = False) -> dict[str, Any]:
    claims = dict(tokens.claims) if tokens is not None else {}
    sub = claims.get("sub")
    groups = claims.get("groups")
    return {
        "session": key.short(),
        "issuer": settings.issuer,
        "client_id": settings.client_id,
        "session_name": settings.username,
        "scopes": list(settings.scopes),
        "username": f"{settings.issuer}#{sub}" if sub is not None else None,
        "email": claims.get("email"),
        "groups": list(groups) if isinstance(groups, list) else [],
        "expires_at": tokens.expires_at if tokens is not None else None,
        "expires_in": round(tokens.expires_at - now) if tokens is not None else None,
        "refresh_token": bool(tokens is not None and tokens.refresh_token),
        "next_refresh_at": refresh_due(policy, tokens) if tokens is not None and tokens.refresh_token else None,
        "login_pending": login_pending,
    }
