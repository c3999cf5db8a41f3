"""RFC 9207 mix-up defence: the ``iss`` of an authorization response must be the issuer, and a provider that
advertises ``authorization_response_iss_parameter_supported`` (the test provider does, as Authelia and Keycloak do)
must send it.  A refused response's code is never sent to the token endpoint."""

from __future__ import annotations

import asyncio
import sys
from pathlib import Path

import pytest

from brokerd.errors import TokenValidationError
from brokerd.models import ProviderSettings
from brokerd.oidc import OIDCClient
from tests.support import browser
from tests.support.daemon import Daemon, exec_token, jwt_claims, login_args
from tests.support.provider import ProviderFactory, TestProvider

MIXUP_BROWSER = Path(__file__).resolve().parent / "support" / "mixup_browser.py"
CLIENT = {
    "client_id": "mixup", "client_secret": "mixup-secret", "token_endpoint_auth_method": "client_secret_basic",
    "redirect_uris": ["http://127.0.0.1:1/nowhere"], "grant_types": ["authorization_code"],
    "response_types": ["code"], "scope": "openid email",
}


@pytest.fixture(scope="module")
def op(provider_factory: ProviderFactory) -> TestProvider:
    return provider_factory({"clients": [CLIENT]})


async def _landed(oidc: OIDCClient, settings: ProviderSettings) -> tuple[object, dict[str, str]]:
    auth = await oidc.authorization_request(settings, CLIENT["redirect_uris"][0])
    landed = await asyncio.to_thread(browser.login, auth.url, follow_callback=False, timeout=30)
    return auth, landed.callback_params


async def test_a_wrong_or_missing_iss_is_refused_before_the_code_is_used(op: TestProvider, oidc: OIDCClient) -> None:
    settings = ProviderSettings(issuer=op.issuer, client_id="mixup", client_secret="mixup-secret",
                                scopes=("openid", "email"))
    auth, params = await _landed(oidc, settings)
    assert params["iss"] == op.issuer  # the provider sends it, as discovery promises
    assert (await oidc.metadata(op.issuer)).authorization_response_iss_parameter_supported
    before = op.counters()["token_requests"]
    with pytest.raises(TokenValidationError, match=r"came from issuer 'http://evil\.example'"):
        await oidc.exchange_code(settings, auth, params["code"], iss="http://evil.example")  # type: ignore[arg-type]
    with pytest.raises(TokenValidationError, match="carries no 'iss'"):
        await oidc.exchange_code(settings, auth, params["code"])  # type: ignore[arg-type]
    assert op.counters()["token_requests"] == before  # the code never left brokerd
    # The code was not spent: the genuine answer still redeems it.
    tokens = await oidc.exchange_code(settings, auth, params["code"], iss=params["iss"])  # type: ignore[arg-type]
    assert tokens.claims["iss"] == op.issuer


async def test_a_typed_code_needs_no_iss(op: TestProvider, oidc: OIDCClient) -> None:
    settings = ProviderSettings(issuer=op.issuer, client_id="mixup", client_secret="mixup-secret")
    auth, params = await _landed(oidc, settings)
    tokens = await oidc.exchange_code(settings, auth, params["code"], redirected=False)  # type: ignore[arg-type]
    assert tokens.claims["aud"] == "mixup"


@pytest.mark.parametrize("tamper", [["--iss-host=evil.example"], ["--drop-iss"]], ids=["wrong-iss", "no-iss"])
def test_daemon_refuses_a_hostile_browser_delivering_a_code_with_a_wrong_iss(
        provider: TestProvider, daemon: Daemon, tamper: list[str]) -> None:
    hostile = " ".join([sys.executable, str(MIXUP_BROWSER), *tamper])
    before = provider.counters()
    refused = daemon.shim(login_args(provider.issuer), env={"BROWSER": hostile})
    assert refused.returncode != 0 and refused.stdout == ""
    (line,) = [x for x in refused.stderr.splitlines() if not x.startswith("Open this URL")]
    assert "the code was not used" in line and "Traceback" not in refused.stderr, refused.stderr
    after = provider.counters()
    assert after["token_requests"] == before["token_requests"]
    assert after["auth_requests"] == before["auth_requests"] + 1
    # An honest browser then logs in as usual (another session: the refused one waits out its failure back-off).
    token = exec_token(daemon.shim(login_args(provider.issuer, "--oidc-extra-scope=email")))
    assert jwt_claims(token)["iss"] == provider.issuer
