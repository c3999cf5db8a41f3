"""SessionManager against the real test provider: single flight, refresh ahead, rotation safety, back-off, odd
provider answers, persistence, logout and status.  Real HTTP, real store, real time (tokens live 4 s); logins use
the password grant so no browser is involved.  The pure policy functions are checked first."""

from __future__ import annotations

import asyncio
import json
import logging
import os
from collections.abc import AsyncIterator, Callable, Iterator
from contextlib import asynccontextmanager
from dataclasses import replace
from pathlib import Path
from typing import Any

import aiohttp
import pytest

from brokerd.browser import BrowserOpener
from brokerd.callback import CallbackServer
from brokerd.clock import SystemClock
from brokerd.errors import (
    InvalidGrant,
    LoginInterrupted,
    ProviderError,
    TokenEndpointError,
    TokenValidationError,
    UsageError,
)
from brokerd.flags import parse_flags, provider_settings
from brokerd.flows import LoginFlows
from brokerd.models import LoginOptions, ProviderSettings
from brokerd.oidc import OIDCClient
from brokerd.refresh import Policy, margin, refresh_due, refresh_token_lost, serve_until
from brokerd.sessions import SessionManager
from brokerd.store import SessionStore
from tests.support.callers import Caller
from tests.support.provider import ProviderFactory, TestProvider

TTL = 4  # ID and access token lifetime at this module's provider
FAST = Policy(retry_initial=0.2, retry_max=1.0)
OPTIONS = LoginOptions(grant_type="password", password="alice-password")


@pytest.fixture(scope="module")
def idp(provider_factory: ProviderFactory) -> TestProvider:
    return provider_factory({"id_token_ttl": TTL, "access_token_ttl": TTL})


@pytest.fixture(autouse=True)
def _no_leftover_faults(idp: TestProvider) -> Iterator[None]:
    yield
    idp.clear_faults()


def settings_for(p: TestProvider, *scopes: str) -> ProviderSettings:
    return ProviderSettings(issuer=p.issuer, client_id="kube_login", client_secret="insecure_secret",
                            scopes=scopes or ("offline_access", "groups", "email"), username="alice")


def grants(p: TestProvider, kind: str) -> int:
    return int(p.counters()["token_grants"][kind])


def counter(p: TestProvider, name: str) -> int:
    return int(p.counters()[name])


async def wait_for(pred: Callable[[], bool], timeout: float, what: str) -> None:
    loop = asyncio.get_running_loop()
    deadline = loop.time() + timeout
    while not pred():
        if loop.time() > deadline:
            raise AssertionError(f"timed out after {timeout} s waiting for {what}")
        await asyncio.sleep(0.05)


async def sleep_until(epoch: float) -> None:
    await asyncio.sleep(max(0.0, epoch - SystemClock().now()))


@asynccontextmanager
async def manager(state: Path, policy: Policy = FAST, request_timeout: float = 5.0,
                  close: bool = True) -> AsyncIterator[SessionManager]:
    async with aiohttp.ClientSession() as http:
        oidc = OIDCClient(http, SystemClock(), request_timeout=request_timeout)
        flows = LoginFlows(CallbackServer(), BrowserOpener({}))
        async def client_for(_settings: ProviderSettings) -> OIDCClient:
            return oidc

        mgr = SessionManager(client_for, flows, SessionStore(state), SystemClock(), policy)
        await mgr.start()
        try:
            yield mgr
        finally:
            await mgr.close(refresh_grace=5.0)


def the_status(mgr: SessionManager) -> dict[str, Any]:
    (only,) = mgr.status()
    return only


# -- pure policy --------------------------------------------------------------------------------------------------


def _times(life: float) -> tuple[float, float]:
    return 1000.0, 1000.0 + life


@pytest.mark.parametrize(("life", "due"), [(3600, 1000 + 2880), (200, 1000 + 140), (100, 1000 + 50),
                                           (10, 1000 + 5)])
def test_refresh_due_is_80_percent_at_most_60s_before_exp_never_in_first_half(life: float, due: float) -> None:
    assert refresh_due(Policy(), *_times(life)) == pytest.approx(due)


def test_serve_margin_is_10s_or_a_tenth_of_the_life() -> None:
    assert margin(Policy(), *_times(3600)) == 10
    assert margin(Policy(), *_times(4)) == pytest.approx(0.4)
    # Whole seconds, as the ExecCredential states it: never serve past the expiry kubectl was told.
    assert serve_until(Policy(), *_times(4)) == 1003


def _not_sent() -> ProviderError:
    err = ProviderError("connection refused")
    err.maybe_delivered = False
    return err


@pytest.mark.parametrize(("exc", "lost"), [
    (InvalidGrant("dead", error="invalid_grant", status=400), True),
    (TokenEndpointError("server_error", error="server_error", status=500), False),
    (TokenEndpointError("weird", error="weird", status=400), False),
    (TokenEndpointError("empty body", status=200), True),
    (TokenEndpointError("gateway timeout", status=504), True),
    (TokenEndpointError("HTML 502 from a gateway", status=502), True),
    (TokenEndpointError("500 without an OAuth error body", status=500), True),
    (_not_sent(), False),
    (ProviderError("no answer within 30 s"), True),
    (TokenValidationError("bad signature"), True),
    (UsageError("--oidc-client-assertion-key /k.pem: No such file or directory"), False),
], ids=["invalid_grant", "500", "nonstandard-400", "unusable-200", "504", "gateway-502",
        "500-not-oauth", "not-sent", "maybe-delivered",
        "bad-id-token", "assertion-key-unusable"])
def test_which_failures_spend_the_refresh_token(exc: Exception, lost: bool) -> None:
    assert refresh_token_lost(exc) is lost


# -- against the provider -------------------------------------------------------------------------------------------


async def test_refresh_ahead_with_nobody_waiting(idp: TestProvider, tmp_path: Path) -> None:
    s = settings_for(idp)
    async with manager(tmp_path) as mgr:
        first = await mgr.get_token(s, OPTIONS, Caller())
        refreshes = grants(idp, "refresh_token")
        assert the_status(mgr)["next_refresh_at"] == pytest.approx(first.issued_at + TTL / 2, abs=0.5)
        await wait_for(lambda: grants(idp, "refresh_token") > refreshes, TTL, "the background refresh")
        await wait_for(lambda: the_status(mgr)["expires_at"] > first.expires_at, 2, "the refreshed session")
        before = idp.counters()["token_requests"]
        second = await mgr.get_token(s, OPTIONS, Caller())
        assert idp.counters()["token_requests"] == before  # served from cache: this caller waited for nobody
        assert second.id_token != first.id_token and second.refresh_token != first.refresh_token
        # The session adopts the answer first and saves after (session.py, rule 2): the store follows shortly.
        await wait_for(lambda: SessionStore(tmp_path).load()[s.key].tokens.refresh_token == second.refresh_token, 5,
                       "the refreshed session on disk")


async def test_fifty_callers_at_expiry_share_one_refresh(idp: TestProvider, tmp_path: Path) -> None:
    s = settings_for(idp)
    # No background refresh before exp, so the callers are the ones that find the token expired.
    async with manager(tmp_path, replace(FAST, refresh_ratio=1.0, refresh_lead=0)) as mgr:
        first = await mgr.get_token(s, OPTIONS, Caller())
        await sleep_until(mgr.credential(s, first)[1] + 0.05)
        before = idp.counters()
        idp.fault("token", "delay", seconds=0.5, grant_type="refresh_token")  # all 50 arrive while it runs
        results = await asyncio.gather(*(mgr.get_token(s, OPTIONS, Caller()) for _ in range(50)))
        after = idp.counters()
    assert after["token_grants"]["refresh_token"] - before["token_grants"]["refresh_token"] == 1
    assert after["token_requests"] - before["token_requests"] == 1
    assert len({t.id_token for t in results}) == 1 and results[0].id_token != first.id_token


@pytest.mark.parametrize("kind", ["status", "nonstandard_error"])
async def test_refused_refresh_is_retried_with_back_off_and_one_warning(
        idp: TestProvider, tmp_path: Path, kind: str, caplog: pytest.LogCaptureFixture) -> None:
    s = settings_for(idp)
    caplog.set_level(logging.DEBUG, logger="brokerd.sessions")
    async with manager(tmp_path) as mgr:
        first = await mgr.get_token(s, OPTIONS, Caller())
        before = idp.counters()
        idp.fault("token", kind, count=2, grant_type="refresh_token")
        await wait_for(lambda: grants(idp, "refresh_token") > before["token_grants"]["refresh_token"], TTL,
                       "the third attempt to succeed")
        await wait_for(lambda: the_status(mgr)["expires_at"] > first.expires_at, 2, "the refreshed session")
        after = idp.counters()
    warnings = [r for r in caplog.records if r.name == "brokerd.sessions" and r.levelno >= logging.WARNING]
    assert len(warnings) == 1, [r.getMessage() for r in warnings]
    assert "retrying with back-off" in warnings[0].getMessage()
    assert after["token_requests"] - before["token_requests"] == 3
    assert after["refresh_reuse_detected"] == 0 and after["token_grants"]["password"] == before["token_grants"][
        "password"]


@pytest.mark.parametrize("kind", ["drop", "empty_body", "html", "timeout"])
async def test_maybe_delivered_refresh_drops_the_token_and_logs_in_once_after_expiry(
        idp: TestProvider, tmp_path: Path, kind: str) -> None:
    s = settings_for(idp)
    async with manager(tmp_path, request_timeout=0.7) as mgr:
        first = await mgr.get_token(s, OPTIONS, Caller())
        before = idp.counters()
        if kind == "timeout":  # the provider processes it (and rotates) after we gave up waiting
            idp.fault("token", "delay", seconds=1.5, grant_type="refresh_token")
        else:
            idp.fault("token", kind, grant_type="refresh_token")
        await wait_for(lambda: not the_status(mgr)["refresh_token"], TTL, "the refresh token to be dropped")
        assert (await mgr.get_token(s, OPTIONS, Caller())).id_token == first.id_token  # still valid: served
        if kind == "timeout":
            await wait_for(lambda: grants(idp, "refresh_token") > before["token_grants"]["refresh_token"], 3,
                           "the provider to process the timed-out refresh")
        assert SessionStore(tmp_path).load()[s.key].tokens.refresh_token is None
        await sleep_until(mgr.credential(s, first)[1] + 0.05)
        renewed = await mgr.get_token(s, OPTIONS, Caller())
        for _ in range(3):
            assert (await mgr.get_token(s, OPTIONS, Caller())).id_token == renewed.id_token
        after = idp.counters()
    assert renewed.id_token != first.id_token
    assert after["token_grants"]["password"] - before["token_grants"]["password"] == 1
    assert after["token_requests"] - before["token_requests"] == 2  # the one refresh, never sent again; the login
    assert after["refresh_reuse_detected"] == 0


async def test_connection_refused_keeps_the_refresh_token(provider_factory: ProviderFactory,
                                                          tmp_path: Path) -> None:
    p = provider_factory({"id_token_ttl": TTL, "access_token_ttl": TTL})
    s = settings_for(p)
    async with manager(tmp_path) as mgr:
        first = await mgr.get_token(s, OPTIONS, Caller())
        p.stop()
        await wait_for(lambda: the_status(mgr)["refresh_retrying"], TTL, "a failed background refresh")
        assert the_status(mgr)["refresh_token"]
        assert (await mgr.get_token(s, OPTIONS, Caller())).id_token == first.id_token
        await sleep_until(mgr.credential(s, first)[1] + 0.05)
        with pytest.raises(ProviderError, match="cannot reach"):
            await mgr.get_token(s, OPTIONS, Caller())
        assert the_status(mgr)["refresh_token"]  # never sent, so still good for when the provider is back


async def test_revoked_grant_leads_to_exactly_one_login(idp: TestProvider, tmp_path: Path) -> None:
    s = settings_for(idp)
    async with manager(tmp_path) as mgr:
        first = await mgr.get_token(s, OPTIONS, Caller())
        before = idp.counters()
        idp.revoke_all("alice")
        await wait_for(lambda: not the_status(mgr)["refresh_token"], TTL, "invalid_grant to drop the token")
        await sleep_until(mgr.credential(s, first)[1] + 0.05)
        results = await asyncio.gather(*(mgr.get_token(s, OPTIONS, Caller()) for _ in range(5)))
        after = idp.counters()
    assert len({t.id_token for t in results}) == 1
    assert after["token_grants"]["password"] - before["token_grants"]["password"] == 1
    assert after["token_errors"].get("invalid_grant", 0) - before["token_errors"].get("invalid_grant", 0) == 1


async def test_refresh_without_new_id_token_or_refresh_token(idp: TestProvider, tmp_path: Path) -> None:
    s = settings_for(idp)
    bare = {"access_token": "opaque-access", "token_type": "Bearer", "expires_in": TTL}
    async with manager(tmp_path, replace(FAST, refresh_ratio=1.0, refresh_lead=0)) as mgr:
        first = await mgr.get_token(s, OPTIONS, Caller())
        before = idp.counters()
        idp.fault("token", "status", status=200, body=bare, grant_type="refresh_token")
        bare_answer = await mgr.get_token(s, replace(OPTIONS, force_refresh=True), Caller())
        assert idp.counters()["faults_applied"] > before["faults_applied"]
        assert bare_answer.id_token == first.id_token and bare_answer.access_token == "opaque-access"
        st = the_status(mgr)
        assert st["next_refresh_at"] is None  # refreshing ahead cannot extend this ID token
        assert st["refresh_token"] and st["expires_at"] == first.expires_at  # kept both
        await sleep_until(first.expires_at + 0.05)
        # Expired: the kept refresh token renews (the bare answer never reached the grant at the provider).
        second = await mgr.get_token(s, OPTIONS, Caller())
        assert second.id_token != first.id_token
        # Once more, now with nothing valid left: a bare answer means one login.
        idp.fault("token", "status", count=None, status=200, body=bare, grant_type="refresh_token")
        await sleep_until(second.expires_at + 0.05)
        third = await mgr.get_token(s, OPTIONS, Caller())
        after = idp.counters()
    assert third.id_token not in (first.id_token, second.id_token)
    assert after["token_grants"]["password"] - before["token_grants"]["password"] == 1
    assert after["refresh_reuse_detected"] == 0


async def test_force_refresh_refreshes_or_logs_in_now(idp: TestProvider, tmp_path: Path) -> None:
    forced = replace(OPTIONS, force_refresh=True)
    async with manager(tmp_path) as mgr:
        s = settings_for(idp)
        first = await mgr.get_token(s, OPTIONS, Caller())
        before = idp.counters()
        second = await mgr.get_token(s, forced, Caller())
        assert second.refresh_token != first.refresh_token  # (the ID token may be equal within one second)
        assert grants(idp, "refresh_token") - before["token_grants"]["refresh_token"] == 1
        # Without offline_access there is no refresh token: forcing means a login.
        plain = settings_for(idp, "groups")
        one = await mgr.get_token(plain, OPTIONS, Caller())
        two = await mgr.get_token(plain, forced, Caller())
        assert one.refresh_token is None and two.refresh_token is None
        assert grants(idp, "password") - before["token_grants"]["password"] == 2


async def test_sessions_survive_a_restart(idp: TestProvider, tmp_path: Path) -> None:
    s = settings_for(idp)
    never = replace(FAST, refresh_ratio=1.0, refresh_lead=0)  # no background refresh during the test's steps
    async with manager(tmp_path, never) as mgr:
        first = await mgr.get_token(s, OPTIONS, Caller())
    before = idp.counters()
    async with manager(tmp_path, never) as mgr:
        assert (await mgr.get_token(s, OPTIONS, Caller())).id_token == first.id_token
    assert idp.counters()["token_requests"] == before["token_requests"]  # valid: no provider traffic
    await sleep_until(first.expires_at + 0.05)
    async with manager(tmp_path, never) as mgr:
        renewed = await mgr.get_token(s, OPTIONS, Caller())
    after = idp.counters()
    assert renewed.id_token != first.id_token
    assert after["token_requests"] - before["token_requests"] == 1
    assert after["token_grants"]["refresh_token"] - before["token_grants"]["refresh_token"] == 1


async def test_close_lets_a_refresh_in_flight_land_and_saves_it(idp: TestProvider, tmp_path: Path) -> None:
    s = settings_for(idp)
    async with manager(tmp_path) as mgr:
        first = await mgr.get_token(s, OPTIONS, Caller())
        applied = counter(idp, "faults_applied")
        idp.fault("token", "delay", seconds=1, grant_type="refresh_token")
        forced = asyncio.create_task(mgr.get_token(s, replace(OPTIONS, force_refresh=True), Caller()))
        await wait_for(lambda: counter(idp, "faults_applied") > applied, 5, "the refresh to reach the provider")
    new = await forced
    assert new.refresh_token != first.refresh_token
    assert SessionStore(tmp_path).load()[s.key].tokens.refresh_token == new.refresh_token


async def test_a_refresh_cancelled_in_flight_counts_as_spent(idp: TestProvider, tmp_path: Path) -> None:
    """Issue 11 item 2: a shutdown that cannot wait any longer cancels the refresh; the provider may still process
    it, so the token it carried must be neither saved nor sent again after the restart."""
    s = settings_for(idp)
    async with aiohttp.ClientSession() as http:
        oidc = OIDCClient(http, SystemClock(), request_timeout=5.0)

        async def client_for(_settings: ProviderSettings) -> OIDCClient:
            return oidc

        mgr = SessionManager(client_for, LoginFlows(CallbackServer(), BrowserOpener({})), SessionStore(tmp_path),
                             SystemClock(), FAST)
        await mgr.start()
        first = await mgr.get_token(s, OPTIONS, Caller())
        before = idp.counters()
        idp.fault("token", "delay", seconds=1.5, grant_type="refresh_token")
        forced = asyncio.create_task(mgr.get_token(s, replace(OPTIONS, force_refresh=True), Caller()))
        await wait_for(lambda: counter(idp, "faults_applied") > before["faults_applied"], 5, "the refresh to be sent")
        await mgr.close(refresh_grace=0.1)
        with pytest.raises(LoginInterrupted):  # its caller is told the daemon is shutting down
            await forced
    assert SessionStore(tmp_path).load()[s.key].tokens.refresh_token is None
    await wait_for(lambda: grants(idp, "refresh_token") > before["token_grants"]["refresh_token"], 5,
                   "the provider to process the cancelled refresh")
    async with manager(tmp_path) as mgr:
        assert (await mgr.get_token(s, OPTIONS, Caller())).id_token == first.id_token  # still served
        renewed = await mgr.get_token(s, replace(OPTIONS, force_refresh=True), Caller())  # the one login
        await mgr.get_token(s, replace(OPTIONS, force_refresh=True), Caller())  # a refresh with the new token
    after = idp.counters()
    assert renewed.id_token != first.id_token
    assert after["refresh_reuse_detected"] == 0 and after["token_grants"]["password"] - before["token_grants"][
        "password"] == 1


async def test_corrupt_store_is_moved_aside(idp: TestProvider, tmp_path: Path) -> None:
    tmp_path.chmod(0o700)
    (tmp_path / "sessions.bin").write_bytes(b"BRKS\x01" + os.urandom(64))
    async with manager(tmp_path) as mgr:
        assert mgr.status() == []
        await mgr.get_token(settings_for(idp), OPTIONS, Caller())
    assert [p.name for p in tmp_path.glob("sessions.bin.corrupt-*")]
    assert len(SessionStore(tmp_path).load()) == 1


async def test_logout_revokes_and_the_next_call_logs_in(idp: TestProvider, tmp_path: Path) -> None:
    s = settings_for(idp)
    async with manager(tmp_path) as mgr:
        await mgr.get_token(s, OPTIONS, Caller())
        before = idp.counters()
        assert await mgr.logout(issuer="https://elsewhere.example") == []
        (ended,) = await mgr.logout(issuer=idp.issuer, client_id="kube_login")
        assert ended["result"].startswith("refresh token revoked")
        assert mgr.status() == [] and SessionStore(tmp_path).load() == {}
        await mgr.get_token(s, OPTIONS, Caller())
        after = idp.counters()
    assert after["revocations"] - before["revocations"] == 1
    assert after["token_grants"]["password"] - before["token_grants"]["password"] == 1


async def test_status_shows_the_session_but_no_token(idp: TestProvider, tmp_path: Path) -> None:
    s = settings_for(idp)
    async with manager(tmp_path) as mgr:
        tokens = await mgr.get_token(s, OPTIONS, Caller())
        st = the_status(mgr)
    assert st["username"] == f"{idp.issuer}#{idp.sub('alice')}"
    assert st["email"] == "alice@example.com"  # (groups: see test_lifecycle; the password grant omits them)
    assert st["refresh_token"] is True and st["next_refresh_at"] > SystemClock().now()
    text = json.dumps(st)
    for secret in (tokens.id_token, tokens.refresh_token, tokens.access_token, "insecure_secret"):
        assert secret and secret not in text


async def test_a_restarted_daemon_refreshes_with_the_sessions_own_provider_options(idp: TestProvider,
                                                                                  tmp_path: Path) -> None:
    """A custom CA or request header is kept with the session: the refresh-ahead after a restart, before any
    caller has come back, reaches the provider the way the logins did."""
    headers = (("X-Gateway", "on"),)
    s = replace(settings_for(idp), request_headers=headers)
    used: list[ProviderSettings] = []
    async with manager(tmp_path) as mgr:
        await mgr.get_token(s, OPTIONS, Caller())
    before = grants(idp, "refresh_token")
    async with aiohttp.ClientSession() as http:
        oidc = OIDCClient(http, SystemClock(), request_timeout=5.0)

        async def client_for(settings: ProviderSettings) -> OIDCClient:
            used.append(settings)
            return oidc

        mgr = SessionManager(client_for, LoginFlows(CallbackServer(), BrowserOpener({})), SessionStore(tmp_path),
                             SystemClock(), FAST)
        await mgr.start()
        try:
            await wait_for(lambda: grants(idp, "refresh_token") > before, TTL, "the refresh ahead of expiry")
        finally:
            await mgr.close(refresh_grace=5.0)
    assert used and all(o.request_headers == headers for o in used)


async def test_a_callers_tls_options_make_a_session_of_their_own(idp: TestProvider, tmp_path: Path) -> None:
    """Issue 11 item 9: --insecure-skip-tls-verify (or another CA) is part of what identifies a session, so one
    caller cannot turn off certificate checks for another session's background refreshes."""
    base = ["--oidc-issuer-url=" + idp.issuer, "--oidc-client-id=kube_login", "--oidc-client-secret=insecure_secret",
            "--oidc-extra-scope=offline_access", "--username=alice", "--password=alice-password"]
    careful = provider_settings(parse_flags(base))
    careless = provider_settings(parse_flags([*base, "--insecure-skip-tls-verify"]))
    assert careful.key != careless.key
    seen: list[ProviderSettings] = []
    async with aiohttp.ClientSession() as http:
        oidc = OIDCClient(http, SystemClock(), request_timeout=5.0)

        async def client_for(settings: ProviderSettings) -> OIDCClient:
            seen.append(settings)
            return oidc

        mgr = SessionManager(client_for, LoginFlows(CallbackServer(), BrowserOpener({})), SessionStore(tmp_path),
                             SystemClock(), FAST)
        try:
            await mgr.get_token(careful, OPTIONS, Caller())
            await mgr.get_token(careless, OPTIONS, Caller())
            assert len(mgr.status()) == 2
            seen.clear()
            await mgr.get_token(careful, replace(OPTIONS, force_refresh=True), Caller())
        finally:
            await mgr.close(refresh_grace=5.0)
    assert seen and not any(s.tls.insecure_skip_verify for s in seen)
    stored = SessionStore(tmp_path).load()
    assert not stored[careful.key].settings.tls.insecure_skip_verify
    assert stored[careless.key].settings.tls.insecure_skip_verify
