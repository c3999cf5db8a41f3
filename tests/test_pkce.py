"""brokerd/pkce.py: the S256 challenge against RFC 7636's own example, and the random values' shape."""

from __future__ import annotations

import string

from brokerd.pkce import random_token, s256_challenge


def test_s256_challenge_is_rfc_7636_appendix_b() -> None:
    verifier = "dBjftJeZ4CVP-mB92K27uhbUJU1p1r_wW1gFWFOEjXk"
    assert s256_challenge(verifier) == "E9Melhoa2OwvFrEMTJguCHaoeK1t8URWbuGJSstw-cM"


def test_random_tokens_are_letters_and_digits_of_the_asked_length_and_differ() -> None:
    tokens = {random_token(64) for _ in range(50)}
    assert len(tokens) == 50
    for token in tokens:
        assert len(token) == 64 and set(token) <= set(string.ascii_letters + string.digits)
    # A 43-character state or nonce is within RFC 7636's 43..128 for a verifier too.
    assert len(random_token(43)) == 43
