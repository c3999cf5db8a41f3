"""Guards for the review of issue 11 that need the daemon's parts in-process (the rest are in test_review_breaks):
a logged-out session never renews (7), no --password or client secret stays in the server's caches (8), and a
claim-time failure after a refresh keeps the rotated refresh token (the reviewer's doubt, decided)."""

from __future__ import annotations

import asyncio
import os
import time
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from dataclasses import replace
from pathlib import Path

import aiohttp
import pytest

from brokerd.browser import BrowserOpener
from brokerd.callback import CallbackServer
from brokerd.clock import Clock, SystemClock
from brokerd.config import Settings
from brokerd.errors import ClaimTimeError, LoginInterrupted
from brokerd.flows import LoginFlows
from brokerd.models import LoginOptions, ProviderSettings
from brokerd.oidc import OIDCClient
from brokerd.server import Server
from brokerd.sessions import SessionManager
from brokerd.store import SessionStore
from client_shim import core as shim
from tests.support.callers import Caller
from tests.support.clock import FakeClock
from tests.support.daemon import login_args
from tests.support.provider import ProviderFactory, TestProvider

PASSWORD = "alice-password"
OPTIONS = LoginOptions(grant_type="password", password=PASSWORD)


@asynccontextmanager
async def daemon_parts(state: Path, clock: Clock | None = None) -> AsyncIterator[tuple[SessionManager, Server, Path]]:
    path = state / "s.sock"
    config = Settings(socket_path=path, state_dir=state)
    clock = clock or SystemClock()
    async with aiohttp.ClientSession() as http:
        oidc = OIDCClient(http, clock)

        async def client_for(_settings: ProviderSettings) -> OIDCClient:
            return oidc

        callbacks = CallbackServer()
        mgr = SessionManager(client_for, LoginFlows(callbacks, BrowserOpener({})), SessionStore(state), clock)
        await mgr.start()
        api = Server(mgr, client_for, lambda: config)
        server = await asyncio.start_unix_server(api.handle, path=str(path))
        try:
            yield mgr, api, path
        finally:
            server.close()
            await server.wait_closed()
            await mgr.close(refresh_grace=5.0)
            await callbacks.close()


def _grants(p: TestProvider) -> dict[str, int]:
    return dict(p.counters()["token_grants"])


async def test_a_logged_out_session_never_renews(provider: TestProvider, tmp_path: Path) -> None:
    """A caller joined to a timer's refresh that fails while logout waits for it goes round again on the session it
    holds, which logout has closed: it must not refresh or log in (an orphan grant nobody can revoke), nor may a
    timer start a renewal on it."""
    s = ProviderSettings(issuer=provider.issuer, client_id="kube_login", client_secret="insecure_secret",
                         scopes=("offline_access",), username="alice")
    async with daemon_parts(tmp_path) as (mgr, _api, _path):
        await mgr.get_token(s, OPTIONS, Caller())
        session = mgr._sessions[s.key]  # what a waiting caller holds
        await mgr.logout()
        before = _grants(provider)
        with pytest.raises(LoginInterrupted, match="logged out"):
            await session.get(replace(OPTIONS, force_refresh=True), Caller())
        with pytest.raises(LoginInterrupted):
            session.start_renewal(LoginOptions(), None, allow_login=False, force=True)
        assert _grants(provider) == before, "a logged-out session refreshed or logged in"
        assert session.renewal is None


async def test_no_password_or_client_secret_stays_in_the_servers_caches(provider: TestProvider,
                                                                        tmp_path: Path) -> None:
    async with daemon_parts(tmp_path) as (_mgr, api, path):
        env = {b"BROKERD_SOCKET": os.fsencode(path), b"BROKERD_NO_AUTOSTART": b"1"}
        args = login_args(provider.issuer, "--grant-type=password", "--username=alice", f"--password={PASSWORD}",
                          scopes=("offline_access",))
        await asyncio.to_thread(shim.request, args, env, "kubectl-oidc_login", autostart=False)
        cached = repr(api._cache._requests) + repr(api._cache._parsed)
        assert PASSWORD not in cached, "a --password sits in the request cache"
        # Without --password (the session is there now): cached, and emptied by logout with the client secret.
        args = login_args(provider.issuer, "--username=alice", scopes=("offline_access",))
        await asyncio.to_thread(shim.request, args, env, "kubectl-oidc_login", autostart=False)
        assert "insecure_secret" in repr(api._cache._requests), "the cache this test inspects is not where it looks"
        await asyncio.to_thread(shim.request, ["logout"], env, "brokerd", autostart=False)
        assert "insecure_secret" not in repr(api._cache._requests) + repr(api._cache._parsed), \
            "a client secret outlived logout"


async def test_a_clock_that_is_wrong_keeps_the_rotated_refresh_token(provider_factory: ProviderFactory,
                                                                    tmp_path: Path) -> None:
    """Decided (a doubt of the reviewer): the provider rotated and answered, and the new ID token fails only its
    time checks (iat in the future by our clock).  Our clock may be the wrong one: keep the rotated refresh token
    (it was never sent), serve the old, verified ID token meanwhile, never the unverified one."""
    idp = provider_factory({"rotate_refresh_tokens": True, "id_token_ttl": 3600, "access_token_ttl": 3600})
    clock = FakeClock(time.time())
    s = ProviderSettings(issuer=idp.issuer, client_id="kube_login", client_secret="insecure_secret",
                         scopes=("offline_access",), username="alice")
    async with daemon_parts(tmp_path, clock) as (mgr, _api, _path):
        first = await mgr.get_token(s, OPTIONS, Caller())
        clock.t -= 600  # our clock now runs ten minutes slow: the next ID token's iat is in our future
        before = idp.counters()
        with pytest.raises(ClaimTimeError):
            await mgr.get_token(s, replace(OPTIONS, force_refresh=True), Caller())
        kept = mgr._sessions[s.key].tokens
        assert kept is not None and kept.refresh_token, "the rotated refresh token was dropped"
        assert kept.refresh_token != first.refresh_token, "the spent refresh token was kept"
        assert kept.id_token == first.id_token, "an ID token that failed its checks is served"
        clock.t += 600  # the clock is right again: the kept token refreshes, no login, no replay
        again = await mgr.get_token(s, replace(OPTIONS, force_refresh=True), Caller())
        after = idp.counters()
        assert again.refresh_token not in (None, kept.refresh_token), "the kept refresh token was not used"
        assert after["refresh_reuse_detected"] == before["refresh_reuse_detected"]
        assert after["token_grants"]["password"] == before["token_grants"]["password"], "logged in again"
