"""--oidc-redirect-url: brokerd listens where the redirect sends the browser, or says why it cannot."""

from __future__ import annotations

import json

from tests.support.daemon import Daemon, login_args
from tests.support.net import free_port
from tests.support.provider import ProviderFactory


def test_redirect_url_with_a_path_and_port_is_listened_on(provider_factory: ProviderFactory) -> None:
    port = free_port()
    redirect = f"http://localhost:{port}/callback"
    idp = provider_factory({"default_client": {"redirect_uris": [redirect]}})
    with Daemon() as daemon:
        ok = daemon.shim(login_args(idp.issuer, f"--oidc-redirect-url={redirect}"))
        assert ok.returncode == 0, ok.stderr + daemon.log()
        assert json.loads(ok.stdout)["kind"] == "ExecCredential"
        assert idp.last_auth()["redirect_uri"] == redirect
        # A --listen-address that cannot receive that redirect is refused in one line, before any browser opens.
        other = free_port()
        bad = daemon.shim(login_args(idp.issuer, f"--oidc-redirect-url={redirect}", "--oidc-extra-scope=email",
                                     f"--listen-address=127.0.0.1:{other}"))
        assert bad.returncode == 2 and bad.stdout == ""
        line = bad.stderr.strip().splitlines()[-1]
        assert f"port {port}" in line and f"port {other}" in line, bad.stderr
        assert daemon.browser_openings() == 1
