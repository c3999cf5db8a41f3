"""ID token checks that need no I/O: JWS parsing, key selection, signature and claim rules (OIDC Core 3.1.3.7).

``oidc.py`` owns the JWKS cache and calls these.  Every failure is a ``TokenValidationError`` whose message names
the rule that failed and never contains the token.
"""

from __future__ import annotations

import json
import math
from collections.abc import Collection, Mapping
from typing import Any

from joserfc import jws
from joserfc.errors import JoseError
from joserfc.jwk import Key, KeySet

from .errors import ClaimTimeError, DiscoveryError, TokenValidationError

# Only public-key algorithms: "none" proves nothing, and HS* with a JWKS would let anyone who has the public key
# (everyone) mint tokens.  A provider that signs ID tokens with HS* and the client secret is not supported.
ASYMMETRIC_ALGS = frozenset({
    "RS256", "RS384", "RS512", "PS256", "PS384", "PS512", "ES256", "ES384", "ES512", "ES256K", "EdDSA", "Ed25519",
})
_KEY_TYPES = {"RS": "RSA", "PS": "RSA", "ES": "EC", "Ed": "OKP"}

# Leeway for clocks that disagree, applied to nbf and iat only.  exp gets none: kube-apiserver allows none either,
# so a token we call valid past its exp would be refused there anyway.
CLOCK_SKEW = 30.0
# Anything larger than this is not an ID token we want to parse.
MAX_TOKEN_LENGTH = 64 * 1024
# Claim times beyond this (the year 5138) are nonsense, not times.
MAX_TIME = 10**11


def allowed_algs(advertised: Collection[str]) -> frozenset[str]:
    """Algorithms we accept from a provider: what discovery lists, minus anything not asymmetric.

    OIDC Discovery makes RS256 the default when the provider lists nothing.
    """
    algs = frozenset(advertised or ("RS256",)) & ASYMMETRIC_ALGS
    return algs


def parse_key_set(doc: Any) -> KeySet:
    """Import a JWKS document; keys of unknown type are skipped (RFC 7517 section 5)."""
    if not isinstance(doc, Mapping) or not isinstance(doc.get("keys"), list):
        raise DiscoveryError("JWKS document has no 'keys' list")
    try:
        return KeySet.import_key_set({"keys": [k for k in doc["keys"] if isinstance(k, dict)]})
    except (JoseError, ValueError, TypeError) as exc:
        raise DiscoveryError(f"JWKS document holds no usable key ({type(exc).__name__})") from exc


def parse(token: str) -> jws.CompactSignature:
    """Split and decode a compact JWS without checking it."""
    if not token or len(token) > MAX_TOKEN_LENGTH:
        raise TokenValidationError("ID token is empty or too large")
    if token.count(".") != 2:
        raise TokenValidationError("ID token is not a compact JWS (encrypted ID tokens are not supported)")
    try:
        obj = jws.extract_compact(token.encode("ascii"))
    except (JoseError, ValueError, TypeError, UnicodeError) as exc:
        raise TokenValidationError(f"ID token cannot be decoded ({type(exc).__name__})") from exc
    if not isinstance(obj.headers().get("alg"), str):
        raise TokenValidationError("ID token header has no 'alg'")
    return obj


def check_alg(obj: jws.CompactSignature, allowed: frozenset[str]) -> str:
    alg = str(obj.headers()["alg"])
    if alg not in allowed:
        raise TokenValidationError(
            f"ID token is signed with '{alg[:20]}', which is not allowed (allowed: {', '.join(sorted(allowed))})"
        )
    return alg


def candidate_keys(key_set: KeySet, obj: jws.CompactSignature, alg: str) -> list[Key]:
    """Keys from the set that could have made this signature: same kid (if the token names one), a key type that
    fits the algorithm, not marked for encryption, and no conflicting ``alg``."""
    kid = obj.headers().get("kid")
    kty = _KEY_TYPES.get(alg[:2])
    found = []
    for key in key_set.keys:
        if kid is not None and key.kid != kid:
            continue
        if key.key_type != kty or key.get("use") not in (None, "sig") or key.alg not in (None, alg):
            continue
        found.append(key)
    return found


def verify_signature(obj: jws.CompactSignature, keys: list[Key], alg: str) -> None:
    for key in keys:
        try:
            if jws.validate_compact(obj, key, algorithms=[alg]):
                return
        except JoseError:
            continue
    raise TokenValidationError("ID token signature does not verify against the provider's keys")


def payload_claims(obj: jws.CompactSignature) -> dict[str, Any]:
    try:
        claims = json.loads(obj.payload)
    except (TypeError, ValueError, RecursionError) as exc:
        raise TokenValidationError("ID token payload is not JSON") from exc
    if not isinstance(claims, dict):
        raise TokenValidationError("ID token payload is not a JSON object")
    return claims


def _number(claims: Mapping[str, Any], name: str, *, required: bool) -> float | None:
    value = claims.get(name)
    if value is None:
        if required:
            raise TokenValidationError(f"ID token has no '{name}' claim")
        return None
    if isinstance(value, bool) or not isinstance(value, int | float):
        raise TokenValidationError(f"ID token '{name}' claim is not a number")
    # A time: finite and within a sane range (NaN compares false with everything; a 400-digit int overflows).
    if isinstance(value, int) and not 0 <= value <= MAX_TIME:
        raise TokenValidationError(f"ID token '{name}' claim is not a plausible time")
    if not (math.isfinite(value) and 0 <= value <= MAX_TIME):
        raise TokenValidationError(f"ID token '{name}' claim is not a plausible time")
    return float(value)


def check_claims(claims: Mapping[str, Any], *, issuer: str, client_id: str, now: float,
                 nonce: str | None, skew: float = CLOCK_SKEW) -> None:
    """The claim rules of OIDC Core 3.1.3.7 that a relying party without a client secret for HS* can apply."""
    iss = claims.get("iss")
    if iss != issuer:
        shown = iss[:200] if isinstance(iss, str) else repr(iss)[:50]
        raise TokenValidationError(f"ID token issuer {shown!r} is not {issuer!r}")
    aud = claims.get("aud")
    audiences = [aud] if isinstance(aud, str) else aud
    if not isinstance(audiences, list) or client_id not in audiences:
        raise TokenValidationError(f"ID token audience does not contain client id {client_id!r}")
    azp = claims.get("azp")
    if len(audiences) > 1 and azp is None:
        raise TokenValidationError("ID token has several audiences but no 'azp'")
    if azp is not None and azp != client_id:
        raise TokenValidationError(f"ID token 'azp' is not client id {client_id!r}")
    sub = claims.get("sub")
    if not isinstance(sub, str) or not sub:
        raise TokenValidationError("ID token has no 'sub' claim")
    exp = _number(claims, "exp", required=True)
    assert exp is not None  # for mypy: required=True never returns None
    if exp <= now:
        raise ClaimTimeError(f"ID token expired {int(now - exp)} s ago")
    nbf = _number(claims, "nbf", required=False)
    if nbf is not None and nbf > now + skew:
        raise ClaimTimeError(f"ID token is not valid for another {int(nbf - now)} s (nbf)")
    iat = _number(claims, "iat", required=True)
    if iat is not None and iat > now + skew:
        raise ClaimTimeError(f"ID token was issued {int(iat - now)} s in the future (iat)")
    if nonce is not None and claims.get("nonce") != nonce:
        raise TokenValidationError("ID token nonce does not match the login request")
