"""The loopback redirect listener.

One listener per port serves every pending login at once and routes each redirect by its ``state``, so two
sessions logging in together share port 8000 instead of fighting over it (kubelogin #389, #851).  A listener is
bound when the first login needs it and closed when the last one using it ends.  For a ``localhost`` redirect it
listens on 127.0.0.1 and ::1 alike, since browsers resolve ``localhost`` either way.

Loopback only: whoever reaches the listener first gets the login's code, so an address from --listen-address or
--oidc-redirect-url that is not a loopback address (0.0.0.0, a LAN address, a host name other than localhost, which
is never resolved) is refused with one line, unless the daemon's own config allows it (``non_loopback_ok``).
"""

from __future__ import annotations

import asyncio
import contextlib
import errno
import html
import ipaddress
import logging
import socket
import ssl
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field

# aiohttp's low-level server, not aiohttp.web: one handler needs no application, router or runner, and
# aiohttp.web's imports cost the daemon about 1.4 MB of memory (issue 14.5; bench/run section 5).
from aiohttp.web_request import BaseRequest
from aiohttp.web_response import Response, StreamResponse
from aiohttp.web_server import Server

from brokerd import jarm
from brokerd.errors import CallbackUnavailable, LoginDenied, UsageError

log = logging.getLogger("brokerd.callback")

SHUTDOWN_TIMEOUT = 5.0  # seconds a closing listener gives a request being answered

PAGE = """<!doctype html><html><head><meta charset="utf-8"><title>brokerd</title>
<style>body{{font:16px system-ui,sans-serif;margin:4em auto;max-width:36em;color:#222}}</style></head>
<body><h1>{title}</h1><p>{text}</p></body></html>"""


@dataclass(frozen=True)
class CallbackResult:
    code: str = field(repr=False)
    iss: str | None
    response: str | None = field(default=None, repr=False)  # a JARM response: verified before its code is used


@dataclass
class _Pending:
    future: asyncio.Future[CallbackResult]
    path: str
    open_url_after: str | None
    form_post: bool = False  # response_mode form_post(.jwt): the answer comes as a POST, and only so


class _Listener:
    def __init__(self, hosts: tuple[str, ...], port: int, scheme: str) -> None:
        self.hosts = hosts
        self.port = port
        self.scheme = scheme
        self.pending: dict[str, _Pending] = {}
        self.leases = 0
        self.http: Server | None = None
        self.servers: list[asyncio.AbstractServer] = []

    async def stop(self) -> None:
        """What aiohttp's runner cleanup does: stop accepting, then close the connections (a browser's keep-alive
        one too) once their requests are answered."""
        for server in self.servers:
            server.close()
        self.servers = []
        if self.http is not None:
            http, self.http = self.http, None
            await asyncio.sleep(0)  # requests that arrived before the close start being handled first
            http.pre_shutdown()
            await http.shutdown(SHUTDOWN_TIMEOUT)

    async def handle(self, request: BaseRequest) -> StreamResponse:
        posted = request.method == "POST"
        if ((request.method != "GET" and not (posted and any(p.form_post for p in self.pending.values())))
                or request.path == "/favicon.ico"):
            return Response(status=404)
        # POST: response_mode form_post (the provider's page submits the answer as a form).
        form = (await request.post()) if posted else request.query
        query = {k: v for k, v in form.items() if isinstance(v, str)}
        state = jarm.routing_state(query)
        pending = self.pending.get(state) if state else None
        if pending is None or request.path != pending.path or posted != pending.form_post:
            # A stale tab, a forged request or a replay: say so and keep waiting for the real redirect.
            log.info("callback on port %d with an unknown state or path ignored", self.port)
            return _page(400, "Unknown or expired login", "This login link is not the one brokerd is waiting for. "
                         "Go back to your terminal and run the command again.")
        if pending.future.done():
            return _page(400, "Login already finished", "You can close this tab.")
        if error := query.get("error"):
            description = query.get("error_description") or ""
            reason = f"{error}: {description}" if description else error
            pending.future.set_exception(LoginDenied(f"the provider refused the login ({reason[:300]})"))
            return _page(403, "Login failed", html.escape(reason[:300]))
        code, response = query.get("code", ""), query.get("response")
        if not code and response is None:
            return _page(400, "Login failed", "The provider sent no authorization code.")
        pending.future.set_result(CallbackResult(code=code, iss=query.get("iss"), response=response))
        if pending.open_url_after:
            return Response(status=302, headers={"Location": pending.open_url_after})
        return _page(200, "Logged in", "You are logged in. You can close this tab and go back to your terminal.")


def _page(status: int, title: str, text: str) -> Response:
    body = PAGE.format(title=html.escape(title), text=text)
    return Response(status=status, text=body, content_type="text/html",
                        headers={"Cache-Control": "no-store", "Referrer-Policy": "no-referrer"})


def _split(address: str) -> tuple[str, int]:
    host, _, port = address.rpartition(":")
    return host.strip("[]"), int(port)


def is_loopback(host: str) -> bool:
    if host == "localhost":
        return True
    try:
        return ipaddress.ip_address(host).is_loopback
    except ValueError:
        return False  # a host name: what it resolves to is not ours to trust


def check_loopback(addresses: Sequence[str]) -> None:
    """UsageError for the first address that is not a loopback one (the redirect listener's rule)."""
    for address in addresses:
        host = _split(address)[0]
        if not is_loopback(host):
            raise UsageError(f"brokerd listens for the login redirect on loopback addresses only, not {address!r} "
                             "(use 127.0.0.1, [::1] or localhost; the daemon's config can allow others: "
                             "[daemon] listen_non_loopback = true)")


def _bind(host: str, port: int) -> socket.socket:
    family = socket.AF_INET6 if ":" in host else socket.AF_INET
    sock = socket.socket(family, socket.SOCK_STREAM)
    try:
        # SO_REUSEADDR on Linux only skips TIME_WAIT; it never lets two live listeners share a port.
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        if family == socket.AF_INET6:
            sock.setsockopt(socket.IPPROTO_IPV6, socket.IPV6_V6ONLY, 1)
        sock.bind((host, port))
        sock.listen(64)
        sock.setblocking(False)
    except BaseException:
        sock.close()
        raise
    return sock


def _listening(host: str, port: int) -> bool:
    family = socket.AF_INET6 if ":" in host else socket.AF_INET
    with socket.socket(family, socket.SOCK_STREAM) as probe:
        probe.settimeout(1.0)  # loopback: a listener answers at once, a free port refuses at once
        try:
            probe.connect((host, port))
        except OSError:
            return False
    return True


class Lease:
    """One login's use of a listener.  ``redirect_uri`` is what goes into the authorization request."""

    def __init__(self, server: CallbackServer, listener: _Listener) -> None:
        self._server = server
        self._listener = listener
        self._states: list[str] = []
        self._released = False

    @property
    def port(self) -> int:
        return self._listener.port

    @property
    def default_redirect_uri(self) -> str:
        return f"{self._listener.scheme}://localhost:{self._listener.port}"

    def expect(
        self, state: str, *, path: str = "/", open_url_after: str | None = None, form_post: bool = False
    ) -> asyncio.Future[CallbackResult]:
        future: asyncio.Future[CallbackResult] = asyncio.get_running_loop().create_future()
        self._listener.pending[state] = _Pending(future, path or "/", open_url_after, form_post)
        self._states.append(state)
        return future

    async def release(self) -> None:
        """Idempotent: a second call must not take away another login's share of the listener."""
        if self._released:
            return
        self._released = True
        for state in self._states:
            pending = self._listener.pending.pop(state, None)
            if pending is not None and not pending.future.done():
                pending.future.cancel()
        self._states.clear()
        await self._server._release(self._listener)


class CallbackServer:
    """Leases loopback listeners to logins.  ``busy_wait``: how long a login waits for a port that another program
    holds (another kubelogin mid-login, kubelogin #389) before it gives up; ``busy_poll``: how often it looks."""

    def __init__(self, busy_wait: float = 30.0, busy_poll: float = 0.25) -> None:
        self._listeners: dict[int, _Listener] = {}
        self._lock = asyncio.Lock()
        self._busy_wait = busy_wait
        self._busy_poll = busy_poll

    async def acquire(self, addresses: Sequence[str], ssl_context: ssl.SSLContext | None = None,
                      on_wait: Callable[[str], None] | None = None, *, non_loopback_ok: bool = False) -> Lease:
        """Lease a listener on the first address that is ours already or can be bound now.

        When every address is held by other programs, look again every ``busy_poll`` seconds for at most
        ``busy_wait`` seconds (the holder's login ends soon, one way or the other), then raise CallbackUnavailable.
        ``on_wait`` hears once, in words for the person, that the login is waiting for a port.
        """
        if not non_loopback_ok:
            check_loopback(addresses)
        loop = asyncio.get_running_loop()
        deadline = loop.time() + self._busy_wait
        announced = False
        while True:
            lease, busy, in_use = await self._try_acquire(addresses, ssl_context)
            if lease is not None:
                return lease
            if not in_use or loop.time() >= deadline:
                raise CallbackUnavailable(
                    f"cannot listen for the login redirect: {', '.join(busy)} in use by other programs or not "
                    "available (free one or pass --listen-address)")
            if not announced:
                log.warning("waiting for a login redirect port: %s in use by other programs", ", ".join(busy))
                if on_wait is not None:
                    on_wait(f"waiting up to {self._busy_wait:.0f} s for a login redirect port: {', '.join(busy)} "
                            "in use by other programs")
                announced = True
            await asyncio.sleep(min(self._busy_poll, max(0.0, deadline - loop.time())))

    async def _try_acquire(self, addresses: Sequence[str],
                           ssl_context: ssl.SSLContext | None) -> tuple[Lease | None, list[str], bool]:
        """(a lease or None, the addresses that could not be bound, whether any of them was merely in use)."""
        scheme = "https" if ssl_context else "http"
        busy: list[str] = []
        in_use = False
        async with self._lock:
            # A port that is ours already (another session's login) first, even if an earlier one in the list has
            # come free meanwhile: both logins then share one listener, routed by state (kubelogin #851).
            for address in addresses:
                port = _split(address)[1]
                listener = self._listeners.get(port) if port else None
                if listener is not None and listener.scheme == scheme:
                    listener.leases += 1
                    return Lease(self, listener), busy, in_use
            for address in addresses:
                host, port = _split(address)
                try:
                    listener = await self._start(host, port, scheme, ssl_context)
                except OSError as exc:
                    if exc.errno not in (errno.EADDRINUSE, errno.EACCES, errno.EADDRNOTAVAIL):
                        raise CallbackUnavailable(f"cannot listen on {address}: {exc.strerror}") from exc
                    busy.append(address)
                    in_use = in_use or exc.errno == errno.EADDRINUSE
                    continue
                listener.leases = 1
                self._listeners[listener.port] = listener
                return Lease(self, listener), busy, in_use
        return None, busy, in_use

    async def _start(self, host: str, port: int, scheme: str, ssl_context: ssl.SSLContext | None) -> _Listener:
        hosts = [host]
        if host in ("127.0.0.1", "localhost"):
            hosts = ["127.0.0.1", "::1"]
        socks = [_bind(hosts[0], port)]
        try:
            bound = [hosts[0]]
            chosen = socks[0].getsockname()[1]
            for extra in hosts[1:]:
                try:
                    socks.append(_bind(extra, chosen))
                except OSError as exc:
                    if exc.errno == errno.EADDRINUSE and port and _listening(extra, chosen):
                        # Another program listens on [::1]:port: a browser that resolves localhost to ::1 would
                        # hand it our code.  The port counts as busy.  (In use without a listener -- the local
                        # end of some connection -- is harmless: the browser is refused there and uses IPv4.)
                        raise
                    # No IPv6 on this machine (or an ephemeral port taken on ::1 only): IPv4 alone serves.
                    log.debug("not listening on [%s]:%d: %s", extra, chosen, exc.strerror)
                    continue
                bound.append(extra)
            listener = _Listener(tuple(bound), chosen, scheme)
        except BaseException:
            for sock in socks:
                sock.close()
            raise
        try:
            listener.http = Server(listener.handle, access_log=None)
            loop = asyncio.get_running_loop()
            for sock in socks:
                listener.servers.append(await loop.create_server(listener.http, sock=sock, ssl=ssl_context))
        except BaseException:
            await listener.stop()
            for sock in socks:
                sock.close()
            raise
        log.info("listening for the login redirect on port %d (%s)", chosen, ", ".join(bound))
        return listener

    async def _release(self, listener: _Listener) -> None:
        async with self._lock:
            listener.leases -= 1
            if listener.leases > 0:
                return
            self._listeners.pop(listener.port, None)
            await listener.stop()
            log.info("closed the login redirect listener on port %d", listener.port)

    async def close(self) -> None:
        async with self._lock:
            listeners = list(self._listeners.values())
            self._listeners.clear()
        for listener in listeners:
            for pending in listener.pending.values():
                if not pending.future.done():
                    pending.future.cancel()
            with contextlib.suppress(Exception):
                await listener.stop()
