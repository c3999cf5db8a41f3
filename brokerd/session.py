"""One session: its tokens, its renewal (a refresh or a login, at most one at a time, shared as a
``renewal.Renewal``) and its refresh-ahead timer.

What happens when a refresh fails is decided in one place: ``LiveSession._refresh_failed``.  The rules it applies
live in ``brokerd.refresh`` as pure functions.

A refresh token is never sent twice.  Three rules keep that promise, whatever is interrupted where:

1. Write-ahead.  Before a refresh token is sent, the store is saved without it (fsynced): the disk never holds a
   refresh token that may be in flight.  If that save fails, nothing is sent while the disk may hold that token
   (``on_disk``, kept from each save's outcome); a token no save ever wrote cannot come back after a restart, so
   it is sent anyway and the session lives in memory only.  A daemon killed mid-refresh (SIGKILL, power loss)
   restarts with the ID token only: it serves that until exp, then logs in once.
   A memory-only session (``persist`` False) is in no snapshot, so the disk never holds its token.
2. Adopt the answer first.  As soon as the token endpoint answered 200, the refresh token it returned (or the one
   sent, when the provider does not rotate) is the session's; verifying the new ID token comes after.  A failure
   there (JWKS unreachable, a bad signature) cannot bring the spent token back: a transient one (or an ID token
   failing only its time claims: our clock may be wrong) is retried with the new refresh token, a verification
   failure drops it.  The old ID token is served meanwhile.
3. Maybe delivered means spent.  A request that may have reached the provider (a timeout after sending, a dropped
   connection, an unusable 2xx answer, an error status without an OAuth error body, e.g. a gateway's 502, a
   cancellation by logout or shutdown) spends the token (``refresh.refresh_token_lost``); only a request that
   never left, or an OAuth error answer, leaves it usable.

A logged-out session (``closed``) never starts a renewal: a caller still holding it is told it was logged out.

A refresh that returns no new ID token (kubelogin #536) keeps the old one and stops the timer (refreshing again
cannot extend it).  The ID token of a session whose refresh token was dropped is served until it expires; the next
caller after that logs in once.  A login is never retried in a loop: a renewal logs in at most once, and after a
failed login non-interactive callers are refused for ``login_retry_interval``.
"""

from __future__ import annotations

import asyncio
import logging
import time
from collections.abc import Callable
from dataclasses import replace
from typing import Literal, NoReturn, Protocol

from brokerd.clock import Clock
from brokerd.errors import BrokerError, LoginError, LoginInterrupted, LoginPending, ProviderError, StoreError
from brokerd.flows import LoginFlows
from brokerd.models import Caller, LoginOptions, ProviderSettings, Served, TokenSet
from brokerd.oidc import OIDCClient
from brokerd.policy import BackgroundLogin, SessionPolicy, may_refresh, serve_limit, session_end
from brokerd.refresh import Policy, answered_refresh_unusable, refresh_due, refresh_token_lost, serve_until
from brokerd.renewal import Renewal

log = logging.getLogger("brokerd.sessions")

CALLER_GRACE = 2.0
MAX_RETRIES = 100  # background refresh attempts per token; the back-off reaches exp long before this


class Host(Protocol):
    """What a session needs from its manager: how to reach the provider, log in, persist, and tell the time."""

    flows: LoginFlows
    clock: Clock
    closing: bool

    @property
    def policy(self) -> Policy: ...

    async def client_for(self, settings: ProviderSettings) -> OIDCClient: ...

    def renewed(self, session: LiveSession, how: Literal["refresh", "login"]) -> None:
        """A refresh or a login of ``session`` succeeded (counters, the agent's watch)."""
        ...

    async def background(self, session: LiveSession, caller: Caller, options: LoginOptions
                         ) -> BackgroundLogin | None:
        """How a login for ``caller`` shows itself (agent.Agent.background); PolicyRefused to refuse it."""
        ...

    async def save(self, *, strict: bool = False) -> None:
        """Persist every session as ``LiveSession.stored`` says; with ``strict``, raise StoreError if not saved."""
        ...


class LiveSession:
    def __init__(self, host: Host, settings: ProviderSettings, tokens: TokenSet | None = None) -> None:
        self._host = host
        self.settings = settings
        self.served = Served.by(settings)  # ID token or access token: decided here, once
        self.tokens = tokens
        self.renewal: Renewal | None = None
        self.timer: asyncio.Task[None] | None = None
        self.next_refresh_at: float | None = None
        self.retrying = False
        self.closed = False  # logged out: nothing may schedule work on it any more
        self.sending = False  # its refresh token is on its way to the provider: the store must not hold it
        self.persist = True  # False: memory only (--token-cache-storage=none); never in a snapshot for the store
        # The refresh tokens the disk may hold for this session (set by the manager after each save): the
        # write-ahead save is needed only for those.
        self.on_disk: set[str] = set()
        self.login_failed_at: float | None = None
        self.login_failure = ""
        # The agent's view (agent.py): the policy in force, when the last login was (max_session_age counts from
        # it) and when a token was last handed out (idle_logout counts from it).
        self.policy = SessionPolicy()
        self.logged_in_at: float | None = None
        self.last_served_at: float | None = None

    @property
    def short(self) -> str:
        return self.settings.key.short()

    # -- what is served -------------------------------------------------------------------------------------------

    def serve_until(self, tokens: TokenSet) -> float:
        """The expirationTimestamp to give kubectl: a little before the real exp (kube-apiserver allows no leeway)."""
        # Never past the session's end by age: a token the provider issued for longer is not served beyond it.
        return serve_limit(self.policy, self.logged_in_at,
                           serve_until(self._host.policy, tokens.issued_at, self.served.expiry(tokens)))

    def servable(self, tokens: TokenSet | None) -> bool:
        if tokens is None or not self.served.token(tokens):
            return False
        return self._host.clock.now() < self.serve_until(tokens)

    def credential(self, tokens: TokenSet) -> tuple[str, float]:
        """The token to hand out and its stated expiry."""
        return self.served.token(tokens), self.serve_until(tokens)

    def stored(self) -> TokenSet | None:
        """What the store may hold for this session: nothing for a memory-only one, never a refresh token that may
        be in flight."""
        if not self.persist:
            return None
        if self.tokens is not None and self.sending:
            return replace(self.tokens, refresh_token=None)
        return self.tokens

    @property
    def idle(self) -> bool:
        """No tokens and nothing under way: an entry left by a failed login."""
        return self.tokens is None and (self.renewal is None or self.renewal.running.done())

    # -- callers --------------------------------------------------------------------------------------------------

    async def get(self, options: LoginOptions, caller: Caller) -> tuple[TokenSet, Literal["cache", "refresh", "login"]]:
        """A servable token set, and how it was obtained: from the cache, or by the renewal this caller waited on."""
        force = options.force_refresh
        # Two rounds at most: a background refresh that failed hands over to one renewal that may log in.
        for _ in range(2):
            if self.closed:
                # Logged out while this caller waited (a renewal that failed during logout's wait): renewing
                # now would refresh or log in for a session nobody holds any more, an orphan grant.
                raise LoginInterrupted("the session was logged out while this request waited; run it again")
            if not force and self.servable(self.tokens):
                assert self.tokens is not None
                return self.tokens, "cache"
            renewal = self.renewal
            if renewal is None or renewal.running.done():
                renewal = self.start_renewal(options, caller, allow_login=True, force=force)
            force = False
            renewal.join(caller)
            if renewal.notice is not None:
                # A person at a terminal gets the browser at once; background joiners are counted on the notice.
                await (renewal.notice.open_now() if caller.interactive else
                       renewal.notice.update(waiting=len(renewal.callers)))
            try:
                # A little longer than the login's own deadline, so the caller hears why it ended ("no login was
                # completed within N s") rather than that it is still pending.
                tokens = await asyncio.wait_for(asyncio.shield(renewal.running),
                                                options.authentication_timeout + CALLER_GRACE)
            except asyncio.CancelledError:
                task = asyncio.current_task()
                if renewal.running.cancelled() and not (task is not None and task.cancelling()):
                    raise LoginInterrupted("the login was interrupted: " + (
                        "brokerd is shutting down" if self._host.closing else "the session was logged out")) from None
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
            if self.servable(tokens):
                return tokens, renewal.how
            if renewal.allow_login:
                raise LoginError("the provider issued a token that is already expired; check the clock on this "
                                 "machine and the provider's token lifetime")
        raise LoginError("could not renew the session")

    def start_renewal(self, options: LoginOptions, caller: Caller | None, *, allow_login: bool,
                      force: bool = False) -> Renewal:
        if self.closed:
            raise LoginInterrupted("the session was logged out")
        renewal = Renewal(allow_login=allow_login)
        renewal.task = asyncio.create_task(self._renew(options, caller, renewal, force))
        self.renewal = renewal
        renewal.task.add_done_callback(lambda t: self._renewal_done(renewal, t))
        return renewal

    def _renewal_done(self, renewal: Renewal, task: asyncio.Task[TokenSet]) -> None:
        if self.renewal is renewal:
            self.renewal = None
        if not task.cancelled():
            task.exception()  # marks it retrieved: every waiter got it already, or nobody waits

    async def _renew(self, options: LoginOptions, caller: Caller | None, renewal: Renewal,
                     force: bool) -> TokenSet:
        oidc = await self._host.client_for(self.settings)
        tokens = self.tokens
        if tokens is not None and tokens.refresh_token and may_refresh(self.policy, self.logged_in_at,
                                                                       self._host.clock.now()):
            # Discovery first, on its own: a failure here certainly sent nothing, so the refresh token stays.
            await oidc.metadata(self.settings.issuer)
            try:
                return await self._refresh(oidc, tokens, renewal.announce)
            except BrokerError as exc:
                kept = self.tokens
                if kept is not None and kept.refresh_token and not isinstance(exc, StoreError):
                    # Transient and unspent: the caller or the timer tries again.
                    if not force and self.servable(kept):
                        return kept
                    raise
                if not renewal.allow_login or caller is None or self.closed:
                    raise
        if not renewal.allow_login or caller is None:
            raise LoginError("the session has no refresh token; a login is needed")
        return await self._login(oidc, options, caller, renewal)

    # -- refresh --------------------------------------------------------------------------------------------------

    async def _refresh(self, oidc: OIDCClient, tokens: TokenSet, announce: Callable[[str], None]) -> TokenSet:
        self.sending = True
        try:
            await self._host.save(strict=True)  # write-ahead: the disk forgets the token before it leaves
        except StoreError as exc:
            if tokens.refresh_token in self.on_disk:
                self.sending = False
                raise  # nothing was sent: the token stays (one clear line for the caller)
            # The disk cannot hold this token (no save that contained it landed), so it can never be read back
            # and resent after a restart: sending it without the write-ahead save is safe.  The session lives
            # in memory only until the store can be written again.
            if self.persist:
                announce(f"note: {exc}; this session is kept in memory only")
        except BaseException:
            self.sending = False
            raise
        try:
            answer = await oidc.refresh_grant(self.settings, tokens)
        except BaseException as exc:  # a cancellation too: the request may have reached the provider
            await self._refresh_failed(tokens, exc, answered=False)
        rotated = replace(tokens, refresh_token=answer.refresh_token)
        self.tokens, self.sending = rotated, False  # from here on the old refresh token is gone, in memory too
        try:
            new = await oidc.refreshed_tokens(self.settings, answer, tokens)
        except BaseException as exc:
            await self._refresh_failed(rotated, exc, answered=True)
        await self._adopt(new)
        expiry, before = self.served.expiry(new), self.served.expiry(tokens)
        if expiry <= before:
            # No new ID token (kubelogin #536), or one no longer-lived: refreshing ahead again cannot extend it.
            # The next caller after its exp renews (a refresh, else one login).
            log.info("session %s refreshed but its token was not extended; it stays valid until %s", self.short,
                     _fmt(expiry))
            self.cancel_timer()
        else:
            log.info("session %s refreshed; token valid until %s", self.short, _fmt(expiry))
            self.schedule()
        self._host.renewed(self, "refresh")
        return new

    async def _refresh_failed(self, tokens: TokenSet, exc: BaseException, *, answered: bool) -> NoReturn:
        """THE decision on a failed refresh: keep ``tokens``' refresh token for another attempt, or drop it.

        ``tokens`` holds the refresh token that is the session's now: the one sent (``answered`` False) or the one
        the provider answered with.  Kept: the session stays as it is, saved with its refresh token again, and the
        caller or the timer retries.  Dropped: the ID token is served until it expires, then one login.
        """
        if isinstance(exc, asyncio.CancelledError):
            lost = not answered  # cancelled while sending: it may have arrived; after the answer: never sent
        elif not isinstance(exc, BrokerError):
            lost = True
        elif answered:
            lost = answered_refresh_unusable(exc)
        else:
            lost = refresh_token_lost(exc)
        self.sending = False
        if lost:
            self.tokens = replace(tokens, refresh_token=None)
            self.cancel_timer()
            log.warning("session %s: dropped the refresh token (%s); the ID token is served until it expires, then "
                        "the next call logs in", self.short, _reason(exc))
        else:
            self.tokens = tokens
        await self._host.save()
        if isinstance(exc, BrokerError | asyncio.CancelledError):
            raise exc
        # A bug or an answer we did not foresee: one line for the caller, not a traceback.
        raise ProviderError(f"the refresh failed unexpectedly ({type(exc).__name__})") from exc

    async def _adopt(self, tokens: TokenSet) -> None:
        self.tokens = tokens
        await self._host.save()

    # -- login ----------------------------------------------------------------------------------------------------

    async def _login(self, oidc: OIDCClient, options: LoginOptions, caller: Caller, renewal: Renewal) -> TokenSet:
        clock, policy = self._host.clock, self._host.policy
        failed_at = self.login_failed_at
        if (failed_at is not None and not caller.interactive and not options.force_refresh
                and clock.now() - failed_at < policy.login_retry_interval):
            wait = policy.login_retry_interval - (clock.now() - failed_at)
            raise LoginPending(f"the last login attempt failed ({self.login_failure}); not opening the browser "
                               f"again for {wait:.0f} s (run kubectl in a terminal to retry now)")
        background = await self._host.background(self, caller, options)  # may refuse: before any port is taken
        renewal.logging_in = True
        renewal.how = "login"
        try:
            tokens = await self._host.flows.login(oidc, self.settings, options, caller, renewal.announce,
                                                  background=background, on_notice=renewal.attach)
        except BrokerError as exc:
            self.login_failed_at = clock.now()
            self.login_failure = str(exc)
            raise
        self.login_failed_at = None
        self.logged_in_at = clock.now()
        await self._adopt(tokens)
        self._host.renewed(self, "login")
        log.info("session %s logged in; token valid until %s", self.short, _fmt(self.served.expiry(tokens)))
        self.schedule()
        return tokens

    # -- ahead-of-time refresh ------------------------------------------------------------------------------------

    def cancel_timer(self) -> None:
        if self.timer is not None and self.timer is not asyncio.current_task():
            self.timer.cancel()
        self.timer = None
        self.next_refresh_at = None
        self.retrying = False

    def schedule(self) -> None:
        self.cancel_timer()
        tokens = self.tokens
        if self._host.closing or self.closed or tokens is None or not tokens.refresh_token:
            return
        due = refresh_due(self._host.policy, tokens.issued_at, self.served.expiry(tokens))
        end = session_end(self.policy, self.logged_in_at)
        if end is not None and due >= end:
            return  # no refresh past the session's end by age (the agent's watch ends the session then)
        self.next_refresh_at = due
        self.timer = asyncio.create_task(self._refresh_ahead(tokens, self.next_refresh_at))

    async def _refresh_ahead(self, tokens: TokenSet, due: float) -> None:
        clock, policy = self._host.clock, self._host.policy
        await clock.sleep(due - clock.now())
        until = self.serve_until(tokens)
        delay = policy.retry_initial
        for attempt in range(1, MAX_RETRIES + 1):
            if self.tokens is not tokens or self.closed:
                return  # renewed meanwhile; that renewal scheduled the next timer
            renewal = self.renewal
            if renewal is None or renewal.running.done():
                renewal = self.start_renewal(LoginOptions(), None, allow_login=False, force=True)
            try:
                await asyncio.shield(renewal.running)
                return
            except Exception as exc:  # whatever went wrong, the timer must go on (back-off)
                now = self.tokens
                if now is None or not now.refresh_token:
                    return  # the refresh token was dropped (and that was logged)
                if now is not tokens and now.id_token != tokens.id_token:
                    return  # another renewal won
                tokens = now  # the same ID token, perhaps with a rotated refresh token adopted: keep trying
                # One warning per failure streak; the retries go to debug so a dead provider does not flood logs.
                if attempt == 1:
                    log.warning("session %s: background refresh failed (%s); retrying with back-off until the "
                                "token expires at %s", self.short, _reason(exc), _fmt(until))
                else:
                    log.debug("session %s: background refresh attempt %d failed: %s", self.short, attempt,
                              _reason(exc))
            remaining = until - clock.now()
            if remaining <= 0:
                log.debug("session %s: no refresh before the token expired; the next call renews", self.short)
                self.next_refresh_at, self.retrying = None, False
                return
            wait = min(delay, remaining)
            self.next_refresh_at, self.retrying = clock.now() + wait, True
            await clock.sleep(wait)
            delay = min(delay * 2, policy.retry_max)


def _reason(exc: BaseException) -> str:
    return str(exc) if isinstance(exc, BrokerError) else type(exc).__name__


def _fmt(epoch: float) -> str:
    return time.strftime("%Y-%m-%d %H:%M:%S", time.localtime(epoch))
