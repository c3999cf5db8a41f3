"""The random values of a login (PKCE verifier, state, nonce, a client assertion's jti) and the S256 challenge.

Two standard-library lines, not authlib: its ``generate_token`` and ``create_s256_code_challenge`` were all brokerd
used of it, and importing them loaded authlib's OAuth 2 package into the daemon (about 0.6 MB; issue 14.5).
"""

from __future__ import annotations

import base64
import hashlib
import secrets
import string

# RFC 7636 4.1 allows [A-Z] / [a-z] / [0-9] / "-" / "." / "_" / "~"; letters and digits suit every use here.
ALPHABET = string.ascii_letters + string.digits


def random_token(length: int) -> str:
    """``length`` letters and digits from the operating system's CSPRNG (about 5.95 bits each)."""
    return "".join(secrets.choice(ALPHABET) for _ in range(length))


def s256_challenge(verifier: str) -> str:
    """RFC 7636 4.2: BASE64URL-ENCODE(SHA256(ASCII(code_verifier))), without padding."""
    digest = hashlib.sha256(verifier.encode("ascii")).digest()
    return base64.urlsafe_b64encode(digest).rstrip(b"=").decode("ascii")
