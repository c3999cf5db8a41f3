"""kubelogin's get-token flags: every flag of the parity list is accepted; bad or contradictory ones give one line
naming the flag.  Pure parsing here, plus the daemon's stderr note for the cache flags."""

from __future__ import annotations

import base64
import copy
import json
import re
from collections.abc import Iterator
from pathlib import Path

import pytest

from brokerd.errors import LoginDenied, LoginError, UsageError
from brokerd.flags import FLAGS, parse_flags, request_from_flags
from brokerd.flows import parse_pasted_code
from tests.support.daemon import Daemon, login_args
from tests.support.provider import TestProvider

DESIGN = Path("/work/shared/DESIGN.md")
BASE = ["--oidc-issuer-url=https://auth.example.com", "--oidc-client-id=kube"]
PEM = "-----BEGIN CERTIFICATE-----\nMIIB\n-----END CERTIFICATE-----\n"

# One valid use of each flag of kubelogin's get-token (DESIGN.md's parity list), in kubelogin's own spelling.
SAMPLES = {
    "--oidc-issuer-url": "https://auth.example.com", "--oidc-client-id": "kube", "--oidc-client-secret": "s",
    "--oidc-extra-scope": "email", "--oidc-use-access-token": None, "--oidc-redirect-url": "http://localhost:8000",
    "--oidc-auth-request-extra-params": "prompt=login", "--oidc-pkce-method": "S256",
    "--oidc-request-header": "X-A=b", "--grant-type": "authcode", "--username": "alice", "--password": "pw",
    "--listen-address": "127.0.0.1:8000,127.0.0.1:18000", "--skip-open-browser": None, "--browser-command": "firefox",
    "--authentication-timeout-sec": "30", "--open-url-after-authentication": "https://example.com/ok",
    "--local-server-cert": "/etc/brokerd/cert.pem", "--local-server-key": "/etc/brokerd/key.pem",
    "--token-cache-dir": "/home/u/.kube/cache/oidc-login", "--token-cache-storage": "disk", "--force-refresh": None,
    "--certificate-authority": "/etc/ssl/ca.pem",
    "--certificate-authority-data": base64.b64encode(PEM.encode()).decode(),
    "--insecure-skip-tls-verify": None, "-v": "1",
}


def _parity_flags() -> list[str]:
    text = DESIGN.read_text()
    section = text.split("## kubelogin get-token flags")[1].split("\n## ")[0]
    names = set(re.findall(r"(?<![\w-])(--[a-z][a-z-]*|-v)\b", section))
    # "--certificate-authority(-data)" and "--local-server-cert/key" are written as one item each.
    if "--local-server-cert" in names:
        names.add("--local-server-key")
    names.add("--certificate-authority-data")
    return sorted(names)


@pytest.mark.skipif(not DESIGN.exists(), reason="the shared design notes are not on this machine")
def test_every_kubelogin_flag_in_the_parity_list_is_accepted() -> None:
    names = _parity_flags()
    assert len(names) >= 26, names
    for name in names:
        assert name in SAMPLES, f"{name} has no sample in this test"
        value = SAMPLES[name]
        key = name.lstrip("-")
        assert key in FLAGS, name
        args = [*BASE, name] if value is None else [*BASE, f"{name}={value}"]
        if name in ("--username", "--password"):
            args.append("--grant-type=password")
        if name in ("--local-server-cert", "--local-server-key"):
            args += ["--local-server-cert=/c.pem", "--local-server-key=/k.pem"]
        request_from_flags(parse_flags(args))  # no UsageError
        if value is not None and name != "-v":
            request_from_flags(parse_flags([*BASE, name, value, *args[len(BASE) + 1:]]))  # the "--flag value" form


def test_flag_forms_and_repetition() -> None:
    flags = parse_flags([*BASE, "--oidc-extra-scope=groups,email", "--oidc-extra-scope", "offline_access",
                         "--listen-address=127.0.0.1:9000", "--listen-address", "[::1]:9001", "-v=3",
                         "--certificate-authority=/a.pem", "--certificate-authority=/b.pem",
                         "--oidc-auth-request-extra-params=claims={\"id_token\":{\"groups\":null}},x=y",
                         "--skip-open-browser=false"])
    settings, options, _ = request_from_flags(flags)
    assert settings.scopes == ("email", "groups", "offline_access", "openid")
    assert options.listen_addresses == ("127.0.0.1:9000", "[::1]:9001")
    assert options.verbosity == 3 and not options.skip_open_browser
    assert settings.tls.ca_files == ("/a.pem", "/b.pem")
    assert dict(settings.extra_params)["claims"] == '{"id_token":{"groups":null}},x=y'
    for form in (["-v", "2"], ["-v2"], ["--v=2"]):
        assert request_from_flags(parse_flags([*BASE, *form]))[1].verbosity == 2


def test_grant_auto_with_username_is_the_password_grant_as_in_kubelogin() -> None:
    _, options, _ = request_from_flags(parse_flags([*BASE, "--username=alice"]))
    assert options.grant_type == "password"
    _, options, _ = request_from_flags(parse_flags([*BASE, "--session-name=work"]))
    assert options.grant_type == "auto"


@pytest.mark.parametrize(("args", "names"), [
    (["--oidc-bogus=1"], "--oidc-bogus"),
    (["positional"], "'positional'"),
    (["--oidc-client-id"], "--oidc-client-id"),
    (["--grant-type=magic"], "--grant-type"),
    (["--oidc-pkce-method=plain"], "--oidc-pkce-method"),
    (["--token-cache-storage=cloud"], "--token-cache-storage"),
    (["--authentication-timeout-sec=soon"], "--authentication-timeout-sec"),
    (["--authentication-timeout-sec=0"], "--authentication-timeout-sec"),
    (["--skip-open-browser=maybe"], "--skip-open-browser"),
    (["--listen-address=8000"], "--listen-address"),
    (["--oidc-auth-request-extra-params=novalue"], "--oidc-auth-request-extra-params"),
    (["--local-server-cert=/c.pem"], "--local-server-cert"),
    (["--local-server-cert=c.pem", "--local-server-key=/k.pem"], "--local-server-cert"),
    (["--certificate-authority=ca.pem"], "--certificate-authority"),
    (["--certificate-authority-data=not base64!"], "--certificate-authority-data"),
    (["--certificate-authority-data=" + base64.b64encode(b"hello").decode()], "--certificate-authority-data"),
    (["--insecure-skip-tls-verify", "--certificate-authority=/ca.pem"], "--insecure-skip-tls-verify"),
    (["--grant-type=device-code", "--password=x"], "--password"),
    (["--grant-type=client-credentials", "--username=x"], "--username"),
    (["--oidc-redirect-url=localhost:8000"], "--oidc-redirect-url"),
], ids=lambda v: v if isinstance(v, str) else None)
def test_bad_or_contradictory_flags_name_the_flag(args: list[str], names: str) -> None:
    with pytest.raises(UsageError) as info:
        request_from_flags(parse_flags([*BASE, *args]))
    message = str(info.value)
    assert names in message and "\n" not in message
    assert info.value.exit_code == 2


def test_required_flags() -> None:
    for args, name in (([], "--oidc-issuer-url"), (["--oidc-issuer-url=https://a"], "--oidc-client-id"),
                       (["--oidc-issuer-url=ftp://a", "--oidc-client-id=x"], "--oidc-issuer-url")):
        with pytest.raises(UsageError, match=re.escape(name)):
            request_from_flags(parse_flags(args))


def test_cache_flags_are_accepted_with_a_note_that_is_returned_not_stored() -> None:
    flags = parse_flags([*BASE, "--token-cache-dir=/tmp/x", "--token-cache-storage=keyring"])
    before = copy.deepcopy(flags)
    for _ in range(2):  # the same flags give the same notes, however often they are read
        _, options, notes = request_from_flags(flags)
        assert len(notes) == 1 and "--token-cache-dir is accepted, not used" in notes[0]
        assert options.cache_storage == "keyring"  # honoured now (issue 16), not noted as ignored
    assert flags == before  # nothing was added to the parsed flags (the server caches them)
    assert request_from_flags(parse_flags(BASE))[2] == ()


def test_pasted_code_or_redirect_address() -> None:
    assert parse_pasted_code("  abc123 \n", "s" * 43) == ("abc123", None)
    state = "S" * 43
    assert parse_pasted_code(f"http://localhost:8000/?code=xyz&state={state}&iss=https%3A%2F%2Fa", state) == (
        "xyz", "https://a")
    with pytest.raises(LoginError, match="another login"):
        parse_pasted_code("http://localhost:8000/?code=xyz&state=other-state", state)
    with pytest.raises(LoginDenied, match="access_denied"):
        parse_pasted_code("http://localhost:8000/?error=access_denied&state=x", state)
    with pytest.raises(LoginError, match="no authorization code"):
        parse_pasted_code("   ", state)


# ---- through the daemon -----------------------------------------------------------------------------------------

@pytest.fixture(scope="module")
def daemon() -> Iterator[Daemon]:
    with Daemon() as d:
        yield d


def test_daemon_prints_the_cache_note_on_stderr_and_serves_the_token(provider: object, daemon: Daemon) -> None:
    from tests.support.provider import TestProvider

    assert isinstance(provider, TestProvider)
    result = daemon.shim(login_args(provider.issuer, "--username=alice", "--password=alice-password",
                                    "--token-cache-dir=/tmp/nowhere", "--token-cache-storage=disk", "-v", "1"))
    assert result.returncode == 0, result.stderr
    assert "--token-cache-dir is accepted, not used" in result.stderr
    assert result.stdout.startswith('{"kind":"ExecCredential"')
    assert not Path("/tmp/nowhere").exists()


@pytest.mark.parametrize("args", [["--oidc-bogus"], ["--insecure-skip-tls-verify", "--certificate-authority=/x"],
                                  ["--grant-type=authcode", "--password=x"]])
def test_daemon_rejects_bad_flags_in_one_line(provider: object, daemon: Daemon, args: list[str]) -> None:
    from tests.support.provider import TestProvider

    assert isinstance(provider, TestProvider)
    result = daemon.shim(login_args(provider.issuer, *args))
    assert result.returncode == 2 and result.stdout == ""
    assert result.stderr.count("\n") == 1 and result.stderr.startswith("brokerd: ")
    assert args[-1].split("=")[0] in result.stderr or args[0].split("=")[0] in result.stderr


def test_v_tells_that_caller_the_daemons_lines_about_its_own_request(provider: TestProvider) -> None:
    """kubelogin's -v: with -v1 the caller sees discovery, the client and the grant used for its request; a caller
    without -v, at the same daemon, sees none of it."""
    with Daemon() as d:
        loud = d.shim(login_args(provider.issuer, "--grant-type=client-credentials", "--session-name=v", "-v1",
                                 scopes=()))
        assert loud.returncode == 0, loud.stderr + d.log()
        assert json.loads(loud.stdout)["kind"] == "ExecCredential"
        lines = loud.stderr.splitlines()
        assert any("brokerd [debug] new provider client: system CAs" in line for line in lines), loud.stderr
        assert any("brokerd [debug] discovery: fetching" in line for line in lines), loud.stderr
        assert any("logging in (--grant-type=client-credentials)" in line for line in lines), loud.stderr
        assert any("brokerd [info]" in line and "logged in" in line for line in lines), loud.stderr
        assert "insecure_secret" not in loud.stderr
        # Another caller without -v (a new session, so a new login) hears none of it, nor of anyone else's.
        quiet = d.shim(login_args(provider.issuer, "--grant-type=client-credentials", scopes=()))
        assert quiet.returncode == 0, quiet.stderr + d.log()
        assert "brokerd [" not in quiet.stderr
        assert "logged in" in d.log()  # the daemon's own log has the lines either way
