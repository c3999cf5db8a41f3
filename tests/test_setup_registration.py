"""`setup` names the registration mismatch and the exact flag to add, against the real test provider with clients
registered the strict way: PAR required, client_secret_jwt, private_key_jwt, JWT response modes only.  No browser
opens for any of them; with the flag added, setup logs in."""

from __future__ import annotations

from pathlib import Path

import pytest

from tests.support.daemon import Daemon, login_args
from tests.support.provider import ProviderFactory, TestProvider, client_key_pair

REDIRECTS = ["http://localhost:8000", "http://localhost:18000"]
COMMON = {"redirect_uris": REDIRECTS, "grant_types": ["authorization_code", "refresh_token"],
          "response_types": ["code"], "scope": "openid groups email profile offline_access"}
SECRET = "a-client-secret-long-enough-for-hs256-0123456789abcdef0123456789"


@pytest.fixture(scope="module")
def keys(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    base = tmp_path_factory.mktemp("setup-keys")
    out: dict[str, Path] = {}
    for name in ("registered", "stranger"):
        pem, public = client_key_pair("RSA", kid=name)
        out[name] = base / f"{name}.pem"
        out[name].write_bytes(pem)
        out[name].chmod(0o600)
        if name == "registered":
            out["public"] = public  # type: ignore[assignment]
    return out


@pytest.fixture(scope="module")
def op(provider_factory: ProviderFactory, keys: dict[str, object]) -> TestProvider:
    clients = [
        {"client_id": "parreq", "client_secret": SECRET, "token_endpoint_auth_method": "client_secret_basic",
         "require_pushed_authorization_requests": True, **COMMON},
        {"client_id": "secretjwt", "client_secret": SECRET, "token_endpoint_auth_method": "client_secret_jwt",
         **COMMON},
        {"client_id": "pkjwt", "token_endpoint_auth_method": "private_key_jwt", "jwks": {"keys": [keys["public"]]},
         **COMMON},
        {"client_id": "jarm", "client_secret": SECRET, "token_endpoint_auth_method": "client_secret_basic",
         "authorization_signed_response_alg": "RS256", "response_modes": ["query.jwt", "form_post.jwt"], **COMMON},
    ]
    return provider_factory({"par": True, "jarm": True, "clients": clients})


def _setup(daemon: Daemon, op: TestProvider, client: str, *extra: str, secret: str | None = SECRET) -> str:
    result = daemon.cli("setup", *login_args(op.issuer, *extra, client_id=client, secret=secret)[1:])
    return result.stdout + result.stderr


@pytest.mark.parametrize(("client", "extra", "secret", "code", "fix"), [
    ("parreq", ["--oidc-par=never"], SECRET, "par-required", "add --oidc-par=always"),
    ("secretjwt", [], SECRET, "wrong-client-auth-method", "add --oidc-client-auth-method=client_secret_jwt"),
    ("pkjwt", ["--oidc-client-assertion-key={stranger}"], None, "assertion-refused", "--oidc-client-assertion-kid"),
    ("jarm", [], SECRET, "response-mode-not-allowed", "add --oidc-response-mode=query.jwt"),
], ids=["par-required", "client-secret-jwt", "assertion-refused", "response-mode"])
def test_setup_names_the_flag_to_add(op: TestProvider, keys: dict[str, Path], daemon: Daemon, client: str,
                                     extra: list[str], secret: str | None, code: str, fix: str) -> None:
    args = [e.format(**keys) for e in extra]
    out = _setup(daemon, op, client, *args, secret=secret)
    assert f"problem ({code})" in out and fix in out, out
    assert daemon.browser_openings() == 0 and "Traceback" not in out


@pytest.mark.parametrize(("client", "extra", "secret"), [
    ("parreq", [], SECRET), ("secretjwt", ["--oidc-client-auth-method=client_secret_jwt"], SECRET),
    ("pkjwt", ["--oidc-client-assertion-key={registered}"], None), ("jarm", ["--oidc-response-mode=query.jwt"], SECRET),
], ids=["par", "client-secret-jwt", "private-key-jwt", "jarm"])
def test_with_the_flag_setup_logs_in_and_says_where_groups_came_from(
        op: TestProvider, keys: dict[str, Path], daemon: Daemon, client: str, extra: list[str],
        secret: str | None) -> None:
    out = _setup(daemon, op, client, *[e.format(**keys) for e in extra], secret=secret)
    assert "## Login succeeded" in out and "problem (" not in out.replace("problem (no-refresh-token)", ""), out
    assert "groups:   admins, dev (from the ID token)" in out


def test_setup_says_when_groups_are_only_in_userinfo(op: TestProvider, daemon: Daemon) -> None:
    # No claims parameter for groups: the provider (like Authelia 4.39) then keeps them out of the ID token.
    out = _setup(daemon, op, "parreq", '--oidc-auth-request-extra-params=claims={"id_token":{"email":null}}')
    assert "groups:   (none) (the provider has groups, but only in userinfo" in out, out
