"""The OIDC protocol adapter: discovery, JWKS, PKCE/state/nonce, the grants, ID token verification, revocation.

HTTP goes through an injected ``aiohttp.ClientSession`` (TLS and CA bundles are the caller's choice) by way of
``provider_http.py`` (proxies, body limit, network failures); wire formats are ``oidc_wire.py``'s;
time goes through a ``Clock``.  Authlib supplies the protocol helpers (PKCE challenge, random tokens); joserfc
verifies JWTs (``idtoken.py``).  Every aiohttp/joserfc error is converted into the ``brokerd.errors`` tree here
(network failures in ``provider_http``).
Secrets (tokens, codes, verifiers, client secrets) never appear in exception messages.
"""

from __future__ import annotations

import asyncio
import json
import logging
import math
from collections.abc import Awaitable, Callable, Mapping
from dataclasses import replace
from typing import Any
from urllib.parse import parse_qsl, urlencode, urlsplit, urlunsplit

import aiohttp
from joserfc.jwk import KeySet

from . import id_token_jwe, idtoken, jarm, provider_http
from .client_auth import ClientAuthenticator, check_response_issuer, pushed_request_endpoint, pushed_request_uri
from .clock import Clock
from .errors import (
    DiscoveryError,
    InvalidGrant,
    LoginDenied,
    LoginTimeout,
    ProviderError,
    TokenEndpointError,
    TokenValidationError,
    UsageError,
)
from .models import STATUS_CLAIMS, ProviderSettings, TokenSet
from .oidc_wire import (
    AuthRequest,
    DeviceAuthorization,
    ProviderMetadata,
    RefreshAnswer,
    lifetime,
    origin,
    parse_token_response,
    refresh_lifetime,
    safe_text,
)
from .pkce import random_token, s256_challenge

__all__ = ["AuthRequest", "ClientFactory", "DeviceAuthorization", "OIDCClient", "ProviderMetadata",
           "RefreshAnswer"]

DEVICE_GRANT = "urn:ietf:params:oauth:grant-type:device_code"
# Authorization parameters that carry brokerd's own security state; extra params must not replace them.
PROTECTED_PARAMS = frozenset({
    "response_type", "client_id", "redirect_uri", "scope", "state", "nonce", "code_challenge",
    "code_challenge_method",
})
GROUPS_CLAIMS_REQUEST = '{"id_token":{"groups":{"essential":true}}}'
# When a token response has no expires_in and no ID token (client credentials), assume a short life.
FALLBACK_LIFETIME = 300.0
JWKS_REFETCH_INTERVAL = 60.0

log = logging.getLogger("brokerd.oidc")

# How everything that talks to a provider gets its client: by awaiting this with the session's settings (their
# TLS options and request headers pick the HTTP client).  tls.ProviderClients.client_for is the daemon's.
ClientFactory = Callable[[ProviderSettings], Awaitable["OIDCClient"]]


class OIDCClient:
    """One per daemon; caches discovery per issuer and JWKS per URI.  Safe to share between tasks."""

    def __init__(self, http: aiohttp.ClientSession, clock: Clock, *, discovery_ttl: float = 3600,
                 request_timeout: float = 30, jwks_refetch_interval: float = JWKS_REFETCH_INTERVAL,
                 request_headers: Mapping[str, str] | None = None) -> None:
        self._http = http
        self._request_headers = dict(request_headers or {})  # --oidc-request-header, sent on every request
        self._clock = clock
        self._discovery_ttl = discovery_ttl
        self._timeout = request_timeout
        self._jwks_refetch_interval = jwks_refetch_interval
        self._metadata: dict[str, tuple[float, ProviderMetadata]] = {}
        self._jwks: dict[str, tuple[float, KeySet]] = {}
        self._jwks_refetched_at: dict[str, float] = {}
        self._locks: dict[str, asyncio.Lock] = {}
        self._authenticator = ClientAuthenticator(clock)

    @property
    def http(self) -> aiohttp.ClientSession:
        return self._http

    # ---- HTTP -------------------------------------------------------------------------------------------------

    async def _send(self, method: str, url: str, *, data: Mapping[str, str] | None = None,
                    headers: Mapping[str, str] | None = None) -> tuple[int, str, bytes]:
        return await provider_http.send(self._http, method, url, time_limit=self._timeout, data=data,
                                        headers={**self._request_headers, **(headers or {})})

    async def _get_json(self, url: str, what: str) -> dict[str, Any]:
        status, _, body = await self._send("GET", url)
        if status != 200:
            raise DiscoveryError(f"{what} at {origin(url)} answered HTTP {status}")
        try:
            doc = json.loads(body)
        except (ValueError, UnicodeError, RecursionError) as exc:
            raise DiscoveryError(f"{what} at {origin(url)} is not JSON") from exc
        if not isinstance(doc, dict):
            raise DiscoveryError(f"{what} at {origin(url)} is not a JSON object")
        return doc

    def _lock(self, name: str) -> asyncio.Lock:
        return self._locks.setdefault(name, asyncio.Lock())

    async def _client_auth(self, settings: ProviderSettings, meta: ProviderMetadata, form: dict[str, str],
                           endpoint: str = "token") -> dict[str, str]:
        return await self._authenticator.apply(settings, meta, form, endpoint=endpoint)

    async def _post_form(self, settings: ProviderSettings, meta: ProviderMetadata, url: str,
                         form: dict[str, str], what: str, endpoint: str = "token") -> dict[str, Any]:
        headers = await self._client_auth(settings, meta, form, endpoint)
        status, ctype, body = await self._send("POST", url, data=form, headers=headers)
        # 201 Created is how a pushed authorization request succeeds (RFC 9126 2.2).
        return parse_token_response(200 if status == 201 else status, ctype, body, f"{what} at {origin(url)}")

    # ---- discovery and keys -----------------------------------------------------------------------------------

    async def metadata(self, issuer: str, *, max_age: float | None = None) -> ProviderMetadata:
        """Discovery, cached for ``discovery_ttl`` (or ``max_age`` when given: a login passes a short one, so a
        provider that went down fails at once instead of after the person gave up waiting in the browser)."""
        ttl = self._discovery_ttl if max_age is None else min(max_age, self._discovery_ttl)
        cached = self._metadata.get(issuer)
        if cached and self._clock.now() - cached[0] < ttl:
            return cached[1]
        async with self._lock("discovery " + issuer):
            cached = self._metadata.get(issuer)
            if cached and self._clock.now() - cached[0] < ttl:
                return cached[1]
            log.debug("discovery: fetching %s/.well-known/openid-configuration", issuer.rstrip("/"))
            doc = await self._get_json(issuer.rstrip("/") + "/.well-known/openid-configuration", "discovery")
            found = doc.get("issuer")
            # OIDC Discovery 4.3: exact match, trailing slash included; the API server compares iss exactly too.
            if found != issuer:
                shown = safe_text(found, 200) if isinstance(found, str) else "nothing"
                raise DiscoveryError(f"discovery for issuer {issuer!r} names issuer {shown!r}; they must match")
            meta = ProviderMetadata.from_document(doc)
            self._metadata[issuer] = (self._clock.now(), meta)
            return meta

    async def _key_set(self, uri: str, *, refetch: bool) -> KeySet | None:
        """The cached JWKS; with ``refetch``, fetch again unless that happened within the rate limit (then None)."""
        async with self._lock("jwks " + uri):
            now = self._clock.now()
            cached = self._jwks.get(uri)
            if refetch:
                last = self._jwks_refetched_at.get(uri)
                if last is not None and now - last < self._jwks_refetch_interval:
                    return None
                self._jwks_refetched_at[uri] = now
            elif cached and now - cached[0] < self._discovery_ttl:
                return cached[1]
            keys = idtoken.parse_key_set(await self._get_json(uri, "JWKS"))
            self._jwks[uri] = (now, keys)
            return keys

    async def verify_id_token(self, settings: ProviderSettings, id_token: str, *,
                              nonce: str | None) -> dict[str, Any]:
        meta = await self.metadata(settings.issuer)
        obj = idtoken.parse(id_token)
        alg = idtoken.check_alg(obj, idtoken.allowed_algs(meta.id_token_signing_alg_values_supported))
        key_set = await self._key_set(meta.jwks_uri, refetch=False)
        assert key_set is not None  # for mypy: only refetch=True returns None
        keys = idtoken.candidate_keys(key_set, obj, alg)
        if not keys:
            # The provider may have rotated its keys since we cached them: look once more, rate-limited so that
            # a stream of junk tokens cannot make us hammer the JWKS endpoint.
            fresh = await self._key_set(meta.jwks_uri, refetch=True)
            keys = idtoken.candidate_keys(fresh, obj, alg) if fresh is not None else []
            if not keys:
                raise TokenValidationError("ID token is signed by a key the provider does not publish")
        idtoken.verify_signature(obj, keys, alg)
        claims = idtoken.payload_claims(obj)
        idtoken.check_claims(claims, issuer=meta.issuer, client_id=settings.client_id, now=self._clock.now(),
                             nonce=nonce)
        return claims

    # ---- building token sets ----------------------------------------------------------------------------------

    async def _token_set(self, settings: ProviderSettings, doc: Mapping[str, Any], *, nonce: str | None,
                         previous: TokenSet | None = None, id_token_optional: bool = False) -> TokenSet:
        now = self._clock.now()
        access = doc.get("access_token")
        if not isinstance(access, str) or not access:
            raise ProviderError(f"token response from {origin(settings.issuer)} has no access_token")
        expires_in = lifetime(doc.get("expires_in"))
        access_exp = now + expires_in if expires_in is not None else None
        refresh = doc.get("refresh_token")
        refresh_token = refresh if isinstance(refresh, str) and refresh else None
        refresh_life = refresh_lifetime(doc) if refresh_token is not None else None
        refresh_exp = now + refresh_life if refresh_life is not None else None
        if refresh_token is None and previous is not None:
            refresh_token = previous.refresh_token  # providers without rotation send none back
            # The same token: a new expiry when the provider says one (Keycloak's sliding idle time), else its own.
            refresh_life = refresh_lifetime(doc)
            refresh_exp = now + refresh_life if refresh_life is not None else previous.refresh_expires_at
        if refresh_token is None:
            refresh_exp = None
        raw_id = await id_token_jwe.signed_id_token(settings, doc.get("id_token"), self._authenticator.private_key)
        if isinstance(raw_id, str) and raw_id:
            claims = await self.verify_id_token(settings, raw_id, nonce=nonce)
            if previous is not None and previous.claims:
                for name in ("iss", "sub", "aud"):
                    if name in previous.claims and claims.get(name) != previous.claims[name]:
                        raise TokenValidationError(f"refreshed ID token has a different '{name}' than before")
            kept = {k: claims[k] for k in STATUS_CLAIMS if k in claims}
            return TokenSet(id_token=raw_id, expires_at=float(claims["exp"]), issued_at=now,
                            refresh_token=refresh_token, refresh_expires_at=refresh_exp, access_token=access,
                            access_expires_at=access_exp, claims=kept)
        if previous is not None and previous.id_token:
            if previous.expires_at <= now:
                # kubelogin #536: some providers return no ID token on refresh; the old one is of no use now.
                raise InvalidGrant(f"refresh at {origin(settings.issuer)} returned no ID token and the old one "
                                   "has expired; log in again", error="no_id_token", status=200)
            return TokenSet(id_token=previous.id_token, expires_at=previous.expires_at, issued_at=now,
                            refresh_token=refresh_token, refresh_expires_at=refresh_exp, access_token=access,
                            access_expires_at=access_exp,
                            claims=previous.claims)
        if not (id_token_optional or settings.use_access_token):
            raise ProviderError(f"token response from {origin(settings.issuer)} has no id_token")
        return TokenSet(id_token="", expires_at=access_exp or now + FALLBACK_LIFETIME, issued_at=now,
                        refresh_token=refresh_token, refresh_expires_at=refresh_exp, access_token=access,
                        access_expires_at=access_exp)

    # ---- grants -----------------------------------------------------------------------------------------------

    async def authorization_request(self, settings: ProviderSettings, redirect_uri: str, *,
                                    pkce_method: str = "S256", extra_params: Mapping[str, str] | None = None,
                                    login_hint: str | None = None) -> AuthRequest:
        """The URL to open for an authorization-code login.  ``pkce_method`` is kubelogin's: "auto" and "S256"
        send S256 (Authelia requires it), "no" sends none."""
        if pkce_method.lower() not in ("auto", "s256", "no"):
            raise UsageError(f"unknown PKCE method {pkce_method!r} (use auto, S256 or no)")
        meta = await self.metadata(settings.issuer)
        state, nonce = random_token(43), random_token(43)
        verifier = random_token(64) if pkce_method.lower() != "no" else None
        extras = dict(settings.extra_params)
        extras.update(extra_params or {})
        clash = sorted(PROTECTED_PARAMS & extras.keys())
        if clash:
            raise UsageError(f"extra auth request params may not set {', '.join(clash)}")
        params = {"response_type": "code", "client_id": settings.client_id, "redirect_uri": redirect_uri,
                  "scope": " ".join(settings.scopes), "state": state, "nonce": nonce}
        if verifier is not None:
            params["code_challenge"] = s256_challenge(verifier)
            params["code_challenge_method"] = "S256"
        if login_hint:
            params["login_hint"] = login_hint
        # Authelia 4.39 puts groups in the ID token only when asked through the claims parameter.
        if "groups" in settings.scopes and meta.claims_parameter_supported and "claims" not in extras:
            params["claims"] = GROUPS_CLAIMS_REQUEST
        if settings.registration.response_mode != "query":
            params["response_mode"] = settings.registration.response_mode
        params.update(extras)
        if (pushed := pushed_request_endpoint(settings, meta)) is not None:
            # RFC 9126: the parameters go to the provider directly, authenticated; the browser sees only a handle.
            doc = await self._post_form(settings, meta, pushed, dict(params), "pushed authorization request endpoint",
                                        "pushed_authorization_request")
            params = {"client_id": settings.client_id, "request_uri": pushed_request_uri(doc, pushed)}
        parts = urlsplit(meta.authorization_endpoint)
        query = urlencode([*parse_qsl(parts.query, keep_blank_values=True), *params.items()])
        url = urlunsplit((parts.scheme, parts.netloc, parts.path, query, ""))
        return AuthRequest(url=url, state=state, nonce=nonce, code_verifier=verifier, redirect_uri=redirect_uri)

    async def exchange_code(self, settings: ProviderSettings, auth: AuthRequest, code: str, *,
                            iss: str | None = None, redirected: bool = True, response: str | None = None) -> TokenSet:
        """Redeem a code; ``iss`` is the callback's RFC 9207 ``iss`` parameter (``redirected`` is False only for a
        code the person typed, which carries none); ``response`` a JARM response, whose code replaces ``code``."""
        meta = await self.metadata(settings.issuer)
        if response is not None:
            code = await jarm.verify_response(
                response, keys=lambda refetch: self._key_set(meta.jwks_uri, refetch=refetch), meta=meta,
                client_id=settings.client_id, state=auth.state, now=self._clock.now())
            iss = meta.issuer  # verified inside the signed response
        check_response_issuer(meta, iss, redirected=redirected)
        form = {"grant_type": "authorization_code", "code": code, "redirect_uri": auth.redirect_uri}
        if auth.code_verifier is not None:
            form["code_verifier"] = auth.code_verifier
        doc = await self._post_form(settings, meta, meta.token_endpoint, form, "token endpoint")
        return await self._token_set(settings, doc, nonce=auth.nonce)

    async def refresh(self, settings: ProviderSettings, tokens: TokenSet) -> TokenSet:
        """Use the refresh token once and verify the answer (both steps below; for callers that need not tell
        them apart).  The session machinery calls the two steps itself: see ``brokerd.session``."""
        answer = await self.refresh_grant(settings, tokens)
        return await self.refreshed_tokens(settings, answer, tokens)

    async def refresh_grant(self, settings: ProviderSettings, tokens: TokenSet) -> RefreshAnswer:
        """Send the refresh token (once) and return the provider's 200 answer, unverified.

        From the moment this returns, the old refresh token may be spent (rotation): the caller must adopt
        ``RefreshAnswer.refresh_token`` before anything else can fail."""
        if not tokens.refresh_token:
            raise InvalidGrant("no refresh token to use", error="no_refresh_token")
        meta = await self.metadata(settings.issuer)
        form = {"grant_type": "refresh_token", "refresh_token": tokens.refresh_token}
        doc = await self._post_form(settings, meta, meta.token_endpoint, form, "token endpoint")
        # A 2xx that is not a token response (a middlebox's {"status": "ok"}) says nothing about the token sent:
        # the provider may have rotated it behind it.  status=200 makes it count as spent (refresh_token_lost).
        # token_type is checked only when present: providers (and tests) that omit it are common and harmless.
        access, token_type = doc.get("access_token"), doc.get("token_type", "Bearer")
        if not isinstance(access, str) or not access or not isinstance(token_type, str):
            raise TokenEndpointError(f"token endpoint at {origin(meta.token_endpoint)} answered a refresh with "
                                     "HTTP 200 but no token response", status=200)
        new = doc.get("refresh_token")
        return RefreshAnswer(doc=doc, refresh_token=new if isinstance(new, str) and new else tokens.refresh_token)

    async def refreshed_tokens(self, settings: ProviderSettings, answer: RefreshAnswer,
                               previous: TokenSet) -> TokenSet:
        """Verify a refresh answer into a token set.  Raises ``InvalidGrant`` (``error == "no_id_token"``) when
        the provider returned no new ID token and the old one has expired (kubelogin #536): "log in again"."""
        return await self._token_set(settings, answer.doc, nonce=None,
                                     previous=replace(previous, refresh_token=answer.refresh_token))

    async def revoke(self, settings: ProviderSettings, token: str, token_type_hint: str = "refresh_token") -> bool:
        """RFC 7009.  False when the provider has no revocation endpoint; errors raise ``TokenEndpointError``."""
        meta = await self.metadata(settings.issuer)
        if meta.revocation_endpoint is None:
            return False
        form = {"token": token, "token_type_hint": token_type_hint}
        headers = await self._client_auth(settings, meta, form, "revocation")
        status, ctype, body = await self._send("POST", meta.revocation_endpoint, data=form, headers=headers)
        if status == 200:
            return True
        parse_token_response(status, ctype, body, f"revocation endpoint at {origin(meta.revocation_endpoint)}")
        raise TokenEndpointError(f"revocation endpoint answered HTTP {status}", status=status)

    async def start_device_authorization(self, settings: ProviderSettings, *,
                                         pkce: bool = True) -> DeviceAuthorization:
        meta = await self.metadata(settings.issuer)
        if meta.device_authorization_endpoint is None:
            raise ProviderError(f"{meta.issuer} offers no device authorization endpoint")
        verifier = random_token(64) if pkce else None
        form = {"client_id": settings.client_id, "scope": " ".join(settings.scopes)}
        # The same groups rule and extra parameters as the code flow: a device login must see the same claims.
        extras = {k: v for k, v in settings.extra_params if k not in PROTECTED_PARAMS}
        if "groups" in settings.scopes and meta.claims_parameter_supported and "claims" not in extras:
            form["claims"] = GROUPS_CLAIMS_REQUEST
        form.update(extras)
        if verifier is not None:
            form["code_challenge"] = s256_challenge(verifier)
            form["code_challenge_method"] = "S256"
        doc = await self._post_form(settings, meta, meta.device_authorization_endpoint, form,
                                    "device authorization endpoint", "device_authorization")
        device_code, user_code = doc.get("device_code"), doc.get("user_code")
        uri = doc.get("verification_uri") or doc.get("verification_url")  # Google spells it _url
        complete, expires_in, interval = doc.get("verification_uri_complete"), doc.get("expires_in"), doc.get(
            "interval", 5)
        if not (isinstance(device_code, str) and isinstance(user_code, str) and isinstance(uri, str)
                and isinstance(expires_in, int | float) and isinstance(interval, int | float)):
            raise ProviderError(f"device authorization response from {origin(meta.issuer)} is incomplete")
        return DeviceAuthorization(
            device_code=device_code, user_code=user_code, verification_uri=uri,
            verification_uri_complete=complete if isinstance(complete, str) else None,
            interval=max(1.0, float(interval)), expires_at=self._clock.now() + float(expires_in),
            code_verifier=verifier)

    async def poll_device_token(self, settings: ProviderSettings, device: DeviceAuthorization) -> TokenSet:
        """Poll until the person approves (RFC 8628 3.4-3.5), sleeping through the clock between polls."""
        meta = await self.metadata(settings.issuer)
        interval = device.interval
        form = {"grant_type": DEVICE_GRANT, "device_code": device.device_code}
        if device.code_verifier is not None:
            form["code_verifier"] = device.code_verifier
        # Bounded: interval only grows, so this many polls always reach expires_at.
        for _ in range(math.ceil(max(0.0, device.expires_at - self._clock.now()) / interval) + 1):
            await self._clock.sleep(interval)
            if self._clock.now() >= device.expires_at:
                break
            try:
                doc = await self._post_form(settings, meta, meta.token_endpoint, dict(form), "token endpoint")
            except TokenEndpointError as exc:
                if exc.error == "authorization_pending":
                    continue
                if exc.error == "slow_down":
                    interval += 5
                    continue
                if exc.error == "expired_token":
                    raise LoginTimeout("the device code expired before the login was approved") from exc
                if exc.error == "access_denied":
                    raise LoginDenied("the device login was denied") from exc
                raise
            return await self._token_set(settings, doc, nonce=None)
        raise LoginTimeout("the device code expired before the login was approved")

    async def password_grant(self, settings: ProviderSettings, username: str, password: str) -> TokenSet:
        meta = await self.metadata(settings.issuer)
        form = {"grant_type": "password", "username": username, "password": password,
                "scope": " ".join(settings.scopes)}
        doc = await self._post_form(settings, meta, meta.token_endpoint, form, "token endpoint")
        return await self._token_set(settings, doc, nonce=None)

    async def client_credentials(self, settings: ProviderSettings) -> TokenSet:
        """The client's own token.  Providers usually issue no ID token here: then ``TokenSet.id_token`` is "",
        ``expires_at`` is the access token's expiry (or now + 300 s when the provider gives none) and the caller
        serves the access token.  "openid" and "offline_access" are not sent: they make no sense without a user
        and providers such as Authelia refuse them for this grant."""
        meta = await self.metadata(settings.issuer)
        form = {"grant_type": "client_credentials"}
        scopes = [s for s in settings.scopes if s not in ("openid", "offline_access")]
        if scopes:
            form["scope"] = " ".join(scopes)
        doc = await self._post_form(settings, meta, meta.token_endpoint, form, "token endpoint")
        return await self._token_set(settings, doc, nonce=None, id_token_optional=True)
