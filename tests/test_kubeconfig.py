"""Issue 14 item 2: `brokerd kubeconfig convert|revert` on real kubeconfig files, then real kubectl with the result."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from collections.abc import Iterator, Mapping
from pathlib import Path
from typing import Any

import pytest
from ruamel.yaml import YAML

from tests.support.daemon import SHIM, Daemon
from tests.support.kube import ApiServer, run_kubectl, start_apiserver, versioned_kubectl, write_kubeconfig
from tests.support.provider import TestProvider

KUBECTL = Path("/usr/bin/kubectl")
needs_kubectl = pytest.mark.skipif(not KUBECTL.exists(), reason="kubectl is not installed")
FLAGS = ["--oidc-issuer-url=https://issuer.example", "--oidc-client-id=kube", "--oidc-extra-scope=email",
         "--oidc-extra-scope=groups"]
DIRECT_PREFIX = ["-I", "-S", str(SHIM), "get-token"]

TEAM = """\
# team kubeconfig: these comments must survive
apiVersion: v1
kind: Config
users:
  # kubelogin's own binary, flow-style args, one flag quoted
  - name: bob   # trailing comment
    user:
      exec:
        apiVersion: client.authentication.k8s.io/v1beta1
        command: kubelogin
        args: [get-token, "--oidc-issuer-url=https://issuer.example", --oidc-client-id=kube]
        installHint: |
          pip install brokerd
        provideClusterInfo: true
  - name: carol
    user:
      exec:
        apiVersion: client.authentication.k8s.io/v1beta1
        command: aws
        args: [eks, get-token, --cluster-name, prod]
  - name: dave
    user:
      exec:
        apiVersion: client.authentication.k8s.io/v1
        command: /usr/local/bin/kubectl-oidc_login
        args:
          - get-token
          - --oidc-issuer-url=https://other.example
        interactiveMode: Never
  # defined again in the second file: kubectl takes this first definition
  - name: alice
    user:
      exec:
        apiVersion: client.authentication.k8s.io/v1beta1
        command: kubectl
        args: [oidc-login, get-token, --oidc-issuer-url=https://first.example]
"""


def brokerd(*args: str, env: Mapping[str, str] | None = None) -> subprocess.CompletedProcess[str]:
    full = dict(os.environ)
    full.update(env or {})
    return subprocess.run([sys.executable, "-m", "brokerd", *args], env=full, capture_output=True, text=True,
                          timeout=60, stdin=subprocess.DEVNULL)


def users(path: Path) -> dict[str, dict[str, Any]]:
    doc = YAML(typ="safe").load(path.read_text())
    return {u["name"]: u["user"].get("exec", u["user"]) for u in doc["users"]}


@pytest.fixture
def files(tmp_path: Path) -> tuple[Path, Path]:
    """The team file above, and one that kubectl 1.32 itself wrote (alice again, a kubelogin user, a token)."""
    team = tmp_path / "team.yaml"
    team.write_text(TEAM)
    team.chmod(0o640)
    own = tmp_path / "own"
    kubectl = versioned_kubectl()
    for argv in (["set-credentials", "alice", "--exec-api-version=client.authentication.k8s.io/v1",
                  "--exec-command=kubectl", "--exec-arg=oidc-login", "--exec-arg=get-token",
                  *[f"--exec-arg={f}" for f in FLAGS], "--exec-interactive-mode=IfAvailable", "--exec-env=FOO=bar"],
                 ["set-credentials", "erin", "--exec-api-version=client.authentication.k8s.io/v1beta1",
                  "--exec-command=kubectl", "--exec-arg=oidc-login", "--exec-arg=get-token", *[
                      f"--exec-arg={f}" for f in FLAGS[:2]]],
                 ["set-credentials", "static", "--token=abc"]):
        done = subprocess.run([kubectl, "--kubeconfig", str(own), "config", *argv], capture_output=True, text=True,
                              timeout=30, stdin=subprocess.DEVNULL)
        assert done.returncode == 0, done.stderr
    return team, own


@needs_kubectl
def test_convert_rewrites_kubelogin_users_where_they_are_defined_keeping_the_rest(files: tuple[Path, Path]) -> None:
    team, own = files
    team_before, own_before = team.read_text(), own.read_text()
    env = {"KUBECONFIG": f"{team}{os.pathsep}{own}"}

    dry = brokerd("kubeconfig", "convert", "--dry-run", env=env)
    assert dry.returncode == 0, dry.stderr
    assert f"--- {team} (before)" in dry.stdout and f"+++ {own} (after)" in dry.stdout
    assert team.read_text() == team_before and own.read_text() == own_before  # --dry-run writes nothing
    assert not list(team.parent.glob("*.brokerd.bak"))

    done = brokerd("kubeconfig", "convert", env=env)
    assert done.returncode == 0, done.stderr
    assert done.stdout == dry.stdout  # the diff printed is what was written

    t, o = users(team), users(own)
    assert t["bob"]["command"] == sys.executable
    assert t["bob"]["args"] == [*DIRECT_PREFIX, "--oidc-issuer-url=https://issuer.example", "--oidc-client-id=kube"]
    assert t["bob"]["installHint"] == "pip install brokerd\n" and t["bob"]["provideClusterInfo"] is True
    assert t["dave"]["args"] == [*DIRECT_PREFIX, "--oidc-issuer-url=https://other.example"]
    assert t["dave"]["interactiveMode"] == "Never"
    assert t["alice"]["args"] == [*DIRECT_PREFIX, "--oidc-issuer-url=https://first.example"]
    assert t["carol"] == {"apiVersion": "client.authentication.k8s.io/v1beta1", "command": "aws",
                          "args": ["eks", "get-token", "--cluster-name", "prod"]}  # not kubelogin's: untouched
    # alice in the second file is shadowed by the first file's alice (kubectl's merge rule): left alone.
    assert o["alice"]["command"] == "kubectl" and o["alice"]["args"][:2] == ["oidc-login", "get-token"]
    assert o["erin"]["command"] == sys.executable and o["erin"]["args"] == [*DIRECT_PREFIX, *FLAGS[:2]]
    assert o["static"] == {"token": "abc"}

    text = team.read_text()
    for comment in ("# team kubeconfig: these comments must survive", "# trailing comment",
                    "# defined again in the second file", "# kubelogin's own binary"):
        assert comment in text
    assert '"--oidc-issuer-url=https://issuer.example"' in text  # quoting kept
    # Only command and args changed: every removed line is one of those (block-list args only gain items).
    removed = [line[1:].strip() for line in dry.stdout.splitlines()
               if line.startswith("-") and not line.startswith("---")]
    assert removed and all(line.startswith(("command:", "args:")) or line == "- oidc-login"
                           for line in removed), removed
    assert "clusters: null" in own.read_text()  # kubectl's own spelling survives the round trip

    # Backups hold the old text, private; the files keep their modes.
    assert Path(f"{team}.brokerd.bak").read_text() == team_before
    assert Path(f"{own}.brokerd.bak").read_text() == own_before
    assert Path(f"{team}.brokerd.bak").stat().st_mode & 0o777 == 0o600
    assert team.stat().st_mode & 0o777 == 0o640 and own.stat().st_mode & 0o777 == 0o600

    # Idempotent: nothing more to do, nothing written, no new backup text.
    after = team.read_text(), own.read_text()
    again = brokerd("kubeconfig", "convert", env=env)
    assert again.returncode == 0 and again.stdout == "" and "nothing to do" in again.stderr
    assert (team.read_text(), own.read_text()) == after

    # Revert: back to kubectl's plugin form, flags in order; the foreign user untouched.
    back = brokerd("kubeconfig", "revert", env=env)
    assert back.returncode == 0, back.stderr
    t, o = users(team), users(own)
    assert t["bob"]["command"] == "kubectl"
    assert t["bob"]["args"] == ["oidc-login", "get-token", "--oidc-issuer-url=https://issuer.example",
                                "--oidc-client-id=kube"]
    assert o["erin"]["args"] == ["oidc-login", "get-token", *FLAGS[:2]]
    assert t["carol"]["command"] == "aws"
    assert "# trailing comment" in team.read_text()


@needs_kubectl
def test_user_selection_and_explicit_file(files: tuple[Path, Path]) -> None:
    team, own = files
    done = brokerd("kubeconfig", "convert", "--kubeconfig", str(own), "--user", "erin")
    assert done.returncode == 0, done.stderr
    o = users(own)
    assert o["erin"]["command"] == sys.executable
    assert o["alice"]["command"] == "kubectl"  # not named
    assert users(team)["bob"]["command"] == "kubelogin"  # not in the file given

    missing = brokerd("kubeconfig", "convert", "--kubeconfig", str(own), "--user", "carol", "--user", "nobody")
    assert missing.returncode == 2 and missing.stderr.count("\n") == 1
    assert "nobody" in missing.stderr and "carol" in missing.stderr and "Traceback" not in missing.stderr


def test_bad_yaml_gives_one_line_and_writes_nothing(tmp_path: Path) -> None:
    bad = tmp_path / "config"
    bad.write_text("users: [\n  - name: x\n")
    result = brokerd("kubeconfig", "convert", "--kubeconfig", str(bad))
    assert result.returncode == 2
    assert result.stderr.count("\n") == 1 and str(bad) in result.stderr and "Traceback" not in result.stderr
    assert bad.read_text() == "users: [\n  - name: x\n"


@pytest.fixture(scope="module")
def apiserver(provider: TestProvider) -> Iterator[ApiServer]:
    with start_apiserver(provider.issuer) as server:
        yield server


@needs_kubectl
def test_kubectl_with_the_converted_file_gets_a_token_without_a_new_login(
        tmp_path: Path, provider: TestProvider, apiserver: ApiServer) -> None:
    kubeconfig = write_kubeconfig(tmp_path / "config", apiserver.url, apiserver.ca_file, [
        "oidc-login", "get-token", f"--oidc-issuer-url={provider.issuer}", "--oidc-client-id=kube_login",
        "--oidc-client-secret=insecure_secret", "--oidc-extra-scope=groups"])
    kubectl = versioned_kubectl()
    with Daemon() as daemon:
        first = run_kubectl(["auth", "whoami", "-o", "json"], kubeconfig, env=daemon.env, kubectl=kubectl, timeout=60)
        assert first.returncode == 0, first.stderr + daemon.log()
        before = provider.counters()

        converted = daemon.cli("kubeconfig", "convert", "--kubeconfig", str(kubeconfig))
        assert converted.returncode == 0, converted.stderr
        assert users(kubeconfig)["authelia"]["command"] == sys.executable

        second = run_kubectl(["auth", "whoami", "-o", "json"], kubeconfig, env=daemon.env, kubectl=kubectl)
        assert second.returncode == 0, second.stderr
        assert json.loads(second.stdout)["status"]["userInfo"]["username"] == json.loads(
            first.stdout)["status"]["userInfo"]["username"]
        assert "Open this URL" not in second.stderr
        after = provider.counters()
        assert after["token_requests"] == before["token_requests"]  # same session: no provider traffic
        assert after["auth_requests"] == before["auth_requests"]
        assert daemon.browser_openings() == 1

        reverted = daemon.cli("kubeconfig", "revert", "--kubeconfig", str(kubeconfig))
        assert reverted.returncode == 0, reverted.stderr
        third = run_kubectl(["auth", "whoami", "-o", "json"], kubeconfig, env=daemon.env, kubectl=kubectl)
        assert third.returncode == 0, third.stderr
        assert daemon.browser_openings() == 1


def test_convert_updates_a_direct_form_that_names_another_venv(tmp_path: Path) -> None:
    """After the venv moved, convert points the direct form at the current interpreter and shim, flags kept."""
    config = tmp_path / "config"
    config.write_text(
        "apiVersion: v1\nkind: Config\nusers:\n- name: moved\n  user:\n    exec:\n"
        "      apiVersion: client.authentication.k8s.io/v1beta1\n      command: /old/venv/bin/python\n"
        "      args: [-I, -S, /old/venv/lib/python3.11/site-packages/client_shim/shim.py, get-token,\n"
        "             --oidc-client-id=k]\n")
    done = brokerd("kubeconfig", "convert", "--kubeconfig", str(config))
    assert done.returncode == 0, done.stderr
    moved = users(config)["moved"]
    assert moved["command"] == sys.executable and moved["args"] == [*DIRECT_PREFIX, "--oidc-client-id=k"]
