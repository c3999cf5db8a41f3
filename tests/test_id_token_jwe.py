"""Encrypted ID tokens against the real test provider, for clients whose ``id_token_encrypted_response_alg`` is set
(RSA-OAEP-256 with A256GCM, ECDH-ES with A128CBC-HS256, ECDH-ES+A256KW with A256GCM): brokerd decrypts with
--oidc-id-token-decryption-key, verifies the signed JWT inside and serves that one, which kube-apiserver accepts."""

from __future__ import annotations

from pathlib import Path

import pytest

from tests.support.daemon import Daemon, exec_token, jwt_claims, login_args
from tests.support.kube import run_kubectl, start_apiserver, write_kubeconfig
from tests.support.provider import ProviderFactory, TestProvider, client_key_pair

COMMON = {"redirect_uris": ["http://localhost:8000", "http://localhost:18000"],
          "grant_types": ["authorization_code", "refresh_token"], "response_types": ["code"],
          "scope": "openid groups email profile offline_access", "token_endpoint_auth_method": "client_secret_basic"}
CLIENTS = {"jwe-rsa": ("RSA", "RSA-OAEP-256", "A256GCM"), "jwe-ec": ("P-256", "ECDH-ES", "A128CBC-HS256"),
           "jwe-ec-kw": ("P-384", "ECDH-ES+A256KW", "A256GCM")}


@pytest.fixture(scope="module")
def key_files(tmp_path_factory: pytest.TempPathFactory) -> dict[str, tuple[Path, dict[str, str]]]:
    base = tmp_path_factory.mktemp("jwe-keys")
    out = {}
    for name, (kind, _, _) in [*CLIENTS.items(), ("stranger", ("RSA", "", ""))]:
        pem, public = client_key_pair(kind)
        path = base / f"{name}.pem"
        path.write_bytes(pem)
        path.chmod(0o600)
        out[name] = (path, {**public, "use": "enc"})
    return out


@pytest.fixture(scope="module")
def op(provider_factory: ProviderFactory, key_files: dict[str, tuple[Path, dict[str, str]]]) -> TestProvider:
    clients = [{"client_id": name, "client_secret": f"{name}-secret", "id_token_encrypted_response_alg": alg,
                "id_token_encrypted_response_enc": enc, "jwks": {"keys": [key_files[name][1]]}, **COMMON}
               for name, (_, alg, enc) in CLIENTS.items()]
    return provider_factory({"encryption": True, "clients": clients})


def _args(op: TestProvider, client: str, *extra: str) -> list[str]:
    return login_args(op.issuer, *extra, client_id=client, secret=f"{client}-secret",
                      scopes=("groups", "offline_access"))


@pytest.mark.parametrize("client", list(CLIENTS))
def test_encrypted_id_token_login_refresh_and_logout(op: TestProvider, daemon: Daemon, client: str,
                                                     key_files: dict[str, tuple[Path, dict[str, str]]]) -> None:
    args = _args(op, client, f"--oidc-id-token-decryption-key={key_files[client][0]}")
    before = op.counters()
    token = exec_token(daemon.shim(args))
    assert token.count(".") == 2  # the signed JWT from inside the JWE, not the JWE
    assert jwt_claims(token)["aud"] == client and jwt_claims(token)["groups"] == ["admins", "dev"]
    refreshed = exec_token(daemon.shim([*args, "--force-refresh"]))
    assert refreshed.count(".") == 2 and jwt_claims(refreshed)["sub"] == jwt_claims(token)["sub"]
    assert daemon.cli("logout", "--all").returncode == 0
    after = op.counters()
    assert after["token_grants"]["refresh_token"] - before["token_grants"]["refresh_token"] == 1
    assert after["grants_revoked"] - before["grants_revoked"] == 1


@pytest.mark.parametrize(("key", "message"), [
    (None, "the provider sends encrypted ID tokens; pass --oidc-id-token-decryption-key=PATH"),
    ("stranger", "the encrypted ID token cannot be decrypted with --oidc-id-token-decryption-key"),
], ids=["no-key", "wrong-key"])
def test_without_the_right_key_one_line(op: TestProvider, daemon: Daemon, key: str | None, message: str,
                                        key_files: dict[str, tuple[Path, dict[str, str]]]) -> None:
    extra = [f"--oidc-id-token-decryption-key={key_files[key][0]}"] if key else []
    result = daemon.shim(_args(op, "jwe-rsa", *extra))
    assert result.returncode != 0 and result.stdout == ""
    (line,) = [x for x in result.stderr.splitlines() if not x.startswith("Open this URL")]
    assert message in line and "Traceback" not in result.stderr


@pytest.mark.skipif(not Path("/usr/bin/kubectl").exists(), reason="kubectl is not installed")
def test_kube_apiserver_accepts_the_served_token(op: TestProvider, daemon: Daemon, tmp_path: Path,
                                                 key_files: dict[str, tuple[Path, dict[str, str]]]) -> None:
    with start_apiserver(op.issuer, client_id="jwe-ec") as apiserver:
        kubeconfig = write_kubeconfig(tmp_path / "kubeconfig", apiserver.url, apiserver.ca_file, [
            "oidc-login", *_args(op, "jwe-ec", f"--oidc-id-token-decryption-key={key_files['jwe-ec'][0]}")])
        whoami = run_kubectl(["auth", "whoami", "-o", "json"], kubeconfig, env=daemon.env, timeout=60)
    assert whoami.returncode == 0, whoami.stderr + daemon.log()
    assert f"{op.issuer}#{op.sub('alice')}" in whoami.stdout


def test_a_decryption_key_gone_at_refresh_keeps_the_new_refresh_token(
        op: TestProvider, daemon: Daemon, tmp_path: Path,
        key_files: dict[str, tuple[Path, dict[str, str]]]) -> None:
    """The refresh answer's token is adopted before the ID token is decrypted: a key file brokerd cannot read then
    is one line, and the adopted token (never sent) stays; once the file is back it refreshes, no second login."""
    key = tmp_path / "moving.pem"
    key.write_bytes(key_files["jwe-rsa"][0].read_bytes())
    key.chmod(0o600)
    args = _args(op, "jwe-rsa", f"--oidc-id-token-decryption-key={key}")
    before = op.counters()
    exec_token(daemon.shim(args))
    key.rename(tmp_path / "moved.pem")
    failed = daemon.shim([*args, "--force-refresh"])
    assert failed.returncode != 0 and failed.stdout == "" and "Traceback" not in failed.stderr
    assert f"--oidc-id-token-decryption-key {key}: No such file" in failed.stderr
    (tmp_path / "moved.pem").rename(key)
    refreshed = exec_token(daemon.shim([*args, "--force-refresh"]))
    assert refreshed.count(".") == 2
    after = op.counters()
    grants = {g: after["token_grants"][g] - before["token_grants"][g] for g in ("authorization_code", "refresh_token")}
    assert grants == {"authorization_code": 1, "refresh_token": 2}
    assert after["refresh_reuse_detected"] == before["refresh_reuse_detected"]
