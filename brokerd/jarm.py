"""The authorization response in its other shapes: form_post (a POST to the loopback listener) and JARM (a JWT
signed by the provider carrying code, state and iss; query.jwt, form_post.jwt, jwt).

The listener only reads the JARM's state, unverified, to route it to its login; ``verify_response`` checks the
signature with the provider's keys, iss, aud = client_id, exp and state before the code inside is used.
"""

from __future__ import annotations

import json
from collections.abc import Awaitable, Callable, Mapping
from typing import Any

from joserfc import jws
from joserfc.errors import JoseError
from joserfc.jwk import KeySet

from .errors import LoginDenied, TokenValidationError
from .idtoken import ASYMMETRIC_ALGS, candidate_keys
from .oidc_wire import ProviderMetadata, safe_text

MAX_RESPONSE = 64 * 1024
KeyLookup = Callable[[bool], Awaitable[KeySet | None]]  # refetch -> the provider's JWKS (None: rate-limited)


def _unverified(token: str) -> tuple[jws.CompactSignature, dict[str, Any]]:
    if not token or len(token) > MAX_RESPONSE or token.count(".") != 2:
        raise TokenValidationError("the JWT authorization response is not a signed JWT (an encrypted one is not "
                                   "supported)")
    try:
        obj = jws.extract_compact(token.encode("ascii"))
        claims = json.loads(obj.payload)
    except (JoseError, ValueError, TypeError, UnicodeError) as exc:
        raise TokenValidationError(f"the JWT authorization response cannot be decoded ({type(exc).__name__})") from exc
    if not isinstance(claims, dict) or not isinstance(obj.headers().get("alg"), str):
        raise TokenValidationError("the JWT authorization response has no claims or no 'alg'")
    return obj, claims


def routing_state(params: Mapping[str, str]) -> str | None:
    """The state that routes a callback to its login: the parameter, or inside an (unverified) JARM ``response``."""
    response = params.get("response")
    if response is None:
        return params.get("state")
    try:
        state = _unverified(response)[1].get("state")
    except TokenValidationError:
        return None
    return state if isinstance(state, str) else None


async def verify_response(token: str, *, keys: KeyLookup, meta: ProviderMetadata, client_id: str, state: str,
                          now: float) -> str:
    """The code of a JARM response once everything about it checks out (JARM 4.4)."""
    obj, claims = _unverified(token)
    alg = str(obj.headers()["alg"])
    allowed = frozenset(meta.authorization_signing_alg_values_supported) & ASYMMETRIC_ALGS
    if alg not in allowed:
        raise TokenValidationError(f"the JWT authorization response is signed with {safe_text(alg, 20)!r}, not one of "
                                   f"{', '.join(sorted(allowed)) or 'the asymmetric algorithms'}")
    key_set = await keys(False)
    found = candidate_keys(key_set, obj, alg) if key_set is not None else []
    if not found:
        fresh = await keys(True)  # rotated keys: look once more (rate-limited by the caller)
        found = candidate_keys(fresh, obj, alg) if fresh is not None else []
    if not any(_valid(obj, key, alg) for key in found):
        raise TokenValidationError("the JWT authorization response's signature does not verify against the "
                                   "provider's keys; its code was not used")
    if claims.get("iss") != meta.issuer:
        raise TokenValidationError(f"the JWT authorization response was issued by {safe_text(str(claims.get('iss')))!r}"
                                   f", not {meta.issuer!r}; its code was not used")
    aud = claims.get("aud")
    if client_id not in ([aud] if isinstance(aud, str) else aud if isinstance(aud, list) else []):
        raise TokenValidationError(f"the JWT authorization response is not for client {client_id!r}")
    exp = claims.get("exp")
    if not isinstance(exp, int | float) or isinstance(exp, bool) or exp <= now:
        raise TokenValidationError("the JWT authorization response has expired (or has no exp)")
    if claims.get("state") != state:
        raise TokenValidationError("the JWT authorization response belongs to another login (state)")
    if isinstance(error := claims.get("error"), str):
        desc = claims.get("error_description")
        detail = f" ({safe_text(desc, 200)})" if isinstance(desc, str) and desc else ""
        raise LoginDenied(f"the provider refused the login: {safe_text(error, 60)}{detail}")
    code = claims.get("code")
    if not isinstance(code, str) or not code:
        raise TokenValidationError("the JWT authorization response carries no code")
    return code


def _valid(obj: jws.CompactSignature, key: Any, alg: str) -> bool:
    try:
        return bool(jws.validate_compact(obj, key, algorithms=[alg]))
    except JoseError:
        return False
