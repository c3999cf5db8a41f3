"""Pushed authorization requests (RFC 9126) against the real test provider with PAR required for the client (as
Authelia's ``require_pushed_authorization_requests``): the browser sees only client_id and request_uri, the push is
authenticated like the token request (a client secret, or private_key_jwt), and a kubectl call goes through it."""

from __future__ import annotations

import asyncio
import json
from pathlib import Path
from urllib.parse import parse_qsl, urlsplit

import pytest

from brokerd.errors import TokenEndpointError
from brokerd.models import ProviderSettings
from brokerd.oidc import OIDCClient
from brokerd.registration import ClientRegistration
from tests.support import browser
from tests.support.daemon import Daemon, exec_token, jwt_claims, login_args
from tests.support.kube import run_kubectl, start_apiserver, write_kubeconfig
from tests.support.provider import ProviderFactory, TestProvider, client_key_pair
from tests.test_grants import PtyRun

REDIRECTS = ["http://localhost:8000", "http://localhost:18000", "http://localhost:18998/done"]
GRANTS = ["authorization_code", "refresh_token"]
SCOPE = "openid groups email profile offline_access"
SECRET = "par-secret"


@pytest.fixture(scope="module")
def key_file(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, dict[str, str]]:
    pem, public = client_key_pair("P-256")
    path = tmp_path_factory.mktemp("par-keys") / "client.pem"
    path.write_bytes(pem)
    path.chmod(0o600)
    return path, public


@pytest.fixture(scope="module")
def op(provider_factory: ProviderFactory, key_file: tuple[Path, dict[str, str]]) -> TestProvider:
    common = {"redirect_uris": REDIRECTS, "grant_types": GRANTS, "response_types": ["code"], "scope": SCOPE,
              "require_pushed_authorization_requests": True}
    clients = [
        {"client_id": "par", "client_secret": SECRET, "token_endpoint_auth_method": "client_secret_basic", **common},
        {"client_id": "parjwt", "token_endpoint_auth_method": "private_key_jwt", "jwks": {"keys": [key_file[1]]},
         **common},
    ]
    return provider_factory({"par": True, "clients": clients})


def _jwt_args(op: TestProvider, key: Path, *extra: str) -> list[str]:
    return login_args(op.issuer, f"--oidc-client-assertion-key={key}", *extra, client_id="parjwt", secret=None,
                      scopes=("groups", "offline_access"))


def test_the_browser_sees_only_client_id_and_request_uri(op: TestProvider, daemon: Daemon) -> None:
    before = op.counters()
    token = exec_token(daemon.shim(login_args(op.issuer, client_id="par", secret=SECRET)))
    assert jwt_claims(token)["aud"] == "par"
    assert set(op.last_auth()) == {"client_id", "request_uri"}
    pushed = op.last_pushed()
    assert pushed["code_challenge_method"] == "S256" and len(pushed["state"]) == 43 and pushed["nonce"]
    assert op.counters()["pushed_authorization"] - before["pushed_authorization"] == 1


async def test_without_par_the_client_is_refused(op: TestProvider, oidc: OIDCClient) -> None:
    settings = ProviderSettings(issuer=op.issuer, client_id="par", client_secret=SECRET,
                                registration=ClientRegistration(par="never"))
    auth = await oidc.authorization_request(settings, "http://localhost:18998/done")
    assert "request_uri" not in dict(parse_qsl(urlsplit(auth.url).query))
    landed = await asyncio.to_thread(browser.login, auth.url, follow_callback=False, timeout=30)
    assert landed.callback_params["error"] == "invalid_request"  # the provider requires PAR for this client
    # The push itself is authenticated: a wrong secret is refused there, before any browser opens.
    wrong = ProviderSettings(issuer=op.issuer, client_id="par", client_secret="wrong")
    with pytest.raises(TokenEndpointError, match=r"^pushed authorization request endpoint at .* invalid_client"):
        await oidc.authorization_request(wrong, "http://localhost:18998/done")


def test_par_always_without_an_endpoint_is_one_line(provider: TestProvider, daemon: Daemon) -> None:
    result = daemon.shim(login_args(provider.issuer, "--oidc-par=always"))
    assert result.returncode != 0 and result.stdout == ""
    assert result.stderr.strip().splitlines() == [
        f"brokerd: --oidc-par=always but {provider.issuer} offers no pushed authorization request endpoint; use "
        "--oidc-par=auto"]


def test_authcode_keyboard_with_par(op: TestProvider, daemon: Daemon) -> None:
    args = login_args(op.issuer, "--grant-type=authcode-keyboard", "--oidc-redirect-url=http://localhost:18998/done",
                      client_id="par", secret=SECRET)
    run = PtyRun(daemon.shim_argv(args), daemon.env)
    url = run.expect(r"to log in: (\S+)").group(1)
    assert set(dict(parse_qsl(urlsplit(url).query))) == {"client_id", "request_uri"}
    landed = browser.login(url, follow_callback=False, timeout=30)
    run.expect("Enter the code")
    run.send(landed.callback_url + "\n")
    code, out, terminal = run.finish()
    assert code == 0, terminal + daemon.log()
    assert jwt_claims(json.loads(out)["status"]["token"])["aud"] == "par"


@pytest.mark.skipif(not Path("/usr/bin/kubectl").exists(), reason="kubectl is not installed")
def test_kubectl_with_private_key_jwt_and_par_then_refresh_and_logout(
        op: TestProvider, key_file: tuple[Path, dict[str, str]], daemon: Daemon, tmp_path: Path) -> None:
    before = op.counters()
    with start_apiserver(op.issuer, client_id="parjwt") as apiserver:
        kubeconfig = write_kubeconfig(tmp_path / "kubeconfig", apiserver.url, apiserver.ca_file,
                                      ["oidc-login", *_jwt_args(op, key_file[0])])
        whoami = run_kubectl(["auth", "whoami", "-o", "json"], kubeconfig, env=daemon.env, timeout=60)
    assert whoami.returncode == 0, whoami.stderr + daemon.log()
    user = json.loads(whoami.stdout)["status"]["userInfo"]
    assert user["username"] == f"{op.issuer}#{op.sub('alice')}" and {"admins", "dev"} <= set(user["groups"])
    assert set(op.last_auth()) == {"client_id", "request_uri"}
    exec_token(daemon.shim([*_jwt_args(op, key_file[0]), "--force-refresh"]))
    assert daemon.cli("logout", "--all").returncode == 0
    after = op.counters()
    assert after["pushed_authorization"] - before["pushed_authorization"] == 1
    assert after["token_grants"]["refresh_token"] - before["token_grants"]["refresh_token"] == 1
    assert after["grants_revoked"] - before["grants_revoked"] == 1
    assert after["token_errors"] == before["token_errors"]
