"""brokerd.oidc against a small scripted provider served over real loopback HTTP from inside the test.

The provider here is deliberately simple and fully controllable: crafted ID tokens (signed with joserfc, or forged
by hand for "none" and HS256-with-the-public-key), a JWKS whose keys the test rotates, and a token endpoint that
answers whatever the test queues.  Behaviour against a real provider is in test_oidc.py.
"""

from __future__ import annotations

import asyncio
import base64
import hashlib
import hmac
import json
import time
from collections.abc import AsyncIterator
from typing import Any
from urllib.parse import parse_qs, unquote_plus, urlsplit

import aiohttp
import pytest
from aiohttp import web
from joserfc import jwt
from joserfc.jwk import ECKey, Key, RSAKey

from brokerd.errors import (
    DiscoveryError,
    InvalidGrant,
    LoginDenied,
    LoginTimeout,
    ProviderError,
    TokenEndpointError,
    TokenValidationError,
    UsageError,
)
from brokerd.models import ProviderSettings, Served, TokenSet
from brokerd.oidc import OIDCClient
from brokerd.oidc_wire import safe_text
from brokerd.registration import ClientRegistration

CLIENT_ID = "kube cli:1"  # a space and a colon: client_secret_basic must form-encode them
SECRET = "s3cr:et/+&=%"


class FakeClock:
    def __init__(self) -> None:
        self.t = time.time()
        self.sleeps: list[float] = []

    def now(self) -> float:
        return self.t

    async def sleep(self, seconds: float) -> None:
        self.sleeps.append(seconds)
        self.t += seconds


def _b64(data: bytes) -> str:
    return base64.urlsafe_b64encode(data).rstrip(b"=").decode()


class FakeOP:
    """Discovery, JWKS, token, device and revocation endpoints on 127.0.0.1, scripted by the test."""

    def __init__(self, spare: dict[str, Key]) -> None:
        self.base = ""
        self.spare = spare  # pre-generated keys: RSA generation is slow
        self.issuer_override: str | None = None
        self.discovery_extra: dict[str, Any] = {}
        self.keys: list[Key] = [spare["k1"]]
        self.discovery_fetches = 0
        self.jwks_fetches = 0
        self.token_replies: list[tuple[int, str, bytes]] = []
        self.requests: list[tuple[str, dict[str, str], dict[str, str]]] = []

    @property
    def issuer(self) -> str:
        return self.base

    def sign(self, claims: dict[str, Any], key: Key | None = None, alg: str = "RS256") -> str:
        key = key or self.keys[0]
        return jwt.encode({"alg": alg, "kid": key.kid}, claims, key, algorithms=[alg])

    def claims(self, **overrides: Any) -> dict[str, Any]:
        now = int(time.time())
        base: dict[str, Any] = {"iss": self.issuer, "aud": CLIENT_ID, "sub": "alice", "iat": now, "exp": now + 600,
                                "nonce": "n0nce", "email": "alice@example.test", "groups": ["dev"], "at_hash": "x"}
        base.update(overrides)
        return {k: v for k, v in base.items() if v is not None}

    def reply(self, status: int, body: Any, content_type: str = "application/json") -> None:
        raw = body if isinstance(body, bytes) else json.dumps(body).encode()
        self.token_replies.append((status, content_type, raw))

    async def _discovery(self, request: web.Request) -> web.Response:
        self.discovery_fetches += 1
        doc = {
            "issuer": self.issuer_override or self.issuer, "authorization_endpoint": self.base + "/auth?tenant=t1",
            "token_endpoint": self.base + "/token", "jwks_uri": self.base + "/jwks",
            "revocation_endpoint": self.base + "/revoke", "device_authorization_endpoint": self.base + "/device",
            "id_token_signing_alg_values_supported": ["RS256", "ES256", "HS256", "none"],
            "claims_parameter_supported": True, "code_challenge_methods_supported": ["S256"],
        }
        doc.update(self.discovery_extra)
        return web.json_response({k: v for k, v in doc.items() if v is not None})

    async def _jwks(self, request: web.Request) -> web.Response:
        self.jwks_fetches += 1
        return web.json_response({"keys": [k.as_dict(private=False) for k in self.keys]})

    async def _record(self, request: web.Request) -> web.Response:
        form = {k: v for k, v in (await request.post()).items() if isinstance(v, str)}
        self.requests.append((request.path, dict(request.headers), form))
        status, ctype, body = self.token_replies.pop(0) if self.token_replies else (500, "text/plain", b"no reply")
        return web.Response(status=status, body=body, headers={"Content-Type": ctype} if ctype else {})

    async def start(self) -> web.AppRunner:
        app = web.Application()
        app.router.add_get("/.well-known/openid-configuration", self._discovery)
        app.router.add_get("/jwks", self._jwks)
        for path in ("/token", "/device", "/revoke"):
            app.router.add_post(path, self._record)
        runner = web.AppRunner(app)
        await runner.setup()
        site = web.TCPSite(runner, "127.0.0.1", 0)
        await site.start()
        port = runner.addresses[0][1]
        self.base = f"http://127.0.0.1:{port}"
        return runner


@pytest.fixture(scope="module")
def spare_keys() -> dict[str, Key]:
    keys: dict[str, Key] = {name: RSAKey.generate_key(2048, parameters={"kid": kid})
                            for name, kid in (("k1", "k1"), ("k2", "k2"), ("impostor", "k1"), ("stranger", "nobody"))}
    keys["ec1"] = ECKey.generate_key("P-256", parameters={"kid": "ec1"})
    return keys


@pytest.fixture
async def op(spare_keys: dict[str, Key]) -> AsyncIterator[FakeOP]:
    fake = FakeOP(spare_keys)
    runner = await fake.start()
    try:
        yield fake
    finally:
        await runner.cleanup()


@pytest.fixture
def clock() -> FakeClock:
    return FakeClock()


@pytest.fixture
async def client(clock: FakeClock) -> AsyncIterator[OIDCClient]:
    async with aiohttp.ClientSession() as http:
        yield OIDCClient(http, clock, request_timeout=5)


def settings(op: FakeOP, **kw: Any) -> ProviderSettings:
    return ProviderSettings(issuer=op.issuer, client_id=CLIENT_ID, client_secret=kw.pop("client_secret", SECRET),
                            **kw)


# ---- ID token verification --------------------------------------------------------------------------------------

async def test_valid_token_is_accepted(op: FakeOP, client: OIDCClient) -> None:
    claims = await client.verify_id_token(settings(op), op.sign(op.claims()), nonce="n0nce")
    assert claims["sub"] == "alice"
    assert op.jwks_fetches == 1
    await client.verify_id_token(settings(op), op.sign(op.claims()), nonce=None)
    assert op.jwks_fetches == 1, "JWKS must be cached"


async def test_es256_is_accepted_when_advertised(op: FakeOP, client: OIDCClient) -> None:
    op.keys.append(op.spare["ec1"])
    token = op.sign(op.claims(), key=op.keys[1], alg="ES256")
    assert (await client.verify_id_token(settings(op), token, nonce="n0nce"))["sub"] == "alice"


async def test_alg_not_advertised_is_rejected(op: FakeOP, client: OIDCClient) -> None:
    op.discovery_extra["id_token_signing_alg_values_supported"] = ["RS256"]
    op.keys.append(op.spare["ec1"])
    token = op.sign(op.claims(), key=op.keys[1], alg="ES256")
    with pytest.raises(TokenValidationError, match="ES256"):
        await client.verify_id_token(settings(op), token, nonce=None)


async def test_bad_signature_is_rejected(op: FakeOP, client: OIDCClient) -> None:
    impostor = op.spare["impostor"]
    with pytest.raises(TokenValidationError, match="signature"):
        await client.verify_id_token(settings(op), op.sign(op.claims(), key=impostor), nonce=None)
    # A payload swapped under a genuine signature fails too.
    head, _, sig = op.sign(op.claims()).split(".")
    forged = ".".join([head, _b64(json.dumps(op.claims(sub="mallory")).encode()), sig])
    with pytest.raises(TokenValidationError, match="signature"):
        await client.verify_id_token(settings(op), forged, nonce=None)


async def test_alg_none_is_rejected(op: FakeOP, client: OIDCClient) -> None:
    token = ".".join([_b64(b'{"alg":"none","kid":"k1"}'), _b64(json.dumps(op.claims()).encode()), ""])
    with pytest.raises(TokenValidationError, match="'none'"):
        await client.verify_id_token(settings(op), token, nonce=None)


async def test_hs256_signed_with_public_key_is_rejected(op: FakeOP, client: OIDCClient) -> None:
    """The classic key-confusion forgery: HMAC keyed with the published RSA key.  Discovery even lists HS256."""
    rsa = op.keys[0]
    assert isinstance(rsa, RSAKey)
    for public in (rsa.as_pem(private=False), json.dumps(op.keys[0].as_dict(private=False)).encode()):
        signing_input = _b64(b'{"alg":"HS256","kid":"k1"}') + "." + _b64(json.dumps(op.claims()).encode())
        mac = hmac.new(public, signing_input.encode(), hashlib.sha256).digest()
        with pytest.raises(TokenValidationError, match="HS256"):
            await client.verify_id_token(settings(op), signing_input + "." + _b64(mac), nonce=None)


async def test_unknown_kid_refetches_once_then_fails_and_is_rate_limited(
        op: FakeOP, client: OIDCClient, clock: FakeClock) -> None:
    await client.verify_id_token(settings(op), op.sign(op.claims()), nonce=None)
    assert op.jwks_fetches == 1
    stranger = op.spare["stranger"]
    token = op.sign(op.claims(), key=stranger)
    with pytest.raises(TokenValidationError, match="key the provider does not publish"):
        await client.verify_id_token(settings(op), token, nonce=None)
    assert op.jwks_fetches == 2, "exactly one refetch for an unknown kid"
    with pytest.raises(TokenValidationError):
        await client.verify_id_token(settings(op), token, nonce=None)
    assert op.jwks_fetches == 2, "a second unknown kid within the rate limit must not refetch"
    clock.t += 61
    with pytest.raises(TokenValidationError):
        await client.verify_id_token(settings(op), op.sign(op.claims(), key=stranger), nonce=None)
    assert op.jwks_fetches == 3


async def test_rotated_kid_refetches_once_then_verifies(op: FakeOP, client: OIDCClient) -> None:
    await client.verify_id_token(settings(op), op.sign(op.claims()), nonce=None)
    op.keys = [op.spare["k2"]]
    claims = await client.verify_id_token(settings(op), op.sign(op.claims()), nonce=None)
    assert claims["sub"] == "alice"
    assert op.jwks_fetches == 2


@pytest.mark.parametrize(("overrides", "nonce", "match"), [
    ({"iss": "https://evil.test"}, None, "issuer"),
    ({"aud": "someone-else"}, None, "audience"),
    ({"aud": ["someone-else", "other"]}, None, "audience"),
    ({"aud": [CLIENT_ID, "other"]}, None, "azp"),
    ({"aud": [CLIENT_ID, "other"], "azp": "other"}, None, "azp"),
    ({"exp": ("now", -1)}, None, "expired"),
    ({"exp": None}, None, "'exp'"),
    ({"exp": "soon"}, None, "not a number"),
    ({"nbf": ("now", 120)}, None, "nbf"),
    ({"iat": ("now", 120)}, None, "iat"),
    ({}, "other-nonce", "nonce"),
    ({"nonce": None}, "n0nce", "nonce"),
    ({"sub": None}, None, "'sub'"),
    ({"sub": ""}, None, "'sub'"),
])
async def test_claim_rules_reject(op: FakeOP, client: OIDCClient, overrides: dict[str, Any], nonce: str | None,
                                  match: str) -> None:
    # ("now", delta) is resolved here, not at collection: a long suite run would otherwise age these claims.
    now = int(time.time())
    resolved = {k: now + v[1] if isinstance(v, tuple) and v[0] == "now" else v for k, v in overrides.items()}
    token = op.sign(op.claims(**resolved))
    with pytest.raises(TokenValidationError, match=match) as info:
        await client.verify_id_token(settings(op), token, nonce=nonce)
    assert token not in str(info.value)


async def test_small_skew_is_allowed_for_nbf_and_iat_only(op: FakeOP, client: OIDCClient) -> None:
    now = int(time.time())
    ok = op.sign(op.claims(nbf=now + 20, iat=now + 20, aud=[CLIENT_ID, "x"], azp=CLIENT_ID))
    assert (await client.verify_id_token(settings(op), ok, nonce=None))["sub"] == "alice"


@pytest.mark.parametrize("token", ["", "abc", "a.b", "a.b.c", "e30.e30.e30.e30.e30", "x" * 70000])
async def test_garbage_tokens_are_rejected(op: FakeOP, client: OIDCClient, token: str) -> None:
    with pytest.raises(TokenValidationError):
        await client.verify_id_token(settings(op), token, nonce=None)


# ---- discovery ------------------------------------------------------------------------------------------------

async def test_discovery_issuer_mismatch_names_both(op: FakeOP, client: OIDCClient) -> None:
    op.issuer_override = "https://elsewhere.test"
    with pytest.raises(DiscoveryError) as info:
        await client.metadata(op.issuer)
    assert op.issuer in str(info.value) and "https://elsewhere.test" in str(info.value)


async def test_discovery_trailing_slash_must_match_exactly(op: FakeOP, client: OIDCClient) -> None:
    with pytest.raises(DiscoveryError):
        await client.metadata(op.issuer + "/")


async def test_discovery_is_cached_with_ttl(op: FakeOP, client: OIDCClient, clock: FakeClock) -> None:
    meta = await client.metadata(op.issuer)
    assert meta.token_endpoint == op.base + "/token" and meta.claims_parameter_supported
    await client.metadata(op.issuer)
    assert op.discovery_fetches == 1
    clock.t += 3601
    await client.metadata(op.issuer)
    assert op.discovery_fetches == 2


async def test_discovery_without_required_endpoint(op: FakeOP, client: OIDCClient) -> None:
    op.discovery_extra["jwks_uri"] = None
    with pytest.raises(DiscoveryError, match="jwks_uri"):
        await client.metadata(op.issuer)


async def test_unreachable_provider_is_one_line_provider_error(clock: FakeClock) -> None:
    # Bind and close a port so that nothing listens there.
    probe = web.AppRunner(web.Application())
    await probe.setup()
    site = web.TCPSite(probe, "127.0.0.1", 0)
    await site.start()
    port = probe.addresses[0][1]
    await probe.cleanup()
    async with aiohttp.ClientSession() as http:
        with pytest.raises(ProviderError) as info:
            await OIDCClient(http, clock).metadata(f"http://127.0.0.1:{port}/realms/x")
    assert str(info.value) == f"cannot reach http://127.0.0.1:{port}: connection refused"


async def test_slow_provider_times_out(clock: FakeClock) -> None:
    release = asyncio.Event()

    async def slow(request: web.Request) -> web.Response:
        await asyncio.wait_for(release.wait(), 10)
        return web.Response()

    app = web.Application()
    app.router.add_get("/.well-known/openid-configuration", slow)
    runner = web.AppRunner(app)
    await runner.setup()
    await web.TCPSite(runner, "127.0.0.1", 0).start()
    base = f"http://127.0.0.1:{runner.addresses[0][1]}"
    try:
        async with aiohttp.ClientSession() as http:
            with pytest.raises(ProviderError, match=r"^cannot reach .*: no answer within 0.3 s$"):
                await OIDCClient(http, clock, request_timeout=0.3).metadata(base)
    finally:
        release.set()
        await runner.cleanup()


# ---- authorization request ------------------------------------------------------------------------------------

async def test_authorization_request_parameters(op: FakeOP, client: OIDCClient) -> None:
    s = settings(op, scopes=("groups", "email"), extra_params=(("prompt", "login"),))
    auth = await client.authorization_request(s, "http://127.0.0.1:8000", extra_params={"ui_locales": "de"},
                                              login_hint="alice")
    parts = urlsplit(auth.url)
    q = {k: v[0] for k, v in parse_qs(parts.query).items()}
    assert parts.path == "/auth" and q["tenant"] == "t1"
    assert q["response_type"] == "code" and q["client_id"] == CLIENT_ID
    assert q["redirect_uri"] == "http://127.0.0.1:8000" == auth.redirect_uri
    assert q["scope"] == "email groups openid"
    assert q["state"] == auth.state and len(auth.state) == 43
    assert q["nonce"] == auth.nonce and len(auth.nonce) >= 32 and auth.nonce != auth.state
    assert auth.code_verifier is not None
    expected = _b64(hashlib.sha256(auth.code_verifier.encode()).digest())
    assert q["code_challenge"] == expected and q["code_challenge_method"] == "S256"
    assert json.loads(q["claims"]) == {"id_token": {"groups": {"essential": True}}}
    assert q["prompt"] == "login" and q["ui_locales"] == "de" and q["login_hint"] == "alice"
    assert auth.code_verifier not in repr(auth) and auth.state not in repr(auth)
    other = await client.authorization_request(s, "http://127.0.0.1:8000")
    assert other.state != auth.state and other.code_verifier != auth.code_verifier


@pytest.mark.parametrize(("method", "pkce"), [("auto", True), ("S256", True), ("no", False)])
async def test_pkce_method(op: FakeOP, client: OIDCClient, method: str, pkce: bool) -> None:
    auth = await client.authorization_request(settings(op), "http://127.0.0.1:8000/cb", pkce_method=method)
    assert ("code_challenge_method=S256" in auth.url) is pkce
    assert (auth.code_verifier is not None) is pkce
    assert "claims=" not in auth.url  # no groups scope, no claims request


async def test_authorization_request_rejects_bad_input(op: FakeOP, client: OIDCClient) -> None:
    with pytest.raises(UsageError, match="plain"):
        await client.authorization_request(settings(op), "http://127.0.0.1:8000", pkce_method="plain")
    with pytest.raises(UsageError, match="state"):
        await client.authorization_request(settings(op, extra_params=(("state", "x"),)), "http://127.0.0.1:8000")


# ---- token endpoint -------------------------------------------------------------------------------------------

async def _auth(client: OIDCClient, op: FakeOP) -> Any:
    return await client.authorization_request(settings(op), "http://127.0.0.1:8000")


async def test_exchange_code_sends_basic_auth_and_verifies_nonce(op: FakeOP, client: OIDCClient) -> None:
    auth = await _auth(client, op)
    op.reply(200, {"access_token": "at-1", "token_type": "Bearer", "expires_in": 300, "refresh_token": "rt-1",
                   "id_token": op.sign(op.claims(nonce=auth.nonce))})
    tokens = await client.exchange_code(settings(op), auth, "the-code")
    path, headers, form = op.requests[-1]
    assert path == "/token" and headers["Accept"] == "application/json"
    assert form == {"grant_type": "authorization_code", "code": "the-code", "redirect_uri": "http://127.0.0.1:8000",
                    "code_verifier": auth.code_verifier}
    scheme, _, value = headers["Authorization"].partition(" ")
    user, _, password = base64.b64decode(value).decode().partition(":")
    assert scheme == "Basic" and ":" not in user and " " not in user
    assert (unquote_plus(user), unquote_plus(password)) == (CLIENT_ID, SECRET)
    assert tokens.access_token == "at-1" and tokens.refresh_token == "rt-1"
    assert tokens.claims["sub"] == "alice" and "at_hash" not in tokens.claims and "nonce" not in tokens.claims
    assert tokens.expires_at == tokens.claims["exp"]


async def test_exchange_code_rejects_wrong_nonce_and_wrong_callback_iss(op: FakeOP, client: OIDCClient) -> None:
    auth = await _auth(client, op)
    op.reply(200, {"access_token": "at", "id_token": op.sign(op.claims(nonce="replayed"))})
    with pytest.raises(TokenValidationError, match="nonce"):
        await client.exchange_code(settings(op), auth, "c")
    with pytest.raises(TokenValidationError, match="issuer"):
        await client.exchange_code(settings(op), auth, "c", iss="https://evil.test")
    assert len(op.requests) == 1, "a mixed-up callback must not reach the token endpoint"


async def test_public_client_sends_id_in_body(op: FakeOP, client: OIDCClient) -> None:
    op.reply(200, {"access_token": "at", "id_token": op.sign(op.claims())})
    await client.password_grant(settings(op, client_secret=None), "alice", "pw")
    _, headers, form = op.requests[-1]
    assert "Authorization" not in headers
    assert form == {"grant_type": "password", "username": "alice", "password": "pw", "scope": "openid",
                    "client_id": CLIENT_ID}


@pytest.mark.parametrize(("status", "ctype", "body", "error", "words"), [
    (500, "text/html", b"<html><body>Internal Server Error " + b"x" * 5000 + b"</body></html>", None,
     "HTTP 500 with a body that is not JSON (text/html)"),
    (502, "", b"", None, "HTTP 502 with an empty body"),
    (400, "application/json", b'{"error":"weird","error_description":"odd"}', "weird", "non-standard error 'weird'"),
    (401, "application/json", b'{"error":"invalid_client"}', "invalid_client", "invalid_client"),
    (200, "application/json", b'["not", "a", "dict"]', None, "HTTP 200 with JSON that is neither"),
])
async def test_token_endpoint_errors(op: FakeOP, client: OIDCClient, status: int, ctype: str, body: bytes,
                                     error: str | None, words: str) -> None:
    op.reply(status, body, ctype)
    with pytest.raises(TokenEndpointError) as info:
        await client.exchange_code(settings(op), await _auth(client, op), "c")
    exc = info.value
    assert type(exc) is TokenEndpointError
    assert exc.status == status and exc.error == error and words in str(exc)
    assert len(str(exc)) < 300 and "\n" not in str(exc)
    assert exc.description is None or len(exc.description) <= 200


async def test_invalid_grant_and_redaction(op: FakeOP, client: OIDCClient) -> None:
    rt = "rt-" + "Q" * 60
    op.reply(400, {"error": "invalid_grant", "error_description": f"refresh token {rt} was already used"})
    tokens = TokenSet(id_token="", expires_at=0, issued_at=0, refresh_token=rt)
    with pytest.raises(InvalidGrant) as info:
        await client.refresh(settings(op), tokens)
    assert info.value.error == "invalid_grant" and info.value.status == 400
    assert rt not in str(info.value) and rt not in (info.value.description or "")
    assert SECRET not in str(info.value)
    assert op.requests[-1][2] == {"grant_type": "refresh_token", "refresh_token": rt}


def test_safe_text() -> None:
    assert safe_text("a\nb\x00c  d") == "a b c d"
    assert safe_text("x" * 500, 10) == "[...]"
    assert safe_text("short words stay") == "short words stay"


# ---- refresh ----------------------------------------------------------------------------------------------------

async def _initial(op: FakeOP, client: OIDCClient, **claims: Any) -> TokenSet:
    op.reply(200, {"access_token": "at-0", "refresh_token": "rt-0", "id_token": op.sign(op.claims(**claims))})
    return await client.password_grant(settings(op), "alice", "pw")


async def test_refresh_rotates_and_verifies(op: FakeOP, client: OIDCClient) -> None:
    old = await _initial(op, client)
    op.reply(200, {"access_token": "at-1", "refresh_token": "rt-1", "id_token": op.sign(op.claims(nonce=None))})
    new = await client.refresh(settings(op), old)
    assert new.refresh_token == "rt-1" and new.access_token == "at-1" and new.id_token != old.id_token


async def test_refresh_keeps_old_refresh_token_when_none_returned(op: FakeOP, client: OIDCClient) -> None:
    old = await _initial(op, client)
    op.reply(200, {"access_token": "at-1", "id_token": op.sign(op.claims())})
    assert (await client.refresh(settings(op), old)).refresh_token == "rt-0"


async def test_refresh_without_id_token_keeps_valid_old_one(op: FakeOP, client: OIDCClient,
                                                           clock: FakeClock) -> None:
    old = await _initial(op, client)
    op.reply(200, {"access_token": "at-1", "refresh_token": "rt-1"})
    new = await client.refresh(settings(op), old)
    assert new.id_token == old.id_token and new.expires_at == old.expires_at and new.refresh_token == "rt-1"
    clock.t = old.expires_at + 1
    op.reply(200, {"access_token": "at-2", "refresh_token": "rt-2"})
    with pytest.raises(InvalidGrant) as info:
        await client.refresh(settings(op), new)
    assert info.value.error == "no_id_token"


async def test_refresh_with_other_subject_is_rejected(op: FakeOP, client: OIDCClient) -> None:
    old = await _initial(op, client)
    op.reply(200, {"access_token": "at-1", "id_token": op.sign(op.claims(sub="bob"))})
    with pytest.raises(TokenValidationError, match="'sub'"):
        await client.refresh(settings(op), old)


async def test_refresh_without_refresh_token(op: FakeOP, client: OIDCClient) -> None:
    with pytest.raises(InvalidGrant):
        await client.refresh(settings(op), TokenSet(id_token="x", expires_at=0, issued_at=0))
    assert op.requests == []


# ---- other grants -------------------------------------------------------------------------------------------------

async def test_client_credentials_without_id_token(op: FakeOP, client: OIDCClient, clock: FakeClock) -> None:
    op.reply(200, {"access_token": "cc-at", "token_type": "Bearer", "expires_in": 120})
    tokens = await client.client_credentials(settings(op, scopes=("api", "offline_access")))
    assert tokens.id_token == "" and Served(False).token(tokens) == "" and Served(True).token(tokens) == "cc-at"
    assert tokens.expires_at == pytest.approx(clock.t + 120)
    assert op.requests[-1][2] == {"grant_type": "client_credentials", "scope": "api"}


async def test_code_grant_without_id_token_is_an_error(op: FakeOP, client: OIDCClient) -> None:
    op.reply(200, {"access_token": "at"})
    with pytest.raises(ProviderError, match="no id_token"):
        await client.exchange_code(settings(op), await _auth(client, op), "c")


async def test_revoke(op: FakeOP, client: OIDCClient) -> None:
    op.reply(200, b"", "")
    assert await client.revoke(settings(op), "rt-x") is True
    path, headers, form = op.requests[-1]
    assert path == "/revoke" and form == {"token": "rt-x", "token_type_hint": "refresh_token"}
    assert headers["Authorization"].startswith("Basic ")
    op.reply(400, {"error": "unsupported_token_type"})
    with pytest.raises(TokenEndpointError, match="unsupported_token_type"):
        await client.revoke(settings(op), "rt-x")


async def test_revoke_without_endpoint(op: FakeOP, client: OIDCClient) -> None:
    op.discovery_extra["revocation_endpoint"] = None
    assert await client.revoke(settings(op), "rt-x") is False
    assert op.requests == []


async def _device(op: FakeOP, client: OIDCClient, interval: int = 2, expires_in: int = 60) -> Any:
    op.reply(200, {"device_code": "dc", "user_code": "ABCD-EFGH", "verification_uri": op.base + "/activate",
                   "expires_in": expires_in, "interval": interval})
    return await client.start_device_authorization(settings(op))


async def test_device_flow_honours_pending_and_slow_down(op: FakeOP, client: OIDCClient,
                                                         clock: FakeClock) -> None:
    device = await _device(op, client)
    _, _, form = op.requests[-1]
    assert form["scope"] == "openid" and form["code_challenge_method"] == "S256"
    assert device.user_code == "ABCD-EFGH" and device.verification_uri_complete is None
    op.reply(400, {"error": "authorization_pending"})
    op.reply(400, {"error": "slow_down"})
    op.reply(400, {"error": "authorization_pending"})
    op.reply(200, {"access_token": "at", "id_token": op.sign(op.claims())})
    tokens = await client.poll_device_token(settings(op), device)
    assert tokens.claims["sub"] == "alice"
    assert clock.sleeps == [2, 2, 7, 7]
    last = op.requests[-1][2]
    assert last["grant_type"] == "urn:ietf:params:oauth:grant-type:device_code" and last["device_code"] == "dc"
    assert last["code_verifier"] == device.code_verifier


@pytest.mark.parametrize(("error", "exc"), [("access_denied", LoginDenied), ("expired_token", LoginTimeout),
                                            ("invalid_grant", InvalidGrant)])
async def test_device_flow_errors(op: FakeOP, client: OIDCClient, error: str, exc: type[Exception]) -> None:
    device = await _device(op, client)
    op.reply(400, {"error": error})
    with pytest.raises(exc):
        await client.poll_device_token(settings(op), device)


async def test_device_flow_gives_up_at_expiry(op: FakeOP, client: OIDCClient) -> None:
    device = await _device(op, client, interval=5, expires_in=20)
    for _ in range(10):
        op.reply(400, {"error": "authorization_pending"})
    with pytest.raises(LoginTimeout):
        await client.poll_device_token(settings(op), device)
    assert len(op.requests) - 1 == 3  # polls at +5, +10, +15; at +20 the code is dead


async def test_an_endpoint_with_its_own_auth_methods_gets_one_it_advertises(op: FakeOP, client: OIDCClient) -> None:
    """Discovery may list methods per endpoint (revocation_endpoint_auth_methods_supported): with no method
    configured, brokerd uses one that endpoint offers; a configured method is used everywhere as given."""
    op.discovery_extra.update(token_endpoint_auth_methods_supported=["client_secret_post"],
                              revocation_endpoint_auth_methods_supported=["client_secret_basic"])
    op.reply(200, b"", "")
    assert await client.revoke(settings(op), "rt-x") is True
    _, headers, form = op.requests[-1]
    assert headers["Authorization"].startswith("Basic ") and "client_secret" not in form
    op.reply(200, {"access_token": "at", "token_type": "Bearer", "expires_in": 60})
    await client.client_credentials(settings(op))
    _, headers, form = op.requests[-1]
    assert "Authorization" not in headers and form["client_secret"] == SECRET
    op.reply(200, b"", "")
    configured = settings(op, registration=ClientRegistration(auth_method="client_secret_post"))
    assert await client.revoke(configured, "rt-y") is True
    _, headers, form = op.requests[-1]
    assert "Authorization" not in headers and form["client_secret"] == SECRET
