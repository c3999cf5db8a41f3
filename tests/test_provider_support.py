"""The test provider and both browsers, proven by hand-made OIDC flows (no brokerd involved)."""

from __future__ import annotations

import base64
import hashlib
import http.client
import json
import os
import queue
import secrets
import subprocess
import sys
import threading
import time
import urllib.error
import urllib.parse
import urllib.request
from collections.abc import Iterator
from dataclasses import dataclass
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from typing import Any

import pytest
from joserfc import jwt
from joserfc.jwk import KeySet

from tests.support import browser
from tests.support.provider import ProviderFactory, TestProvider

ROOT = Path(__file__).resolve().parent.parent
CLIENT_ID, CLIENT_SECRET = "brokerd_test", "test secret/with:odd+chars"
ALICE_GROUPS = ["admins", "dev"]


class Callback:
    """A loopback redirect target on 127.0.0.1:PORT (reached as localhost) that records each query."""

    def __init__(self) -> None:
        self.hits: queue.Queue[dict[str, str]] = queue.Queue()
        hits = self.hits

        class Handler(BaseHTTPRequestHandler):
            def do_GET(self) -> None:
                parts = urllib.parse.urlsplit(self.path)
                if parts.path == "/":
                    hits.put(dict(urllib.parse.parse_qsl(parts.query)))
                self.send_response(200 if parts.path == "/" else 404)
                self.send_header("Content-Type", "text/html")
                self.end_headers()
                self.wfile.write(b"<html><body>signed in</body></html>")

            def log_message(self, *args: Any) -> None:
                pass

        self.server = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.port = self.server.server_address[1]
        self.redirect_uri = f"http://localhost:{self.port}"
        self.thread = threading.Thread(target=self.server.serve_forever, daemon=True)
        self.thread.start()

    def next_hit(self, timeout: float = 10.0) -> dict[str, str]:
        return self.hits.get(timeout=timeout)

    def close(self) -> None:
        self.server.shutdown()
        self.server.server_close()


@pytest.fixture(scope="module")
def callback() -> Iterator[Callback]:
    cb = Callback()
    yield cb
    cb.close()


def client_config(redirect_uri: str) -> dict[str, Any]:
    grants = ["authorization_code", "refresh_token", "urn:ietf:params:oauth:grant-type:device_code", "password"]
    return {
        "client_id": CLIENT_ID,
        "client_secret": CLIENT_SECRET,
        "token_endpoint_auth_method": "client_secret_basic",
        "redirect_uris": [redirect_uri],
        "grant_types": grants,
        "response_types": ["code"],
    }


@pytest.fixture(scope="module")
def op(provider_factory: ProviderFactory, callback: Callback) -> TestProvider:
    return provider_factory({"clients": [client_config(callback.redirect_uri)], "id_token_ttl": 300})


@dataclass
class AuthRequest:
    url: str
    verifier: str
    state: str
    nonce: str


def auth_request(
    p: TestProvider,
    redirect_uri: str,
    scope: str = "openid email profile groups offline_access",
    client_id: str = CLIENT_ID,
    **extra: str,
) -> AuthRequest:
    verifier = secrets.token_urlsafe(48)
    challenge = base64.urlsafe_b64encode(hashlib.sha256(verifier.encode()).digest()).rstrip(b"=").decode()
    state, nonce = secrets.token_urlsafe(16), secrets.token_urlsafe(16)
    params = {
        "client_id": client_id,
        "response_type": "code",
        "redirect_uri": redirect_uri,
        "scope": scope,
        "state": state,
        "nonce": nonce,
        "code_challenge": challenge,
        "code_challenge_method": "S256",
        **extra,
    }
    return AuthRequest(f"{p.issuer}/auth?{urllib.parse.urlencode(params)}", verifier, state, nonce)


def basic(client_id: str, secret: str) -> str:
    # RFC 6749 2.3.1: form-urlencode both parts before base64 (Authelia insists).
    raw = f"{urllib.parse.quote(client_id, safe='')}:{urllib.parse.quote(secret, safe='')}"
    return "Basic " + base64.b64encode(raw.encode()).decode()


def token(
    p: TestProvider, data: dict[str, str], client_id: str = CLIENT_ID, secret: str = CLIENT_SECRET, path: str = "/token"
) -> tuple[int, dict[str, Any]]:
    req = urllib.request.Request(p.issuer + path, data=urllib.parse.urlencode(data).encode(), method="POST")
    req.add_header("Authorization", basic(client_id, secret))
    req.add_header("Content-Type", "application/x-www-form-urlencoded")
    try:
        with urllib.request.urlopen(req, timeout=10) as resp:
            body = resp.read()
            return resp.status, json.loads(body) if body else {}
    except urllib.error.HTTPError as exc:
        with exc:  # it holds the connection open until closed
            body = exc.read()
        return exc.code, json.loads(body) if body else {}


def get(url: str) -> tuple[int, bytes, dict[str, str]]:
    parts = urllib.parse.urlsplit(url)
    conn = http.client.HTTPConnection(parts.hostname or "", parts.port, timeout=10)
    try:
        conn.request("GET", parts.path + ("?" + parts.query if parts.query else ""))
        resp = conn.getresponse()
        return resp.status, resp.read(), {k.lower(): v for k, v in resp.getheaders()}
    finally:
        conn.close()


def verify_id_token(p: TestProvider, id_token: str, client_id: str = CLIENT_ID) -> dict[str, Any]:
    status, body, _ = get(p.issuer + "/jwks")
    assert status == 200
    decoded = jwt.decode(id_token, KeySet.import_key_set(json.loads(body)), algorithms=["RS256"])
    claims: dict[str, Any] = decoded.claims
    assert claims["iss"] == p.issuer
    assert claims["aud"] == client_id or client_id in claims["aud"]
    assert claims["exp"] > time.time()
    return claims


def code_login(p: TestProvider, cb: Callback, **extra: str) -> tuple[AuthRequest, dict[str, Any]]:
    req = auth_request(p, cb.redirect_uri, **extra)
    result = browser.login(req.url)
    assert result.callback_status == 200
    hit = cb.next_hit()
    assert hit["state"] == req.state and hit["iss"] == p.issuer
    status, tokens = token(
        p,
        {
            "grant_type": "authorization_code",
            "code": hit["code"],
            "redirect_uri": cb.redirect_uri,
            "code_verifier": req.verifier,
        },
    )
    assert status == 200, tokens
    return req, tokens


def test_code_flow_pkce_claims_and_counters(op: TestProvider, callback: Callback) -> None:
    op.reset()
    req, tokens = code_login(op, callback)
    claims = verify_id_token(op, tokens["id_token"])
    assert claims["nonce"] == req.nonce
    assert claims["sub"] == op.sub("alice") and claims["sub"] != "alice"  # opaque subject, like Authelia
    assert claims["email"] == "alice@example.com" and claims["preferred_username"] == "alice"
    assert "groups" not in claims  # Authelia 4.39: only through the claims parameter
    assert tokens["refresh_token"] and tokens["token_type"].lower() == "bearer"
    c = op.counters()
    assert c["authorization"] == 1 and c["auth_requests"] == 1 and c["logins"] == 1
    assert c["consent_shown"] == 1  # offline_access asks for consent
    assert c["token_grants"]["authorization_code"] == 1
    last = op.last_auth()
    assert last["redirect_uri"] == callback.redirect_uri and last["code_challenge_method"] == "S256"
    assert last["state"] == req.state and "prompt" not in last  # recorded as sent, before any rewriting


def test_groups_only_when_asked_via_claims_parameter(op: TestProvider, callback: Callback) -> None:
    claims_param = json.dumps({"id_token": {"groups": {"essential": True}}})
    _, tokens = code_login(op, callback, claims=claims_param)
    assert verify_id_token(op, tokens["id_token"])["groups"] == ALICE_GROUPS
    assert json.loads(op.last_auth()["claims"]) == {"id_token": {"groups": {"essential": True}}}
    req = urllib.request.Request(op.issuer + "/me", headers={"Authorization": f"Bearer {tokens['access_token']}"})
    with urllib.request.urlopen(req, timeout=10) as resp:
        assert json.loads(resp.read())["groups"] == ALICE_GROUPS


def test_groups_in_id_token_knob(provider_factory: ProviderFactory, callback: Callback) -> None:
    p = provider_factory(
        {"clients": [client_config(callback.redirect_uri)], "groups_in_id_token": True, "two_factor": False}
    )
    _, tokens = code_login(p, callback, scope="openid groups")
    assert verify_id_token(p, tokens["id_token"])["groups"] == ALICE_GROUPS
    assert "refresh_token" not in tokens  # no offline_access, no refresh token
    assert p.counters()["consent_shown"] == 0


def test_refresh_rotation_and_reuse_revokes_grant(op: TestProvider, callback: Callback) -> None:
    _, tokens = code_login(op, callback)
    op.reset()
    first = tokens["refresh_token"]
    status, refreshed = token(op, {"grant_type": "refresh_token", "refresh_token": first})
    assert status == 200 and refreshed["refresh_token"] != first
    verify_id_token(op, refreshed["id_token"])
    status, err = token(op, {"grant_type": "refresh_token", "refresh_token": first})  # replay
    assert status == 400 and err["error"] == "invalid_grant"
    status, err = token(op, {"grant_type": "refresh_token", "refresh_token": refreshed["refresh_token"]})
    assert status == 400 and err["error"] == "invalid_grant"  # the whole chain went with it
    c = op.counters()
    assert c["refresh_reuse_detected"] == 1 and c["token_grants"]["refresh_token"] == 1
    assert c["grants_revoked"] == 1 and c["token_errors"]["invalid_grant"] == 2


def test_kube_login_client_like_authelia(provider: TestProvider) -> None:
    good = auth_request(provider, "http://localhost:8000", client_id="kube_login")
    status, _, headers = get(good.url)
    assert status == 303 and headers["location"].startswith("/interaction/")
    for bad in ("http://localhost:8000/", "http://127.0.0.1:8000", "http://localhost:8001", "http://[::1]:18000"):
        status, body, _ = get(auth_request(provider, bad, client_id="kube_login").url)
        assert status == 400 and b"redirect_uri" in body, bad
    no_pkce = good.url.replace("code_challenge", "x_challenge")
    status, _, headers = get(no_pkce)
    assert status == 303 and "error=invalid_request" in headers["location"]
    short = auth_request(provider, "http://localhost:18000", client_id="kube_login", state="short")
    status, _, headers = get(short.url)
    assert status == 303 and "error=invalid_state" in headers["location"]
    # client_secret_basic only: the same secret in the form body is refused
    req = urllib.request.Request(
        provider.issuer + "/token",
        method="POST",
        data=urllib.parse.urlencode(
            {"grant_type": "client_credentials", "client_id": "kube_login", "client_secret": "insecure_secret"}
        ).encode(),
    )
    with pytest.raises(urllib.error.HTTPError) as info:
        urllib.request.urlopen(req, timeout=10)
    with info.value as err:
        assert err.code == 401 and json.loads(err.read())["error"] == "invalid_client"


def test_faults(op: TestProvider) -> None:
    op.reset()
    op.fault("token", "status", status=503, count=1)
    assert token(op, {"grant_type": "refresh_token", "refresh_token": "x"})[0] == 503
    assert token(op, {"grant_type": "refresh_token", "refresh_token": "x"})[0] == 400  # served normally again
    op.fault("token", "nonstandard_error")
    assert token(op, {"grant_type": "refresh_token", "refresh_token": "x"}) == (400, {"error": "weird"})
    op.fault("token", "status", status=502, count=None, grant_type="refresh_token")
    assert token(op, {"grant_type": "authorization_code", "code": "x", "redirect_uri": "x"})[0] == 400
    assert token(op, {"grant_type": "refresh_token", "refresh_token": "x"})[0] == 502
    assert token(op, {"grant_type": "refresh_token", "refresh_token": "x"})[0] == 502
    op.fault("discovery", "html")
    status, body, headers = get(op.issuer + "/.well-known/openid-configuration")
    assert status == 200 and headers["content-type"].startswith("text/html") and body.startswith(b"<!DOCTYPE")
    op.fault("discovery", "empty_body", count=2)
    assert get(op.issuer + "/.well-known/openid-configuration")[:2] == (200, b"")
    assert get(op.issuer + "/.well-known/openid-configuration")[:2] == (200, b"")
    assert json.loads(get(op.issuer + "/.well-known/openid-configuration")[1])["issuer"] == op.issuer
    op.fault("jwks", "drop", count=None)
    for _ in range(2):
        with pytest.raises((http.client.HTTPException, ConnectionError)):
            get(op.issuer + "/jwks")
    op.clear_faults()
    assert get(op.issuer + "/jwks")[0] == 200
    op.fault("discovery", "delay", seconds=0.5)
    started = time.monotonic()
    assert get(op.issuer + "/.well-known/openid-configuration")[0] == 200
    assert time.monotonic() - started >= 0.45
    c = op.counters()
    assert c["discovery"] == 5 and c["jwks"] == 3 and c["token_requests"] == 6 and c["faults_applied"] == 10


def test_rotate_keys(op: TestProvider, callback: Callback) -> None:
    old = {k["kid"] for k in json.loads(get(op.issuer + "/jwks")[1])["keys"]}
    kept = op.rotate_keys(keep_old=True)
    assert kept["kid"] not in old and old <= set(kept["kids"])
    fresh = op.rotate_keys()
    assert fresh["kids"] == [fresh["kid"]]
    assert [k["kid"] for k in json.loads(get(op.issuer + "/jwks")[1])["keys"]] == [fresh["kid"]]
    _, tokens = code_login(op, callback)  # sessions and clients survive the rotation
    header = json.loads(base64.urlsafe_b64decode(tokens["id_token"].split(".")[0] + "=="))
    assert header["kid"] == fresh["kid"] and header["alg"] == "RS256"


def test_revoke_all(op: TestProvider, callback: Callback) -> None:
    _, tokens = code_login(op, callback)
    assert op.revoke_all("alice") > 0
    status, err = token(op, {"grant_type": "refresh_token", "refresh_token": tokens["refresh_token"]})
    assert status == 400 and err["error"] == "invalid_grant"


def test_revocation_endpoint(op: TestProvider, callback: Callback) -> None:
    _, tokens = code_login(op, callback)
    op.reset()
    status, _ = token(
        op, {"token": tokens["refresh_token"], "token_type_hint": "refresh_token"}, path="/token/revocation"
    )
    assert status == 200 and op.counters()["revocations"] == 1
    assert token(op, {"grant_type": "refresh_token", "refresh_token": tokens["refresh_token"]})[0] == 400


def test_device_flow(op: TestProvider) -> None:
    op.reset()
    status, dev = token(op, {"scope": "openid email"}, path="/device/auth")
    assert status == 200, dev
    status, pending = token(
        op, {"grant_type": "urn:ietf:params:oauth:grant-type:device_code", "device_code": dev["device_code"]}
    )
    assert status == 400 and pending["error"] == "authorization_pending"
    result = browser.login(dev["verification_uri_complete"], user="bob", password="bob-password")
    assert result.callback_status == 200 and "complete" in result.callback_body
    status, tokens = token(
        op, {"grant_type": "urn:ietf:params:oauth:grant-type:device_code", "device_code": dev["device_code"]}
    )
    assert status == 200, tokens
    assert verify_id_token(op, tokens["id_token"])["email"] == "bob@example.com"
    c = op.counters()
    assert c["token_grants"]["device_code"] == 1 and c["device_authorization"] == 1


def test_password_and_client_credentials(provider: TestProvider) -> None:
    provider.reset()
    kube = ("kube_login", "insecure_secret")
    status, tokens = token(
        provider,
        {
            "grant_type": "password",
            "username": "alice",
            "password": "alice-password",
            "scope": "openid email groups offline_access",
        },
        *kube,
    )
    assert status == 200, tokens
    claims = verify_id_token(provider, tokens["id_token"], "kube_login")
    assert claims["sub"] == provider.sub("alice") and "groups" not in claims
    status, refreshed = token(
        provider, {"grant_type": "refresh_token", "refresh_token": tokens["refresh_token"]}, *kube
    )
    assert status == 200 and refreshed["refresh_token"] != tokens["refresh_token"]
    status, err = token(provider, {"grant_type": "password", "username": "alice", "password": "wrong"}, *kube)
    assert status == 400 and err["error"] == "invalid_grant"
    status, cc = token(provider, {"grant_type": "client_credentials"}, *kube)
    assert status == 200 and cc["access_token"] and "id_token" not in cc
    grants = provider.counters()["token_grants"]
    assert grants["password"] == 1 and grants["client_credentials"] == 1 and grants["refresh_token"] == 1


def test_standin_cli_deny_and_log(op: TestProvider, callback: Callback, tmp_path: Path) -> None:
    log = tmp_path / "opened.log"
    req = auth_request(op, callback.redirect_uri)
    env = {**os.environ, "BROKERD_TEST_BROWSER_LOG": str(log), "BROKERD_TEST_BROWSER_DENY": "1"}
    run = subprocess.run(
        [sys.executable, str(ROOT / "tests/support/browser.py"), req.url],
        env=env,
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert run.returncode == 0, run.stderr
    assert "status 200" in run.stdout and "code=" not in run.stdout
    hit = callback.next_hit()
    assert hit["error"] == "access_denied" and hit["state"] == req.state and "code" not in hit
    lines = log.read_text().splitlines()
    assert len(lines) == 1 and lines[0].endswith(f"open {op.issuer}/auth") and "?" not in lines[0]


def test_standin_reports_wrong_password(op: TestProvider, callback: Callback) -> None:
    req = auth_request(op, callback.redirect_uri)
    run = subprocess.run(
        [sys.executable, str(ROOT / "tests/support/browser.py"), "--password", "nope", req.url],
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert run.returncode == 1 and "Incorrect username or password" in run.stderr
    assert callback.hits.empty()


def test_chromium_login(op: TestProvider, callback: Callback, tmp_path: Path) -> None:
    if not Path("/usr/bin/chromium").exists():
        pytest.skip("/usr/bin/chromium is missing (apt-get install -y chromium)")
    req = auth_request(op, callback.redirect_uri, claims=json.dumps({"id_token": {"groups": {"essential": True}}}))
    shot = tmp_path / "final.png"
    run = subprocess.run(
        [sys.executable, str(ROOT / "tests/support/chromium_login.py"), "--screenshot", str(shot), req.url],
        capture_output=True,
        text=True,
        timeout=100,
    )
    assert run.returncode == 0, run.stderr
    assert "status 200" in run.stdout and shot.stat().st_size > 0
    hit = callback.next_hit()
    status, tokens = token(
        op,
        {
            "grant_type": "authorization_code",
            "code": hit["code"],
            "redirect_uri": callback.redirect_uri,
            "code_verifier": req.verifier,
        },
    )
    assert status == 200
    assert verify_id_token(op, tokens["id_token"])["groups"] == ALICE_GROUPS
