"""--oidc-redirect-url: brokerd listens where the redirect sends the browser, or says why it cannot; and only on
loopback addresses unless the daemon's config allows more."""

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


def test_a_non_loopback_listener_is_refused_unless_the_daemon_allows_it(provider_factory: ProviderFactory) -> None:
    port = free_port()
    redirect = f"http://localhost:{port}"
    idp = provider_factory({"default_client": {"redirect_uris": [redirect]}})
    with Daemon() as daemon:
        for extra in ([f"--listen-address=0.0.0.0:{port}"], ["--oidc-redirect-url=http://myhost.lan:8000/cb"],
                      [f"--oidc-redirect-url=http://0.0.0.0:{port}"]):
            bad = daemon.shim(login_args(idp.issuer, *extra))
            assert bad.returncode == 2 and bad.stdout == "", bad.stderr
            lines = bad.stderr.strip().splitlines()
            assert len(lines) == 1 and "loopback addresses only" in lines[0], bad.stderr
        assert daemon.browser_openings() == 0
    # The daemon's owner may allow it (a caller cannot): then 0.0.0.0 is listened on, and the login completes.
    with Daemon(config="[daemon]\nlisten_non_loopback = true\n") as daemon:
        ok = daemon.shim(login_args(idp.issuer, f"--listen-address=0.0.0.0:{port}"))
        assert ok.returncode == 0, ok.stderr + daemon.log()
        assert json.loads(ok.stdout)["kind"] == "ExecCredential"
        assert daemon.browser_openings() == 1
