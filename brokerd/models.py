"""Pure data: provider settings, the session key, token sets.  No I/O."""

from __future__ import annotations

import hashlib
import json
from collections.abc import Mapping
from dataclasses import dataclass, field
from functools import cached_property
from typing import Any, Protocol

from brokerd.registration import ClientRegistration

DEFAULT_LISTEN = ("127.0.0.1:8000", "127.0.0.1:18000")
EXEC_API_V1BETA1 = "client.authentication.k8s.io/v1beta1"
EXEC_API_V1 = "client.authentication.k8s.io/v1"

# Claims kept in memory and on disk for `brokerd status`; the token itself stays opaque otherwise.
STATUS_CLAIMS = ("iss", "sub", "aud", "exp", "iat", "email", "name", "preferred_username", "groups")


def canonical_json(value: object) -> str:
    return json.dumps(value, sort_keys=True, separators=(",", ":"), ensure_ascii=True)


@dataclass(frozen=True)
class TLSOptions:
    """How to trust the provider (--certificate-authority(-data), --insecure-skip-tls-verify)."""

    ca_files: tuple[str, ...] = ()
    ca_data: tuple[str, ...] = field(default=(), repr=False)
    insecure_skip_verify: bool = False


@dataclass(frozen=True)
class ProviderSettings:
    """The settings that change which token a user gets.  Two requests with equal settings share one session."""

    issuer: str
    client_id: str
    client_secret: str | None = field(default=None, repr=False)
    scopes: tuple[str, ...] = ("openid",)
    extra_params: tuple[tuple[str, str], ...] = ()
    use_access_token: bool = False
    redirect_url: str | None = None
    username: str | None = None
    # How to reach the provider.  Part of the session's identity: a caller with other TLS settings (say
    # --insecure-skip-tls-verify) gets a session of its own and can never weaken another session's refreshes.
    tls: TLSOptions = field(default_factory=TLSOptions)
    request_headers: tuple[tuple[str, str], ...] = ()
    registration: ClientRegistration = field(default_factory=ClientRegistration)

    def __post_init__(self) -> None:
        # Normalize so that the key is stable whatever order the flags came in (kubelogin #1638).
        scopes = set(self.scopes) | {"openid"}
        object.__setattr__(self, "scopes", tuple(sorted(scopes)))
        object.__setattr__(self, "extra_params", tuple(sorted(self.extra_params)))

    @cached_property
    def key(self) -> SessionKey:
        secret_hash = (
            hashlib.sha256(self.client_secret.encode()).hexdigest() if self.client_secret is not None else None
        )
        doc: dict[str, Any] = {
            "v": 1,
            "issuer": self.issuer,
            "client_id": self.client_id,
            "client_secret_sha256": secret_hash,
            "scopes": list(self.scopes),
            "extra_params": [list(p) for p in self.extra_params],
            "use_access_token": self.use_access_token,
            "redirect_url": self.redirect_url,
            "username": self.username,
        }
        # Only when not the defaults, so that the keys of sessions made before these were part of it stay valid.
        if self.tls != TLSOptions():
            doc["tls"] = {"ca_files": list(self.tls.ca_files), "ca_data": list(self.tls.ca_data),
                          "insecure_skip_verify": self.tls.insecure_skip_verify}
        if self.request_headers:
            doc["request_headers"] = [list(h) for h in self.request_headers]
        if reg := self.registration.non_defaults():
            doc["registration"] = reg
        return SessionKey(hashlib.sha256(canonical_json(doc).encode()).hexdigest())


@dataclass(frozen=True, order=True)
class SessionKey:
    value: str

    def short(self) -> str:
        return self.value[:12]

    def __str__(self) -> str:
        return self.value


@dataclass(frozen=True)
class TokenSet:
    """What a grant gave us.  ``expires_at`` is the served token's expiry (ID token ``exp`` normally)."""

    id_token: str = field(repr=False)
    expires_at: float
    issued_at: float
    refresh_token: str | None = field(default=None, repr=False)
    access_token: str | None = field(default=None, repr=False)
    access_expires_at: float | None = None
    # When the refresh token stops working, when the provider said so (refresh_expires_in); None: not said.
    refresh_expires_at: float | None = None
    claims: Mapping[str, Any] = field(default_factory=dict)


@dataclass(frozen=True)
class Served:
    """Which token of a set a session hands to kubectl, decided once per session from its settings."""

    access_token: bool

    @classmethod
    def by(cls, settings: ProviderSettings) -> Served:
        return cls(access_token=settings.use_access_token)

    def token(self, tokens: TokenSet) -> str:
        if self.access_token and tokens.access_token:
            return tokens.access_token
        return tokens.id_token

    def expiry(self, tokens: TokenSet) -> float:
        """The real expiry of the served token (ID token ``exp`` normally)."""
        if self.access_token and tokens.access_expires_at is not None:
            return tokens.access_expires_at
        return tokens.expires_at


@dataclass(frozen=True)
class Session:
    """A persisted session: the settings it was made for (how to reach the provider included, so a restarted
    daemon can refresh before anyone asks) and its current tokens."""

    key: SessionKey
    settings: ProviderSettings
    tokens: TokenSet
    # The agent's clocks (agent.py): max_session_age counts from the login, idle_logout from the last token served.
    logged_in_at: float | None = None
    last_served_at: float | None = None


@dataclass(frozen=True)
class LoginOptions:
    """How to get a token when one is needed.  Not part of the session key."""

    grant_type: str = "auto"
    listen_addresses: tuple[str, ...] = DEFAULT_LISTEN
    browser_command: str | None = None
    skip_open_browser: bool = False
    authentication_timeout: float = 180.0
    pkce_method: str = "auto"
    open_url_after_authentication: str | None = None
    password: str | None = field(default=None, repr=False)
    force_refresh: bool = False
    local_server_cert: str | None = None
    local_server_key: str | None = None
    verbosity: int = 0
    cache_storage: str | None = None  # --token-cache-storage: "none" keeps the session in memory only


class Caller(Protocol):
    """Who is waiting for a token: where to show messages, whether a person can answer, whose desktop to use."""

    env: Mapping[str, str]
    interactive: bool

    def tell(self, text: str) -> None:
        """Show one message on the caller's stderr (never blocks; a caller that went away is ignored)."""
        ...

    async def ask(self, prompt: str, *, secret: bool) -> str:
        """Ask the person for one line on their terminal; UsageError when nobody can answer."""
        ...
