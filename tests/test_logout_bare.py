"""Issue 14 item 4: bare `brokerd logout` ends the only session, asks at a terminal, names the choices otherwise."""

from __future__ import annotations

import json
import os
import pty
import select
import subprocess
import sys
import time

import pytest

from tests.support.daemon import Daemon, login_args
from tests.support.provider import ProviderFactory, TestProvider


@pytest.fixture(scope="module")
def second(provider_factory: ProviderFactory) -> TestProvider:
    return provider_factory()


def _issuers(daemon: Daemon) -> list[str]:
    status = daemon.cli("status", "--json")
    assert status.returncode == 0, status.stderr
    return sorted(s["issuer"] for s in json.loads(status.stdout)["sessions"])


def _login(daemon: Daemon, *providers: TestProvider) -> None:
    for p in providers:
        result = daemon.shim(login_args(p.issuer))
        assert result.returncode == 0, result.stderr + daemon.log()


def test_the_only_session_is_ended(provider: TestProvider, daemon: Daemon) -> None:
    _login(daemon, provider)
    before = provider.counters()
    out = daemon.cli("logout")
    assert out.returncode == 0, out.stderr
    assert f"logged out of {provider.issuer}" in out.stdout
    assert _issuers(daemon) == []
    assert provider.counters()["token_requests"] == before["token_requests"]  # no refresh token: nothing revoked
    assert daemon.cli("logout").stdout.strip() == "no sessions"


def test_several_sessions_without_a_terminal_are_named_not_ended(
        provider: TestProvider, second: TestProvider, daemon: Daemon) -> None:
    _login(daemon, provider, second)
    out = daemon.cli("logout")  # stdin is /dev/null
    assert out.returncode == 2 and out.stdout == ""
    assert "2 sessions; say which to end (or --all)" in out.stderr
    for p in (provider, second):
        assert f"brokerd logout --issuer {p.issuer} --client-id kube_login" in out.stderr
    assert _issuers(daemon) == sorted([provider.issuer, second.issuer])
    assert daemon.cli("logout", "--all").returncode == 0  # --all stays
    assert _issuers(daemon) == []


def test_several_sessions_at_a_terminal_ask_which(provider: TestProvider, second: TestProvider,
                                                  daemon: Daemon) -> None:
    _login(daemon, provider, second)
    master, slave = pty.openpty()
    proc = subprocess.Popen([sys.executable, "-m", "brokerd", "logout"], env=daemon.env, stdin=slave, stdout=slave,
                            stderr=slave, start_new_session=True)
    os.close(slave)
    seen = b""
    try:
        deadline = time.monotonic() + 30
        while b"end which?" not in seen and time.monotonic() < deadline:
            if select.select([master], [], [], 1)[0]:
                seen += os.read(master, 4096)
        assert b"end which? [1-2, all]" in seen, seen
        listed = seen.decode()
        chosen = second if listed.index(second.issuer) < listed.index(provider.issuer) else provider
        os.write(master, b"1\n")
        while time.monotonic() < deadline:
            if select.select([master], [], [], 1)[0]:
                try:
                    chunk = os.read(master, 4096)
                except OSError:  # EIO: the child closed the terminal
                    break
                if not chunk:
                    break
                seen += chunk
        assert proc.wait(timeout=30) == 0, seen
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait(timeout=5)
        os.close(master)
    assert f"logged out of {chosen.issuer}".encode() in seen
    remaining = provider if chosen is second else second
    assert _issuers(daemon) == [remaining.issuer]
