"""Provider faults injected into the real test provider while a real daemon serves real shims: each gives the
caller one clear line and a non-zero exit (or a late success), the daemon keeps serving other sessions, refreshes
back off, and a still-valid session is never dropped for a transient fault.

Every test uses its own session (extra auth request params are part of the session key), so one test's failed login or
refresh does not leak into the next.
"""

from __future__ import annotations

import json
import threading
import time
from collections.abc import Iterator
from typing import Any

import pytest

from tests.support.daemon import Daemon, exec_token, login_args
from tests.support.hostile import exchange, request, tracebacks
from tests.support.net import free_port, module_port
from tests.support.provider import ProviderFactory, TestProvider

TTL = 12  # ID/access token life: refresh due at 6 s, served until 10.8 s (10% margin)


def redirect_port() -> int:
    """This module's own redirect port, so other tests' use of 8000/18000 cannot interfere (picked at first use)."""
    return module_port(__name__)


def provider_config() -> dict[str, Any]:
    return {"default_client": {"redirect_uris": [f"http://localhost:{redirect_port()}"]},
            "id_token_ttl": TTL, "access_token_ttl": TTL}


# Fast back-off so a test can watch it; no lockout after a failed login, so a test can retry at once.
DAEMON_CONFIG = "[daemon]\nretry_initial = 1\nretry_max = 4\nlogin_retry_interval = 0\n"


@pytest.fixture(scope="module")
def idp(provider_factory: ProviderFactory) -> TestProvider:
    return provider_factory(provider_config())


@pytest.fixture(scope="module")
def daemon() -> Iterator[Daemon]:
    with Daemon(config=DAEMON_CONFIG) as d:
        yield d
        assert tracebacks(d.log()) == []


@pytest.fixture(autouse=True)
def _clear(idp: TestProvider) -> Iterator[None]:
    idp.clear_faults()
    yield
    idp.clear_faults()


def args(issuer: str, name: str, *extra: str) -> list[str]:
    return login_args(issuer, f"--listen-address=127.0.0.1:{redirect_port()}",
                      f"--oidc-auth-request-extra-params=case={name}",
                      *extra)




def one_error_line(result: Any) -> str:
    """The caller's stderr: at most the login URL line, then exactly one error line."""
    assert result.returncode != 0 and result.stdout == "", result
    lines = result.stderr.strip().splitlines()
    assert lines and all(line.startswith("Open this URL to log in:") for line in lines[:-1]), lines
    assert lines[-1].startswith("brokerd: ") and "Traceback" not in result.stderr
    return str(lines[-1])


def faults_applied(idp: TestProvider) -> int:
    return int(idp.counters()["faults_applied"])


def test_500_on_the_token_endpoint(idp: TestProvider, daemon: Daemon) -> None:
    idp.fault("token", status=500, grant_type="authorization_code")
    line = one_error_line(daemon.shim(args(idp.issuer, "t500")))
    assert line == (f"brokerd: token endpoint at {idp.issuer} answered server_error (injected fault)"), line
    assert exec_token(daemon.shim(args(idp.issuer, "t500")))  # the fault is gone: the next call logs in


def test_slow_token_endpoint_succeeds_and_other_sessions_are_served(idp: TestProvider, daemon: Daemon) -> None:
    other = exec_token(daemon.shim(args(idp.issuer, "slow-other")))
    idp.fault("token", kind="delay", seconds=5, grant_type="authorization_code")
    started = time.monotonic()
    slow = daemon.shim_async(args(idp.issuer, "slow"))
    try:
        time.sleep(1.5)
        assert exec_token(daemon.shim(args(idp.issuer, "slow-other"))) == other
        assert slow.poll() is None  # answered while the slow login still waits: not queued behind it
        out, err = slow.communicate(timeout=60)
    finally:
        if slow.poll() is None:
            slow.kill()
            slow.communicate()
    assert slow.returncode == 0, err
    assert json.loads(out)["status"]["token"]
    assert time.monotonic() - started >= 5


def test_provider_down_then_back_on_the_same_port(provider_factory: ProviderFactory, daemon: Daemon) -> None:
    port = free_port()
    first = provider_factory(provider_config(), port=port)
    valid = exec_token(daemon.shim(_offline(first.issuer, "down-valid")))
    first.stop()
    # Connection refused: a session that is still valid is served from memory ...
    assert exec_token(daemon.shim(_offline(first.issuer, "down-valid"))) == valid
    # ... a forced refresh says why it cannot refresh, in one line, and keeps the session ...
    line = one_error_line(daemon.shim(_offline(first.issuer, "down-valid", "--force-refresh")))
    assert line == f"brokerd: cannot reach http://127.0.0.1:{port}: connection refused", line
    assert exec_token(daemon.shim(_offline(first.issuer, "down-valid"))) == valid
    # ... a login for another session fails at once although discovery is cached: no browser tab for nothing ...
    openings = daemon.browser_openings()
    line = one_error_line(daemon.shim(args(first.issuer, "down-other")))
    assert line == f"brokerd: cannot reach http://127.0.0.1:{port}: connection refused", line
    assert daemon.browser_openings() == openings
    # ... and a daemon that has not seen the provider yet fails a login at discovery, before any browser.
    with Daemon(config=DAEMON_CONFIG) as fresh:
        line = one_error_line(fresh.shim(args(first.issuer, "down-new")))
        assert line == f"brokerd: cannot reach http://127.0.0.1:{port}: connection refused", line
        assert fresh.browser_openings() == 0
    second = provider_factory(provider_config(), port=port)  # back (new signing key, new state)
    assert exec_token(daemon.shim(args(second.issuer, "down-new")))
    assert exec_token(daemon.shim(_offline(second.issuer, "down-valid"))) == valid


@pytest.mark.parametrize(("target", "words"), [
    ("discovery", "discovery at {issuer} answered HTTP 500"),
    ("jwks", "JWKS at {issuer} answered HTTP 500"),
], ids=["discovery", "jwks"])
def test_discovery_or_jwks_failing(idp: TestProvider, target: str, words: str) -> None:
    # A daemon of its own: discovery and keys are cached for an hour once fetched.
    with Daemon(config=DAEMON_CONFIG) as d:
        idp.fault(target, status=500, count=None)
        line = one_error_line(d.shim(args(idp.issuer, f"fail-{target}")))
        assert line == "brokerd: " + words.format(issuer=idp.issuer), line
        assert exchange(d.socket, request("status")) == b'O{"sessions": []}\n'  # nothing cached
        idp.clear_faults()
        assert exec_token(d.shim(args(idp.issuer, f"fail-{target}")))
        d.stop()
        assert tracebacks(d.log()) == []


def _offline(issuer: str, name: str, *extra: str) -> list[str]:
    return args(issuer, name, "--oidc-extra-scope=offline_access", *extra)


def test_transient_refresh_fault_keeps_the_session_and_backs_off(idp: TestProvider, daemon: Daemon) -> None:
    started = time.monotonic()
    first = exec_token(daemon.shim(_offline(idp.issuer, "flaky")))
    openings = daemon.browser_openings()
    idp.fault("token", status=500, count=None, grant_type="refresh_token")
    applied = faults_applied(idp)
    # The refresh came due at ~6 s and kept failing; the token is served until floor(exp - 1.2) >= started + 9 s.
    time.sleep(max(0.0, started + 8.5 - time.monotonic()))
    attempts = faults_applied(idp) - applied
    # Backed off (1 s, 2 s, ...): a handful of attempts, not a tight loop.
    assert 1 <= attempts <= 4, attempts
    assert exec_token(daemon.shim(_offline(idp.issuer, "flaky"))) == first  # still valid: still served
    idp.clear_faults()
    deadline = time.monotonic() + 10
    while time.monotonic() < deadline:
        renewed = exec_token(daemon.shim(_offline(idp.issuer, "flaky")))
        if renewed != first:
            break
        time.sleep(0.5)
    assert renewed != first, "the session was not refreshed after the fault cleared"
    assert daemon.browser_openings() == openings  # refreshed, never a new login
    assert "background refresh failed" in daemon.log()


def test_signing_key_rotated(idp: TestProvider, daemon: Daemon) -> None:
    first = exec_token(daemon.shim(_offline(idp.issuer, "rotate")))
    idp.rotate_keys(keep_old=False)
    before = idp.counters()
    openings = daemon.browser_openings()
    renewed = exec_token(daemon.shim(_offline(idp.issuer, "rotate", "--force-refresh")))
    after = idp.counters()
    assert renewed != first
    assert after["jwks"] - before["jwks"] == 1  # the unknown kid made it fetch the keys once
    assert after["token_grants"]["refresh_token"] - before["token_grants"]["refresh_token"] == 1
    assert daemon.browser_openings() == openings


def test_refresh_token_revoked_leads_to_a_new_login(idp: TestProvider, daemon: Daemon) -> None:
    first = exec_token(daemon.shim(_offline(idp.issuer, "revoked")))
    idp.revoke_all("alice")
    openings = daemon.browser_openings()
    # Nobody finishes the new login in the browser: the caller is told so in one line, in time ...
    failing = daemon.shim(_offline(idp.issuer, "revoked", "--force-refresh", "--authentication-timeout-sec=3"),
                          env={"BROWSER": "true"})
    line = one_error_line(failing)
    # The caller waits a little longer than the login's own deadline, so it hears why the login ended.
    assert line == "brokerd: no login was completed in the browser within 3 s", line
    time.sleep(1)  # let the abandoned login reach its own deadline
    assert "dropped the refresh token (token endpoint at" in daemon.log()
    # The ID token is still good, so it is still served (dropping the refresh token is no reason to drop it) ...
    assert exec_token(daemon.shim(_offline(idp.issuer, "revoked"))) == first
    # ... and with a browser that logs in, a forced renewal logs in again.
    renewed = exec_token(daemon.shim(_offline(idp.issuer, "revoked", "--force-refresh")))
    assert renewed != first
    assert daemon.browser_openings() > openings


def test_daemon_still_serves_after_all_faults(idp: TestProvider, daemon: Daemon) -> None:
    results: list[str] = []

    def call() -> None:
        results.append(exec_token(daemon.shim(args(idp.issuer, "t500"))))

    threads = [threading.Thread(target=call) for _ in range(4)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(30)
    assert len(results) == 4 and len(set(results)) == 1
