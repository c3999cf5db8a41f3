"""brokerd.oidc against the real test provider (oidc-provider in node, Authelia-like defaults).

One provider per module, with an extra client whose redirect URI is on a port picked at module start (8000 and
18000 may be busy with other tests).  Each code-flow test runs a one-shot aiohttp listener on that port as the
redirect target and drives the login with the browser stand-in in a worker thread.
"""

from __future__ import annotations

import asyncio
import re
from typing import Any

import aiohttp
import pytest
from aiohttp import web

from brokerd.clock import SystemClock
from brokerd.errors import (
    DiscoveryError,
    InvalidGrant,
    ProviderError,
    TokenEndpointError,
    TokenValidationError,
)
from brokerd.models import ProviderSettings, TokenSet
from brokerd.oidc import AuthRequest, OIDCClient
from tests.support import browser
from tests.support.net import free_port
from tests.support.provider import ProviderFactory, TestProvider

# Odd characters on purpose: client_secret_basic must form-encode id and secret before base64.
CLIENT_ID = "brokerd oidc:test"
CLIENT_SECRET = "odd secret/with:+&%="
PUBLIC_ID = "brokerd_public"
DEVICE_GRANT = "urn:ietf:params:oauth:grant-type:device_code"
SCOPES = ("openid", "email", "groups", "offline_access")


class Env:
    def __init__(self, op: TestProvider, redirect_uri: str, port: int) -> None:
        self.op = op
        self.redirect_uri = redirect_uri
        self.port = port

    def settings(self, **kw: Any) -> ProviderSettings:
        kw.setdefault("client_id", CLIENT_ID)
        kw.setdefault("client_secret", CLIENT_SECRET)
        kw.setdefault("scopes", SCOPES)
        return ProviderSettings(issuer=self.op.issuer, **kw)


@pytest.fixture(scope="module")
def env(provider_factory: ProviderFactory) -> Env:
    port = free_port()
    redirect_uri = f"http://127.0.0.1:{port}/callback"
    grants = ["authorization_code", "refresh_token", DEVICE_GRANT, "password", "client_credentials"]
    clients = [
        {"client_id": CLIENT_ID, "client_secret": CLIENT_SECRET, "token_endpoint_auth_method": "client_secret_basic",
         "redirect_uris": [redirect_uri], "grant_types": grants, "response_types": ["code"],
         "scope": "openid email groups profile offline_access"},
        {"client_id": PUBLIC_ID, "token_endpoint_auth_method": "none", "redirect_uris": [redirect_uri],
         "grant_types": ["authorization_code", "refresh_token", "password"], "response_types": ["code"]},
    ]
    op = provider_factory({"clients": clients, "id_token_ttl": 300, "access_token_ttl": 300})
    return Env(op, redirect_uri, port)


async def _browser_login(url: str, **kw: Any) -> browser.LoginResult:
    return await asyncio.to_thread(browser.login, url, timeout=30, **kw)


async def code_login(env: Env, oidc: OIDCClient, settings: ProviderSettings,
                     user: str = "alice") -> tuple[AuthRequest, dict[str, str]]:
    """Runs the redirect target for one login and returns the request and the callback's query."""
    got: asyncio.Future[dict[str, str]] = asyncio.get_running_loop().create_future()

    async def callback(request: web.Request) -> web.Response:
        if not got.done():
            got.set_result(dict(request.query))
        return web.Response(text="signed in", content_type="text/html")

    app = web.Application()
    app.router.add_get("/callback", callback)
    runner = web.AppRunner(app)
    await runner.setup()
    try:
        await web.TCPSite(runner, "127.0.0.1", env.port).start()
        auth = await oidc.authorization_request(settings, env.redirect_uri)
        result = await _browser_login(auth.url, user=user, password=f"{user}-password")
        assert result.callback_status == 200
        query = await asyncio.wait_for(got, 10)
    finally:
        await runner.cleanup()
    return auth, query


async def test_code_flow_with_pkce_nonce_and_groups(env: Env, oidc: OIDCClient) -> None:
    env.op.reset()
    settings = env.settings()
    auth, query = await code_login(env, oidc, settings)
    assert query["state"] == auth.state and "error" not in query
    sent = env.op.last_auth()
    assert sent["code_challenge_method"] == "S256" and sent["redirect_uri"] == env.redirect_uri
    assert len(sent["state"]) == 43
    tokens = await oidc.exchange_code(settings, auth, query["code"], iss=query.get("iss"))
    assert tokens.claims["sub"] == env.op.sub("alice")
    assert tokens.claims["iss"] == env.op.issuer and tokens.claims["aud"] == CLIENT_ID
    # groups reach the ID token only through the claims parameter (Authelia 4.39 behaviour).
    assert tokens.claims["groups"] == ["admins", "dev"]
    assert tokens.refresh_token and tokens.access_token and tokens.id_token
    assert tokens.expires_at == tokens.claims["exp"]
    counters = env.op.counters()
    assert counters["token_grants"]["authorization_code"] == 1 and counters["consent_shown"] == 1
    # The code is single-use.
    with pytest.raises(InvalidGrant):
        await oidc.exchange_code(settings, auth, query["code"], iss=query["iss"])


async def test_code_flow_public_client(env: Env, oidc: OIDCClient) -> None:
    settings = env.settings(client_id=PUBLIC_ID, client_secret=None, scopes=("openid", "email"))
    auth, query = await code_login(env, oidc, settings, user="bob")
    tokens = await oidc.exchange_code(settings, auth, query["code"], iss=query["iss"])
    assert tokens.claims["email"] == "bob@example.com" and tokens.refresh_token is None


async def _password_tokens(env: Env, oidc: OIDCClient, settings: ProviderSettings | None = None) -> TokenSet:
    return await oidc.password_grant(settings or env.settings(), "alice", "alice-password")


async def test_refresh_rotates_and_replay_kills_the_chain(env: Env, oidc: OIDCClient) -> None:
    env.op.reset()
    settings = env.settings()
    first = await _password_tokens(env, oidc)
    second = await oidc.refresh(settings, first)
    assert second.refresh_token and second.refresh_token != first.refresh_token
    # Same second, same claims: the ID token may be byte-identical (RS256 is deterministic); it was re-verified.
    assert second.claims["sub"] == first.claims["sub"] and second.id_token
    third = await oidc.refresh(settings, second)
    assert third.refresh_token != second.refresh_token
    # Replaying a spent refresh token is refused and revokes the whole chain, the newest token included.
    with pytest.raises(InvalidGrant) as info:
        await oidc.refresh(settings, first)
    assert first.refresh_token and first.refresh_token not in str(info.value)
    with pytest.raises(InvalidGrant):
        await oidc.refresh(settings, third)
    counters = env.op.counters()
    assert counters["refresh_reuse_detected"] == 1 and counters["token_grants"]["refresh_token"] == 2


async def test_password_grant(env: Env, oidc: OIDCClient) -> None:
    tokens = await _password_tokens(env, oidc)
    assert tokens.claims["sub"] == env.op.sub("alice") and tokens.refresh_token
    with pytest.raises(InvalidGrant):
        await oidc.password_grant(env.settings(), "alice", "wrong")
    public = await _password_tokens(env, oidc, env.settings(client_id=PUBLIC_ID, client_secret=None))
    assert public.claims["aud"] == PUBLIC_ID


async def test_wrong_client_secret_is_invalid_client(env: Env, oidc: OIDCClient) -> None:
    bad = "not-the-secret-at-all"
    with pytest.raises(TokenEndpointError) as info:
        await _password_tokens(env, oidc, env.settings(client_secret=bad))
    assert info.value.error == "invalid_client" and info.value.status == 401
    assert bad not in str(info.value)


async def test_client_credentials(env: Env, oidc: OIDCClient) -> None:
    tokens = await oidc.client_credentials(env.settings())
    assert tokens.id_token == "" and tokens.access_token and tokens.refresh_token is None
    assert tokens.access_expires_at is not None and tokens.expires_at == tokens.access_expires_at


async def test_revocation(env: Env, oidc: OIDCClient) -> None:
    env.op.reset()
    settings = env.settings()
    tokens = await _password_tokens(env, oidc)
    assert tokens.refresh_token
    assert await oidc.revoke(settings, tokens.refresh_token) is True
    assert env.op.counters()["revocations"] == 1
    with pytest.raises(InvalidGrant):
        await oidc.refresh(settings, tokens)


async def test_device_flow(env: Env, oidc: OIDCClient) -> None:
    env.op.reset()
    settings = env.settings(scopes=("openid", "email"))
    device = await oidc.start_device_authorization(settings)
    assert device.verification_uri.startswith(env.op.issuer) and device.verification_uri_complete
    poll = asyncio.create_task(oidc.poll_device_token(settings, device))
    try:
        result = await _browser_login(device.verification_uri_complete, user="bob", password="bob-password")
        assert "complete" in result.callback_body
        tokens = await asyncio.wait_for(poll, 30)
    finally:
        poll.cancel()
    assert tokens.claims["email"] == "bob@example.com"
    assert env.op.counters()["token_grants"]["device_code"] == 1


async def test_key_rotation_is_followed(env: Env, oidc: OIDCClient) -> None:
    env.op.reset()
    await _password_tokens(env, oidc)
    env.op.rotate_keys()
    tokens = await _password_tokens(env, oidc)
    assert tokens.claims["sub"] == env.op.sub("alice")
    assert env.op.counters()["jwks"] == 2, "one fetch, then one refetch for the new kid"


async def test_discovery_issuer_mismatch(env: Env, oidc: OIDCClient) -> None:
    other = env.op.issuer.replace("127.0.0.1", "localhost")
    with pytest.raises(DiscoveryError) as info:
        await oidc.metadata(other)
    assert other in str(info.value) and env.op.issuer in str(info.value)


@pytest.mark.parametrize(("kind", "words"), [
    ("html", "not JSON (text/html)"),
    ("empty_body", "empty body"),
    ("nonstandard_error", "non-standard error 'weird'"),
    ("status", "server_error"),
])
async def test_token_endpoint_faults(env: Env, oidc: OIDCClient, kind: str, words: str) -> None:
    await oidc.metadata(env.op.issuer)
    env.op.fault("token", kind)
    try:
        with pytest.raises(TokenEndpointError, match=re.escape(words)) as info:
            await _password_tokens(env, oidc)
    finally:
        env.op.clear_faults()
    assert not isinstance(info.value, InvalidGrant)
    assert CLIENT_SECRET not in str(info.value)


async def test_dropped_and_slow_connections(env: Env) -> None:
    async with aiohttp.ClientSession() as http:
        oidc = OIDCClient(http, SystemClock(), request_timeout=0.5)
        await oidc.metadata(env.op.issuer)
        try:
            env.op.fault("token", "drop")
            with pytest.raises(ProviderError, match="^" + re.escape(f"cannot reach {env.op.issuer}: ")) as info:
                await _password_tokens(env, oidc)
            assert not isinstance(info.value, TokenEndpointError)
            env.op.fault("token", "delay", seconds=2)
            with pytest.raises(ProviderError, match=re.escape("no answer within 0.5 s")):
                await _password_tokens(env, oidc)
        finally:
            env.op.clear_faults()


async def test_tampered_token_from_real_provider(env: Env, oidc: OIDCClient) -> None:
    tokens = await _password_tokens(env, oidc)
    head, payload, sig = tokens.id_token.split(".")
    flipped = sig[:-2] + ("A" if sig[-2] != "A" else "B") + sig[-1]
    with pytest.raises(TokenValidationError, match="signature"):
        await oidc.verify_id_token(env.settings(), f"{head}.{payload}.{flipped}", nonce=None)
    with pytest.raises(TokenValidationError, match="audience"):
        await oidc.verify_id_token(env.settings(client_id="kube_login"), tokens.id_token, nonce=None)
