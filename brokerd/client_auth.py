"""How brokerd proves who it is to the provider, and checks who answered: the client side of a registration.

Client authentication at every endpoint that asks for it (RFC 6749 2.3.1 secrets, RFC 7523 / OIDC Core 9 JWT
assertions), and the RFC 9207 mix-up defence on authorization responses.  ``oidc.py`` calls these; the key file
is read here, off the event loop, and its contents never reach a message or a log line.
"""

from __future__ import annotations

import asyncio
import base64
import json
import logging
import os
import stat
import warnings
from typing import Any, Literal
from urllib.parse import quote_plus

from cryptography.exceptions import UnsupportedAlgorithm
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric import ec, rsa
from joserfc import jwk, jwt
from joserfc.errors import JoseError, SecurityWarning
from joserfc.jwk import Key, KeySet

from .clock import Clock
from .errors import ProviderError, TokenValidationError, UsageError
from .models import ProviderSettings
from .oidc_wire import ProviderMetadata, origin, safe_text
from .pkce import random_token

log = logging.getLogger("brokerd.client_auth")


def check_response_issuer(meta: ProviderMetadata, iss: str | None, *, redirected: bool) -> None:
    """RFC 9207: an ``iss`` in the authorization response must be our issuer; a provider that advertises
    ``authorization_response_iss_parameter_supported`` always sends it, so a redirect without one did not come
    from it (a mix-up: the code may belong to another provider).  A code the person typed carries no ``iss``."""
    if iss is not None:
        if iss != meta.issuer:
            raise TokenValidationError(
                f"the login answer came from issuer {safe_text(iss)!r}, expected {meta.issuer!r}; the code was not "
                "used (a mix-up attack, or a redirect from another provider's login)")
        return
    if redirected and meta.authorization_response_iss_parameter_supported:
        raise TokenValidationError(
            f"the login answer carries no 'iss' although {meta.issuer} always sends one (RFC 9207); the code was "
            "not used")


# ---- client authentication -------------------------------------------------------------------------------------

ASSERTION_TYPE = "urn:ietf:params:oauth:client-assertion-type:jwt-bearer"
# Short: an assertion is good for one request (its jti is single-use at the provider anyway).
ASSERTION_LIFETIME = 60
MAX_KEY_FILE = 64 * 1024
KEY_READ_TIMEOUT = 10.0  # s; as tls.FILE_READ_TIMEOUT (not imported: tls.py imports oidc.py, which imports this)
_ALG_BY_CURVE = {"P-256": "ES256", "P-384": "ES384", "P-521": "ES512", "Ed25519": "EdDSA"}


def _pick(keys: KeySet, kid: str | None, where: str) -> Key:
    private = [k for k in keys.keys if k.is_private and (kid is None or k.kid == kid)]
    if len(private) != 1:
        which = f"with kid {kid!r}" if kid else "(name one with --oidc-client-assertion-kid)"
        raise UsageError(f"{where}: {len(private)} private keys {which}; need exactly one")
    return private[0]


def _import(data: bytes, where: str, kid: str | None) -> Key:
    """A private key from PEM (PKCS#8, PKCS#1 or SEC1), a JWK or a JWKS.  Errors name the file, never its bytes."""
    text = data.strip()
    try:
        if text.startswith(b"{"):
            doc = json.loads(text)
            if isinstance(doc, dict) and isinstance(doc.get("keys"), list):
                return _pick(KeySet.import_key_set(doc), kid, where)  # type: ignore[arg-type]
            key: Key = jwk.import_key(doc)
        else:
            loaded = serialization.load_pem_private_key(text, password=None)
            key_type: Literal["RSA", "EC", "OKP"] = "OKP"
            if isinstance(loaded, rsa.RSAPrivateKey):
                key_type = "RSA"
            elif isinstance(loaded, ec.EllipticCurvePrivateKey):
                key_type = "EC"
            key = jwk.import_key(text, key_type)
    except UsageError:
        raise
    except (JoseError, ValueError, TypeError, UnsupportedAlgorithm) as exc:
        raise UsageError(f"{where}: not a private key brokerd can use (PEM RSA, EC "
                         f"P-256/384/521 or Ed25519, or JWK/JWKS JSON): {type(exc).__name__}") from None
    if not key.is_private:
        raise UsageError(f"{where}: holds a public key; brokerd needs the private one")
    return key


def _default_alg(key: Key) -> str:
    if isinstance(key, jwk.RSAKey):
        return "RS256"
    curve = key.as_dict().get("crv")
    alg = _ALG_BY_CURVE.get(str(curve))
    if alg is None:
        raise UsageError(f"a key on curve {curve} needs --oidc-client-assertion-alg")
    return alg


def read_private_key(path: str, flag: str, kid: str | None) -> tuple[Key, bool]:
    """Blocking (call in a thread): the key in the file ``--flag`` names, and whether others than its owner can
    read the file."""
    where = f"--{flag} {path}"
    try:
        fd = os.open(path, os.O_RDONLY | os.O_NOFOLLOW | os.O_NONBLOCK)
    except OSError as exc:
        raise UsageError(f"{where}: {exc.strerror}") from None
    with os.fdopen(fd, "rb") as f:
        st = os.fstat(f.fileno())
        if not stat.S_ISREG(st.st_mode) or st.st_size > MAX_KEY_FILE:
            raise UsageError(f"{where}: not a regular file of at most {MAX_KEY_FILE} bytes")
        return _import(f.read(MAX_KEY_FILE), where, kid), bool(st.st_mode & 0o077)


def make_assertion(client_id: str, audience: str, key: Key, alg: str, kid: str | None, now: float) -> str:
    """RFC 7523 2.2 / OIDC Core 9: iss = sub = client_id, the audience, a unique jti, a short life."""
    header: dict[str, Any] = {"alg": alg, "typ": "JWT"}
    if kid:
        header["kid"] = kid
    claims = {"iss": client_id, "sub": client_id, "aud": audience, "jti": random_token(32),
              "iat": int(now), "exp": int(now) + ASSERTION_LIFETIME}
    try:
        with warnings.catch_warnings():
            # joserfc flags EdDSA as superseded by Ed25519 (RFC 9864); providers still ask for EdDSA by name.
            warnings.simplefilter("ignore", SecurityWarning)
            return jwt.encode(header, claims, key, algorithms=[alg])
    except (JoseError, ValueError) as exc:
        raise UsageError(f"cannot sign a client assertion with {alg} and this key ({type(exc).__name__})") from None


def choose_method(settings: ProviderSettings, advertised: tuple[str, ...]) -> str:
    """The configured method, else as brokerd always did: basic, post when only post is offered, none without a
    secret."""
    configured = settings.registration.method
    if configured is not None:
        return configured
    if not settings.client_secret:
        return "none"
    if "client_secret_basic" not in advertised and "client_secret_post" in advertised:
        return "client_secret_post"
    return "client_secret_basic"


class ClientAuthenticator:
    """Adds client authentication to one request.  One per OIDCClient; remembers which key files it warned
    about, so a world-readable key is reported once, not on every refresh."""

    def __init__(self, clock: Clock) -> None:
        self._clock = clock
        self._warned: set[str] = set()

    async def private_key(self, path: str, flag: str, kid: str | None, what: str) -> Key:
        """A key file's key, read in a thread; a file others can read is used, with one warning per path."""
        try:
            # Off the loop and bounded, like the CA files (tls.py): a hung network mount fails this request only.
            key, exposed = await asyncio.wait_for(asyncio.to_thread(read_private_key, path, flag, kid),
                                                  KEY_READ_TIMEOUT)
        except TimeoutError:
            raise UsageError(f"--{flag} {path}: reading it took longer than {KEY_READ_TIMEOUT:g} s (a hung network "
                             "file system?)") from None
        if exposed and path not in self._warned:
            self._warned.add(path)
            log.warning("the %s %s can be read by other users; chmod 600 it", what, path)
        return key

    async def apply(self, settings: ProviderSettings, meta: ProviderMetadata, form: dict[str, str], *,
                    endpoint: str = "token") -> dict[str, str]:
        """Fill ``form`` and return the headers that authenticate the client at ``endpoint`` (token, revocation,
        pushed_authorization_request, device_authorization).  The token endpoint URL is the assertion's audience:
        RFC 7523 3 names it, Authelia (fosite) requires it at every endpoint, and oidc-provider, Keycloak and Okta
        accept it."""
        advertised = meta.token_endpoint_auth_methods_supported
        method = choose_method(settings, advertised)
        own = meta.auth_methods_for(endpoint)
        if own and method not in own and settings.registration.method is None:
            # An endpoint with its own list: fall back only to a method it advertises that we can do.
            method = next((m for m in ("client_secret_basic", "client_secret_post") if m in own and
                           settings.client_secret), method)
        if method == "none":
            form["client_id"] = settings.client_id
            return {}
        secret = settings.client_secret or ""
        if method == "client_secret_post":
            form["client_id"] = settings.client_id
            form["client_secret"] = secret
            return {}
        if method == "client_secret_basic":
            pair = f"{quote_plus(settings.client_id, safe='')}:{quote_plus(secret, safe='')}"
            return {"Authorization": "Basic " + base64.b64encode(pair.encode()).decode("ascii")}
        reg = settings.registration
        if method == "client_secret_jwt":
            key: Key = jwk.OctKey.import_key(secret.encode())
            alg, kid = reg.assertion_alg or "HS256", reg.assertion_kid
        else:
            assert reg.assertion_key is not None  # parse_registration insists on it
            key = await self.private_key(reg.assertion_key, "oidc-client-assertion-key", reg.assertion_kid,
                                         "client assertion key")
            alg, kid = reg.assertion_alg or _default_alg(key), reg.assertion_kid or key.kid
        form["client_id"] = settings.client_id
        form["client_assertion_type"] = ASSERTION_TYPE
        form["client_assertion"] = make_assertion(settings.client_id, meta.token_endpoint, key, alg, kid,
                                                  self._clock.now())
        return {}


# ---- pushed authorization requests -----------------------------------------------------------------------------

def pushed_request_endpoint(settings: ProviderSettings, meta: ProviderMetadata) -> str | None:
    """Where to push the authorization request (RFC 9126), or None to send it through the browser: ``auto`` pushes
    whenever discovery offers an endpoint, so state, nonce and the PKCE challenge stay out of the browser's history
    and any command line."""
    mode = settings.registration.par
    usable = meta.pushed_authorization_request_endpoint
    if mode == "never":
        return None
    if mode == "always" and usable is None:
        raise UsageError(f"--oidc-par=always but {meta.issuer} offers no pushed authorization request endpoint; use "
                         "--oidc-par=auto")
    return usable


def pushed_request_uri(doc: dict[str, Any], endpoint: str) -> str:
    request_uri = doc.get("request_uri")
    if not isinstance(request_uri, str) or not request_uri:
        raise ProviderError(f"pushed authorization request endpoint at {origin(endpoint)} returned no request_uri")
    return request_uri
