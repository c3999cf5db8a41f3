"""Session timers and back-off on a fake clock (issue 12 item 8), odd numbers and nested JSON from the provider
(issue 11 item 4), and the bound on entries of failed logins (issue 11 item 13).

The provider, HTTP, the store and the session machinery are real; only time is fake: it moves when the test moves
it, and the test waits (bounded) for the timer to be asleep rather than sleeping on the wall clock.  ID tokens live
an hour at this provider, so virtual time can run ahead of real time without them expiring."""

from __future__ import annotations

import asyncio
import logging
import time
from collections.abc import AsyncIterator, Callable, Iterator
from contextlib import asynccontextmanager
from dataclasses import replace
from pathlib import Path
from typing import Any

import aiohttp
import pytest

from brokerd.browser import BrowserOpener
from brokerd.callback import CallbackServer
from brokerd.errors import BrokerError, LoginError, TokenValidationError
from brokerd.flows import LoginFlows
from brokerd.idtoken import check_claims
from brokerd.models import LoginOptions, ProviderSettings
from brokerd.oidc import OIDCClient
from brokerd.oidc_wire import lifetime, refresh_lifetime
from brokerd.refresh import Policy
from brokerd.sessions import MAX_IDLE, SessionManager
from brokerd.store import SessionStore
from tests.support.callers import Caller
from tests.support.clock import FakeClock
from tests.support.provider import ProviderFactory, TestProvider

TTL = 3600
POLICY = Policy(retry_initial=2.0, retry_max=8.0, login_retry_interval=30.0)
OPTIONS = LoginOptions(grant_type="password", password="alice-password")


@pytest.fixture(scope="module")
def idp(provider_factory: ProviderFactory) -> TestProvider:
    return provider_factory({"id_token_ttl": TTL, "access_token_ttl": TTL})


@pytest.fixture(autouse=True)
def _no_leftover_faults(idp: TestProvider) -> Iterator[None]:
    yield
    idp.clear_faults()


def settings_for(p: TestProvider, username: str = "alice", **kw: Any) -> ProviderSettings:
    return ProviderSettings(issuer=p.issuer, client_id="kube_login", client_secret="insecure_secret",
                            scopes=("offline_access", "email"), username=username, **kw)


@asynccontextmanager
async def manager(state: Path, clock: FakeClock) -> AsyncIterator[SessionManager]:
    async with aiohttp.ClientSession() as http:
        oidc = OIDCClient(http, clock, request_timeout=10.0)

        async def client_for(_settings: ProviderSettings) -> OIDCClient:
            return oidc

        mgr = SessionManager(client_for, LoginFlows(CallbackServer(), BrowserOpener({})), SessionStore(state), clock,
                             POLICY)
        await mgr.start()
        try:
            yield mgr
        finally:
            await mgr.close(refresh_grace=10.0)


async def until(pred: Callable[[], bool], what: str) -> None:
    """Wait for an effect of real I/O (the provider answering), bounded; never used to let virtual time pass."""
    for _ in range(750):
        if pred():
            return
        await asyncio.sleep(0.02)
    raise AssertionError(f"gave up waiting for {what}")


def refreshes(p: TestProvider) -> int:
    return int(p.counters()["token_grants"]["refresh_token"])


async def test_timer_refreshes_at_the_due_time_and_not_before(idp: TestProvider, tmp_path: Path) -> None:
    clock = FakeClock(time.time())
    s = settings_for(idp)
    async with manager(tmp_path, clock) as mgr:
        first = await mgr.get_token(s, OPTIONS, Caller())
        (due,) = await clock.asleep()
        assert due == pytest.approx(first.issued_at + 0.8 * (first.expires_at - first.issued_at))
        before = refreshes(idp)
        clock.advance_to(due - 1)
        assert await clock.asleep() == [due]  # still asleep: a second early is early
        assert refreshes(idp) == before
        clock.advance_to(due)
        await until(lambda: mgr.status()[0]["next_refresh_at"] != due, "the refresh to end")
        assert refreshes(idp) == before + 1
        # (No timer is asserted next: the provider's clock did not move with ours, so the new ID token may expire
        # when the old one did, and then refreshing ahead cannot extend it.)
        second = await mgr.get_token(s, OPTIONS, Caller())
        assert second.refresh_token != first.refresh_token
        assert SessionStore(tmp_path).load()[s.key].tokens.refresh_token == second.refresh_token


async def test_back_off_doubles_and_logs_one_warning(idp: TestProvider, tmp_path: Path,
                                                     caplog: pytest.LogCaptureFixture) -> None:
    caplog.set_level(logging.DEBUG, logger="brokerd.sessions")
    clock = FakeClock(time.time())
    s = settings_for(idp)
    async with manager(tmp_path, clock) as mgr:
        await mgr.get_token(s, OPTIONS, Caller())
        (due,) = await clock.asleep()
        before = idp.counters()
        idp.fault("token", "status", count=3, grant_type="refresh_token")
        waits = []
        clock.advance_to(due)
        for _ in range(3):  # three refused attempts: back-off 2, 4, 8 s
            (retry,) = await clock.asleep()
            waits.append(retry - clock.now())
            (status,) = mgr.status()
            assert status["refresh_retrying"] and status["refresh_token"]
            clock.advance_to(retry)
        await until(lambda: not mgr.status()[0]["refresh_retrying"], "the fourth attempt to end")
        after = idp.counters()
    assert waits == [2.0, 4.0, 8.0]
    assert after["token_requests"] - before["token_requests"] == 4
    assert after["refresh_reuse_detected"] == 0
    warnings = [r for r in caplog.records if r.name == "brokerd.sessions" and r.levelno >= logging.WARNING]
    assert len(warnings) == 1 and "retrying with back-off" in warnings[0].getMessage()


@pytest.mark.parametrize("expires_in", ["1e999", "Infinity", "NaN", "-1e999", "1" * 400],
                         ids=["1e999", "Infinity", "NaN", "-inf", "400-digits"])
async def test_absurd_expires_in_is_ignored_and_other_sessions_are_saved(
        idp: TestProvider, tmp_path: Path, expires_in: str) -> None:
    """One session's refresh answer carries a nonsense expires_in: it must neither break that session nor keep
    every other session's rotated refresh token from being saved."""
    clock = FakeClock(time.time())
    odd, other = settings_for(idp, use_access_token=True), settings_for(idp)
    async with manager(tmp_path, clock) as mgr:
        await mgr.get_token(odd, OPTIONS, Caller())
        await mgr.get_token(other, OPTIONS, Caller())
        body = ('{"access_token":"opaque","token_type":"Bearer","refresh_token":"r-odd","expires_in":'
                + expires_in + "}")
        idp.fault("token", "status", status=200, body=body, grant_type="refresh_token")
        forced = replace(OPTIONS, force_refresh=True)
        answered = await mgr.get_token(odd, forced, Caller())
        token, expiry = mgr.credential(odd, answered)
        assert token == "opaque" and expiry < clock.now() + TTL + 1  # the ID token's exp, not "for ever"
        renewed = await mgr.get_token(other, forced, Caller())
    stored = SessionStore(tmp_path).load()
    assert stored[other.key].tokens.refresh_token == renewed.refresh_token
    assert stored[odd.key].tokens.refresh_token == "r-odd"


async def test_deeply_nested_json_from_the_token_endpoint_is_one_clear_error(idp: TestProvider,
                                                                             tmp_path: Path) -> None:
    clock = FakeClock(time.time())
    s = settings_for(idp)
    async with manager(tmp_path, clock) as mgr:
        first = await mgr.get_token(s, OPTIONS, Caller())
        idp.fault("token", "status", status=200, body="[" * 200_000 + "]" * 200_000, grant_type="refresh_token")
        # An unusable 200 answer may have rotated the token: dropped, and this forced caller logs in once.
        renewed = await mgr.get_token(s, replace(OPTIONS, force_refresh=True), Caller())
        assert renewed.refresh_token not in (None, first.refresh_token)
    assert idp.counters()["refresh_reuse_detected"] == 0


async def test_timer_survives_an_error_that_is_not_a_broker_error(idp: TestProvider, tmp_path: Path) -> None:
    """Whatever a background refresh raises, the timer backs off and tries again (it used to die silently)."""
    clock = FakeClock(time.time())
    s = settings_for(idp)
    async with aiohttp.ClientSession() as http:
        oidc = OIDCClient(http, clock, request_timeout=10.0)
        broken = [False]

        async def client_for(_settings: ProviderSettings) -> OIDCClient:
            if broken[0]:
                broken[0] = False
                raise RuntimeError("a bug in building the client")
            return oidc

        mgr = SessionManager(client_for, LoginFlows(CallbackServer(), BrowserOpener({})), SessionStore(tmp_path),
                             clock, POLICY)
        await mgr.get_token(s, OPTIONS, Caller())
        (due,) = await clock.asleep()
        before = refreshes(idp)
        broken[0] = True
        clock.advance_to(due)
        (retry,) = await clock.asleep()
        assert retry - clock.now() == POLICY.retry_initial
        clock.advance_to(retry)
        await until(lambda: refreshes(idp) == before + 1, "the retried refresh")
        await mgr.close()


@pytest.mark.parametrize("claim", ["exp", "iat", "nbf"])
@pytest.mark.parametrize("value", [float("nan"), float("inf"), float("-inf"), 10**400, -5])
def test_id_token_times_must_be_finite_and_plausible(claim: str, value: float) -> None:
    now = 1_700_000_000.0
    claims: dict[str, Any] = {"iss": "https://i", "aud": "c", "sub": "u", "exp": now + 60, "iat": now}
    claims[claim] = value
    with pytest.raises(TokenValidationError):
        check_claims(claims, issuer="https://i", client_id="c", now=now, nonce=None)


def test_lifetime_accepts_only_sane_numbers() -> None:
    assert lifetime(3600) == 3600.0 and lifetime(1.5) == 1.5
    for bad in (float("inf"), float("nan"), 10**400, 0, -3, True, "3600", None, 400 * 24 * 3600):
        assert lifetime(bad) is None


def test_refresh_lifetime_reads_both_names_checked_like_expires_in() -> None:
    assert refresh_lifetime({"refresh_expires_in": 1800}) == 1800.0
    assert refresh_lifetime({"refresh_token_expires_in": 600}) == 600.0
    assert refresh_lifetime({"expires_in": 300}) is None
    # Keycloak's 0 for an offline token that does not expire, and nonsense: not a known expiry.
    for bad in (0, float("nan"), True, "1800", 10**400, 400 * 24 * 3600):
        assert refresh_lifetime({"refresh_expires_in": bad}) is None


async def test_entries_of_failed_logins_are_bounded(idp: TestProvider, tmp_path: Path) -> None:
    clock = FakeClock(time.time())
    wrong = replace(OPTIONS, password="wrong")
    async with manager(tmp_path, clock) as mgr:
        for n in range(MAX_IDLE + 40):
            with pytest.raises(BrokerError):
                await mgr.get_token(settings_for(idp, username=f"nobody-{n}"), wrong, Caller())
        assert mgr.entries <= MAX_IDLE
        # Past the retry interval they protect, they all go.
        clock.advance_to(clock.now() + POLICY.login_retry_interval)
        await mgr.get_token(settings_for(idp), OPTIONS, Caller())
        assert mgr.entries == 1
        # The throttle of a recent failure is still in force while its entry is kept.
        bad = settings_for(idp, username="mallory")
        with pytest.raises(BrokerError):
            await mgr.get_token(bad, wrong, Caller())
        with pytest.raises(LoginError, match="not opening the browser again"):
            await mgr.get_token(bad, wrong, Caller())
