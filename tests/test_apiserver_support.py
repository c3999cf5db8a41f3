"""The test API server and kubectl helpers, driven by the real kubectl.

A tiny issuer in this module (discovery + JWKS on 127.0.0.1, tokens signed with joserfc) stands in for the
provider; a tiny exec plugin prints whatever token the test put in a file. One API server and one issuer serve
the whole module.
"""

from __future__ import annotations

import hashlib
import json
import os
import ssl
import subprocess
import sys
import threading
import time
import urllib.error
import urllib.request
from collections.abc import Iterator
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from typing import Any

import pytest
from joserfc import jwt
from joserfc.jwk import RSAKey

from tests.support import kube

CLIENT_ID = "kube_login"
STATIC_TOKEN = "static-test-token-0123456789"

PLUGIN_SOURCE = """\
import json, os, sys
info = json.loads(os.environ.get("KUBERNETES_EXEC_INFO") or "{}")
api = info.get("apiVersion", "client.authentication.k8s.io/v1beta1")
with open(os.environ["TEST_PLUGIN_CALLS"], "a") as fh:
    fh.write(json.dumps({"argv": sys.argv[1:], "api": api}) + "\\n")
with open(os.environ["TEST_PLUGIN_TOKEN"]) as fh:
    token = fh.read()
print(json.dumps({"apiVersion": api, "kind": "ExecCredential", "status": {"token": token}}))
"""


class TinyIssuer:
    """Discovery and JWKS over plain HTTP on 127.0.0.1; counts JWKS fetches to observe refetching."""

    def __init__(self) -> None:
        self.keys = [RSAKey.generate_key(2048, parameters={"kid": "k1"}, private=True)]
        self.jwks_fetches = 0
        self._lock = threading.Lock()
        issuer = self

        class Handler(BaseHTTPRequestHandler):
            def do_GET(self) -> None:
                if self.path == "/.well-known/openid-configuration":
                    body: dict[str, Any] = {"issuer": issuer.url, "jwks_uri": issuer.url + "/jwks"}
                elif self.path == "/jwks":
                    with issuer._lock:
                        issuer.jwks_fetches += 1
                        body = {"keys": [k.as_dict(private=False) for k in issuer.keys]}
                else:
                    self.send_error(404)
                    return
                data = json.dumps(body).encode()
                self.send_response(200)
                self.send_header("Content-Type", "application/json")
                self.send_header("Content-Length", str(len(data)))
                self.end_headers()
                self.wfile.write(data)

            def log_message(self, *args: Any) -> None:
                pass

        self._server = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.url = f"http://127.0.0.1:{self._server.server_address[1]}"
        self._thread = threading.Thread(target=self._server.serve_forever, daemon=True)
        self._thread.start()

    def claims(self, **overrides: Any) -> dict[str, Any]:
        now = int(time.time())
        claims: dict[str, Any] = {"iss": self.url, "aud": CLIENT_ID, "sub": "alice", "groups": ["admins", "devs"],
                                  "iat": now, "exp": now + 120}
        claims.update(overrides)
        return {k: v for k, v in claims.items() if v is not None}

    def sign(self, claims: dict[str, Any], key: RSAKey | None = None, kid: str = "k1") -> str:
        return jwt.encode({"alg": "RS256", "kid": kid}, claims, key or self.keys[0])

    def close(self) -> None:
        self._server.shutdown()
        self._server.server_close()
        self._thread.join(timeout=5)


@pytest.fixture(scope="module")
def issuer() -> Iterator[TinyIssuer]:
    iss = TinyIssuer()
    yield iss
    iss.close()


@pytest.fixture(scope="module")
def api(issuer: TinyIssuer, tmp_path_factory: pytest.TempPathFactory) -> Iterator[kube.ApiServer]:
    with kube.start_apiserver(issuer.url, CLIENT_ID, static_token=STATIC_TOKEN, server_version="1.32.0",
                              workdir=tmp_path_factory.mktemp("apiserver")) as server:
        yield server


@pytest.fixture(scope="module")
def plugin(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """The exec plugin, installed as kubectl-oidc_login so `kubectl oidc-login` finds it on PATH too."""
    bindir = tmp_path_factory.mktemp("bin")
    script = bindir / "kubectl-oidc_login"
    script.write_text(f"#!{sys.executable} -IS\n{PLUGIN_SOURCE}")  # one shebang argument
    script.chmod(0o755)
    return script


class PluginRun:
    """Per test: where the plugin reads its token and logs its calls, and the env that tells it so."""

    def __init__(self, tmp_path: Path, plugin: Path) -> None:
        self.token_file = tmp_path / "token"
        self.calls_file = tmp_path / "calls.jsonl"
        self.calls_file.touch()
        # kubectl hands its whole environment to the plugin: no --exec-env needed for these.
        self.env = {"TEST_PLUGIN_TOKEN": str(self.token_file), "TEST_PLUGIN_CALLS": str(self.calls_file),
                    "PATH": f"{plugin.parent}{os.pathsep}{os.environ.get('PATH', '/usr/bin:/bin')}"}

    def set_token(self, token: str) -> str:
        self.token_file.write_text(token)
        return token

    def calls(self) -> list[dict[str, Any]]:
        return [json.loads(line) for line in self.calls_file.read_text().splitlines()]


@pytest.fixture
def run(tmp_path: Path, plugin: Path) -> PluginRun:
    return PluginRun(tmp_path, plugin)


def digest(token: str) -> str:
    return hashlib.sha256(token.encode()).hexdigest()[:12]


def whoami(result: subprocess.CompletedProcess[str]) -> dict[str, Any]:
    assert result.returncode == 0, result.stderr
    info: dict[str, Any] = json.loads(result.stdout)["status"]["userInfo"]
    return info


@kube.needs_kubectl
def test_static_token_kubeconfig_whoami_and_version(api: kube.ApiServer, tmp_path: Path) -> None:
    kc = kube.write_static_token_kubeconfig(tmp_path / "kubeconfig", api.url, api.ca_file, STATIC_TOKEN)
    assert kc.stat().st_mode & 0o777 == 0o600

    info = whoami(kube.run_kubectl(["auth", "whoami", "-o", "json"], kc))
    assert info == {"username": "static", "groups": ["system:authenticated"]}
    version = kube.run_kubectl(["get", "--raw", "/version"], kc)
    assert version.returncode == 0, version.stderr
    assert json.loads(version.stdout)["gitVersion"] == "v1.32.0"

    log = api.log()
    mine = [r for r in log["requests"] if r["token_sha256_prefix"] == digest(STATIC_TOKEN)]
    assert {"/version", "/apis/authentication.k8s.io/v1/selfsubjectreviews"} <= {r["path"] for r in mine}
    assert STATIC_TOKEN not in json.dumps(log)


@pytest.mark.parametrize(("api_version", "interactive_mode"),
                         [(kube.EXEC_V1BETA1, None), (kube.EXEC_V1, "IfAvailable")])
@kube.needs_kubectl
def test_exec_plugin_valid_token(api: kube.ApiServer, issuer: TinyIssuer, run: PluginRun, plugin: Path,
                                 tmp_path: Path, api_version: str, interactive_mode: str | None) -> None:
    kc = kube.write_kubeconfig(tmp_path / "kubeconfig", api.url, api.ca_file, ["--some-flag"],
                               exec_command=str(plugin), api_version=api_version,
                               interactive_mode=interactive_mode)
    token = run.set_token(issuer.sign(issuer.claims()))

    info = whoami(kube.run_kubectl(["auth", "whoami", "-o", "json"], kc, env=run.env))
    assert info["username"] == f"{issuer.url}#alice"
    assert info["groups"] == ["admins", "devs", "system:authenticated"]
    nodes = kube.run_kubectl(["get", "nodes"], kc, env=run.env)
    assert nodes.returncode == 0, nodes.stderr
    assert "No resources found" in nodes.stderr

    calls = run.calls()
    # Server 1.32 is the dispatcher's own version: it runs the command itself, reusing the credential it got for
    # its /version probe, so one plugin run per call (two per call for other server versions).
    assert len(calls) == 2
    assert {c["api"] for c in calls} == {api_version}
    assert all(c["argv"] == ["--some-flag"] for c in calls)
    paths = {r["path"] for r in api.requests() if r["token_sha256_prefix"] == digest(token)}
    assert {"/api/v1/nodes", "/apis/authentication.k8s.io/v1/selfsubjectreviews"} <= paths


@kube.needs_kubectl
def test_missing_groups_claim_means_no_groups(api: kube.ApiServer, issuer: TinyIssuer, run: PluginRun,
                                              plugin: Path, tmp_path: Path) -> None:
    kc = kube.write_kubeconfig(tmp_path / "kubeconfig", api.url, api.ca_file, [], exec_command=str(plugin))
    run.set_token(issuer.sign(issuer.claims(groups=None, sub="bob")))
    info = whoami(kube.run_kubectl(["auth", "whoami", "-o", "json"], kc, env=run.env,
                                   kubectl=kube.versioned_kubectl("1.32")))
    assert info == {"username": f"{issuer.url}#bob", "groups": ["system:authenticated"]}


OTHER_KEY = RSAKey.generate_key(2048, parameters={"kid": "k1"}, private=True)


@pytest.mark.parametrize(("case", "reason"), [
    ("expired", "token expired"),
    ("wrong_aud", "aud does not contain client id"),
    ("wrong_iss", "iss mismatch"),
    ("bad_signature", "bad signature"),
])
@kube.needs_kubectl
def test_exec_plugin_rejected_token(api: kube.ApiServer, issuer: TinyIssuer, run: PluginRun, plugin: Path,
                                    tmp_path: Path, case: str, reason: str) -> None:
    claims = {
        "expired": issuer.claims(exp=int(time.time()) - 1, iat=int(time.time()) - 60),
        "wrong_aud": issuer.claims(aud=["someone-else"]),
        "wrong_iss": issuer.claims(iss=issuer.url + "/"),
        "bad_signature": issuer.claims(),
    }[case]
    token = run.set_token(issuer.sign(claims, key=OTHER_KEY if case == "bad_signature" else None))
    kc = kube.write_kubeconfig(tmp_path / "kubeconfig", api.url, api.ca_file, [], exec_command=str(plugin),
                               api_version=kube.EXEC_V1, interactive_mode="Never")
    before = api.unauthorized()

    result = kube.run_kubectl(["auth", "whoami"], kc, env=run.env, kubectl=kube.versioned_kubectl("1.33"))

    assert result.returncode != 0
    assert "Unauthorized" in result.stderr
    log = api.log()
    assert log["unauthorized"] > before
    assert {f["reason"] for f in log["failures"] if f["token_sha256_prefix"] == digest(token)} == {reason}
    assert not [r for r in log["requests"] if r["token_sha256_prefix"] == digest(token)]


def _post_review(api: kube.ApiServer, token: str | None, path: str = "/apis/authentication.k8s.io/v1/"
                 "selfsubjectreviews") -> tuple[int, dict[str, Any]]:
    headers = {"Authorization": f"Bearer {token}"} if token else {}
    method = "POST" if path.endswith("selfsubjectreviews") else "GET"
    req = urllib.request.Request(api.url + path, data=b"{}" if method == "POST" else None, method=method,
                                 headers=headers)
    ctx = ssl.create_default_context(cafile=str(api.ca_file))
    try:
        with urllib.request.urlopen(req, context=ctx, timeout=5) as resp:
            return resp.status, json.load(resp)
    except urllib.error.HTTPError as exc:
        with exc:
            return exc.code, json.load(exc)


def test_unknown_kid_refetches_jwks_once(api: kube.ApiServer, issuer: TinyIssuer) -> None:
    status, _ = _post_review(api, issuer.sign(issuer.claims()))  # make sure the first JWKS is cached
    assert status == 201
    rotated = RSAKey.generate_key(2048, parameters={"kid": "k2"}, private=True)
    issuer.keys.append(rotated)
    fetches = issuer.jwks_fetches

    status, body = _post_review(api, issuer.sign(issuer.claims(sub="carol"), key=rotated, kid="k2"))
    assert status == 201
    assert body["status"]["userInfo"]["username"] == f"{issuer.url}#carol"
    assert issuer.jwks_fetches == fetches + 1

    status, body = _post_review(api, issuer.sign(issuer.claims(), key=rotated, kid="nope"))
    assert status == 401
    assert issuer.jwks_fetches == fetches + 2


def test_status_bodies_and_anonymous_access(api: kube.ApiServer) -> None:
    status, body = _post_review(api, "not-a-jwt")
    assert status == 401
    assert body == {"kind": "Status", "apiVersion": "v1", "metadata": {}, "status": "Failure",
                    "message": "Unauthorized", "reason": "Unauthorized", "code": 401}
    assert _post_review(api, None, "/version")[0] == 200
    status, body = _post_review(api, None, "/api")
    assert (status, body["reason"]) == (403, "Forbidden")


@kube.needs_kubectl
def test_v1_exec_api_needs_interactive_mode(api: kube.ApiServer, run: PluginRun, plugin: Path,
                                            tmp_path: Path) -> None:
    kc = kube.write_kubeconfig(tmp_path / "kubeconfig", api.url, api.ca_file, [], exec_command=str(plugin),
                               api_version=kube.EXEC_V1)
    result = kube.run_kubectl(["get", "--raw", "/version"], kc, env=run.env,
                              kubectl=kube.versioned_kubectl("1.32"))
    assert result.returncode != 0
    assert "interactiveMode" in result.stderr
    assert run.calls() == []


@kube.needs_kubectl
def test_authelia_guide_kubeconfig_via_kubectl_plugin(api: kube.ApiServer, issuer: TinyIssuer,
                                                      run: PluginRun, tmp_path: Path) -> None:
    args = ["oidc-login", "get-token", f"--oidc-issuer-url={issuer.url}", f"--oidc-client-id={CLIENT_ID}",
            "--oidc-client-secret=insecure_secret", "--oidc-extra-scope=groups"]
    kc = kube.write_kubeconfig(tmp_path / "kubeconfig", api.url, api.ca_file, args,
                               api_version=kube.EXEC_V1, interactive_mode="IfAvailable")
    view = subprocess.run([kube.versioned_kubectl(), "config", "view", "-o", "json", f"--kubeconfig={kc}"],
                          capture_output=True, text=True, check=True, timeout=30)
    exec_cfg = json.loads(view.stdout)["users"][0]["user"]["exec"]
    assert (exec_cfg["command"], exec_cfg["args"], exec_cfg["apiVersion"], exec_cfg["interactiveMode"]) == (
        "kubectl", args, kube.EXEC_V1, "IfAvailable")
    run.set_token(issuer.sign(issuer.claims()))

    info = whoami(kube.run_kubectl(["auth", "whoami", "-o", "json"], kc, env=run.env))
    assert info["username"] == f"{issuer.url}#alice"
    assert {c["api"] for c in run.calls()} == {kube.EXEC_V1}
    assert all(c["argv"] == args[1:] for c in run.calls())


@kube.needs_kubectl
def test_run_kubectl_kills_exec_plugin_recursion(api: kube.ApiServer, tmp_path: Path) -> None:
    # `kubectl oidc-login` with no kubectl-oidc_login on PATH: the dispatcher asks the server for its
    # version, which runs the plugin, which is kubectl again... run_kubectl must stop the chain.
    kc = kube.write_kubeconfig(tmp_path / "kubeconfig", api.url, api.ca_file, ["oidc-login", "get-token"],
                               api_version=kube.EXEC_V1, interactive_mode="Never")
    started = time.monotonic()
    with pytest.raises(kube.ProcessChainError):
        kube.run_kubectl(["get", "--raw", "/version"], kc, env={"PATH": "/usr/bin:/bin"}, max_procs=8,
                         timeout=20)
    assert time.monotonic() - started < 15
