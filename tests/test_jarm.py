"""Response modes against the real test provider: JARM (jwt, query.jwt, form_post.jwt) for a client whose
``authorization_signed_response_alg`` is set and that may use nothing else, and plain form_post.  The loopback
listener takes form_post's POST; a JARM response is verified (signature, iss, aud, exp, state) before its code is
used."""

from __future__ import annotations

import asyncio
import json
import time
from collections.abc import AsyncIterator

import aiohttp
import pytest
from joserfc import jws, jwt
from joserfc.jwk import RSAKey

from brokerd.clock import SystemClock
from brokerd.errors import TokenValidationError
from brokerd.models import ProviderSettings
from brokerd.oidc import OIDCClient
from brokerd.registration import ClientRegistration
from tests.support import browser
from tests.support.daemon import Daemon, exec_token, jwt_claims, login_args
from tests.support.provider import ProviderFactory, TestProvider, rsa_jwk
from tests.test_grants import PtyRun

REDIRECTS = ["http://localhost:8000", "http://localhost:18000", "http://localhost:18997/done"]
COMMON = {"redirect_uris": REDIRECTS, "grant_types": ["authorization_code", "refresh_token"],
          "response_types": ["code"], "scope": "openid groups email profile offline_access",
          "token_endpoint_auth_method": "client_secret_basic"}
JARM_MODES = ["jwt", "query.jwt", "form_post.jwt"]


@pytest.fixture(scope="module")
def op(provider_factory: ProviderFactory) -> TestProvider:
    clients = [
        {"client_id": "jarm", "client_secret": "jarm-secret", "authorization_signed_response_alg": "RS256",
         "response_modes": JARM_MODES, **COMMON},
        {"client_id": "formpost", "client_secret": "fp-secret", "response_modes": ["form_post"], **COMMON},
    ]
    return provider_factory({"jarm": True, "clients": clients})


class LaterClock(SystemClock):
    """An hour ahead: the only way to see an expired response without waiting for it."""

    def now(self) -> float:
        return time.time() + 3600


@pytest.fixture
async def http() -> AsyncIterator[aiohttp.ClientSession]:
    async with aiohttp.ClientSession() as session:
        yield session


def _args(op: TestProvider, mode: str, client: str = "jarm", secret: str = "jarm-secret") -> list[str]:
    return login_args(op.issuer, f"--oidc-response-mode={mode}", client_id=client, secret=secret,
                      scopes=("groups", "offline_access"))


@pytest.mark.parametrize("mode", JARM_MODES)
def test_jarm_login_through_the_daemon(op: TestProvider, daemon: Daemon, mode: str) -> None:
    before = op.counters()
    claims = jwt_claims(exec_token(daemon.shim(_args(op, mode))))
    assert claims["aud"] == "jarm" and claims["groups"] == ["admins", "dev"]
    assert op.last_auth()["response_mode"] == mode
    if mode == "form_post.jwt":  # refresh and logout are authenticated as always; once is enough
        exec_token(daemon.shim([*_args(op, mode), "--force-refresh"]))
        assert daemon.cli("logout", "--all").returncode == 0
        after = op.counters()
        assert after["token_grants"]["refresh_token"] - before["token_grants"]["refresh_token"] == 1
        assert after["grants_revoked"] - before["grants_revoked"] == 1


def test_form_post_login_through_the_daemon(op: TestProvider, daemon: Daemon) -> None:
    claims = jwt_claims(exec_token(daemon.shim(_args(op, "form_post", "formpost", "fp-secret"))))
    assert claims["aud"] == "formpost" and op.last_auth()["response_mode"] == "form_post"


async def _jarm_answer(op: TestProvider, oidc: OIDCClient, settings: ProviderSettings) -> tuple[object, str]:
    auth = await oidc.authorization_request(settings, REDIRECTS[2])
    landed = await asyncio.to_thread(browser.login, auth.url, follow_callback=False, timeout=30)
    return auth, landed.callback_params["response"]


async def test_a_forged_or_stale_jarm_response_is_refused_before_its_code_is_used(
        op: TestProvider, http: aiohttp.ClientSession) -> None:
    oidc = OIDCClient(http, SystemClock(), request_timeout=5)
    settings = ProviderSettings(issuer=op.issuer, client_id="jarm", client_secret="jarm-secret",
                                registration=ClientRegistration(response_mode="query.jwt"))
    auth, response = await _jarm_answer(op, oidc, settings)
    header = jws.extract_compact(response.encode()).headers()
    claims = json.loads(jws.extract_compact(response.encode()).payload)
    assert claims["iss"] == op.issuer and claims["aud"] == "jarm" and claims["code"]
    someone_else: dict[str, str | list[str]] = dict(rsa_jwk())
    forged = jwt.encode(dict(header), claims, RSAKey.import_key(someone_else))  # same kid, another key
    before = op.counters()["token_requests"]
    with pytest.raises(TokenValidationError, match="signature does not verify"):
        await oidc.exchange_code(settings, auth, "", response=forged)  # type: ignore[arg-type]
    with pytest.raises(TokenValidationError, match="has expired"):
        await OIDCClient(http, LaterClock(), request_timeout=5).exchange_code(
            settings, auth, "", response=response)  # type: ignore[arg-type]
    other = ProviderSettings(issuer=op.issuer, client_id="formpost", client_secret="fp-secret")
    with pytest.raises(TokenValidationError, match="not for client 'formpost'"):
        await oidc.exchange_code(other, auth, "", response=response)  # type: ignore[arg-type]
    assert op.counters()["token_requests"] == before
    tokens = await oidc.exchange_code(settings, auth, "", response=response)  # type: ignore[arg-type]
    assert tokens.claims["aud"] == "jarm"


async def test_the_jarm_client_cannot_use_a_plain_query_response(op: TestProvider,
                                                                 http: aiohttp.ClientSession) -> None:
    oidc = OIDCClient(http, SystemClock(), request_timeout=5)
    settings = ProviderSettings(issuer=op.issuer, client_id="jarm", client_secret="jarm-secret")
    auth = await oidc.authorization_request(settings, REDIRECTS[2])
    landed = await asyncio.to_thread(browser.login, auth.url, follow_callback=False, timeout=30)
    assert landed.callback_params["error"] == "invalid_request"


def test_authcode_keyboard_with_a_pasted_jarm_answer(op: TestProvider, daemon: Daemon) -> None:
    args = login_args(op.issuer, "--grant-type=authcode-keyboard", "--oidc-redirect-url=" + REDIRECTS[2],
                      "--oidc-response-mode=query.jwt", client_id="jarm", secret="jarm-secret")
    run = PtyRun(daemon.shim_argv(args), daemon.env)
    url = run.expect(r"to log in: (\S+)").group(1)
    landed = browser.login(url, follow_callback=False, timeout=30)
    assert "response" in landed.callback_params and "code" not in landed.callback_params
    run.expect("Enter the code")
    run.send(landed.callback_url + "\n")
    code, out, terminal = run.finish()
    assert code == 0, terminal + daemon.log()
    assert jwt_claims(json.loads(out)["status"]["token"])["aud"] == "jarm"
    refused = daemon.shim([*(a for a in args if not a.startswith("--oidc-response-mode")),
                           "--oidc-response-mode=form_post.jwt"])
    assert "cannot work with --grant-type=authcode-keyboard" in refused.stderr and refused.returncode != 0
