"""Encrypted ID tokens (OIDC Core 10.2; Authelia's ``id_token_encrypted_response_alg``): the JWE is decrypted with
the client's key (``--oidc-id-token-decryption-key``) and the signed JWT inside is what brokerd verifies, keeps and
serves.  kube-apiserver verifies only signed JWTs against the provider's JWKS, so the inner token is the one that
works there; an encrypted token without a signed one inside cannot be used for Kubernetes and is refused.
"""

from __future__ import annotations

from collections.abc import Awaitable, Callable
from typing import Any

from joserfc import jwe
from joserfc.errors import JoseError
from joserfc.jwk import Key

from .errors import TokenValidationError
from .models import ProviderSettings

FLAG = "oidc-id-token-decryption-key"
# Key management and content encryption that joserfc implements and that do not need a shared secret: the
# provider encrypts to the client's public key.  RSA1_5 is left out (padding-oracle attacks).
ALGORITHMS = ("RSA-OAEP", "RSA-OAEP-256", "ECDH-ES", "ECDH-ES+A128KW", "ECDH-ES+A192KW", "ECDH-ES+A256KW",
              "A128GCM", "A192GCM", "A256GCM", "A128CBC-HS256", "A192CBC-HS384", "A256CBC-HS512")
KeyLoader = Callable[[str, str, str | None, str], Awaitable[Key]]


async def signed_id_token(settings: ProviderSettings, raw: Any, load: KeyLoader) -> Any:
    """The signed ID token: ``raw`` itself unless it is a compact JWE (five parts), else the JWT inside it."""
    if not isinstance(raw, str) or raw.count(".") != 4:
        return raw
    path = settings.registration.id_token_decryption_key
    if path is None:
        raise TokenValidationError(f"the provider sends encrypted ID tokens; pass --{FLAG}=PATH (the client's private "
                                   "key whose public half the provider encrypts to)")
    key = await load(path, FLAG, None, "ID token decryption key")
    try:
        # Not strict about header names: oidc-provider (and others) add informational ones (iss, aud) to the
        # JWE header; nothing in it is trusted, the inner JWS is verified on its own.
        registry = jwe.JWERegistry(algorithms=ALGORITHMS, strict_check_header=False)
        plaintext = jwe.decrypt_compact(raw.encode("ascii"), key, registry=registry).plaintext
    except (JoseError, ValueError, TypeError, UnicodeError) as exc:
        raise TokenValidationError(f"the encrypted ID token cannot be decrypted with --{FLAG} "
                                   f"({type(exc).__name__})") from None
    inner = (plaintext or b"").decode("ascii", "replace")
    if inner.count(".") != 2:
        raise TokenValidationError("the decrypted ID token is not a signed JWT; kube-apiserver accepts only signed "
                                   "ones, so brokerd cannot serve it (set id_token_signed_response_alg too)")
    return inner
