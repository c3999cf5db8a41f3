"""Refresh policy of a session, as pure functions: when to refresh, how long to serve, what a failure means.

``sessions.py`` drives the tasks; everything here is arithmetic on a ``TokenSet`` and an error, so it is tested
without time or I/O.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Any

from brokerd.errors import ClaimTimeError, InvalidGrant, ProviderError, TokenEndpointError, UsageError
from brokerd.models import ProviderSettings, SessionKey, TokenSet


@dataclass(frozen=True)
class Policy:
    refresh_ratio: float = 0.8  # refresh when this share of the token's life has passed ...
    refresh_lead: float = 60.0  # ... and never later than this many seconds before exp
    serve_margin: float = 10.0  # tell kubectl the token expires this much early (at most 10% of its life)
    login_retry_interval: float = 30.0  # after a failed login, non-interactive callers wait this long to retry
    retry_initial: float = 2.0  # background refresh back-off
    retry_max: float = 60.0


def _life(issued_at: float, expiry: float) -> float:
    return max(0.0, expiry - issued_at)


def margin(policy: Policy, issued_at: float, expiry: float) -> float:
    return min(policy.serve_margin, _life(issued_at, expiry) * 0.1)


def serve_until(policy: Policy, issued_at: float, expiry: float) -> float:
    """The expirationTimestamp given to kubectl, and the moment the daemon stops serving a token issued at
    ``issued_at`` that expires at ``expiry``: a little before the real exp, because kube-apiserver allows no
    leeway.  Whole seconds, as RFC 3339 in the ExecCredential says it: the daemon must not serve a token whose
    stated expiry has already passed."""
    return float(math.floor(expiry - margin(policy, issued_at, expiry)))


def refresh_due(policy: Policy, issued_at: float, expiry: float) -> float:
    """When the background refresh runs: at ``refresh_ratio`` of the served token's life, at the latest
    ``refresh_lead`` before its exp, but never in the first half of its life.  That floor decides for short
    lifetimes (tests, strict providers): a 10 s token is refreshed after 5 s, not 50 s before it was issued."""
    life = _life(issued_at, expiry)
    due = min(issued_at + life * policy.refresh_ratio, expiry - policy.refresh_lead)
    return max(due, issued_at + life * 0.5)


def refresh_token_lost(exc: BaseException) -> bool:
    """Is the refresh token unusable after a refresh request failed with ``exc``?

    True when the grant is dead (invalid_grant) and whenever the provider may have processed the request: a
    rotating provider then has spent the token, and sending it again makes it revoke the whole grant.  Only two
    failures prove the token unspent: the request never left (``ProviderError.maybe_delivered`` is False: no
    connection could be made), or the token endpoint refused it with an OAuth error (a 4xx/5xx whose JSON body
    is ``{"error": ...}``: the provider itself read the request and said no).  Any other error status may come
    from a gateway in front of the provider after it forwarded the request (nginx's 502, Cloudflare's 520/524, a
    504), so it is no proof.  A 2xx answer we cannot use, a dropped connection, a timeout after sending, and an ID
    token that fails verification all count as spent.  A ``UsageError`` is brokerd's own configuration (a client
    assertion key file it cannot read or use), found while building the request: nothing left, the token stays.
    """
    if isinstance(exc, UsageError):
        return False
    if isinstance(exc, InvalidGrant):
        return True
    if isinstance(exc, TokenEndpointError) and exc.status is not None:
        return 200 <= exc.status < 300 or exc.error is None
    if isinstance(exc, ProviderError):
        return exc.maybe_delivered
    return True


def answered_refresh_unusable(exc: BaseException) -> bool:
    """After the provider answered a refresh with 200 and its new refresh token was adopted: does ``exc``, raised
    while turning the answer into a session (ID token verification, the JWKS fetch), make the session's refresh
    token unusable?

    The adopted token was never sent, so no network failure can have spent it: a JWKS that cannot be reached is
    transient, and the next attempt sends the new token.  So is an ID token whose only fault is its time claims
    (``ClaimTimeError``: exp/nbf/iat against our clock, which may be the one that is wrong): that ID token is not
    served, but the refresh token is kept.  An ID token that fails verification otherwise (or no ID token when
    the old one expired: ``InvalidGrant``) is not cured by asking again: drop it, and log in once.  A
    ``UsageError`` (an ID token decryption key file brokerd cannot read or use) is cured by fixing the file: keep.
    """
    if isinstance(exc, ClaimTimeError | UsageError):
        return False
    return not isinstance(exc, ProviderError) or isinstance(exc, InvalidGrant)


def describe(key: SessionKey, settings: ProviderSettings, tokens: TokenSet | None, now: float, *,
             expires_at: float | None, next_refresh_at: float | None, retrying: bool = False,
             login_pending: bool = False) -> dict[str, Any]:
    """One session for ``brokerd status``: who, until when, what happens next.  Never a token value."""
    claims = dict(tokens.claims) if tokens is not None else {}
    sub = claims.get("sub")
    groups = claims.get("groups")
    return {
        "session": key.short(),
        "issuer": settings.issuer,
        "client_id": settings.client_id,
        "session_name": settings.username,
        "scopes": list(settings.scopes),
        # kube-apiserver's default username mapping for OIDC: "<issuer>#<sub>".
        "username": f"{settings.issuer}#{sub}" if sub is not None else None,
        "email": claims.get("email"),
        "groups": [g for g in groups if isinstance(g, str)] if isinstance(groups, list) else [],
        "expires_at": expires_at,
        "expires_in": round(expires_at - now) if expires_at is not None else None,
        "refresh_token": bool(tokens is not None and tokens.refresh_token),
        "next_refresh_at": next_refresh_at,
        "refresh_retrying": retrying,
        "login_pending": login_pending,
    }
