"""The agent's part of the use case (issue 15, docs/agent.md): each session's policy in force, the confirmation
asked before a process gets a token, the end of a session by age or disuse, the warning ahead of a login, the
background-login choice, and the per-session counters.

The decisions are policy.py's (pure); what is shown on the desktop is notices.py's.  This module ties them to the
sessions: ``SessionManager`` owns one ``Agent``, and the ``Agent`` owns one ``Guard`` per session plus the one
watch task that wakes at the earliest deadline (idle logout, end of age, warning).  Nothing here touches a refresh
token: ending a session goes through the manager, which applies session.py's rules (a refresh in flight lands
first; a revocation sends the token once, to the revocation endpoint).
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
from collections.abc import Awaitable, Callable, Iterable, Mapping
from dataclasses import dataclass, field
from typing import Any, Protocol

from brokerd import notices
from brokerd.audit import Counters, PeerInfo
from brokerd.clock import Clock
from brokerd.errors import BrokerError, NotificationError, PolicyRefused, UsageError
from brokerd.models import Caller, LoginOptions, ProviderSettings, SessionKey, TokenSet
from brokerd.policy import (
    Approvals,
    BackgroundLogin,
    CallerIdentity,
    PolicyBook,
    SessionPolicy,
    background_mode,
    idle_deadline,
    login_needed_at,
    session_end,
    warn_at,
)
from brokerd.probecache import ProbeCache

log = logging.getLogger("brokerd.agent")

WATCH_MAX_SLEEP = 3600.0  # the watch looks again at least this often (a clock that jumped, a reloaded book)


def caller_peer(caller: Caller) -> PeerInfo | None:
    peer = getattr(caller, "peer", None)
    return peer if isinstance(peer, PeerInfo) else None


def caller_bus(caller: Caller) -> str | None:
    """The caller's session bus (a desktop variable: absent for forwarded callers, server.py drops it)."""
    return caller.env.get("DBUS_SESSION_BUS_ADDRESS") or None


def identity(peer: PeerInfo | None) -> CallerIdentity:
    return CallerIdentity(peer.exe, peer.parent_exe) if peer is not None else CallerIdentity(None, None)


@dataclass(eq=False)
class Guard:
    """One session's agent state.  In memory: a restart asks again and warns again."""

    profiles: set[str | None] = field(default_factory=set)
    approvals: Approvals = field(default_factory=Approvals)
    asking: dict[CallerIdentity, asyncio.Task[bool]] = field(default_factory=dict)
    warned_for: float | None = None
    warned_at: float | None = None
    bus_address: str | None = None
    warning: asyncio.Task[None] | None = None

    def close(self) -> None:
        for task in [*self.asking.values(), *([self.warning] if self.warning is not None else [])]:
            task.cancel()
        self.asking.clear()
        self.approvals.forget()


class SessionView(Protocol):
    """What the agent reads of a session (session.LiveSession satisfies it)."""

    settings: ProviderSettings
    policy: SessionPolicy
    logged_in_at: float | None
    last_served_at: float | None
    tokens: TokenSet | None

    def serve_until(self, tokens: TokenSet) -> float: ...


def login_needed(session: SessionView) -> float | None:
    """When a person will next have to log in to ``session``, as far as can be known (the warning ahead of it)."""
    tokens = session.tokens
    if tokens is None:
        return None
    return login_needed_at(session.policy, logged_in_at=session.logged_in_at,
                           token_expiry=session.serve_until(tokens), has_refresh_token=bool(tokens.refresh_token),
                           refreshed_at=tokens.issued_at,
                           refresh_expires_at=tokens.refresh_expires_at)


class Agent:
    def __init__(self, clock: Clock, book: Callable[[], PolicyBook], hold: Callable[[], float]) -> None:
        """``book`` reads the daemon's current policy tables (SIGHUP swaps them); ``hold``: how long a "no" is
        held before a background caller is asked again (the login retry interval)."""
        self._clock = clock
        self._book = book
        self._hold = hold
        self.probe = ProbeCache(clock)
        self.counters = Counters()
        self._guards: dict[SessionKey, Guard] = {}
        self._changed = asyncio.Event()
        self._watch: asyncio.Task[None] | None = None
        self._login_now: Callable[[SessionKey, str], Awaitable[Any]] | None = None
        self._logins: set[asyncio.Task[None]] = set()  # logins started from a warning's click

    def guard(self, key: SessionKey) -> Guard:
        guard = self._guards.get(key)
        if guard is None:
            guard = self._guards[key] = Guard()
        return guard

    def policy_for(self, settings: ProviderSettings, profiles: Iterable[str | None]) -> SessionPolicy:
        """The strictest of the tables that apply through every profile this session was used with."""
        book = self._book()
        policy = book.for_session(settings.issuer)
        for profile in profiles:
            policy = policy.tighten(book.for_session(settings.issuer, profile))
        return policy

    def forget(self, key: SessionKey) -> None:
        """Logout: a new session asks again and counts from zero."""
        guard = self._guards.pop(key, None)
        if guard is not None:
            guard.close()
        self.counters.forget(str(key))

    # -- confirmation ---------------------------------------------------------------------------------------------

    async def confirm(self, session: SessionView, caller: Caller, options: LoginOptions,
                      ask_timeout: float) -> None:
        """Return when this caller may get a token of ``session``; PolicyRefused (one line) otherwise."""
        policy = session.policy
        if not policy.confirm:
            return
        guard = self.guard(session.settings.key)
        peer = caller_peer(caller)
        who = identity(peer)
        now = self._clock.now()
        issuer, client_id = session.settings.issuer, session.settings.client_id
        name = peer.describe() if peer is not None else "an unknown program"
        until = guard.approvals.denied_until(who, now)
        if until is not None and not caller.interactive:
            raise PolicyRefused(f"{name} was refused a token for {issuer} (denied or not answered); it is asked "
                                f"again in {until - now:.0f} s, or at once from a terminal")
        if not guard.approvals.needs_confirm(policy, who, now):
            return
        within = min(ask_timeout, options.authentication_timeout)
        if caller.interactive:
            try:
                reply = await asyncio.wait_for(
                    caller.ask(notices.terminal_prompt(name, issuer, client_id), secret=False), within)
            except (TimeoutError, UsageError):
                reply = ""
            allowed, why = notices.terminal_answer(reply), "denied at the terminal"
        else:
            bus = caller_bus(caller)
            if bus is None:
                raise self._nobody(name, issuer)
            task = guard.asking.get(who)
            if task is None or task.done():
                task = guard.asking[who] = asyncio.create_task(
                    self._ask_desktop(bus, name, issuer, client_id, within), name="confirm")
            try:
                allowed = await asyncio.shield(task)
            except NotificationError as exc:
                log.info("confirmation for %s could not be shown: %s", name, exc)
                raise self._nobody(name, issuer) from None
            why = f"denied, or no answer within {within:.0f} s"
        if allowed:
            guard.approvals.allow(policy, who, self._clock.now())
            return
        guard.approvals.deny(who, self._clock.now(), self._hold())
        raise PolicyRefused(f"{name} was not allowed a token for {issuer} ({why}); run it again to be asked again")

    @staticmethod
    def _nobody(name: str, issuer: str) -> PolicyRefused:
        return PolicyRefused(f"{name} needs your confirmation for a token for {issuer}, but it has no terminal and "
                             "no desktop notification could be shown; run it from a terminal")

    @staticmethod
    async def _ask_desktop(bus: str, name: str, issuer: str, client_id: str, within: float) -> bool:
        outcome = await notices.confirm_on_desktop(bus, name, issuer, client_id, within=within)
        return outcome.action == notices.ALLOW

    # -- background logins ----------------------------------------------------------------------------------------

    async def background(self, policy: SessionPolicy, caller: Caller, options: LoginOptions,
                         issuer: str) -> BackgroundLogin | None:
        """How a login for this caller shows itself: None for a person at a terminal (the browser at once),
        else "notify" or "browser"; PolicyRefused when the policy says refuse."""
        if caller.interactive or options.skip_open_browser or getattr(caller, "asked_to_log_in", False):
            return None  # a person at a terminal, or `brokerd login`: they asked for it, the browser opens now
        bus = caller_bus(caller)
        info = await self.probe(bus) if bus is not None else None
        mode = background_mode(policy, info is not None and info.actions)
        if mode == "refuse":
            raise PolicyRefused(f"a login to {issuer} is needed and this program has no terminal; log in from one: "
                                "`brokerd login --profile NAME` (or the same get-token flags), or any kubectl "
                                "command there")
        return mode

    # -- the watch: idle logout, end of age, warning ahead of a login ----------------------------------------------

    def changed(self) -> None:
        """A session logged in, served, or was reloaded: the watch recomputes its next wake-up."""
        self._changed.set()

    def start(self, sessions: Callable[[], Iterable[SessionView]],
              end: Callable[[SessionKey, str], Awaitable[Any]],
              login_now: Callable[[SessionKey, str], Awaitable[Any]] | None = None) -> None:
        """``end(key, why)`` ends a session by policy; ``login_now(key, bus)`` logs in again at once (a click on
        the warning ahead of a login)."""
        self._login_now = login_now
        if self._watch is None:
            self._watch = asyncio.create_task(self._run(sessions, end), name="agent-watch")

    async def close(self) -> None:
        if self._watch is not None:
            self._watch.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await self._watch
            self._watch = None
        pending = [*self._logins, *(g.warning for g in self._guards.values() if g.warning is not None)]
        for guard in self._guards.values():
            guard.close()
        for task in pending:
            task.cancel()
            with contextlib.suppress(asyncio.CancelledError, BrokerError):
                await task

    async def _run(self, sessions: Callable[[], Iterable[SessionView]],
                   end: Callable[[SessionKey, str], Awaitable[Any]]) -> None:
        while True:  # until close() cancels it; each round sleeps until the next deadline (or a change)
            self._changed.clear()
            now = self._clock.now()
            wake = now + WATCH_MAX_SLEEP
            for session in list(sessions()):
                try:
                    next_at = await self._look(session, now, end)
                except BrokerError as exc:
                    log.warning("session %s: %s", session.settings.key.short(), exc)
                    next_at = None
                if next_at is not None:
                    wake = min(wake, next_at)
            sleep = asyncio.ensure_future(self._clock.sleep(max(0.0, wake - self._clock.now())))
            changed = asyncio.ensure_future(self._changed.wait())
            try:
                await asyncio.wait({sleep, changed}, return_when=asyncio.FIRST_COMPLETED)
            finally:
                sleep.cancel()
                changed.cancel()

    async def _look(self, session: SessionView, now: float,
                    end: Callable[[SessionKey, str], Awaitable[Any]]) -> float | None:
        """Act on what is due for ``session``; the next time something will be."""
        policy, key = session.policy, session.settings.key
        idle_at = idle_deadline(policy, session.last_served_at)
        if idle_at is not None and now >= idle_at:
            await end(key, f"logged out after {policy.idle_logout:g} s without use (idle_logout)")
            return None
        end_at = session_end(policy, session.logged_in_at)
        if end_at is not None and now >= end_at:
            await end(key, f"reached max_session_age ({policy.max_session_age:g} s); a new login is needed")
            return None
        due = [t for t in (idle_at, end_at) if t is not None]
        need = login_needed(session)
        guard = self.guard(key)
        warn = warn_at(policy, need, guard.warned_at)
        if warn is not None and need is not None and guard.warned_for != need:
            if now >= warn:
                guard.warned_for, guard.warned_at = need, now
                self._warn(session, guard, need, now)
            else:
                due.append(warn)
        return min(due) if due else None

    def _warn(self, session: SessionView, guard: Guard, need: float, now: float) -> None:
        issuer, client_id = session.settings.issuer, session.settings.client_id
        minutes = max(1, round((need - now) / 60))
        if guard.bus_address is None:
            log.info("session %s will need a login to %s in %d min (no desktop to notify)",
                     session.settings.key.short(), issuer, minutes)
            return
        log.info("session %s will need a login to %s in %d min; notifying", session.settings.key.short(), issuer,
                 minutes)
        within = max(1.0, min(need - now, session.policy.warn_before or 0.0))
        guard.warning = asyncio.create_task(
            self._show_warning(session.settings.key, guard.bus_address, issuer, client_id, minutes, within),
            name="expiry-warning")

    async def _show_warning(self, key: SessionKey, bus: str, issuer: str, client_id: str, minutes: int,
                            within: float) -> None:
        try:
            clicked = await notices.warn_on_desktop(bus, issuer, client_id, minutes, within=within)
        except NotificationError as exc:
            log.info("the expiry warning could not be shown: %s", exc)
            return
        if clicked and self._login_now is not None:
            log.info("the expiry warning was clicked: logging in to %s now", issuer)
            # Owned by the agent, not by this warning: the login ends the session the warning belongs to.
            task = asyncio.create_task(self._run_login(key, bus), name="login-now")
            self._logins.add(task)
            task.add_done_callback(self._logins.discard)

    async def _run_login(self, key: SessionKey, bus: str) -> None:
        assert self._login_now is not None
        try:
            await self._login_now(key, bus)
        except BrokerError as exc:
            log.warning("the login started from the warning failed: %s", exc)


class DesktopCaller:
    """The Caller of a login the person started from a notification: no terminal, no stderr (the log instead)."""

    interactive = False
    asked_to_log_in = True  # a click is a person's request: the browser opens at once

    def __init__(self, bus: str) -> None:
        self.env: Mapping[str, str] = {"DBUS_SESSION_BUS_ADDRESS": bus}

    def tell(self, text: str) -> None:
        log.info("%s", text)

    async def ask(self, prompt: str, *, secret: bool) -> str:
        raise BrokerError("a login started from a notification cannot ask questions; run `brokerd login` in a "
                          "terminal")
