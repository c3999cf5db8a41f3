"""The loopback redirect listener (brokerd/callback.py) with real HTTP on 127.0.0.1 and ::1."""

from __future__ import annotations

import asyncio
import socket
import ssl
from collections.abc import AsyncIterator, Iterator
from pathlib import Path

import aiohttp
import pytest

from brokerd.callback import CallbackServer
from brokerd.errors import CallbackUnavailable, LoginDenied, UsageError
from tests.support.apiserver import make_tls
from tests.support.net import free_port, ipv6_loopback

STATE = "s" * 43


def _occupy(host: str, port: int) -> socket.socket:
    family = socket.AF_INET6 if ":" in host else socket.AF_INET
    s = socket.socket(family, socket.SOCK_STREAM)
    if family == socket.AF_INET6:
        s.setsockopt(socket.IPPROTO_IPV6, socket.IPV6_V6ONLY, 1)
    s.bind((host, port))
    s.listen(1)
    return s


def _refused(host: str, port: int) -> bool:
    family = socket.AF_INET6 if ":" in host else socket.AF_INET
    with socket.socket(family, socket.SOCK_STREAM) as s:
        s.settimeout(5)
        try:
            s.connect((host, port))
        except ConnectionRefusedError:
            return True
    return False


@pytest.fixture
async def http() -> AsyncIterator[aiohttp.ClientSession]:
    async with aiohttp.ClientSession(timeout=aiohttp.ClientTimeout(total=10)) as session:
        yield session


@pytest.fixture
def blockers() -> Iterator[list[socket.socket]]:
    held: list[socket.socket] = []
    yield held
    for s in held:
        s.close()


async def _get(http: aiohttp.ClientSession, url: str) -> tuple[int, str, str | None]:
    async with http.get(url, allow_redirects=False) as resp:
        return resp.status, await resp.text(), resp.headers.get("Location")


async def test_favicon_wrong_state_and_wrong_path_do_not_end_the_wait(http: aiohttp.ClientSession) -> None:
    server = CallbackServer()
    lease = await server.acquire(["127.0.0.1:0"])
    base = f"http://127.0.0.1:{lease.port}"
    try:
        waiter = lease.expect(STATE, path="/callback")
        assert (await _get(http, f"{base}/favicon.ico"))[0] == 404
        status, body, _ = await _get(http, f"{base}/callback?code=forged&state=wrong-state-123")
        assert status == 400 and "Unknown or expired login" in body
        status, _, _ = await _get(http, f"{base}/?code=elsewhere&state={STATE}")  # right state, wrong path
        assert status == 400
        async with http.post(f"{base}/callback?code=posted&state={STATE}") as resp:
            assert resp.status == 404
        assert not waiter.done()
        # The real redirect, with the junk some providers add (session_state, scope, authuser ...).
        status, body, _ = await _get(
            http, f"{base}/callback?code=the-code&state={STATE}&iss=https%3A%2F%2Fidp&session_state=x.y&scope=openid"
                  "&authuser=0&prompt=consent&=&junk")
        assert status == 200 and "Logged in" in body
        result = await waiter
        assert result.code == "the-code" and result.iss == "https://idp"
        assert "the-code" not in repr(result)
        # A reload of the tab after success: told, not an error page, and the result stands.
        status, body, _ = await _get(http, f"{base}/callback?code=other&state={STATE}")
        assert status == 400 and "already finished" in body
        assert (await waiter).code == "the-code"
    finally:
        await lease.release()
        await server.close()


async def test_access_denied_raises_login_denied_with_the_providers_message(http: aiohttp.ClientSession) -> None:
    server = CallbackServer()
    lease = await server.acquire(["127.0.0.1:0"])
    try:
        waiter = lease.expect(STATE)
        description = "The resource owner <b>denied</b> the request"
        async with http.get(f"http://127.0.0.1:{lease.port}/",
                            params={"error": "access_denied", "error_description": description, "state": STATE,
                                    "iss": "https://idp", "extra": "ignored"}) as resp:
            assert resp.status == 403
            page = await resp.text()
        assert "<b>" not in page and "&lt;b&gt;denied" in page  # the provider's text is escaped, not markup
        with pytest.raises(LoginDenied) as info:
            await waiter
        assert "access_denied" in str(info.value) and description in str(info.value)
    finally:
        await lease.release()
        await server.close()


async def test_error_with_a_wrong_state_is_ignored(http: aiohttp.ClientSession) -> None:
    """A forged error= must not end somebody's login."""
    server = CallbackServer()
    lease = await server.acquire(["127.0.0.1:0"])
    try:
        waiter = lease.expect(STATE)
        status, _, _ = await _get(http, f"http://127.0.0.1:{lease.port}/?error=access_denied&state=not-the-state")
        assert status == 400 and not waiter.done()
        status, _, _ = await _get(http, f"http://127.0.0.1:{lease.port}/?code=c&state={STATE}")
        assert status == 200 and (await waiter).code == "c"
    finally:
        await lease.release()
        await server.close()


async def test_open_url_after_authentication_redirects(http: aiohttp.ClientSession) -> None:
    server = CallbackServer()
    lease = await server.acquire(["127.0.0.1:0"])
    try:
        waiter = lease.expect(STATE, open_url_after="https://example.com/done")
        status, _, location = await _get(http, f"http://127.0.0.1:{lease.port}/?code=c&state={STATE}")
        assert status == 302 and location == "https://example.com/done"
        assert (await waiter).code == "c"
    finally:
        await lease.release()
        await server.close()


@pytest.mark.skipif(not ipv6_loopback(), reason="no IPv6 loopback on this machine")
async def test_localhost_listens_on_both_loopback_addresses(http: aiohttp.ClientSession) -> None:
    server = CallbackServer()
    port = free_port(both_loopbacks=True)
    lease = await server.acquire([f"127.0.0.1:{port}"])
    try:
        assert lease.default_redirect_uri == f"http://localhost:{port}"
        first, second = lease.expect("state-via-ipv4"), lease.expect("state-via-ipv6")
        assert (await _get(http, f"http://127.0.0.1:{port}/?code=four&state=state-via-ipv4"))[0] == 200
        assert (await _get(http, f"http://[::1]:{port}/?code=six&state=state-via-ipv6"))[0] == 200
        assert (await first).code == "four" and (await second).code == "six"
    finally:
        await lease.release()
        await server.close()


async def test_two_logins_share_one_listener_routed_by_state_and_it_closes_after_the_last_release(
        http: aiohttp.ClientSession) -> None:
    server = CallbackServer()
    port = free_port(both_loopbacks=True)
    one = await server.acquire([f"127.0.0.1:{port}"])
    two = await server.acquire([f"127.0.0.1:{port}"])  # no "address already in use": the same listener
    assert one.port == two.port == port
    a, b = one.expect("state-of-login-a"), two.expect("state-of-login-b")
    assert (await _get(http, f"http://127.0.0.1:{port}/?code=code-b&state=state-of-login-b"))[0] == 200
    assert (await b).code == "code-b" and not a.done()
    await two.release()
    await two.release()  # twice (an error path and a finally): must not close the listener under the first login
    # Still open for the first login; the released login's state is gone.
    assert (await _get(http, f"http://127.0.0.1:{port}/?code=late&state=state-of-login-b"))[0] == 400
    assert (await _get(http, f"http://127.0.0.1:{port}/?code=code-a&state=state-of-login-a"))[0] == 200
    assert (await a).code == "code-a"
    await one.release()
    assert _refused("127.0.0.1", port)
    if ipv6_loopback():
        assert _refused("::1", port)
    await server.close()


async def test_release_cancels_a_pending_wait_and_closes_the_port() -> None:
    server = CallbackServer()
    lease = await server.acquire(["127.0.0.1:0"])
    port = lease.port
    waiter = lease.expect(STATE)
    await lease.release()
    assert waiter.cancelled()
    assert _refused("127.0.0.1", port)
    # The port can be leased again at once (no TIME_WAIT trouble, no stale listener entry).
    again = await server.acquire([f"127.0.0.1:{port}"])
    assert again.port == port
    await again.release()
    await server.close()


async def test_a_port_held_by_another_program_falls_back_to_the_next(blockers: list[socket.socket]) -> None:
    taken, free = free_port(both_loopbacks=True), free_port(both_loopbacks=True)
    blockers.append(_occupy("127.0.0.1", taken))
    server = CallbackServer(busy_wait=0)
    lease = await server.acquire([f"127.0.0.1:{taken}", f"127.0.0.1:{free}"])
    assert lease.port == free
    await lease.release()
    await server.close()


@pytest.mark.skipif(not ipv6_loopback(), reason="no IPv6 loopback on this machine")
async def test_a_port_held_on_ipv6_only_counts_as_busy(blockers: list[socket.socket]) -> None:
    """A browser resolving localhost to ::1 would hand the code to whoever listens there."""
    taken, free = free_port(both_loopbacks=True), free_port(both_loopbacks=True)
    blockers.append(_occupy("::1", taken))
    server = CallbackServer(busy_wait=0)
    lease = await server.acquire([f"127.0.0.1:{taken}", f"127.0.0.1:{free}"])
    assert lease.port == free
    assert _refused("127.0.0.1", taken)  # the IPv4 half was not left bound
    await lease.release()
    await server.close()


@pytest.mark.skipif(not ipv6_loopback(), reason="no IPv6 loopback on this machine")
async def test_a_port_bound_but_not_listening_on_ipv6_is_still_used(blockers: list[socket.socket],
                                                                     http: aiohttp.ClientSession) -> None:
    """The local end of some connection on [::1]:port: nobody can receive the redirect there, IPv4 serves."""
    port = free_port(both_loopbacks=True)
    bound = socket.socket(socket.AF_INET6, socket.SOCK_STREAM)
    bound.setsockopt(socket.IPPROTO_IPV6, socket.IPV6_V6ONLY, 1)
    bound.bind(("::1", port))  # no listen()
    blockers.append(bound)
    server = CallbackServer(busy_wait=0)
    lease = await server.acquire([f"127.0.0.1:{port}"])
    try:
        assert lease.port == port
        waiter = lease.expect(STATE)
        assert (await _get(http, f"http://127.0.0.1:{port}/?code=c&state={STATE}"))[0] == 200
        assert (await waiter).code == "c"
    finally:
        await lease.release()
        await server.close()


async def test_all_ports_busy_waits_for_one_to_free_up(blockers: list[socket.socket]) -> None:
    port = free_port(both_loopbacks=True)
    blocker = _occupy("127.0.0.1", port)
    blockers.append(blocker)
    with pytest.raises(CallbackUnavailable, match="in use"):
        await CallbackServer(busy_wait=0).acquire([f"127.0.0.1:{port}"])

    server = CallbackServer(busy_wait=60, busy_poll=0.05)
    told: list[str] = []  # what the waiting callers are told
    task = asyncio.create_task(server.acquire([f"127.0.0.1:{port}"], on_wait=told.append))
    for _ in range(1200):  # bounded: until the listener says it is waiting
        if told or task.done():
            break
        await asyncio.sleep(0.05)
    assert not task.done(), "acquire gave up instead of waiting for the port"
    assert len(told) == 1 and f"127.0.0.1:{port}" in told[0] and "waiting up to 60 s" in told[0]
    blocker.close()
    lease = await asyncio.wait_for(task, 30)
    assert lease.port == port
    assert len(told) == 1  # said once, not once per poll
    await lease.release()
    await server.close()


async def test_unusable_address_fails_at_once_without_waiting() -> None:
    server = CallbackServer(busy_wait=3600)
    # 192.0.2.1 (TEST-NET-1) is not an address of this machine: EADDRNOTAVAIL, nothing to wait for.
    with pytest.raises(CallbackUnavailable):
        await asyncio.wait_for(server.acquire(["192.0.2.1:8000"], non_loopback_ok=True), 30)
    await server.close()


@pytest.mark.parametrize("address", ["0.0.0.0:0", "[::]:0", ":0", "192.0.2.1:8000", "10.1.2.3:8000",
                                     "myhost.lan:8000", "localhost.evil.example:8000", "127.0.0.1.nip.io:0"])
async def test_a_non_loopback_address_is_refused_before_anything_is_bound(address: str) -> None:
    server = CallbackServer(busy_wait=3600)
    try:
        with pytest.raises(UsageError, match="loopback addresses only") as caught:
            await server.acquire(["127.0.0.1:0", address])
        assert "\n" not in str(caught.value) and "listen_non_loopback" in str(caught.value)
    finally:
        await server.close()


@pytest.mark.parametrize("address", ["127.0.0.1:0", "127.0.0.2:0", "localhost:0", "[::1]:0"])
async def test_loopback_addresses_are_accepted(address: str) -> None:
    if "::1" in address and not ipv6_loopback():
        pytest.skip("no IPv6 loopback here")
    server = CallbackServer()
    try:
        lease = await server.acquire([address])
        assert lease.port > 0
        await lease.release()
    finally:
        await server.close()


async def test_close_cancels_pending_waits() -> None:
    server = CallbackServer()
    lease = await server.acquire(["127.0.0.1:0"])
    waiter = lease.expect(STATE)
    port = lease.port
    await server.close()
    assert waiter.cancelled()
    assert _refused("127.0.0.1", port)



async def test_https_callback_with_a_local_server_certificate(tmp_path: Path) -> None:
    """--local-server-cert/--local-server-key: the redirect comes over HTTPS and is routed like any other."""
    ca_file = tmp_path / "ca.pem"
    server_tls = make_tls(str(ca_file))  # a throwaway CA and a certificate for localhost/127.0.0.1/::1
    server = CallbackServer()
    lease = await server.acquire(["127.0.0.1:0"], server_tls)
    try:
        assert lease.default_redirect_uri == f"https://localhost:{lease.port}"
        waiter = lease.expect(STATE)
        client_tls = ssl.create_default_context(cafile=str(ca_file))
        async with aiohttp.ClientSession(timeout=aiohttp.ClientTimeout(total=10)) as https:
            async with https.get(f"https://localhost:{lease.port}/?code=c&state={STATE}", ssl=client_tls) as resp:
                assert resp.status == 200
            # Plain HTTP on that port is not a way around TLS.
            with pytest.raises(aiohttp.ClientError):
                async with https.get(f"http://127.0.0.1:{lease.port}/?code=x&state={STATE}") as resp:
                    await resp.read()
        assert (await waiter).code == "c"
    finally:
        await lease.release()
        await server.close()
