"""`setup`: a real login through the daemon, the report, and each diagnosis triggered by a provider configured to
make that mistake.  Also `clean` and `version` through both entry points (`brokerd`, the shim)."""

from __future__ import annotations

import json
import os
import re
import subprocess
from pathlib import Path

import pytest

from brokerd.flags import FLAGS, SETUP_FLAGS, parse_flags
from brokerd.models import LoginOptions
from brokerd.setup import ApiServerView, api_groups, api_username, kubeconfig_args, redirect_variants
from tests.support.daemon import SHIM, Daemon, login_args
from tests.support.provider import KUBE_LOGIN_CLIENT_SECRET, ProviderFactory, TestProvider


def setup_args(issuer: str, *extra: str, scopes: tuple[str, ...] = ("groups",)) -> list[str]:
    return ["setup", *login_args(issuer, *extra, scopes=scopes)[1:]]


# ---- pure parts ---------------------------------------------------------------------------------------------------

def test_username_and_groups_follow_the_api_server_rules() -> None:
    claims = {"sub": "abc", "email": "a@example.com", "groups": ["admins", "dev"], "role": "ops"}
    issuer = "https://auth.example.com"
    assert api_username(claims, issuer, ApiServerView()) == "https://auth.example.com#abc"
    assert api_username(claims, issuer, ApiServerView(username_claim="email")) == "a@example.com"
    assert api_username(claims, issuer, ApiServerView(username_prefix="-")) == "abc"
    assert api_username(claims, issuer, ApiServerView(username_prefix="oidc:")) == "oidc:abc"
    assert api_username(claims, issuer, ApiServerView(username_claim="upn")) is None
    assert api_groups(claims, ApiServerView()) == ["admins", "dev"]
    assert api_groups(claims, ApiServerView(groups_claim="role", groups_prefix="oidc:")) == ["oidc:ops"]
    assert api_groups(claims, ApiServerView(groups_claim="nope")) == []


def test_kubeconfig_args_drop_one_off_flags_and_never_echo_the_secret() -> None:
    flags = parse_flags(["--oidc-issuer-url", "https://a", "--oidc-client-id=c", "--oidc-client-secret=s3cr3t",
                         "--oidc-extra-scope=groups,email", "--password=pw", "-v", "2", "--force-refresh",
                         "--oidc-username-claim=email", "--oidc-auth-request-extra-params=claims={\"a\":1}",
                         "--skip-open-browser"], {**FLAGS, **SETUP_FLAGS})
    args = kubeconfig_args(flags)
    assert args == ["get-token", "--oidc-issuer-url=https://a", "--oidc-client-id=c",
                    "--oidc-client-secret=YOUR_CLIENT_SECRET", "--oidc-extra-scope=groups",
                    "--oidc-extra-scope=email", "--oidc-auth-request-extra-params=claims={\"a\":1}",
                    "--skip-open-browser"]
    assert not any("s3cr3t" in a or "pw" in a for a in args)


def test_redirect_variants_cover_the_usual_confusions() -> None:
    variants = redirect_variants("http://localhost:8000", LoginOptions())
    assert variants[:3] == ["http://localhost:8000/", "http://127.0.0.1:8000", "http://127.0.0.1:8000/"]
    assert "http://localhost:18000" in variants and len(variants) <= 8


# ---- through the daemon -----------------------------------------------------------------------------------------

def test_setup_reports_what_the_api_server_sees_and_its_commands_work(
        provider: TestProvider, daemon: Daemon, tmp_path: Path) -> None:
    result = daemon.cli(*setup_args(provider.issuer))
    assert result.returncode == 0, result.stderr + daemon.log()
    out = result.stdout
    username = f"{provider.issuer}#{provider.sub('alice')}"
    assert f"username: {username}" in out
    assert "groups:   admins, dev" in out
    assert f'"sub": "{provider.sub("alice")}"' in out  # the decoded claims
    assert "problem (no-groups)" not in out
    assert "problem (no-refresh-token)" in out  # no offline_access asked for
    assert "--exec-command=kubectl" in out and "--exec-arg=oidc-login" in out
    assert f"--exec-arg={SHIM}" in out and "--exec-arg=-I" in out
    assert "brokerd kubeconfig convert --dry-run" in out  # issue 14: setup points kubelogin users at convert
    assert KUBE_LOGIN_CLIENT_SECRET not in out and "YOUR_CLIENT_SECRET" in out
    assert "kind: ClusterRoleBinding" in out and "kind: Group" in out and 'name: "admins"' in out
    assert daemon.browser_openings() == 1

    from tests.support.kube import find_kubectl, run_kubectl, start_apiserver, versioned_kubectl

    if find_kubectl() is None:
        return

    # Run the printed direct-form command as a user would paste it (secret filled in), then use it.
    direct = out.split("Direct form")[1].split("\n\n")[1]
    kubeconfig = tmp_path / "kubeconfig"
    bindir = tmp_path / "bin"
    bindir.mkdir()
    (bindir / "kubectl").symlink_to(versioned_kubectl())
    env = {**os.environ, "KUBECONFIG": str(kubeconfig), "PATH": f"{bindir}:{os.environ['PATH']}"}
    with start_apiserver(provider.issuer) as apiserver:
        script = "\n".join([
            direct.replace("YOUR_CLIENT_SECRET", KUBE_LOGIN_CLIENT_SECRET),
            f"kubectl config set-cluster t --server={apiserver.url} --certificate-authority={apiserver.ca_file} "
            "--embed-certs=true",
            "kubectl config set-context t --cluster=t --user=oidc", "kubectl config use-context t"])
        done = subprocess.run(["bash", "-e", "-c", script], env=env, capture_output=True, text=True, timeout=60)
        assert done.returncode == 0, done.stderr
        who = run_kubectl(["auth", "whoami", "-o", "json"], kubeconfig, env=daemon.env, timeout=60)
        assert who.returncode == 0, who.stderr + daemon.log()
        info = json.loads(who.stdout)["status"]["userInfo"]
        assert info["username"] == username and {"admins", "dev"} <= set(info["groups"])
    assert daemon.browser_openings() == 1  # the session setup made is the one kubectl used


def test_setup_diagnoses_missing_groups_and_refresh_token(provider: TestProvider, daemon: Daemon) -> None:
    result = daemon.cli(*setup_args(provider.issuer, "--oidc-extra-scope=email", scopes=()))
    assert result.returncode == 0, result.stderr
    out = result.stdout
    assert "groups:   (none)" in out
    assert "problem (no-groups)" in out and "--oidc-extra-scope=groups" in out and '"essential":true' in out
    assert "problem (no-refresh-token)" in out and "--oidc-extra-scope=offline_access" in out
    assert "kind: User" in out


def test_setup_diagnoses_a_client_without_the_refresh_token_grant(
        provider_factory: ProviderFactory) -> None:
    p = provider_factory({"default_client": {"grant_types": ["authorization_code"]}})
    with Daemon() as d:
        result = d.cli(*setup_args(p.issuer, "--oidc-extra-scope=offline_access"))
        assert result.returncode == 0, result.stderr + d.log()
    assert "problem (no-refresh-token)" in result.stdout
    assert "refresh_token grant type" in result.stdout
    assert "problem (no-groups)" not in result.stdout


@pytest.mark.parametrize(("registered", "suggested"), [
    ("http://127.0.0.1:8000", "--oidc-redirect-url=http://127.0.0.1:8000"),
    ("http://localhost:8000/", "--oidc-redirect-url=http://localhost:8000/"),
    ("http://localhost:9000", "--oidc-redirect-url=http://localhost:9000 --listen-address=127.0.0.1:9000"),
], ids=["ip-literal", "trailing-slash", "port"])
def test_setup_diagnoses_a_redirect_uri_mismatch_without_opening_a_browser(
        provider_factory: ProviderFactory, registered: str, suggested: str) -> None:
    p = provider_factory({"default_client": {"redirect_uris": [registered]}})
    extra = ("--oidc-redirect-url=http://localhost:9001",) if registered.endswith(":9000") else ()
    with Daemon() as d:
        result = d.cli(*setup_args(p.issuer, *extra))
        assert d.browser_openings() == 0
    assert result.returncode == 1, result.stderr
    assert "problem (redirect-mismatch)" in result.stdout
    if registered.endswith(":9000"):
        # Not among the variants of the URI in use: setup names the port the user asked for and says to register.
        assert "http://localhost:9001" in result.stdout and "register" in result.stdout
    else:
        assert suggested in result.stdout, result.stdout
    assert p.counters()["token_requests"] == 0


@pytest.mark.parametrize("form", ["localhost", "trailing-slash"])
def test_setup_diagnoses_an_issuer_mismatch(provider: TestProvider, daemon: Daemon, form: str) -> None:
    issuer = provider.issuer.replace("127.0.0.1", "localhost") if form == "localhost" else provider.issuer + "/"
    result = daemon.cli(*setup_args(issuer))
    assert result.returncode == 1
    assert "problem (issuer-mismatch)" in result.stdout
    assert f"--oidc-issuer-url={provider.issuer} " in result.stdout
    assert daemon.browser_openings() == 0


# ---- the shim's entry point, clean, version -------------------------------------------------------------------------

def test_setup_clean_and_version_through_the_shim(provider: TestProvider, daemon: Daemon) -> None:
    result = daemon.shim(setup_args(provider.issuer, "--oidc-extra-scope=profile"))
    assert result.returncode == 0, result.stderr
    assert "## Login succeeded" in result.stdout and "Open this URL" in result.stderr

    version = daemon.shim(["version"])
    assert version.returncode == 0
    # Both entry points say it the same way.
    assert re.fullmatch(r"brokerd \S+\n", version.stdout) and version.stdout == daemon.cli("version").stdout

    status = json.loads(daemon.cli("status", "--json").stdout)
    assert len(status["sessions"]) == 1
    cleaned = daemon.shim(["clean"])
    assert cleaned.returncode == 0 and "logged out of 1 session(s)" in cleaned.stdout, cleaned.stderr
    assert json.loads(daemon.cli("status", "--json").stdout)["sessions"] == []


def test_clean_without_a_daemon_empties_the_store(provider: TestProvider, daemon: Daemon) -> None:
    assert daemon.shim(login_args(provider.issuer, "--oidc-extra-scope=email")).returncode == 0
    daemon.stop()
    cleaned = daemon.cli("clean")
    assert cleaned.returncode == 0 and "daemon is not running" in cleaned.stdout
    daemon.start()
    assert json.loads(daemon.cli("status", "--json").stdout)["sessions"] == []
