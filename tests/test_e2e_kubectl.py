"""Issue 2 end to end: real kubectl -> the shim -> the daemon -> the real provider, through a browser stand-in."""

from __future__ import annotations

import json
import socket
from collections.abc import Iterator
from pathlib import Path

import pytest

from tests.support.daemon import Daemon, login_args, stop_daemons_holding
from tests.support.kube import EXEC_V1, ApiServer, needs_kubectl, run_kubectl, start_apiserver, write_kubeconfig
from tests.support.net import free_port
from tests.support.provider import TestProvider

pytestmark = needs_kubectl


@pytest.fixture(scope="module")
def apiserver(provider: TestProvider) -> Iterator[ApiServer]:
    with start_apiserver(provider.issuer) as server:
        yield server


def _authelia_kubeconfig(path: Path, apiserver: ApiServer, issuer: str, *, v1: bool) -> Path:
    exec_args = ["oidc-login", "get-token", f"--oidc-issuer-url={issuer}", "--oidc-client-id=kube_login",
                 "--oidc-client-secret=insecure_secret", "--oidc-extra-scope=groups"]
    if v1:
        return write_kubeconfig(path, apiserver.url, apiserver.ca_file, exec_args, api_version=EXEC_V1,
                                interactive_mode="IfAvailable")
    return write_kubeconfig(path, apiserver.url, apiserver.ca_file, exec_args)


@pytest.mark.parametrize("v1", [False, True], ids=["v1beta1", "v1-IfAvailable"])
def test_kubectl_whoami_logs_in_once_then_serves_from_cache(
        tmp_path: Path, provider: TestProvider, apiserver: ApiServer, daemon: Daemon, v1: bool) -> None:
    kubeconfig = _authelia_kubeconfig(tmp_path / "kubeconfig", apiserver, provider.issuer, v1=v1)
    before = provider.counters()

    first = run_kubectl(["auth", "whoami", "-o", "json"], kubeconfig, env=daemon.env, timeout=60)
    assert first.returncode == 0, first.stderr + daemon.log()
    review = json.loads(first.stdout)
    user = review["status"]["userInfo"]
    assert user["username"] == f"{provider.issuer}#{provider.sub('alice')}"
    assert {"admins", "dev"} <= set(user["groups"])
    assert "Open this URL to log in: " in first.stderr

    second = run_kubectl(["get", "nodes"], kubeconfig, env=daemon.env, timeout=30)
    assert second.returncode == 0, second.stderr
    assert "Open this URL" not in second.stderr

    after = provider.counters()
    assert after["auth_requests"] - before["auth_requests"] == 1
    assert after["token_grants"]["authorization_code"] - before["token_grants"]["authorization_code"] == 1
    assert after["token_requests"] - before["token_requests"] == 1  # the second call caused no provider traffic
    assert daemon.browser_openings() == 1
    last = provider.last_auth()
    # 8000 unless another program holds it (then 18000, see the fallback test below)
    assert last["redirect_uri"] in ("http://localhost:8000", "http://localhost:18000")
    assert last["code_challenge_method"] == "S256"
    assert len(last["state"]) >= 32 and last["nonce"]
    assert set(last["scope"].split()) == {"openid", "groups"}


def test_shim_prints_only_the_exec_credential(provider: TestProvider, daemon: Daemon) -> None:
    info = json.dumps({"apiVersion": EXEC_V1, "kind": "ExecCredential", "spec": {"interactive": False}})
    result = daemon.shim(login_args(provider.issuer), env={"KUBERNETES_EXEC_INFO": info})
    assert result.returncode == 0, result.stderr
    cred = json.loads(result.stdout)  # stdout is exactly one JSON document
    assert cred["apiVersion"] == EXEC_V1 and cred["kind"] == "ExecCredential"
    token = cred["status"]["token"]
    assert token.count(".") == 2
    assert cred["status"]["expirationTimestamp"].endswith("Z")
    # Without KUBERNETES_EXEC_INFO: v1beta1, the same cached token.
    again = daemon.shim(login_args(provider.issuer))
    assert json.loads(again.stdout)["apiVersion"] == "client.authentication.k8s.io/v1beta1"
    assert json.loads(again.stdout)["status"]["token"] == token
    # The socket is private to the user.
    assert daemon.socket.stat().st_mode & 0o777 == 0o600
    assert daemon.socket.parent.stat().st_mode & 0o777 == 0o700


def test_redirect_falls_back_to_18000_when_8000_is_taken(provider: TestProvider, daemon: Daemon) -> None:
    blockers = []
    for family, host in ((socket.AF_INET, "127.0.0.1"), (socket.AF_INET6, "::1")):
        s = socket.socket(family, socket.SOCK_STREAM)
        # Past a TIME_WAIT left by an earlier login on 8000; a live listener still keeps the daemon off the port.
        s.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        try:
            s.bind((host, 8000))
            s.listen(1)
        except OSError:
            s.close()
            continue
        blockers.append(s)
    assert blockers, "could not occupy port 8000 for the test"
    try:
        result = daemon.shim(login_args(provider.issuer, "--oidc-extra-scope=email"))
    finally:
        for s in blockers:
            s.close()
    assert result.returncode == 0, result.stderr + daemon.log()
    assert provider.last_auth()["redirect_uri"] == "http://localhost:18000"


@pytest.mark.parametrize(
    ("args", "env", "expect"),
    [
        (["--oidc-bogus=1"], {}, "unknown flag --oidc-bogus"),
        (["--authentication-timeout-sec=x"], {}, "expected a whole number"),
    ],
    ids=["unknown-flag", "bad-int"],
)
def test_bad_flags_give_one_clear_line(provider: TestProvider, daemon: Daemon, args: list[str],
                                       env: dict[str, str], expect: str) -> None:
    result = daemon.shim(login_args(provider.issuer, *args), env=env)
    assert result.returncode == 2
    assert result.stdout == ""
    assert result.stderr.count("\n") == 1 and expect in result.stderr
    assert daemon.alive()


def test_unreachable_issuer_denied_login_and_timeout_fail_cleanly(provider: TestProvider, daemon: Daemon) -> None:
    port = free_port()  # nothing listens there
    unreachable = daemon.shim(login_args(f"http://127.0.0.1:{port}"))
    assert unreachable.returncode != 0 and unreachable.stdout == ""
    lines = unreachable.stderr.strip().splitlines()
    assert len(lines) == 1 and f"127.0.0.1:{port}" in lines[0], unreachable.stderr

    deny = f"{daemon.env['BROWSER']} --deny"
    denied = daemon.shim(login_args(provider.issuer, "--oidc-extra-scope=offline_access"), env={"BROWSER": deny})
    assert denied.returncode != 0 and denied.stdout == ""
    assert "access_denied" in denied.stderr.splitlines()[-1]

    stuck = f"{daemon.env['BROWSER']} --no-follow-callback"
    timed_out = daemon.shim(login_args(provider.issuer, "--oidc-extra-scope=email", "--authentication-timeout-sec=2"),
                            env={"BROWSER": stuck})
    assert timed_out.returncode != 0 and timed_out.stdout == ""
    assert "browser" in timed_out.stderr.splitlines()[-1]
    assert "Traceback" not in daemon.log()
    assert daemon.alive()


def test_no_autostart_gives_a_clear_error() -> None:
    d = Daemon()  # never started
    try:
        result = d.shim(["get-token", "--oidc-issuer-url=http://127.0.0.1:1", "--oidc-client-id=x"])
        assert result.returncode == 3
        assert "no daemon is listening" in result.stderr
    finally:
        d.close()


def test_shim_autostarts_the_daemon(provider: TestProvider) -> None:
    d = Daemon()
    env = dict(d.env)
    env.pop("BROKERD_NO_AUTOSTART")
    try:
        result = d.shim(login_args(provider.issuer, "--oidc-extra-scope=profile"),
                        env={"BROKERD_NO_AUTOSTART": ""})
        assert result.returncode == 0, result.stderr
        assert json.loads(result.stdout)["kind"] == "ExecCredential"
        assert d.alive()
        log = (d.state_dir / "brokerd.log").read_text()
        assert "serving on" in log
        assert (d.state_dir / "brokerd.log").stat().st_mode & 0o777 == 0o600
    finally:
        # The autostarted daemon is ours: find it by the lock it holds and stop it by PID.
        d.cli("logout", "--all")
        assert stop_daemons_holding(d.socket.with_name(d.socket.name + ".lock")) == 1
        d.close()
