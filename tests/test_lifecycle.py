"""Issue 3 end to end: a real `brokerd serve` process, the real shim, the real test provider with 6 s tokens, logins
through the browser stand-in.  Refresh ahead with nobody waiting, rotation without reuse, 50 callers at expiry,
SIGKILL and restart, provider revocation, logout, status, a corrupted store."""

from __future__ import annotations

import json
import os
import subprocess
import time
from collections.abc import Iterator
from datetime import datetime
from typing import Any

import pytest

from brokerd.store import SessionStore
from tests.support.daemon import Daemon, login_args
from tests.support.net import module_port
from tests.support.provider import ProviderFactory, TestProvider
from tests.support.wait import wait_until

TTL = 6
NO_BACKGROUND_REFRESH = "[daemon]\nrefresh_ratio = 1.0\nrefresh_lead = 0\n"  # the timer fires only at exp


def redirect_port() -> int:
    """This module's own redirect port, so other tests' use of 8000/18000 cannot interfere (picked at first use)."""
    return module_port(__name__)


@pytest.fixture(scope="module")
def idp(provider_factory: ProviderFactory) -> TestProvider:
    return provider_factory({"id_token_ttl": TTL, "access_token_ttl": TTL,
                             "default_client": {"redirect_uris": [f"http://localhost:{redirect_port()}"]}})


@pytest.fixture(autouse=True)
def _no_leftover_faults(idp: TestProvider) -> Iterator[None]:
    yield
    idp.clear_faults()


def args(p: TestProvider, *extra: str) -> list[str]:
    return login_args(p.issuer, f"--listen-address=127.0.0.1:{redirect_port()}", *extra,
                      scopes=("groups", "email", "offline_access"))


def credential(result: subprocess.CompletedProcess[str], d: Daemon) -> tuple[str, float]:
    assert result.returncode == 0, result.stderr + d.log()
    status = json.loads(result.stdout)["status"]
    return status["token"], datetime.fromisoformat(status["expirationTimestamp"]).timestamp()


def get(d: Daemon, p: TestProvider, *extra: str) -> tuple[str, float]:
    return credential(d.shim(args(p, *extra)), d)


def delta(before: dict[str, Any], after: dict[str, Any], name: str) -> int:
    if name in before["token_grants"]:
        return int(after["token_grants"][name] - before["token_grants"][name])
    return int(after[name] - before[name])


def test_refresh_ahead_rotates_with_nobody_waiting_and_no_reuse(idp: TestProvider, daemon: Daemon) -> None:
    before = idp.counters()
    token, _ = get(daemon, idp)
    # Every refresh takes 1 s at the provider: a caller that waited for one would take that long.
    idp.fault("token", "delay", count=None, seconds=1, grant_type="refresh_token")
    seen = {token}
    slowest = 0.0
    deadline = time.monotonic() + 3 * TTL
    while delta(before, idp.counters(), "refresh_token") < 3 and time.monotonic() < deadline:
        started = time.monotonic()
        token, expires = get(daemon, idp)
        slowest = max(slowest, time.monotonic() - started)
        assert expires > time.time()
        seen.add(token)
        time.sleep(0.3)
    after = idp.counters()
    assert delta(before, after, "refresh_token") >= 3, daemon.log()
    assert len(seen) >= 3  # callers got each rotated session ...
    assert slowest < 0.9, f"a caller waited {slowest:.2f} s"  # ... from cache, never waiting on the provider
    assert delta(before, after, "authorization_code") == 1 and daemon.browser_openings() == 1
    assert after["refresh_reuse_detected"] == 0 and after["grants_revoked"] == before["grants_revoked"]


def test_fifty_callers_at_expiry_cause_one_refresh(idp: TestProvider) -> None:
    with Daemon(config=NO_BACKGROUND_REFRESH) as d:
        first, expires = get(d, idp)
        time.sleep(max(0.0, expires - time.time()) + 0.05)
        before = idp.counters()
        idp.fault("token", "delay", seconds=1, grant_type="refresh_token")  # all 50 arrive while it runs
        procs = [d.shim_async(args(idp)) for _ in range(50)]
        tokens = set()
        for proc in procs:
            out, err = proc.communicate(timeout=60)
            assert proc.returncode == 0, err
            tokens.add(json.loads(out)["status"]["token"])
        after = idp.counters()
    assert len(tokens) == 1 and first not in tokens
    assert delta(before, after, "refresh_token") == 1 and delta(before, after, "token_requests") == 1
    assert delta(before, after, "authorization_code") == 0


def test_sigkill_and_restart_keep_the_rotated_session(idp: TestProvider, daemon: Daemon) -> None:
    before = idp.counters()
    first, _ = get(daemon, idp)
    wait_until(lambda: delta(before, idp.counters(), "refresh_token") == 1, "the background refresh", TTL)
    wait_until(lambda: "refreshed; token valid until" in daemon.log(), "the refresh to be saved", 2)
    refreshed, expires = get(daemon, idp)
    assert refreshed != first
    daemon.kill()
    mid = idp.counters()
    daemon.start()
    assert get(daemon, idp)[0] == refreshed  # the rotated session, from disk ...
    assert idp.counters()["token_requests"] == mid["token_requests"]  # ... with no provider traffic
    daemon.kill()
    time.sleep(max(0.0, expires - time.time()) + 1.0)  # past the real exp too
    daemon.start()
    renewed, _ = get(daemon, idp)
    after = idp.counters()
    assert renewed not in (first, refreshed)
    assert delta(mid, after, "refresh_token") == 1 and delta(mid, after, "token_requests") == 1
    assert delta(before, after, "authorization_code") == 1 and after["refresh_reuse_detected"] == 0


def test_provider_revocation_leads_to_exactly_one_login(idp: TestProvider, daemon: Daemon) -> None:
    first, expires = get(daemon, idp)
    before = idp.counters()
    idp.revoke_all("alice")
    tokens = []
    deadline = expires + 2.5
    while time.time() < deadline:  # through the failed background refresh, the expiry, and a little beyond
        tokens.append(get(daemon, idp)[0])
        time.sleep(0.4)
    after = idp.counters()
    assert tokens[0] == first and tokens[-1] != first
    assert delta(before, after, "authorization_code") == 1 and daemon.browser_openings() == 2
    assert after["token_errors"].get("invalid_grant", 0) - before["token_errors"].get("invalid_grant", 0) == 1
    assert "dropped the refresh token" in daemon.log()


def test_logout_revokes_and_the_next_call_logs_in(idp: TestProvider, daemon: Daemon) -> None:
    get(daemon, idp)
    before = idp.counters()
    other = daemon.cli("logout", "--issuer", "https://elsewhere.example")
    assert other.returncode == 0 and "no matching sessions" in other.stdout
    out = daemon.cli("logout", "--all")
    assert out.returncode == 0, out.stderr
    assert f"logged out of {idp.issuer}" in out.stdout and "refresh token revoked" in out.stdout
    assert delta(before, idp.counters(), "revocations") == 1
    assert daemon.cli("status").stdout.strip() == "no sessions"
    assert SessionStore(daemon.state_dir).load() == {}
    get(daemon, idp)
    assert delta(before, idp.counters(), "authorization_code") == 1 and daemon.browser_openings() == 2


def test_status_shows_sessions_without_token_values(idp: TestProvider, daemon: Daemon) -> None:
    token, _ = get(daemon, idp)
    (stored,) = SessionStore(daemon.state_dir).load().values()
    secrets = [token, stored.tokens.id_token, stored.tokens.refresh_token, stored.tokens.access_token,
               "insecure_secret"]
    text = daemon.cli("status")
    doc = daemon.cli("status", "--json")
    assert text.returncode == 0 and doc.returncode == 0, text.stderr + doc.stderr
    (s,) = json.loads(doc.stdout)["sessions"]
    user = f"{idp.issuer}#{idp.sub('alice')}"
    assert s["username"] == user and s["email"] == "alice@example.com" and set(s["groups"]) == {"admins", "dev"}
    assert s["refresh_token"] is True and s["expires_at"] > time.time() and s["next_refresh_at"] < s["expires_at"]
    assert user in text.stdout and "admins, dev" in text.stdout and "refresh token: yes" in text.stdout
    for secret in secrets:
        assert secret and secret not in text.stdout and secret not in doc.stdout


def test_corrupted_store_is_moved_aside_and_the_daemon_keeps_running(idp: TestProvider) -> None:
    with Daemon() as d:
        get(d, idp)
        d.stop()
        store = d.state_dir / "sessions.bin"
        store.write_bytes(b"BRKS\x01" + os.urandom(100))  # damaged while the daemon was down
        d.start()
        assert d.cli("status").stdout.strip() == "no sessions"
        get(d, idp)  # logs in again
        store.write_bytes(b"garbage")  # damaged while it runs: the next save sets it aside, never overwrites it
        get(d, idp, "--force-refresh")
        assert d.alive() and len(SessionStore(d.state_dir).load()) == 1
        aside = sorted(p.name for p in d.state_dir.glob("sessions.bin.corrupt-*"))
        assert len(aside) == 2, aside
        assert d.log().count("moved it aside") == 2 and d.browser_openings() == 2
