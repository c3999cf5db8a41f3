"""Wire formats of the OIDC adapter: the discovery document and token endpoint answers (``expires_in`` as a sane
lifetime), what the grants hand back before a TokenSet (AuthRequest, DeviceAuthorization, RefreshAnswer), and the
rules for quoting provider text in error messages (short, printable, nothing token-like, no URL paths).  Pure, no
I/O."""

from __future__ import annotations

import json
import math
import re
import urllib.request
from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Any
from urllib.parse import urlsplit

from .errors import DiscoveryError, InvalidGrant, TokenEndpointError

# RFC 6749 5.2 plus RFC 8628 3.5: anything else is reported as non-standard.
STANDARD_ERRORS = frozenset({
    "invalid_request", "invalid_client", "invalid_grant", "unauthorized_client", "unsupported_grant_type",
    "invalid_scope", "authorization_pending", "slow_down", "access_denied", "expired_token",
    "unsupported_token_type", "server_error", "temporarily_unavailable",
})
# Endpoints other than the token endpoint where the client authenticates, and that may list methods of their own.
AUTHENTICATED_ENDPOINTS = ("revocation", "pushed_authorization_request", "device_authorization")
# expires_in beyond this is not a lifetime but nonsense (or an attempt to make us keep a token for ever).
MAX_EXPIRES_IN = 366 * 24 * 3600
# What providers call the refresh token's own lifetime: Keycloak's name, and the one of RFC-less others.
REFRESH_LIFETIME_FIELDS = ("refresh_expires_in", "refresh_token_expires_in")
_TOKENISH = re.compile(r"[A-Za-z0-9_\-.~+/=]{24,}")


@dataclass(frozen=True)
class ProviderMetadata:
    issuer: str
    authorization_endpoint: str
    token_endpoint: str
    jwks_uri: str
    revocation_endpoint: str | None
    device_authorization_endpoint: str | None
    userinfo_endpoint: str | None
    id_token_signing_alg_values_supported: tuple[str, ...]
    token_endpoint_auth_methods_supported: tuple[str, ...]
    claims_parameter_supported: bool
    # What a hardened client registration needs (client_auth.py, jarm.py): RFC 9126, RFC 9207, JARM, and the
    # methods an endpoint other than the token endpoint lists for itself (RFC 8414 revocation_..., or others).
    pushed_authorization_request_endpoint: str | None = None
    authorization_response_iss_parameter_supported: bool = False
    authorization_signing_alg_values_supported: tuple[str, ...] = ("RS256",)
    endpoint_auth_methods: tuple[tuple[str, tuple[str, ...]], ...] = ()

    def auth_methods_for(self, endpoint: str) -> tuple[str, ...]:
        """The client authentication methods ``endpoint`` (token, revocation, ...) lists; () when it lists none."""
        if endpoint == "token":
            return self.token_endpoint_auth_methods_supported
        return dict(self.endpoint_auth_methods).get(endpoint, ())

    @classmethod
    def from_document(cls, doc: Mapping[str, Any]) -> ProviderMetadata:
        def url(name: str, required: bool = True) -> str | None:
            value = doc.get(name)
            if isinstance(value, str) and value.startswith(("https://", "http://")):
                return value
            if required or value is not None:
                raise DiscoveryError(f"discovery document has no valid '{name}'")
            return None

        def names(name: str, default: tuple[str, ...]) -> tuple[str, ...]:
            value = doc.get(name)
            return tuple(v for v in value if isinstance(v, str)) if isinstance(value, list) else default

        return cls(
            issuer=str(doc.get("issuer")), authorization_endpoint=str(url("authorization_endpoint")),
            token_endpoint=str(url("token_endpoint")), jwks_uri=str(url("jwks_uri")),
            revocation_endpoint=url("revocation_endpoint", False),
            device_authorization_endpoint=url("device_authorization_endpoint", False),
            userinfo_endpoint=url("userinfo_endpoint", False),
            id_token_signing_alg_values_supported=names("id_token_signing_alg_values_supported", ("RS256",)),
            token_endpoint_auth_methods_supported=names("token_endpoint_auth_methods_supported",
                                                        ("client_secret_basic",)),
            claims_parameter_supported=doc.get("claims_parameter_supported") is True,
            # Optional: a value that is no URL is taken as no endpoint (--oidc-par=auto then sends no PAR).
            pushed_authorization_request_endpoint=par if isinstance(par := doc.get(
                "pushed_authorization_request_endpoint"), str) and par.startswith(("https://", "http://")) else None,
            authorization_response_iss_parameter_supported=doc.get(
                "authorization_response_iss_parameter_supported") is True,
            authorization_signing_alg_values_supported=names("authorization_signing_alg_values_supported",
                                                             ("RS256",)),
            endpoint_auth_methods=tuple(
                (endpoint, methods) for endpoint in AUTHENTICATED_ENDPOINTS
                if (methods := names(f"{endpoint}_endpoint_auth_methods_supported", ()))),
        )


def proxy_for(url: str) -> str | None:
    """The proxy for ``url`` from the daemon's HTTP_PROXY/HTTPS_PROXY/NO_PROXY (lower case wins, as curl does).

    Chosen here rather than by aiohttp's ``trust_env``, which also reads ~/.netrc and would send the user's
    credentials from it to every provider host (and to proxies)."""
    parts = urlsplit(url)
    proxy = urllib.request.getproxies_environment().get(parts.scheme)
    if not proxy or urllib.request.proxy_bypass(parts.hostname or ""):
        return None
    return proxy


def origin(url: str) -> str:
    """scheme://host[:port] of a URL: what error messages may name (paths and queries may carry secrets)."""
    parts = urlsplit(url)
    return f"{parts.scheme}://{parts.netloc.rpartition('@')[2]}"


def safe_text(text: str, limit: int = 200) -> str:
    """A provider's text made fit for one log line: printable, short, and with anything token-like removed."""
    flat = " ".join("".join(c if c.isprintable() else " " for c in text).split())
    return _TOKENISH.sub("[...]", flat)[:limit]


def parse_token_response(status: int, content_type: str, body: bytes, where: str) -> dict[str, Any]:
    """An RFC 6749 5.1/5.2 response as a dict, or the matching ``TokenEndpointError``."""
    doc: Any = None
    if body.strip():
        try:
            doc = json.loads(body)
        except (ValueError, UnicodeError, RecursionError):  # deeply nested JSON is RecursionError
            doc = None
    if isinstance(doc, dict) and isinstance(doc.get("error"), str):
        code = doc["error"]
        raw_desc = doc.get("error_description")
        desc = safe_text(raw_desc) if isinstance(raw_desc, str) else None
        suffix = f" ({desc})" if desc else ""
        if code == "invalid_grant":
            raise InvalidGrant(f"{where} rejected the grant: invalid_grant{suffix}", error=code,
                               description=desc, status=status)
        if code in STANDARD_ERRORS:
            raise TokenEndpointError(f"{where} answered {code}{suffix}", error=code, description=desc,
                                     status=status)
        shown = safe_text(code, 40)
        raise TokenEndpointError(f"{where} answered HTTP {status} with a non-standard error '{shown}'{suffix}",
                                 error=shown, description=desc, status=status)
    if status == 200 and isinstance(doc, dict):
        return doc
    if not body.strip():
        what = "an empty body"
    elif doc is None:
        what = f"a body that is not JSON ({safe_text(content_type, 40) or 'no content type'})"
    else:
        what = "JSON that is neither a result nor an error"
    desc = safe_text(body.decode("utf-8", "replace")) or None
    raise TokenEndpointError(f"{where} answered HTTP {status} with {what}", description=desc, status=status)


def lifetime(value: Any) -> float | None:
    """A provider's ``expires_in`` as seconds, or None when absent or not a sane positive number (a bool, NaN,
    infinity, a 400-digit integer, more than a year)."""
    if isinstance(value, bool) or not isinstance(value, int | float):
        return None
    if isinstance(value, int) and not 0 < value <= MAX_EXPIRES_IN:
        return None
    seconds = float(value)
    return seconds if math.isfinite(seconds) and 0 < seconds <= MAX_EXPIRES_IN else None


def refresh_lifetime(doc: Mapping[str, Any]) -> float | None:
    """The refresh token's own lifetime when a token response says it, checked like ``expires_in``; None when it
    does not say or says nonsense (Keycloak's 0 for an offline token that does not expire included)."""
    for name in REFRESH_LIFETIME_FIELDS:
        seconds = lifetime(doc.get(name))
        if seconds is not None:
            return seconds
    return None


# What the grants hand back before they end in a TokenSet (oidc.py re-exports them).
@dataclass(frozen=True)
class RefreshAnswer:
    """A token endpoint's 200 answer to a refresh, not yet verified.  ``refresh_token`` is the one to use from now
    on: the rotated one, or the one sent when the provider does not rotate."""

    doc: Mapping[str, Any] = field(repr=False)
    refresh_token: str = field(repr=False)


@dataclass(frozen=True)
class AuthRequest:
    url: str = field(repr=False)
    state: str = field(repr=False)
    nonce: str = field(repr=False)
    code_verifier: str | None = field(repr=False)
    redirect_uri: str


@dataclass(frozen=True)
class DeviceAuthorization:
    device_code: str = field(repr=False)
    user_code: str
    verification_uri: str
    verification_uri_complete: str | None
    interval: float
    expires_at: float
    code_verifier: str | None = field(default=None, repr=False)
