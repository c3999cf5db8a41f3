"""The Unix-socket API (protocol: client_shim/protocol.py): peer check, connection budgets, dispatch, error table.
Parsing and its caches are requestcache.py's."""

from __future__ import annotations

import asyncio
import contextlib
import json
import logging
import os
import resource
from collections.abc import Awaitable, Callable
from dataclasses import dataclass, replace
from typing import Any

from brokerd import __version__, audit
from brokerd.callerlog import telling
from brokerd.config import Settings
from brokerd.errors import BrokerError, PeerRejected, ProtocolError, UsageError
from brokerd.flags import FLAGS, SETUP_FLAGS, ignored_flag_notes, parse_flags
from brokerd.models import Caller, LoginOptions, ProviderSettings, TokenSet
from brokerd.oidc import ClientFactory
from brokerd.peers import hung_up
from brokerd.requestcache import RequestCache, request_profile
from brokerd.sessions import SessionManager
from brokerd.shimcaller import ShimCaller
from client_shim import protocol
from client_shim.protocol import Request

log = logging.getLogger("brokerd.server")

# May wait minutes for a login; admin commands answer at once.
LONG_COMMANDS = frozenset({"get-token", "setup", "login"})


@dataclass(frozen=True)
class Limits:
    """Bounds on what one client (even one of our own uid) can make the daemon hold.

    ``read_timeout`` is a deadline for the whole request, not an idle timer, so trickling one byte at a time
    (slowloris) buys nothing.  ``max_connections`` counts every open connection; when it is reached, the oldest
    connection that has not finished sending its request is dropped to make room (idle ones are the cheap ones to
    lose), and only when every connection is busy with a real request is the newcomer turned away.  The cap is
    also kept below the process's file descriptor limit (``connection_cap``), so connections alone can never make
    accept(), the store or the provider's HTTP fail with EMFILE.
    """

    max_request: int = protocol.MAX_REQUEST
    read_timeout: float = 10.0  # a client that has not sent its whole request by then is dropped
    answer_timeout: float = 300.0  # a prompt the person does not answer
    max_connections: int = 1024
    fd_reserve: int = 128  # descriptors kept free for everything that is not a client connection
    admin_reserve: int = 16  # connections get-token/setup callers can never take: status, logout, version
    hangup_poll: float = 1.0  # how often a waiting caller is checked for having hung up

    def connection_cap(self) -> int:
        try:
            soft, _hard = resource.getrlimit(resource.RLIMIT_NOFILE)
        except (OSError, ValueError):  # pragma: no cover - getrlimit does not fail on Linux
            return self.max_connections
        if soft == resource.RLIM_INFINITY:
            return self.max_connections
        return max(1, min(self.max_connections, soft - self.fd_reserve))


class HungUp(Exception):
    """The caller closed its end while it waited (not a BrokerError: there is nobody to tell)."""


Handler = Callable[[Request, ShimCaller], Awaitable[str]]


class Server:
    def __init__(self, sessions: SessionManager, client_for: ClientFactory, settings: Callable[[], Settings],
                 limits: Limits | None = None, trail: audit.AuditLog | None = None) -> None:
        """``settings`` reads the daemon's current settings (profiles, caller_browser): SIGHUP swaps them whole.
        ``trail``: where every token handed out is recorded (audit.py)."""
        self._sessions = sessions
        self._trail = trail
        self._client_for = client_for  # `setup` makes its own checks against the provider
        self._settings = settings
        self._limits = limits or Limits()
        self._cache = RequestCache(settings)  # parsed requests, flags and rendered credentials
        self._uid = os.getuid()
        self._active = 0
        self._cap = self._limits.connection_cap()
        # Connections still sending their request, oldest first (dicts keep insertion order): eviction candidates.
        self._reading: dict[asyncio.StreamWriter, None] = {}
        self._dropped: set[asyncio.StreamWriter] = set()
        self._long = 0  # connections in a LONG_COMMANDS handler
        self._long_cap = max(1, self._cap - min(self._limits.admin_reserve, self._cap // 4))
        self.handlers: dict[str, Handler] = {
            "get-token": self._get_token,
            "version": self._version,
            "status": self._status,
            "logout": self._logout,
            "setup": self._setup,
            "login": self._login,
        }

    @property
    def caller_browser(self) -> bool:
        """[daemon] caller_browser: may callers choose the browser the daemon runs?"""
        return self._settings().caller_browser

    @property
    def active(self) -> int:
        return self._active

    async def handle(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        self._active += 1
        try:
            await self._handle(reader, writer)
        except (ConnectionError, asyncio.IncompleteReadError):
            pass  # the client went away; nothing to tell it
        except Exception:
            # Whatever a client sends, one connection's failure must not reach asyncio's default handler.
            log.exception("internal error on a client connection")
        finally:
            self._active -= 1
            self._reading.pop(writer, None)
            self._dropped.discard(writer)
            writer.close()

    def _make_room(self) -> bool:
        """At the cap: drop the oldest connection still sending its request.  False when none can be dropped."""
        # Dropped connections count until their handler has run; they must not make us drop more.
        if self._active - len(self._dropped) <= self._cap:
            return True
        for victim in self._reading:
            del self._reading[victim]
            self._dropped.add(victim)
            log.debug("connection limit (%d) reached: dropped the oldest connection that sent no request yet",
                      self._cap)
            victim.close()  # its reader sees EOF; its own handle() ends and frees the slot
            return True
        return False

    async def _handle(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        sock = writer.get_extra_info("socket")
        try:
            pid, uid = protocol.peer_credentials(sock)
        except (OSError, AttributeError) as exc:
            # Never serve a caller we could not check (daemon.py refuses to start where no check exists).
            log.warning("refused a connection whose peer cannot be checked: %s", exc)
            self._write_error(writer, PeerRejected("brokerd cannot tell who is connecting; refused"))
            return
        if uid != self._uid:
            log.warning("refused a connection from uid %d (only uid %d may use this daemon)", uid, self._uid)
            self._write_error(writer, PeerRejected("brokerd serves only the user that runs it"))
            # Closing at once would make the client's send fail (EPIPE) before it reads why; take what it sends
            # (bounded in size and time, never parsed) so it gets to read the line above.
            with contextlib.suppress(TimeoutError, ValueError, asyncio.LimitOverrunError):
                await asyncio.wait_for(reader.read(self._limits.max_request), 0.5)
            return
        # Who it is, read now: the process may be gone by the time its request is answered.
        peer = audit.peer_info(sock) if self._trail is not None else None
        if not self._make_room():
            log.warning("connection limit (%d) reached: every connection is busy; refused a new one", self._cap)
            self._write_error(writer, BrokerError("brokerd is overloaded; try again"))
            return
        self._reading[writer] = None
        try:
            async with asyncio.timeout(self._limits.read_timeout):  # no extra task per request, unlike wait_for
                data = await reader.readuntil(protocol.END)
        except (asyncio.LimitOverrunError, ValueError):
            # ValueError: StreamReader's own limit check when the buffer overflows without a separator.
            self._write_error(writer, ProtocolError(f"request larger than {self._limits.max_request} bytes"))
            return
        except TimeoutError:
            self._write_error(writer, ProtocolError(
                f"incomplete request (nothing complete within {self._limits.read_timeout:g} s)"))
            return
        finally:
            self._reading.pop(writer, None)
        long_running = False
        try:
            request, info = self._cache.parse(data)
            command = request.argv[0] if request.argv else ""
            handler = self.handlers.get(command)
            if handler is None:
                raise UsageError(f"unknown command {command!r} (commands: {', '.join(sorted(self.handlers))})"
                                 if command else "no command given (try get-token)")
            if command in LONG_COMMANDS:
                # Their own budget: callers joined to pending logins must never crowd out status and logout.
                if self._long >= self._long_cap:
                    log.warning("%d callers are waiting for tokens; refused one more", self._long)
                    raise BrokerError(f"brokerd is busy with {self._long} waiting callers; try again")
                self._long += 1
                long_running = True
            caller = ShimCaller(reader, writer, request.env, info, self._limits,
                                may_choose_browser=self.caller_browser, pid=pid, peer=peer,
                                program=request.program)
            result = await self._until_hangup(handler(request, caller), sock) if long_running else \
                await handler(request, caller)
        except HungUp:
            log.debug("a caller hung up while it waited; dropped it from the wait")
            return
        except BrokerError as exc:
            self._write_error(writer, exc)
        except Exception:
            log.exception("internal error while serving a request")
            self._write_error(writer, BrokerError("internal error in brokerd (details in its log)"))
        else:
            writer.write(protocol.result_line(result))
        finally:
            if long_running:
                self._long -= 1
        await writer.drain()

    async def _until_hangup(self, work: Awaitable[str], sock: Any) -> str:
        """``work``, abandoned (HungUp) when the caller hangs up meanwhile.  A caller that half-closes (shutdown
        SHUT_WR, then reads) is still there: only a full close counts, which poll() reports as POLLHUP."""
        task = asyncio.current_task()
        assert task is not None
        loop = asyncio.get_running_loop()
        gone = False
        timer: asyncio.TimerHandle | None = None

        def check() -> None:
            nonlocal gone, timer
            if hung_up(sock):
                gone = True
                task.cancel()
            else:
                timer = loop.call_later(self._limits.hangup_poll, check)

        timer = loop.call_later(self._limits.hangup_poll, check)
        try:
            return await work
        except asyncio.CancelledError:
            if gone and task.uncancel() == 0:
                raise HungUp from None
            raise
        finally:
            if timer is not None:
                timer.cancel()

    @staticmethod
    def _write_error(writer: asyncio.StreamWriter, exc: BrokerError) -> None:
        if writer.is_closing():
            return
        writer.write(protocol.error_line(exc.exit_code, f"brokerd: {exc}"))

    async def _get_token(self, request: Request, caller: ShimCaller) -> str:
        settings, options, notes = self._cache.request_settings(request.argv[1:], request.env)
        for note in notes:
            caller.tell(note)
        tokens = await self._token_for_caller(settings, options, caller, request_profile(request))
        token, expiry = self._sessions.credential(settings, tokens)
        return self._cache.rendered(caller.exec_info.api_version, token, expiry)

    async def _token_for_caller(self, settings: ProviderSettings, options: LoginOptions, caller: Caller,
                                profile: str | None = None) -> TokenSet:
        """sessions.obtain, without a --browser-command the caller may not choose (get-token and setup alike);
        every token handed out is recorded in the audit trail."""
        if options.browser_command and not (isinstance(caller, ShimCaller) and caller.chooses_browser):
            caller.tell("note: --browser-command is ignored: this daemon opens its own browser for " + (
                "forwarded callers (docs/remote.md)" if self.caller_browser else
                "every caller (caller_browser = false in its config)"))
            options = replace(options, browser_command=None)
        with telling(caller.tell, options.verbosity):  # -v: this caller sees the log lines of its own request
            tokens, how = await self._sessions.obtain(settings, options, caller, profile)
        if self._trail is not None:
            # Named values only: never a token set, the settings or the request.
            self._trail.record(audit.entry(
                now=self._sessions.clock.now(), session=str(settings.key), issuer=settings.issuer,
                client_id=settings.client_id, user=audit.user_of(tokens.claims), how=how,
                peer=getattr(caller, "peer", None), server=getattr(caller, "cluster", None)))
        return tokens

    async def _login(self, request: Request, caller: ShimCaller) -> str:
        """``brokerd login [--profile NAME | get-token flags]``: end the session (revoking its refresh token) and
        log in now, at a moment the person chose, so its max_session_age counts from here."""
        settings, options, notes = self._cache.request_settings(request.argv[1:], request.env)
        for note in notes:
            caller.tell(note)
        caller.asked_to_log_in = True
        await self._sessions.logout(keys={settings.key})
        self._cache.forget_tokens()
        tokens = await self._token_for_caller(settings, options, caller, request_profile(request))
        return json.dumps({"logged_in": True, "session": settings.key.short(), "issuer": settings.issuer,
                           "client_id": settings.client_id, "expires_at": self._sessions.credential(settings,
                                                                                                    tokens)[1]})

    async def _version(self, request: Request, caller: ShimCaller) -> str:
        return f"brokerd {__version__}"  # as `brokerd version` prints it

    async def _status(self, request: Request, caller: ShimCaller) -> str:
        doc: dict[str, Any] = {"sessions": self._sessions.status()}
        if self._sessions.store_notice:
            doc["store"] = self._sessions.store_notice  # the stored sessions wait for the keyring (brokerd.keywait)
        if problem := self._sessions.store_problem:
            doc["store_problem"] = problem  # only then: the usual answer stays {"sessions": [...]}
        return json.dumps(doc)

    async def _logout(self, request: Request, caller: ShimCaller) -> str:
        filters: dict[str, Any] = {}
        args = list(request.argv[1:])
        while args:
            flag = args.pop(0)
            name, sep, value = flag.partition("=")
            if name not in ("--issuer", "--client-id"):
                raise UsageError(f"logout: unknown flag {name}")
            if not sep:
                if not args:
                    raise UsageError(f"logout: {name} needs a value")
                value = args.pop(0)
            filters[name[2:].replace("-", "_")] = value
        try:
            return json.dumps({"logged_out": await self._sessions.logout(**filters)})
        finally:
            self._cache.clear()

    async def _setup(self, request: Request, caller: ShimCaller) -> str:
        from brokerd.setup import kubeconfig_args, run_setup

        args = request.argv[1:]
        known = {**FLAGS, **SETUP_FLAGS}
        own = parse_flags(args, known)
        flags = self._cache.flags(args, request.env, known)
        report = await run_setup(flags, self._client_for, self._token_for_caller, caller)
        for note in ignored_flag_notes(flags):
            caller.tell(note)
        report["kubeconfig_args"] = kubeconfig_args(own)  # the command line's flags: a profile stays a profile
        return json.dumps(report)

