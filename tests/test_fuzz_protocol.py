"""Bad input on the daemon socket: a property test against a real daemon process, the size, time and connection
limits, slowloris and thousands of idle connections.  The >= 100k-case run is bench/fuzz_protocol.py."""

from __future__ import annotations

import asyncio
import contextlib
import json
import os
import socket
import time
from collections.abc import AsyncIterator, Iterator
from pathlib import Path

import aiohttp
import pytest
from hypothesis import HealthCheck, given, settings

from brokerd.browser import BrowserOpener
from brokerd.callback import CallbackServer
from brokerd.clock import SystemClock
from brokerd.config import Settings
from brokerd.flows import LoginFlows
from brokerd.models import ProviderSettings
from brokerd.oidc import OIDCClient
from brokerd.requestcache import parse_request
from brokerd.server import Limits, Server
from brokerd.sessions import SessionManager
from client_shim.protocol import MAGIC
from tests.support.daemon import Daemon
from tests.support.hostile import (
    DEEP_JSON,
    LOGGED_INTERNAL_ERRORS,
    bad_requests,
    check_answer,
    dead_issuer,
    exchange,
    request,
    tracebacks,
)
from tests.support.provider import TestProvider
from tests.support.wait import wait_until

ISSUER = dead_issuer()


@pytest.fixture(scope="module")
def daemon() -> Iterator[Daemon]:
    with Daemon() as d:
        yield d


def _fds(pid: int) -> int:
    return len(os.listdir(f"/proc/{pid}/fd"))


def _assert_healthy(d: Daemon) -> None:
    assert d.proc is not None and d.proc.poll() is None, d.log()[-3000:]
    answer = check_answer(request("version"), exchange(d.socket, request("version")))
    assert answer.terminal is not None and answer.terminal.startswith(b"Obrokerd ")
    log = d.log()
    assert "Traceback" not in log and not any(words in log for words in LOGGED_INTERNAL_ERRORS), log[-3000:]


@settings(max_examples=150, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture,
                                                                    HealthCheck.too_slow])
@given(data=bad_requests(ISSUER))
def test_any_bytes_get_a_well_formed_answer(daemon: Daemon, data: bytes) -> None:
    raw = exchange(daemon.socket, data, timeout=15)
    check_answer(data, raw)  # never an "internal error" answer
    assert daemon.proc is not None and daemon.proc.poll() is None
    log = daemon.log()  # checked per case, so hypothesis shrinks the request that caused it
    assert not tracebacks(log) and not any(words in log for words in LOGGED_INTERNAL_ERRORS), log[-3000:]


def test_daemon_is_healthy_after_the_property_test(daemon: Daemon) -> None:
    _assert_healthy(daemon)


@pytest.mark.parametrize(("data", "words"), [
    (b"hello\0\0", b"not a brokerd request"),
    (MAGIC + b"\0Zjunk\0\0", b"unknown request field tag"),
    (MAGIC + b"\0A\xff\xfe\0\0", b"unknown command"),
    (MAGIC + b"\0Aget-token\0A--oidc-\xff=1\0\0", b"--oidc-\\udcff"),
    (MAGIC + b"\0Aversion\0EKUBERNETES_EXEC_INFO=[]\0\0", b"KUBERNETES_EXEC_INFO"),
    (MAGIC + b"\0\0", b"no command given"),
    (MAGIC + b"\0A" + b"x" * 70_000 + b"\0\0", b"request larger than 65536 bytes"),
    (MAGIC + b"\0A" + b"x" * 2_000_000, b"request larger than 65536 bytes"),
    (request("version", env={"KUBERNETES_EXEC_INFO": DEEP_JSON[0]}), b"KUBERNETES_EXEC_INFO is nested too deeply"),
    (request("version", env={"KUBERNETES_EXEC_INFO": DEEP_JSON[2]}), b"KUBERNETES_EXEC_INFO is nested too deeply"),
    (request("get-token", f"--oidc-issuer-url={ISSUER}", "--oidc-client-id=x",
             "--authentication-timeout-sec=" + "9" * 400),
     b"--authentication-timeout-sec: expected a whole number of at most 9 digits, got '9999"),
    (request("get-token", f"--oidc-issuer-url={ISSUER}", "--oidc-client-id=x", "-v", "9" * 400),
     b"--v: expected a whole number of at most 9 digits"),
    (request("get-token", f"--oidc-issuer-url={ISSUER}", "--oidc-client-id=x", "--authentication-timeout-sec=86400"),
     b"--authentication-timeout-sec must be between 1 and 3600 (one hour)"),
    (request("get-token", f"--oidc-issuer-url={ISSUER}", "--oidc-client-id=x", "--authentication-timeout-sec=\u00b2"),
     b"--authentication-timeout-sec: expected a whole number"),
    (request("get-token", f"--oidc-issuer-url={ISSUER}", "--oidc-client-id=x", "--listen-address=127.0.0.1:\u00b2"),
     b"--listen-address: expected HOST:PORT"),
], ids=["no-magic", "bad-tag", "invalid-utf8-command", "invalid-utf8-flag", "exec-info-type", "empty", "huge",
        "2MB-unterminated", "deep-exec-info", "deep-exec-info-spec", "400-digit-timeout", "400-digit-v",
        "timeout-over-cap", "superscript-digit", "listen-superscript-port"])
def test_clear_error_for_each_kind_of_bad_request(daemon: Daemon, data: bytes, words: bytes) -> None:
    answer = check_answer(data, exchange(daemon.socket, data))
    assert answer.terminal is not None and answer.terminal.startswith(b"X"), answer.lines
    assert words in answer.terminal, answer.terminal
    assert len(answer.lines) == 1 and not tracebacks(daemon.log()), daemon.log()[-3000:]


@pytest.mark.parametrize("url", ["http://localhost:" + "9" * 400, "http://localhost:99999", "http://[::1",
                                 "http://localhost:\u00b2"])
def test_a_bad_redirect_url_is_one_line_even_when_the_provider_answers(daemon: Daemon, provider: TestProvider,
                                                                       url: str) -> None:
    """The port of --oidc-redirect-url used to be read only when the login bound it, after discovery: with a
    provider that answers, a bad one ended in "internal error" and a traceback."""
    data = request("get-token", f"--oidc-issuer-url={provider.issuer}", "--oidc-client-id=kube_login",
                   "--skip-open-browser", f"--oidc-redirect-url={url}")
    answer = check_answer(data, exchange(daemon.socket, data))
    assert answer.lines == [b"X2 brokerd: --oidc-redirect-url has no valid port or host: "
                            + repr(url[:80]).encode("utf-8", "backslashreplace")], answer.lines
    assert not tracebacks(daemon.log()), daemon.log()[-3000:]


def test_unterminated_request_is_dropped_at_eof(daemon: Daemon) -> None:
    assert exchange(daemon.socket, MAGIC + b"\0Aversion\0") == b""


def test_two_thousand_idle_connections(daemon: Daemon) -> None:
    """More idle connections than the cap (1024): the daemon's fds stay bounded, the oldest idle ones are dropped,
    and a real request still gets through while they are all open."""
    assert daemon.proc is not None
    pid = daemon.proc.pid
    before = _fds(pid)
    idle: list[socket.socket] = []
    try:
        deadline = time.monotonic() + 30
        for _ in range(2000):
            s = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
            idle.append(s)
            s.settimeout(5)
            while True:  # a full listen backlog says EAGAIN to a connect with a timeout: wait for accept()
                try:
                    s.connect(str(daemon.socket))
                    break
                except BlockingIOError:
                    assert time.monotonic() < deadline, "the daemon stopped accepting connections"
                    time.sleep(0.005)
        # Bounded by exchange's own timeout: the real request is answered while all of them are open.
        answer = check_answer(request("status"), exchange(daemon.socket, request("status"), timeout=10))
        assert answer.terminal is not None and answer.terminal.startswith(b"O"), answer.lines
        assert _fds(pid) <= before + 1024 + 16, _fds(pid)
        # The ones dropped to make room were told nothing and closed: their reads end (EOF), they do not hang.
        dropped = 0
        for s in idle[:200]:
            s.settimeout(2)
            try:
                if s.recv(100) == b"":
                    dropped += 1
            except (TimeoutError, ConnectionResetError):
                pass
        assert dropped >= 150, dropped
    finally:
        for s in idle:
            s.close()
    wait_until(lambda: _fds(pid) <= before + 2, lambda: f"the dropped connections to close ({_fds(pid)} fds)", 10,
               interval=0.1)
    _assert_healthy(daemon)


def test_parse_request_keeps_invalid_utf8_round_trippable() -> None:
    req = parse_request(MAGIC + b"\0Aget-token\0A\xff\0EBROWSER=b\0EHOME=/x\0T1\0Nshim")
    assert req.argv == ("get-token", "\udcff")
    assert req.env == {"BROWSER": "b"}  # only the forwarded names
    assert req.stdin_tty and req.program == "shim"


# ---- in-process server with small limits (fast timeouts) -------------------------------------------------------

@contextlib.asynccontextmanager
async def in_process_server(tmp_path: Path, limits: Limits) -> AsyncIterator[tuple[Path, Server]]:
    """A Server on ``tmp_path/s.sock`` with its real parts (sessions, login flows, browser, callback listener)."""
    path = tmp_path / "s.sock"
    config = Settings(socket_path=path, state_dir=tmp_path, persist=False)
    async with aiohttp.ClientSession() as http:
        oidc = OIDCClient(http, SystemClock())
        callbacks = CallbackServer()
        browser = BrowserOpener({})

        async def client_for(_settings: ProviderSettings) -> OIDCClient:
            return oidc

        sessions = SessionManager(client_for, LoginFlows(callbacks, browser), None, SystemClock())
        api = Server(sessions, client_for, lambda: config, limits)
        server = await asyncio.start_unix_server(api.handle, path=str(path), limit=limits.max_request)
        try:
            yield path, api
        finally:
            server.close()
            await server.wait_closed()
            await sessions.close()
            await callbacks.close()
            await browser.close()


@pytest.fixture
async def small_server(tmp_path: Path) -> AsyncIterator[tuple[Path, Server]]:
    async with in_process_server(tmp_path, Limits(max_request=4096, read_timeout=0.5, answer_timeout=3.0,
                                                  max_connections=8)) as parts:
        yield parts


async def _raw(path: Path, data: bytes, *, trickle: float = 0.0, timeout: float = 5.0) -> bytes:
    """Plain socket calls: asyncio's StreamReader would hide what the server said behind a broken pipe."""
    loop = asyncio.get_running_loop()
    sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    sock.setblocking(False)
    try:
        await loop.sock_connect(sock, str(path))
        pieces = [data[i:i + 1] for i in range(len(data))] if trickle else [data]
        for piece in pieces:
            try:
                await loop.sock_sendall(sock, piece)
            except ConnectionError:
                break  # the server gave up on us; what it said is still to be read
            if trickle:
                await asyncio.sleep(trickle)
        out = b""
        async with asyncio.timeout(timeout):
            try:
                while chunk := await loop.sock_recv(sock, 65536):
                    out += chunk
            except ConnectionResetError:
                pass  # after its answer, the server closed with our request unread: the end, not a failure
        return out
    finally:
        sock.close()


async def test_slowloris_is_cut_off_at_the_request_deadline(small_server: tuple[Path, Server]) -> None:
    path, api = small_server
    # One byte every 0.1 s: never idle for long, but never done within the 0.5 s deadline either.  Finishing the
    # request would have been answered; being cut off at the deadline says "incomplete".
    raw = await _raw(path, request("version"), trickle=0.1)
    assert raw.startswith(b"X2 brokerd: incomplete request"), raw
    assert api.active == 0


async def test_request_size_limit(small_server: tuple[Path, Server]) -> None:
    path, _ = small_server
    ok = request("version", "x" * 3000)
    assert (await _raw(path, ok)).startswith(b"Obrokerd ")
    raw = await _raw(path, request("version", "x" * 5000))
    assert raw.startswith(b"X2 brokerd: request larger than 4096 bytes"), raw


def _password_login(i: int) -> bytes:
    return request("get-token", f"--oidc-issuer-url={ISSUER}", "--oidc-client-id=x", "--grant-type=password",
                   f"--username=u{i}", tty=True)


async def test_connection_cap_evicts_idle_and_keeps_room_for_admin_commands(
        small_server: tuple[Path, Server]) -> None:
    path, api = small_server
    idle = [await asyncio.open_unix_connection(str(path)) for _ in range(8)]
    await asyncio.sleep(0.05)
    assert api.active == 8
    # A ninth connection with a real request: the oldest idle one makes room.
    assert (await _raw(path, request("version"))).startswith(b"O")
    assert await asyncio.wait_for(idle[0][0].read(), 1) == b""
    # Fill the get-token budget (8 connections, 2 kept for admin commands) with callers that each wait for an
    # answer to a prompt they never give.
    busy = []
    for i in range(6):  # six sessions (usernames): one login would be shared by all its callers
        reader, writer = await asyncio.open_unix_connection(str(path))
        writer.write(_password_login(i))
        await writer.drain()
        busy.append((reader, writer))
    for reader, _ in busy:
        assert (await asyncio.wait_for(reader.readline(), 2)).startswith(b"SPassword")
    refused = await _raw(path, _password_login(99))
    assert refused == b"X1 brokerd: brokerd is busy with 6 waiting callers; try again\n", refused
    # status, logout and version still get through (before the budget they were refused as "overloaded").
    assert (await _raw(path, request("status"))).startswith(b'O{"sessions"')
    assert (await _raw(path, request("version"))).startswith(b"O")
    for _, writer in [*idle, *busy]:
        writer.close()
    deadline = time.monotonic() + 3
    while api.active and time.monotonic() < deadline:
        await asyncio.sleep(0.05)
    assert api.active == 0
    assert (await _raw(path, request("version"))).startswith(b"O")


def test_connection_cap_stays_below_the_fd_limit() -> None:
    import resource

    soft, _ = resource.getrlimit(resource.RLIMIT_NOFILE)
    assert Limits(max_connections=10**9).connection_cap() == soft - Limits().fd_reserve
    assert Limits(max_connections=5).connection_cap() == 5


# ---- callers that wait on a login -------------------------------------------------------------------------------

@pytest.fixture
async def provider_server(provider: TestProvider, tmp_path: Path) -> AsyncIterator[tuple[Path, Server]]:
    """An in-process server on the real test provider, checking for hung-up callers every 50 ms."""
    async with in_process_server(tmp_path, Limits(hangup_poll=0.05)) as parts:
        yield parts


async def _wait_active(api: Server, count: int, within: float = 5.0) -> None:
    deadline = time.monotonic() + within
    while api.active != count and time.monotonic() < deadline:
        await asyncio.sleep(0.02)


async def test_callers_that_hang_up_leave_the_wait(provider: TestProvider,
                                                   provider_server: tuple[Path, Server]) -> None:
    """Issue 11.12: callers joined to a pending login that close their end are dropped from the wait (their slots
    come back at once, not when the login times out); one that only half-closes still gets its answer."""
    path, api = provider_server
    args = ("get-token", f"--oidc-issuer-url={provider.issuer}", "--oidc-client-id=kube_login",
            "--oidc-client-secret=insecure_secret", "--skip-open-browser", "--listen-address=127.0.0.1:0",
            "--authentication-timeout-sec=5")
    callers: list[tuple[asyncio.StreamReader, asyncio.StreamWriter]] = []
    try:
        for _ in range(4):
            reader, writer = await asyncio.open_unix_connection(str(path))
            callers.append((reader, writer))
            writer.write(request(*args))
            await writer.drain()
            line = await asyncio.wait_for(reader.readline(), 10)
            assert line.startswith(b"M") and b"http" in line, line  # each is told the login URL: it waits
        assert api.active == 4
        for _, writer in callers[:3]:
            writer.close()
        reader, writer = callers[3]
        writer.write_eof()  # done sending, still listening
        await _wait_active(api, 1, within=3.0)  # less than the login's 5 s
        assert api.active == 1  # the login's own 5 s have not passed: the three were noticed
        answer = await asyncio.wait_for(reader.read(), 15)
        assert answer == b"X1 brokerd: no login was completed in the browser within 5 s\n", answer
    finally:
        for _, writer in callers:
            writer.close()
            with contextlib.suppress(ConnectionError):
                await writer.wait_closed()


async def test_logout_leaves_no_rendered_credential(provider: TestProvider,
                                                    provider_server: tuple[Path, Server]) -> None:
    """Issue 11.13: the daemon keeps the ExecCredential it rendered for the next caller; a logout empties it."""
    path, api = provider_server
    raw = await _raw(path, request("get-token", f"--oidc-issuer-url={provider.issuer}", "--oidc-client-id=kube_login",
                                   "--oidc-client-secret=insecure_secret", "--grant-type=password",
                                   "--username=alice", "--password=alice-password"), timeout=20)
    assert raw.startswith(b"O"), raw
    token = json.loads(raw[1:])["status"]["token"]
    assert any(token in rendered for rendered in api._cache._rendered.values())  # cached while the session lives
    assert (await _raw(path, request("logout"), timeout=20)).startswith(b'O{"logged_out"')
    assert not any(token in rendered for rendered in api._cache._rendered.values())
