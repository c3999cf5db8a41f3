"""The refresh fault matrix (issue 11): every point where a refresh can be interrupted, with refresh-token rotation
on and off, against the real test provider and real daemon processes (restarts included).

Across each whole scenario the provider must see no refresh token twice (``refresh_reuse_detected`` 0, no
invalid_grant), and the interruption may cost at most one new login.  Each case ends with two more forced
renewals, so a refresh token the daemon wrongly kept as unspent would be sent again and be caught.

Refreshes are forced (``--force-refresh``) and tokens live an hour, so no background refresh runs in between;
logins use the password grant, so no browser is involved.
"""

from __future__ import annotations

import resource
import signal
import subprocess
import time
from collections.abc import Callable, Iterator
from typing import Any

import pytest

from tests.support.daemon import Daemon, exec_token, login_args
from tests.support.provider import ProviderFactory, TestProvider
from tests.support.relay import Relay

DELAY = 3.0  # a slow token answer: long enough to interrupt the daemon while the provider holds the request
# Longer than the daemon used to give a refresh in flight at shutdown (5 s for callers, then 10 s), shorter than its
# request timeout (30 s): the answer comes, and the daemon must wait for it.
SLOW_STOP = 20.0


class Rig:
    def __init__(self, idp: TestProvider, jwks: Relay, token: Relay, tmp: Any) -> None:
        self.idp, self.jwks, self.token = idp, jwks, token
        self.daemon = Daemon(base=tmp)
        self.before: dict[str, Any] = {}
        self.logins_expected = 0  # what the interruption may cost: 0 or 1 logins

    def args(self, *extra: str) -> list[str]:
        return login_args(self.idp.issuer, "--grant-type=password", "--username=alice", "--password=alice-password",
                          *extra, scopes=("offline_access",))

    def get(self, *extra: str) -> subprocess.CompletedProcess[str]:
        return self.daemon.shim(self.args(*extra))

    def forced(self) -> str:
        result = self.get("--force-refresh")
        assert result.returncode == 0, (result.stderr, self.daemon.log()[-3000:])
        return exec_token(result)

    def wait_for(self, pred: Callable[[], bool], what: str, timeout: float = 15.0) -> None:
        deadline = time.monotonic() + timeout
        while not pred():
            assert time.monotonic() < deadline, f"timed out waiting for {what}"
            time.sleep(0.05)

    def refresh_requests(self) -> int:
        return int(self.idp.counters()["token_grants"]["refresh_token"]) + self.token_errors()

    def token_errors(self) -> int:
        return sum(int(v) for v in self.idp.counters()["token_errors"].values())


@pytest.fixture(scope="module", params=[True, False], ids=["rotation", "no-rotation"])
def world(request: pytest.FixtureRequest, provider_factory: ProviderFactory) -> Iterator[tuple[TestProvider, Relay,
                                                                                                Relay]]:
    jwks, token = Relay(), Relay()
    idp = provider_factory({
        "rotate_refresh_tokens": request.param, "id_token_ttl": 3600, "access_token_ttl": 3600,
        "discovery_overrides": {"jwks_uri": jwks.url("/jwks"), "token_endpoint": token.url("/token")},
    })
    jwks.target = token.target = idp.port
    jwks.start()
    token.start()
    yield idp, jwks, token
    jwks.stop()
    token.stop()


@pytest.fixture
def rig(world: tuple[TestProvider, Relay, Relay], tmp_path: Any) -> Iterator[Rig]:
    idp, jwks, token = world
    idp.clear_faults()
    r = Rig(idp, jwks, token, tmp_path)
    r.daemon.start()
    first = r.get()
    assert first.returncode == 0, first.stderr
    before = r.before = idp.counters()
    yield r
    idp.clear_faults()
    r.jwks.ensure_started()
    r.token.ensure_started()
    try:
        # Two more renewals after the interruption: a refresh token wrongly kept would be replayed here.
        r.forced()
        r.forced()
        after = idp.counters()
        logins = after["token_grants"]["password"] - before["token_grants"]["password"]
        assert after["refresh_reuse_detected"] == before["refresh_reuse_detected"]
        assert after["token_errors"].get("invalid_grant", 0) == before["token_errors"].get("invalid_grant", 0)
        assert logins <= 1
        assert logins == r.logins_expected
    finally:
        r.daemon.close()


def test_before_connect_token_endpoint_refuses(rig: Rig) -> None:
    """Connection refused: the request never left, so the refresh token stays and is used once the host is back."""
    rig.token.stop()
    result = rig.get("--force-refresh")
    assert result.returncode != 0 and "cannot reach" in result.stderr
    rig.logins_expected = 0


def test_after_send_connection_dropped(rig: Rig) -> None:
    """The provider read the request and the connection dropped: maybe processed, so the token counts as spent."""
    rig.idp.fault("token", "drop", grant_type="refresh_token")
    rig.forced()  # this caller wanted a new token now: the token is dropped, so that is the one login
    rig.logins_expected = 1


def test_after_the_answer_id_token_fails_verification(rig: Rig) -> None:
    """The provider rotated, then the ID token does not verify: the spent token never comes back."""
    rig.idp.fault("token", "bad_id_token", grant_type="refresh_token")
    rig.forced()  # the refresh token is dropped: this caller's one login
    assert "signature does not verify" in rig.daemon.log()
    rig.logins_expected = 1


def test_during_the_key_fetch_jwks_refuses_after_a_restart(rig: Rig) -> None:
    """Issue 11 item 1: a cold key cache (restart) and a JWKS host that refuses connections after the token
    endpoint answered 200.  The new refresh token is kept and used once the keys are back; no login needed."""
    rig.daemon.stop()
    rig.daemon.start()
    rig.jwks.stop()
    result = rig.get("--force-refresh")
    assert result.returncode != 0 and "cannot reach" in result.stderr
    rig.jwks.start()
    rig.logins_expected = 0


def test_during_the_save_after_the_answer(rig: Rig) -> None:
    """Issue 11 item 3: the store cannot be written once the provider answered (file size limit on the running
    daemon: EFBIG), then the daemon dies.  The restarted daemon must not find the spent token on disk."""
    rig.idp.fault("token", "delay", seconds=DELAY, grant_type="refresh_token")
    sent = rig.refresh_requests()
    shim = rig.daemon.shim_async(rig.args("--force-refresh"))
    rig.wait_for(lambda: rig.idp.counters()["faults_applied"] > rig.before["faults_applied"],
                 "the refresh to reach the provider")
    assert rig.daemon.proc is not None
    _, hard = resource.getrlimit(resource.RLIMIT_FSIZE)
    resource.prlimit(rig.daemon.proc.pid, resource.RLIMIT_FSIZE, (1, hard))  # Python ignores SIGXFSZ: EFBIG
    shim.communicate(timeout=60)
    rig.wait_for(lambda: rig.refresh_requests() > sent, "the provider to process the refresh")
    rig.daemon.kill()
    rig.daemon.start()
    rig.logins_expected = 1


def test_sigterm_waits_for_a_slow_refresh_in_flight(rig: Rig) -> None:
    """Issue 11 item 2: stopping while a refresh is in flight lets it land and saves the rotated token."""
    rig.idp.fault("token", "delay", seconds=SLOW_STOP, grant_type="refresh_token")
    sent = rig.refresh_requests()
    shim = rig.daemon.shim_async(rig.args("--force-refresh"))
    rig.wait_for(lambda: rig.idp.counters()["faults_applied"] > rig.before["faults_applied"],
                 "the refresh to reach the provider")
    assert rig.daemon.stop(signal.SIGTERM, timeout=60) == 0
    shim.communicate(timeout=60)
    # The provider has processed that refresh before the next one can race it.
    rig.wait_for(lambda: rig.refresh_requests() > sent, "the provider to process the refresh", SLOW_STOP + 10)
    rig.daemon.start()
    rig.logins_expected = 0


def test_sigkill_mid_refresh(rig: Rig) -> None:
    """The daemon dies (SIGKILL, power loss) while the provider processes its refresh: after the restart the token
    that may have been spent is not on disk (write-ahead), so the ID token is served and one login follows."""
    rig.idp.fault("token", "delay", seconds=DELAY, grant_type="refresh_token")
    sent = rig.refresh_requests()
    shim = rig.daemon.shim_async(rig.args("--force-refresh"))
    rig.wait_for(lambda: rig.idp.counters()["faults_applied"] > rig.before["faults_applied"],
                 "the refresh to reach the provider")
    rig.daemon.kill()
    shim.communicate(timeout=60)
    rig.wait_for(lambda: rig.refresh_requests() > sent, "the provider to process the refresh")
    rig.daemon.start()
    assert rig.get().returncode == 0  # the ID token is still served after the restart
    rig.logins_expected = 1


def test_sighup_during_a_refresh_in_flight(rig: Rig) -> None:
    """A config reload while a refresh is in flight leaves it alone (SIGHUP changes settings, not the request)."""
    rig.idp.fault("token", "delay", seconds=DELAY, grant_type="refresh_token")
    shim = rig.daemon.shim_async(rig.args("--force-refresh"))
    rig.wait_for(lambda: rig.idp.counters()["faults_applied"] > rig.before["faults_applied"],
                 "the refresh to reach the provider")
    assert rig.daemon.proc is not None
    rig.daemon.proc.send_signal(signal.SIGHUP)
    _, err = shim.communicate(timeout=60)
    assert shim.returncode == 0, err
    rig.logins_expected = 0
