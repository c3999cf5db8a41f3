"""Client authentication with JWTs (RFC 7523, OIDC Core 9) against the real test provider, with each client
registered so that only its one method works: private_key_jwt with the client's public JWKS, client_secret_jwt.
A whole login, a refresh and a logout (revocation) go through a real daemon and the shim, authenticated the same way.
"""

from __future__ import annotations

import json
import logging
import threading
from pathlib import Path
from typing import Any

import pytest

from brokerd import client_auth
from brokerd.codec import BadEntry, session_from_dict, session_to_dict
from brokerd.errors import TokenEndpointError, UsageError
from brokerd.flags import parse_flags, request_from_flags
from brokerd.models import ProviderSettings, Session, TokenSet
from brokerd.oidc import OIDCClient
from brokerd.registration import ClientRegistration
from tests.support.daemon import Daemon, exec_token, jwt_claims, login_args
from tests.support.provider import ProviderFactory, TestProvider, client_key_pair

SECRET_JWT = "a-client-secret-long-enough-for-hs256-0123456789abcdef0123456789"
GRANTS = ["authorization_code", "refresh_token", "password", "urn:ietf:params:oauth:grant-type:device_code"]
REDIRECTS = ["http://localhost:8000", "http://localhost:18000"]
SCOPE = "openid groups email profile offline_access"


class Keys:
    def __init__(self, base: Path) -> None:
        self.base = base
        self.public: list[dict[str, Any]] = []
        self.paths: dict[str, Path] = {}

    def add(self, name: str, kind: str, *, kid: str | None = None, registered: bool = True, mode: int = 0o600,
            as_jwks: bool = False) -> Path:
        pem, public = client_key_pair(kind, kid)
        if registered:
            self.public.append(public)
        path = self.base / name
        if as_jwks:
            from joserfc import jwk

            private = jwk.import_key(pem, "RSA" if kind == "RSA" else "OKP" if kind == "Ed25519" else "EC")
            decoy = dict(jwk.import_key(client_key_pair(kind)[0], "RSA" if kind == "RSA" else "EC").as_dict())
            decoy["kid"] = "decoy"
            doc = {"keys": [decoy, {**private.as_dict(private=True), "kid": kid}]}
            path.write_text(json.dumps(doc))
        else:
            path.write_bytes(pem)
        path.chmod(mode)
        self.paths[name] = path
        return path


@pytest.fixture(scope="module")
def keys(tmp_path_factory: pytest.TempPathFactory) -> Keys:
    k = Keys(tmp_path_factory.mktemp("client-keys"))
    k.add("rsa.pem", "RSA")
    k.add("p384.pem", "P-384")
    k.add("ed25519.pem", "Ed25519")
    k.add("keyset.json", "P-256", kid="the-one", as_jwks=True)
    k.add("stranger.pem", "RSA", registered=False)
    k.add("exposed.pem", "P-256", mode=0o644)
    return k


@pytest.fixture(scope="module")
def op(provider_factory: ProviderFactory, keys: Keys) -> TestProvider:
    clients = [
        {"client_id": "pkjwt", "token_endpoint_auth_method": "private_key_jwt", "jwks": {"keys": keys.public},
         "redirect_uris": REDIRECTS, "grant_types": GRANTS, "response_types": ["code"], "scope": SCOPE},
        {"client_id": "secretjwt", "client_secret": SECRET_JWT, "token_endpoint_auth_method": "client_secret_jwt",
         "redirect_uris": REDIRECTS, "grant_types": GRANTS, "response_types": ["code"], "scope": SCOPE},
        {"client_id": "secretpost", "client_secret": SECRET_JWT, "token_endpoint_auth_method": "client_secret_post",
         "redirect_uris": REDIRECTS, "grant_types": GRANTS, "response_types": ["code"], "scope": SCOPE},
    ]
    return provider_factory({"clients": clients})


def _pk_settings(op: TestProvider, key: Path, **reg: str) -> ProviderSettings:
    return ProviderSettings(issuer=op.issuer, client_id="pkjwt", scopes=("openid", "offline_access"),
                            registration=ClientRegistration(auth_method="private_key_jwt", assertion_key=str(key),
                                                            **reg))


@pytest.mark.parametrize(("name", "reg"), [
    ("rsa.pem", {}), ("p384.pem", {}), ("ed25519.pem", {}), ("keyset.json", {"assertion_kid": "the-one"}),
    ("rsa.pem", {"assertion_alg": "PS256"}),
], ids=["rsa-pem", "ec-p384-pem", "ed25519-pem", "jwks-by-kid", "rsa-ps256"])
async def test_private_key_jwt_with_each_key_form(op: TestProvider, keys: Keys, oidc: OIDCClient, name: str,
                                                  reg: dict[str, str]) -> None:
    settings = _pk_settings(op, keys.paths[name], **reg)
    tokens = await oidc.password_grant(settings, "alice", "alice-password")
    assert tokens.claims["aud"] == "pkjwt" and tokens.refresh_token
    assert await oidc.revoke(settings, tokens.refresh_token)  # the revocation endpoint takes the same assertion


async def test_only_the_registered_method_works(op: TestProvider, keys: Keys, oidc: OIDCClient) -> None:
    with pytest.raises(TokenEndpointError, match="invalid_client"):
        await oidc.password_grant(_pk_settings(op, keys.paths["stranger.pem"]), "alice", "alice-password")
    with pytest.raises(TokenEndpointError, match="invalid_client"):
        await oidc.password_grant(ProviderSettings(issuer=op.issuer, client_id="secretjwt", client_secret=SECRET_JWT),
                                  "alice", "alice-password")  # basic, as chosen from discovery: refused
    secret_jwt = ProviderSettings(issuer=op.issuer, client_id="secretjwt", client_secret=SECRET_JWT,
                                  registration=ClientRegistration(auth_method="client_secret_jwt"))
    assert (await oidc.password_grant(secret_jwt, "bob", "bob-password")).claims["aud"] == "secretjwt"
    # client_secret_post: the provider (like Authelia) holds the client to it although discovery offers basic too.
    post = ProviderSettings(issuer=op.issuer, client_id="secretpost", client_secret=SECRET_JWT)
    with pytest.raises(TokenEndpointError, match="invalid_client"):
        await oidc.password_grant(post, "bob", "bob-password")
    post = ProviderSettings(issuer=op.issuer, client_id="secretpost", client_secret=SECRET_JWT,
                            registration=ClientRegistration(auth_method="client_secret_post"))
    assert (await oidc.password_grant(post, "bob", "bob-password")).claims["aud"] == "secretpost"


async def test_the_device_authorization_endpoint_takes_the_assertion_too(op: TestProvider, keys: Keys,
                                                                        oidc: OIDCClient) -> None:
    device = await oidc.start_device_authorization(_pk_settings(op, keys.paths["p384.pem"]))
    assert device.user_code and device.verification_uri.startswith(op.issuer)
    with pytest.raises(TokenEndpointError, match=r"^device authorization endpoint .*invalid_client"):
        await oidc.start_device_authorization(_pk_settings(op, keys.paths["stranger.pem"]))


def test_a_profile_holds_the_client_authentication(op: TestProvider, keys: Keys, tmp_path: Path) -> None:
    config = (f'[profiles.hardened]\noidc-issuer-url = "{op.issuer}"\noidc-client-id = "pkjwt"\n'
              f'oidc-client-auth-method = "private_key_jwt"\n'
              f'oidc-client-assertion-key = "{keys.paths["ed25519.pem"]}"\noidc-extra-scope = ["groups"]\n')
    with Daemon(config=config) as d:
        claims = jwt_claims(exec_token(d.shim(["get-token", "--profile=hardened"])))
    assert claims["aud"] == "pkjwt" and claims["groups"] == ["admins", "dev"]


async def test_a_key_others_can_read_is_used_with_one_warning(op: TestProvider, keys: Keys, oidc: OIDCClient,
                                                              caplog: pytest.LogCaptureFixture) -> None:
    settings = _pk_settings(op, keys.paths["exposed.pem"])
    with caplog.at_level(logging.WARNING, logger="brokerd.client_auth"):
        tokens = await oidc.password_grant(settings, "alice", "alice-password")
        await oidc.refresh(settings, tokens)
    warnings = [r.getMessage() for r in caplog.records if r.name == "brokerd.client_auth"]
    assert warnings == [f"the client assertion key {keys.paths['exposed.pem']} can be read by other users; "
                        "chmod 600 it"]


async def test_an_unusable_key_file_is_one_line_naming_the_file(op: TestProvider, tmp_path: Path,
                                                                oidc: OIDCClient) -> None:
    junk = tmp_path / "junk.pem"
    junk.write_text("-----BEGIN PRIVATE KEY-----\nbm90IGEga2V5\n-----END PRIVATE KEY-----\n")
    with pytest.raises(UsageError, match=f"^--oidc-client-assertion-key {junk}: not a private key") as info:
        await oidc.password_grant(_pk_settings(op, junk), "alice", "alice-password")
    assert "bm90" not in str(info.value)
    with pytest.raises(UsageError, match="No such file"):
        await oidc.password_grant(_pk_settings(op, tmp_path / "missing.pem"), "alice", "alice-password")


@pytest.mark.parametrize("method", ["private_key_jwt", "client_secret_jwt"])
def test_login_refresh_and_logout_through_the_daemon(op: TestProvider, keys: Keys, daemon: Daemon,
                                                     method: str) -> None:
    if method == "private_key_jwt":
        args = login_args(op.issuer, "--oidc-client-auth-method=private_key_jwt",
                          f"--oidc-client-assertion-key={keys.paths['rsa.pem']}", client_id="pkjwt", secret=None,
                          scopes=("groups", "offline_access"))
    else:
        args = login_args(op.issuer, "--oidc-client-auth-method=client_secret_jwt", client_id="secretjwt",
                          secret=SECRET_JWT, scopes=("groups", "offline_access"))
    before = op.counters()
    claims = jwt_claims(exec_token(daemon.shim(args)))
    assert claims["aud"] == args[2].split("=")[1] and claims["groups"] == ["admins", "dev"]
    refreshed = jwt_claims(exec_token(daemon.shim([*args, "--force-refresh"])))
    assert refreshed["sub"] == claims["sub"] and refreshed["iat"] >= claims["iat"]
    logout = daemon.cli("logout", "--all")
    assert logout.returncode == 0, logout.stderr
    after = op.counters()
    grants = {g: after["token_grants"][g] - before["token_grants"][g] for g in ("authorization_code", "refresh_token")}
    assert grants == {"authorization_code": 1, "refresh_token": 1}
    assert after["revocations"] - before["revocations"] == 1
    assert after["grants_revoked"] - before["grants_revoked"] == 1  # the revocation was accepted
    assert after["token_errors"] == before["token_errors"]
    log = daemon.log()
    assert "PRIVATE KEY" not in log and SECRET_JWT not in log and "client_assertion" not in log


def test_flags_are_checked_in_one_line() -> None:
    base = ["--oidc-issuer-url=https://idp.example", "--oidc-client-id=c"]
    cases = {
        "--oidc-client-auth-method=tls_client_auth": "--oidc-client-auth-method must be one of",
        "--oidc-client-auth-method=private_key_jwt": "needs --oidc-client-assertion-key=PATH",
        "--oidc-client-assertion-key=key.pem": "needs an absolute path",
        "--oidc-client-auth-method=client_secret_jwt": "needs --oidc-client-secret",
        "--oidc-client-assertion-alg=HS256": "only used by private_key_jwt and client_secret_jwt",
    }
    for flag, message in cases.items():
        with pytest.raises(UsageError, match=message):
            request_from_flags(parse_flags([*base, flag]))
    settings, _, _ = request_from_flags(parse_flags([*base, "--oidc-client-assertion-key=/k.pem"]))
    assert settings.registration.method == "private_key_jwt"
    with pytest.raises(UsageError, match="--oidc-client-assertion-alg must be one of HS256"):
        request_from_flags(parse_flags([*base, "--oidc-client-secret=s", "--oidc-client-auth-method=client_secret_jwt",
                                   "--oidc-client-assertion-alg=RS256"]))


def test_the_key_file_path_keys_the_session_and_defaults_keep_old_keys() -> None:
    plain = ProviderSettings(issuer="https://idp.example", client_id="c", client_secret="s")
    # The key brokerd computed for these settings before the registration existed: old sessions stay found.
    assert plain.key.value == "8ad5fb543f0a3df8a669bad97f949134620aef12d50b56a446690caa37fa8ebe"
    one = ProviderSettings(issuer="https://idp.example", client_id="c",
                           registration=ClientRegistration(assertion_key="/a.pem"))
    other = ProviderSettings(issuer="https://idp.example", client_id="c",
                             registration=ClientRegistration(assertion_key="/b.pem"))
    assert len({plain.key, one.key, other.key}) == 3



def test_the_store_keeps_the_registration_and_reads_old_entries() -> None:
    reg = ClientRegistration(auth_method="private_key_jwt", assertion_key="/k.pem", par="always",
                             response_mode="query.jwt", id_token_decryption_key="/d.pem")
    settings = ProviderSettings(issuer="https://idp.example", client_id="c", registration=reg)
    session = Session(key=settings.key, settings=settings, tokens=TokenSet(id_token="t", expires_at=2.0, issued_at=1.0))
    doc = session_to_dict(session)
    assert doc["settings"]["registration"] == {"auth_method": "private_key_jwt", "assertion_key": "/k.pem",
                                               "par": "always", "response_mode": "query.jwt",
                                               "id_token_decryption_key": "/d.pem"}
    assert session_from_dict(json.loads(json.dumps(doc))).settings.registration == reg
    plain = ProviderSettings(issuer="https://idp.example", client_id="c")
    old = session_to_dict(Session(key=plain.key, settings=plain, tokens=session.tokens))
    assert "registration" not in old["settings"]  # what a store written before this looks like
    assert session_from_dict(old).settings.registration == ClientRegistration()
    old["settings"]["registration"] = {"auth_method": 3}
    with pytest.raises(BadEntry, match="registration"):
        session_from_dict(old)


def test_a_key_file_gone_at_refresh_keeps_the_refresh_token(op: TestProvider, keys: Keys, daemon: Daemon,
                                                             tmp_path: Path) -> None:
    """The assertion is built before the refresh token leaves: a key file brokerd cannot read then is one line, the
    token was never sent and stays; once the file is back the next refresh uses it (no second login)."""
    key = tmp_path / "moving.pem"
    key.write_bytes(keys.paths["rsa.pem"].read_bytes())
    key.chmod(0o600)
    args = login_args(op.issuer, f"--oidc-client-assertion-key={key}", client_id="pkjwt", secret=None,
                      scopes=("offline_access",))
    before = op.counters()
    exec_token(daemon.shim(args))
    key.rename(tmp_path / "moved.pem")
    failed = daemon.shim([*args, "--force-refresh"])
    assert failed.returncode != 0 and failed.stdout == "" and "Traceback" not in failed.stderr
    assert f"--oidc-client-assertion-key {key}: No such file" in failed.stderr
    (tmp_path / "moved.pem").rename(key)
    exec_token(daemon.shim([*args, "--force-refresh"]))
    after = op.counters()
    grants = {g: after["token_grants"][g] - before["token_grants"][g] for g in ("authorization_code", "refresh_token")}
    assert grants == {"authorization_code": 1, "refresh_token": 1}
    assert after["refresh_reuse_detected"] == before["refresh_reuse_detected"]


async def test_a_key_file_that_never_reads_is_one_line_in_bounded_time(
        op: TestProvider, keys: Keys, oidc: OIDCClient, monkeypatch: pytest.MonkeyPatch) -> None:
    """A hung network mount cannot be made here, so the read is held by an event instead (the one fake): the
    request fails with one line after the limit, nothing is sent, and the event loop was never blocked."""
    release = threading.Event()
    real = client_auth.read_private_key

    def hung(path: str, flag: str, kid: str | None) -> tuple[Any, bool]:
        release.wait(30)
        return real(path, flag, kid)

    monkeypatch.setattr(client_auth, "read_private_key", hung)
    monkeypatch.setattr(client_auth, "KEY_READ_TIMEOUT", 0.2, raising=False)
    before = op.counters()["token_requests"]
    try:
        with pytest.raises(UsageError, match=r"^--oidc-client-assertion-key .*: reading it took longer than 0.2 s"):
            await oidc.password_grant(_pk_settings(op, keys.paths["rsa.pem"]), "alice", "alice-password")
    finally:
        release.set()
    assert op.counters()["token_requests"] == before
