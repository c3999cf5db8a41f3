"""``setup`` checks of how the client is registered, each ending in the exact flag to add: the client
authentication method (probed at the token endpoint with a code that cannot exist: a provider authenticates the
client before it looks at the code, so ``invalid_client`` means the method or credentials, ``invalid_grant`` means
they are fine), a JWT assertion refused, pushed authorization requests required, a response mode the client may not
use.  Each probe is a request that cannot log anyone in; no browser opens."""

from __future__ import annotations

import base64
import html
import json
import re
from dataclasses import dataclass, replace
from typing import Any
from urllib.parse import parse_qsl, urlsplit

import aiohttp

from brokerd.client_auth import ClientAuthenticator, choose_method
from brokerd.clock import SystemClock
from brokerd.errors import BrokerError, TokenEndpointError
from brokerd.jarm import routing_state
from brokerd.models import LoginOptions, ProviderSettings
from brokerd.oidc import OIDCClient, ProviderMetadata
from brokerd.oidc_wire import safe_text
from brokerd.registration import AUTH_METHODS, RESPONSE_MODES

PROBE_CODE = "brokerd-setup-probe-not-an-authorization-code"
PROBE_TIMEOUT = 10.0
_HIDDEN = re.compile(r'<input type="hidden" name="([\w.]+)" value="([^"]*)"')


@dataclass(frozen=True)
class Diagnosis:
    code: str
    problem: str
    fix: str


async def _token_probe(oidc: OIDCClient, meta: ProviderMetadata, settings: ProviderSettings) -> tuple[str, str]:
    """(error, description) of a code exchange that must fail; ("", "") when the answer was no OAuth error."""
    form = {"grant_type": "authorization_code", "code": PROBE_CODE, "redirect_uri": "http://localhost:8000"}
    headers = await ClientAuthenticator(SystemClock()).apply(settings, meta, form)
    async with oidc.http.post(meta.token_endpoint, data=form, headers={"Accept": "application/json", **headers},
                              timeout=aiohttp.ClientTimeout(total=PROBE_TIMEOUT)) as resp:
        body = await resp.content.read(64 * 1024)
    try:
        doc = json.loads(body)
    except ValueError:
        return "", ""
    if not isinstance(doc, dict):
        return "", ""
    desc = doc.get("error_description")
    return str(doc.get("error") or ""), safe_text(desc) if isinstance(desc, str) else ""


def _with(settings: ProviderSettings, **changes: Any) -> ProviderSettings:
    return replace(settings, registration=replace(settings.registration, **changes))


async def check_client_auth(oidc: OIDCClient, settings: ProviderSettings) -> Diagnosis | None:
    meta = await oidc.metadata(settings.issuer)
    current = choose_method(settings, meta.token_endpoint_auth_methods_supported)
    error, desc = await _token_probe(oidc, meta, settings)
    if error != "invalid_client":
        return None
    reg = settings.registration
    for method in AUTH_METHODS:
        usable = (method == "none" or (method == "private_key_jwt" and reg.assertion_key is not None)
                  or (method.startswith("client_secret") and settings.client_secret))
        if method == current or not usable:
            continue
        if (await _token_probe(oidc, meta, _with(settings, auth_method=method)))[0] != "invalid_client":
            return Diagnosis("wrong-client-auth-method",
                             f"the provider refuses {current} for client {settings.client_id} "
                             f"({desc or 'invalid_client'}) but accepts {method}",
                             f"add --oidc-client-auth-method={method}")
    if current in ("private_key_jwt", "client_secret_jwt"):
        return Diagnosis("assertion-refused", f"the provider refuses the {current} client assertion: "
                         f"{desc or 'invalid_client'}",
                         "check --oidc-client-assertion-kid (a kid in the client's registered jwks), "
                         "--oidc-client-assertion-alg (the client's token_endpoint_auth_signing_alg), that the "
                         "client's jwks holds this key's public half, and this machine's clock")
    return Diagnosis("client-auth-refused", f"the provider refuses client {settings.client_id} with {current}: "
                     f"{desc or 'invalid_client'}",
                     "check the client secret; a client registered for private_key_jwt needs "
                     "--oidc-client-assertion-key=PATH, one for client_secret_jwt "
                     "--oidc-client-auth-method=client_secret_jwt")


async def _authorization_error(oidc: OIDCClient, settings: ProviderSettings, options: LoginOptions,
                               uri: str) -> tuple[str, str] | None:
    """What the provider answers an authorization request with this redirect URI, when it is an error."""
    try:
        auth = await oidc.authorization_request(settings, uri, pkce_method=options.pkce_method)
    except TokenEndpointError as exc:  # the pushed request was refused
        return exc.error or "error", exc.description or ""
    async with oidc.http.get(auth.url, allow_redirects=False,
                             timeout=aiohttp.ClientTimeout(total=PROBE_TIMEOUT)) as resp:
        location = resp.headers.get("Location") or ""
        body = (await resp.content.read(256 * 1024)).decode("utf-8", "replace")
    params = dict(parse_qsl(urlsplit(location).query)) if location.startswith(uri) else {}
    params.update({k: html.unescape(v) for k, v in _HIDDEN.findall(body)})  # a form_post answer
    if "response" in params and routing_state(params) is not None:  # a JARM answer: the error is inside it
        payload = params["response"].split(".")[1]
        params.update(json.loads(base64.urlsafe_b64decode(payload + "=" * (-len(payload) % 4))))
    error = params.get("error")
    return (str(error), safe_text(str(params.get("error_description") or ""))) if error else None


async def check_authorization(oidc: OIDCClient, settings: ProviderSettings, options: LoginOptions,
                              uri: str) -> Diagnosis | None:
    refused = await _authorization_error(oidc, settings, options, uri)
    if refused is None:
        return None
    error, desc = refused
    low = desc.lower()
    if "pushed authorization" in low or "request_uri" in low:
        meta = await oidc.metadata(settings.issuer)
        fix = ("add --oidc-par=always (or drop --oidc-par=never)" if
               meta.pushed_authorization_request_endpoint else
               "the provider advertises no pushed_authorization_request_endpoint; check its discovery document")
        return Diagnosis("par-required", f"the provider requires pushed authorization requests for client "
                         f"{settings.client_id} ({desc})", fix)
    if "response_mode" in low:
        for mode in ("query.jwt", "form_post.jwt", "jwt", "form_post", "query"):
            if mode != settings.registration.response_mode and mode in RESPONSE_MODES and \
                    await _authorization_error(oidc, _with(settings, response_mode=mode), options, uri) is None:
                return Diagnosis("response-mode-not-allowed", f"client {settings.client_id} may not use response "
                                 f"mode {settings.registration.response_mode} ({desc}) but may use {mode}",
                                 f"add --oidc-response-mode={mode}")
        return Diagnosis("response-mode-not-allowed", f"the provider refuses the response mode: {desc}",
                         "check the client's response_modes and authorization_signed_response_alg")
    return Diagnosis("authorization-refused", f"the provider refuses the authorization request: {error}"
                     + (f" ({desc})" if desc else ""),
                     "check the client id, scopes and extra parameters against the client's registration")


async def registration_diagnosis(oidc: OIDCClient, settings: ProviderSettings, options: LoginOptions,
                                 redirect_uri: str | None) -> Diagnosis | None:
    """The first registration mismatch found, or None; ``redirect_uri`` None skips the authorization checks."""
    try:
        found = await check_client_auth(oidc, settings)
        if found is None and redirect_uri is not None:
            found = await check_authorization(oidc, settings, options, redirect_uri)
    except (aiohttp.ClientError, TimeoutError, OSError, ValueError, BrokerError):
        return None  # unreachable or odd answers: the login itself reports those
    return found
