"""Issue 6: a graceful stop.  SIGTERM during a pending login and during a request in flight."""

from __future__ import annotations

import json
import signal
import time

from tests.support.daemon import Daemon, login_args
from tests.support.provider import TestProvider
from tests.support.wait import wait_until


def test_sigterm_during_a_login_tells_the_waiting_caller(provider: TestProvider) -> None:
    with Daemon() as daemon:
        # A browser that never comes back: the login stays pending.
        stuck = f"{daemon.env['BROWSER']} --no-follow-callback"
        caller = daemon.shim_async(login_args(provider.issuer, "--oidc-extra-scope=address"), env={"BROWSER": stuck})
        assert caller.stderr is not None
        wait_until(lambda: daemon.browser_openings() == 1, lambda: f"the browser to open:\n{daemon.log()}")
        started = time.monotonic()
        assert daemon.stop() == 0
        out, err = caller.communicate(timeout=20)
        assert caller.returncode != 0 and out == ""
        assert "interrupted" in err.splitlines()[-1] and "shutting down" in err
        assert time.monotonic() - started < 15  # it was not left waiting for the 180 s login timeout
        assert not daemon.socket.exists()  # our own socket is removed on the way out
        assert "Traceback" not in daemon.log()


def test_sigterm_lets_a_refresh_in_flight_finish_and_persists_it(provider: TestProvider) -> None:
    args = login_args(provider.issuer, "--oidc-extra-scope=offline_access")
    with Daemon() as daemon:
        first = daemon.shim(args)
        assert first.returncode == 0, first.stderr
        provider.fault("token", "delay", seconds=2, count=1, grant_type="refresh_token")
        before = provider.counters()["token_grants"]["refresh_token"]
        caller = daemon.shim_async([*args, "--force-refresh"])
        wait_until(lambda: provider.counters()["faults_applied"] > 0, "the refresh to reach the provider")
        assert daemon.proc is not None
        daemon.proc.send_signal(signal.SIGTERM)
        out, err = caller.communicate(timeout=30)
        assert daemon.stop() == 0
        assert caller.returncode == 0, err + daemon.log()
        token = json.loads(out)["status"]["token"]
        assert provider.counters()["token_grants"]["refresh_token"] == before + 1
        # The rotated session was saved on the way out: a new daemon serves it without the provider.
        requests = provider.counters()["token_requests"]
        daemon.start()
        again = daemon.shim(args)
        assert again.returncode == 0, again.stderr
        assert json.loads(again.stdout)["status"]["token"] == token
        assert provider.counters()["token_requests"] == requests
        assert provider.counters()["refresh_reuse_detected"] == 0
