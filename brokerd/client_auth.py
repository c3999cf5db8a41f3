"""How brokerd proves who it is to the provider, and checks who answered: the client side of a registration.

Client authentication at every endpoint that asks for it (RFC 6749 2.3.1 secrets, RFC 7523 / OIDC Core 9 JWT
assertions), and the RFC 9207 mix-up defence on authorization responses.  ``oidc.py`` calls these; the key file
is read here, off the event loop, and its contents never reach a message or a log line.
"""

from __future__ import annotations

from .errors import TokenValidationError
from .oidc_wire import ProviderMetadata, safe_text


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
    if redirected and meta.raw.get("authorization_response_iss_parameter_supported") is True:
        raise TokenValidationError(
            f"the login answer carries no 'iss' although {meta.issuer} always sends one (RFC 9207); the code was "
            "not used")
