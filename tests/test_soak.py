"""Soak: ten kubectl loops across two sessions with short token lives, about a minute; run with `-m slow`.

Session A asks for offline_access, so the daemon refreshes it ahead of expiry; session B has no refresh token, so
it logs in again (through the browser stand-in) each time its token runs out.  The run ends once a minute has
passed *and* each session has been renewed several times (bounded), so what it proves does not depend on speed:
no kubectl call failed, no request was refused by the API server, and every grant the provider counted is one the
daemon reports having made -- no duplicate refresh, no refresh-token replay, no abandoned login.
"""

from __future__ import annotations

import re
import subprocess
import sys
import threading
import time
from collections import Counter
from collections.abc import Iterator
from pathlib import Path

import pytest

from brokerd.models import ProviderSettings
from tests.support.daemon import SHIM, Daemon, login_args
from tests.support.kube import (
    ApiServer,
    needs_kubectl,
    run_kubectl,
    start_apiserver,
    versioned_kubectl,
    write_kubeconfig,
)
from tests.support.provider import KUBE_LOGIN_CLIENT_SECRET, ProviderFactory, TestProvider

pytestmark = [
    pytest.mark.slow,
    pytest.mark.timeout(420),
    needs_kubectl,
]

LOOPS = 10
MIN_SECONDS = 60.0
MAX_SECONDS = 300.0  # the bound: if the renewals have not all happened by then, the test fails
MIN_RENEWALS = 3
TTL = 20  # seconds: short enough for several renewals a minute, long enough that a loaded machine keeps up
SCOPES_A = ("groups", "offline_access")
SCOPES_B = ("groups", "email")


@pytest.fixture(scope="module")
def short_lived(provider_factory: ProviderFactory) -> TestProvider:
    return provider_factory({"id_token_ttl": TTL, "access_token_ttl": TTL, "refresh_token_ttl": 10 * TTL})


@pytest.fixture(scope="module")
def apiserver(short_lived: TestProvider) -> Iterator[ApiServer]:
    with start_apiserver(short_lived.issuer) as server:
        yield server


def _renewals(log: str, pattern: str) -> Counter[str]:
    return Counter(re.findall(rf"session ([0-9a-f]{{12}}) {pattern}", log))


def test_ten_kubectl_loops_two_sessions(tmp_path: Path, short_lived: TestProvider, apiserver: ApiServer) -> None:
    key_a = ProviderSettings(short_lived.issuer, "kube_login", KUBE_LOGIN_CLIENT_SECRET, SCOPES_A).key.short()
    key_b = ProviderSettings(short_lived.issuer, "kube_login", KUBE_LOGIN_CLIENT_SECRET, SCOPES_B).key.short()
    kubeconfigs = []
    for name, scopes in (("a", SCOPES_A), ("b", SCOPES_B)):
        args = login_args(short_lived.issuer, scopes=scopes)
        kubeconfigs.append(write_kubeconfig(tmp_path / f"kubeconfig-{name}", apiserver.url, apiserver.ca_file,
                                            ["-I", "-S", str(SHIM), *args], exec_command=sys.executable))
    kubectl = versioned_kubectl()
    failures: list[str] = []
    calls = Counter[int]()
    stop = threading.Event()

    with Daemon() as daemon:
        before = short_lived.counters()
        unauthorized_before = apiserver.unauthorized()

        def loop(index: int) -> None:
            kubeconfig = kubeconfigs[index % 2]
            while not stop.is_set():
                try:
                    result = run_kubectl(["get", "nodes"], kubeconfig, env=daemon.env, kubectl=kubectl, timeout=120,
                                         cache_dir=tmp_path / f"cache-{index}")
                except subprocess.TimeoutExpired as exc:
                    failures.append(f"loop {index}: kubectl timed out: {exc.stderr!r}")
                    continue
                calls[index] += 1
                if result.returncode != 0:
                    failures.append(f"loop {index}: exit {result.returncode}: {result.stderr.strip()}")

        threads = [threading.Thread(target=loop, args=(i,), daemon=True) for i in range(LOOPS)]
        started = time.monotonic()
        for t in threads:
            t.start()
        try:
            while True:
                log = daemon.log()
                done = (time.monotonic() - started >= MIN_SECONDS
                        and _renewals(log, "refreshed")[key_a] >= MIN_RENEWALS
                        and _renewals(log, "logged in")[key_b] >= MIN_RENEWALS)
                if done or failures or time.monotonic() - started > MAX_SECONDS:
                    break
                time.sleep(1.0)
        finally:
            stop.set()
            for t in threads:
                t.join(timeout=150)
        assert not any(t.is_alive() for t in threads)
        assert not failures, failures[:5]
        log = daemon.log()
        refreshed, logged_in = _renewals(log, "refreshed"), _renewals(log, "logged in")
        assert refreshed[key_a] >= MIN_RENEWALS and logged_in[key_b] >= MIN_RENEWALS, (
            f"renewals did not happen within {MAX_SECONDS} s: {refreshed} {logged_in}")
        assert all(calls[i] > 0 for i in range(LOOPS)), calls

        after = short_lived.counters()
        grants = {k: after["token_grants"][k] - before["token_grants"][k] for k in after["token_grants"]}
        # Exactly the grants the daemon made: one login for A, then refreshes only; logins only for B.
        assert set(refreshed) <= {key_a} and set(logged_in) <= {key_a, key_b}
        assert logged_in[key_a] == 1
        assert grants["authorization_code"] == logged_in[key_a] + logged_in[key_b]
        assert grants["refresh_token"] == refreshed[key_a]
        assert after["auth_requests"] - before["auth_requests"] == grants["authorization_code"]
        assert daemon.browser_openings() == grants["authorization_code"]
        assert after["refresh_reuse_detected"] == before["refresh_reuse_detected"]
        assert after["token_errors"] == before["token_errors"]
        assert apiserver.unauthorized() == unauthorized_before
        assert "Traceback" not in log
