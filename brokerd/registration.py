"""How the client is registered at the provider, as far as it changes the requests brokerd makes: client
authentication (RFC 6749 2.3, RFC 7523), pushed authorization requests (RFC 9126), the response mode (JARM) and
ID token encryption.  Pure data and flag validation, no I/O; part of ``ProviderSettings`` (so of the session key,
which includes it only when it is not all defaults: sessions made before it existed keep their keys)."""

from __future__ import annotations

import os
from collections.abc import Callable, Mapping
from dataclasses import asdict, dataclass, fields
from typing import Any

from brokerd.errors import UsageError

AUTH_METHODS = ("client_secret_basic", "client_secret_post", "client_secret_jwt", "private_key_jwt", "none")
PAR_MODES = ("auto", "always", "never")
RESPONSE_MODES = ("query", "form_post", "jwt", "query.jwt", "form_post.jwt")
HMAC_ALGS = ("HS256", "HS384", "HS512")
SIGNING_ALGS = ("RS256", "RS384", "RS512", "PS256", "PS384", "PS512", "ES256", "ES384", "ES512", "EdDSA",
                "Ed25519")
# The get-token flags this module reads, added to flags.FLAGS.
FLAG_NAMES = ("oidc-client-auth-method", "oidc-client-assertion-key", "oidc-client-assertion-alg",
              "oidc-client-assertion-kid", "oidc-par", "oidc-response-mode", "oidc-id-token-decryption-key")


@dataclass(frozen=True)
class ClientRegistration:
    auth_method: str | None = None  # None: chosen from discovery (basic, else post; none without a secret)
    assertion_key: str | None = None  # absolute path of the private_key_jwt key (PEM, JWK or JWKS)
    assertion_alg: str | None = None  # None: from the key (RS256, ES256/384/512, EdDSA), HS256 for a secret
    assertion_kid: str | None = None  # None: the JWK's kid, else no kid header
    par: str = "auto"
    response_mode: str = "query"
    id_token_decryption_key: str | None = None  # absolute path of the key that decrypts JWE ID tokens

    def non_defaults(self) -> dict[str, str]:
        """What differs from the defaults: the session key and the store hold only this."""
        default = ClientRegistration()
        return {k: v for k, v in asdict(self).items() if v != getattr(default, k)}

    @property
    def method(self) -> str | None:
        """The configured method; a key file alone means private_key_jwt."""
        if self.auth_method is None and self.assertion_key is not None:
            return "private_key_jwt"
        return self.auth_method

    @classmethod
    def from_doc(cls, doc: Any) -> ClientRegistration:
        """From ``non_defaults()`` as stored; ValueError for anything else."""
        if doc is None:
            return cls()
        names = {f.name for f in fields(cls)}
        if not isinstance(doc, Mapping) or not all(k in names and isinstance(v, str) for k, v in doc.items()):
            raise ValueError("field 'registration' must map known names to strings")
        return cls(**dict(doc))


def absolute_path(flag: str, path: str | None) -> str | None:
    """A file flag's path, ``~`` expanded; UsageError unless absolute."""
    # The daemon does not share the caller's working directory, so a relative path would name another file.
    if path is None:
        return None
    full = os.path.expanduser(path)
    if not os.path.isabs(full):
        raise UsageError(f"--{flag} needs an absolute path (brokerd does not run in your directory), got {path!r}")
    return full


def _one_of(flag: str, value: str | None, allowed: tuple[str, ...]) -> None:
    if value is not None and value not in allowed:
        raise UsageError(f"--{flag} must be one of {', '.join(allowed)}; got {value!r}")


def parse_registration(get: Callable[[str], str | None], *, has_secret: bool) -> ClientRegistration:
    """The registration flags, checked together; ``get`` reads one string flag."""
    method, alg = get("oidc-client-auth-method"), get("oidc-client-assertion-alg")
    _one_of("oidc-client-auth-method", method, AUTH_METHODS)
    _one_of("oidc-par", get("oidc-par"), PAR_MODES)
    _one_of("oidc-response-mode", get("oidc-response-mode"), RESPONSE_MODES)
    reg = ClientRegistration(
        auth_method=method, assertion_key=absolute_path("oidc-client-assertion-key", get("oidc-client-assertion-key")),
        assertion_alg=alg, assertion_kid=get("oidc-client-assertion-kid"), par=get("oidc-par") or "auto",
        response_mode=get("oidc-response-mode") or "query",
        id_token_decryption_key=absolute_path("oidc-id-token-decryption-key", get("oidc-id-token-decryption-key")))
    chosen = reg.method
    if chosen == "private_key_jwt" and reg.assertion_key is None:
        raise UsageError("--oidc-client-auth-method=private_key_jwt needs --oidc-client-assertion-key=PATH")
    if reg.assertion_key is not None and chosen != "private_key_jwt":
        raise UsageError(f"--oidc-client-assertion-key is only used by private_key_jwt, not {chosen}")
    if chosen in ("client_secret_basic", "client_secret_post", "client_secret_jwt") and not has_secret:
        raise UsageError(f"--oidc-client-auth-method={chosen} needs --oidc-client-secret")
    if chosen == "none" and has_secret:
        raise UsageError("--oidc-client-auth-method=none sends no secret; drop --oidc-client-secret")
    if (alg or reg.assertion_kid) and chosen not in ("private_key_jwt", "client_secret_jwt"):
        raise UsageError("--oidc-client-assertion-alg/-kid are only used by private_key_jwt and client_secret_jwt")
    if alg is not None:
        _one_of("oidc-client-assertion-alg", alg, HMAC_ALGS if chosen == "client_secret_jwt" else SIGNING_ALGS)
    return reg
