"""The loopback redirect listener.

One listener per port serves every pending login at once and routes each redirect by its ``state``, so two
sessions logging in together share port 8000 instead of fighting over it (kubelogin #389, #851).  A listener is
bound when the first login needs it and closed when the last one using it ends.  For a ``localhost`` redirect it
listens on 127.0.0.1 and ::1 alike, since browsers resolve ``localhost`` either way.
"""

from __future__ import annotations

import asyncio
import contextlib
import errno
import html
import logging
import socket
import ssl
from collections.abc import Sequence
from dataclasses import dataclass, field

from aiohttp import web

from brokerd.errors import CallbackUnavailable, LoginDenied

log = logging.getLogger("brokerd.callback")

PAGE = """<!doctype html><html><head><meta charset="utf-8"><title>brokerd</title>
<style>body{{font:16px system-ui,sans-serif;margin:4em auto;max-width:36em;color:#222}}</style></head>
<body><h1>{title}</h1><p>{text}</p></body></html>"""


@dataclass(frozen=True)
class CallbackResult:
    code: str = field(repr=False)
    iss: str | None


@dataclass
class _Pending:
    future: asyncio.Future[CallbackResult]
    path: str
    open_url_after: str | None


class _Listener:
    def __init__(self, hosts: tuple[str, ...], port: int, scheme: str) -> None:
        self.hosts = hosts
        self.port = port
        self.scheme = scheme
        self.pending: dict[str, _Pending] = {}
        self.leases = 0
        self.runner: web.ServerRunner | None = None

    async def handle(self, request: web.BaseRequest) -> web.StreamResponse:
        if request.method != "GET" or request.path == "/favicon.ico":
            return web.Response(status=404)
        state = request.query.get("state")
        pending = self.pending.get(state) if state else None
        if pending is None or request.path != pending.path:
            # A stale tab, a forged request or a replay: say so and keep waiting for the real redirect.
            log.info("callback on port %d with an unknown state or path ignored", self.port)
            return _page(400, "Unknown or expired login", "This login link is not the one brokerd is waiting for. "
                         "Go back to your terminal and run the command again.")
        if pending.future.done():
            return _page(400, "Login already finished", "You can close this tab.")
        if error := request.query.get("error"):
            description = request.query.get("error_description") or ""
            reason = f"{error}: {description}" if description else error
            pending.future.set_exception(LoginDenied(f"the provider refused the login ({reason[:300]})"))
            return _page(403, "Login failed", html.escape(reason[:300]))
        code = request.query.get("code")
        if not code:
            return _page(400, "Login failed", "The provider sent no authorization code.")
        pending.future.set_result(CallbackResult(code=code, iss=request.query.get("iss")))
        if pending.open_url_after:
            return web.Response(status=302, headers={"Location": pending.open_url_after})
        return _page(200, "Logged in", "You are logged in. You can close this tab and go back to your terminal.")


def _page(status: int, title: str, text: str) -> web.Response:
    body = PAGE.format(title=html.escape(title), text=text)
    return web.Response(status=status, text=body, content_type="text/html",
                        headers={"Cache-Control": "no-store", "Referrer-Policy": "no-referrer"})


def _split(address: str) -> tuple[str, int]:
    host, _, port = address.rpartition(":")
    return host.strip("[]"), int(port)


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


class Lease:
    """One login's use of a listener.  ``redirect_uri`` is what goes into the authorization request."""

    def __init__(self, server: CallbackServer, listener: _Listener) -> None:
        self._server = server
        self._listener = listener
        self._states: list[str] = []

    @property
    def port(self) -> int:
        return self._listener.port

    @property
    def default_redirect_uri(self) -> str:
        return f"{self._listener.scheme}://localhost:{self._listener.port}"

    def expect(
        self, state: str, *, path: str = "/", open_url_after: str | None = None
    ) -> asyncio.Future[CallbackResult]:
        future: asyncio.Future[CallbackResult] = asyncio.get_running_loop().create_future()
        self._listener.pending[state] = _Pending(future, path or "/", open_url_after)
        self._states.append(state)
        return future

    async def release(self) -> None:
        for state in self._states:
            pending = self._listener.pending.pop(state, None)
            if pending is not None and not pending.future.done():
                pending.future.cancel()
        self._states.clear()
        await self._server._release(self._listener)


class CallbackServer:
    def __init__(self) -> None:
        self._listeners: dict[int, _Listener] = {}
        self._lock = asyncio.Lock()

    async def acquire(self, addresses: Sequence[str], ssl_context: ssl.SSLContext | None = None) -> Lease:
        """Lease a listener on the first address that is ours already or can be bound now."""
        scheme = "https" if ssl_context else "http"
        async with self._lock:
            busy: list[str] = []
            for address in addresses:
                host, port = _split(address)
                listener = self._listeners.get(port) if port else None
                if listener is not None and listener.scheme == scheme:
                    listener.leases += 1
                    return Lease(self, listener)
                try:
                    listener = await self._start(host, port, scheme, ssl_context)
                except OSError as exc:
                    if exc.errno not in (errno.EADDRINUSE, errno.EACCES, errno.EADDRNOTAVAIL):
                        raise CallbackUnavailable(f"cannot listen on {address}: {exc.strerror}") from exc
                    busy.append(address)
                    continue
                listener.leases = 1
                self._listeners[listener.port] = listener
                return Lease(self, listener)
            raise CallbackUnavailable(
                f"cannot listen for the login redirect: {', '.join(busy)} in use by other programs "
                "(free one or pass --listen-address)")

    async def _start(self, host: str, port: int, scheme: str, ssl_context: ssl.SSLContext | None) -> _Listener:
        hosts = [host]
        if host in ("127.0.0.1", "localhost"):
            hosts = ["127.0.0.1", "::1"]
        socks = [_bind(hosts[0], port)]
        port = socks[0].getsockname()[1]
        for extra in hosts[1:]:
            try:
                socks.append(_bind(extra, port))
            except OSError as exc:
                # No IPv6 on this machine, or ::1 taken by someone else: IPv4 alone still works for most browsers.
                log.debug("not listening on [%s]:%d: %s", extra, port, exc.strerror)
        listener = _Listener(tuple(hosts), port, scheme)
        runner = web.ServerRunner(web.Server(listener.handle), handle_signals=False, access_log=None)
        await runner.setup()
        for sock in socks:
            await web.SockSite(runner, sock, ssl_context=ssl_context).start()
        listener.runner = runner
        log.info("listening for the login redirect on port %d", port)
        return listener

    async def _release(self, listener: _Listener) -> None:
        async with self._lock:
            listener.leases -= 1
            if listener.leases > 0:
                return
            self._listeners.pop(listener.port, None)
            if listener.runner is not None:
                await listener.runner.cleanup()
            log.info("closed the login redirect listener on port %d", listener.port)

    async def close(self) -> None:
        async with self._lock:
            listeners = list(self._listeners.values())
            self._listeners.clear()
        for listener in listeners:
            for pending in listener.pending.values():
                if not pending.future.done():
                    pending.future.cancel()
            if listener.runner is not None:
                with contextlib.suppress(Exception):
                    await listener.runner.cleanup()
