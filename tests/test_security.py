"""Who may talk to the daemon and its callback listener, and what a forged or tampered answer gets: real daemon,
real shim, real provider, a real second uid.  The token rules themselves (bad signature, alg none, HS256 with the
public key, unknown kid, iss, aud, exp, nbf, nonce, sub) are in tests/test_oidc_verify.py; here one tampered token
goes end to end through the daemon."""

from __future__ import annotations

import base64
import http.client
import json
import os
import re
import shutil
import socket
import subprocess
import threading
import time
import urllib.parse
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from tests.support.daemon import SHIM, Daemon, login_args
from tests.support.hostile import Proxy, exchange, proxy_env, request, tracebacks
from tests.support.provider import ProviderFactory, TestProvider

NOBODY = 65534
SYSTEM_PYTHON = shutil.which("python3", path="/usr/bin:/bin")


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


PORT = _free_port()  # this module's own redirect port, so other tests' use of 8000/18000 cannot interfere


@pytest.fixture(scope="module")
def idp(provider_factory: ProviderFactory) -> TestProvider:
    return provider_factory({"default_client": {"redirect_uris": [f"http://localhost:{PORT}"]}})


@pytest.fixture(scope="module")
def proxy() -> Iterator[Proxy]:
    with Proxy() as p:
        yield p


@pytest.fixture(scope="module")
def daemon(proxy: Proxy) -> Iterator[Daemon]:
    with Daemon(env=proxy_env(proxy)) as d:
        yield d


def args(idp: TestProvider, *extra: str) -> list[str]:
    return login_args(idp.issuer, f"--listen-address=127.0.0.1:{PORT}", *extra)


def status(d: Daemon) -> list[dict[str, Any]]:
    raw = exchange(d.socket, request("status"))
    assert raw.startswith(b"O"), raw
    sessions: list[dict[str, Any]] = json.loads(raw[1:])["sessions"]
    return sessions


# ---- the socket: only our own uid ------------------------------------------------------------------------------

@pytest.mark.skipif(os.getuid() != 0 or SYSTEM_PYTHON is None, reason="needs root (to become another uid)")
def test_other_uid_is_refused_by_the_peer_check_and_logged(daemon: Daemon) -> None:
    def as_nobody() -> subprocess.CompletedProcess[str]:
        env = {"BROKERD_SOCKET": str(daemon.socket), "BROKERD_NO_AUTOSTART": "1", "PATH": "/usr/bin:/bin"}
        return subprocess.run(["setpriv", f"--reuid={NOBODY}", f"--regid={NOBODY}", "--clear-groups", "--",
                               str(SYSTEM_PYTHON), "-I", "-S", str(SHIM), "status"],  # version never asks
                              env=env, capture_output=True, text=True, timeout=30, stdin=subprocess.DEVNULL)

    # As installed: the 0700 directory alone keeps the other user out.
    blocked = as_nobody()
    assert blocked.returncode == 3 and "Permission denied" in blocked.stderr, blocked
    # Loosen the filesystem (this test's own dirs only) so that only the SO_PEERCRED check stands in the way.
    run_dir = daemon.socket.parent
    modes = {p: p.stat().st_mode & 0o777 for p in (daemon.base, run_dir, daemon.socket)}
    try:
        daemon.base.chmod(0o711)
        run_dir.chmod(0o711)
        daemon.socket.chmod(0o666)
        refused = as_nobody()
    finally:
        for path, mode in modes.items():
            path.chmod(mode)
    assert refused.returncode == 1, refused
    assert refused.stdout == ""
    assert refused.stderr == "brokerd: brokerd serves only the user that runs it\n"
    assert f"refused a connection from uid {NOBODY} (only uid 0 may use this daemon)" in daemon.log()
    # And our own uid still gets in.
    assert exchange(daemon.socket, request("version")).startswith(b"O")


# ---- the callback listener ---------------------------------------------------------------------------------------

def _listeners(port: int) -> set[str]:
    """Local addresses with a TCP socket in LISTEN on ``port``, from /proc/net/tcp{,6}."""
    found = set()
    for name, width in (("tcp", 8), ("tcp6", 32)):
        for line in Path(f"/proc/net/{name}").read_text().splitlines()[1:]:
            local, _remote, state = line.split()[1:4]
            addr, _, hexport = local.partition(":")
            if state == "0A" and int(hexport, 16) == port:
                assert len(addr) == width
                found.add(addr)
    return found


LOOPBACK_V4 = "0100007F"
LOOPBACK_V6 = "00000000000000000000000001000000"


def _get(url: str, method: str = "GET") -> int:
    parts = urllib.parse.urlsplit(url)
    conn = http.client.HTTPConnection("127.0.0.1", PORT, timeout=5)
    try:
        conn.request(method, parts.path + ("?" + parts.query if parts.query else ""))
        return conn.getresponse().status
    finally:
        conn.close()


def _raw_http(data: bytes) -> bytes:
    with socket.create_connection(("127.0.0.1", PORT), timeout=5) as s:
        s.sendall(data)
        s.shutdown(socket.SHUT_WR)
        out = b""
        while chunk := s.recv(65536):
            out += chunk
        return out


def _login_url(proc: subprocess.Popen[str], timeout: float = 15.0) -> str:
    """The URL the daemon tells the caller to open (its first M line), read off the shim's stderr."""
    assert proc.stderr is not None
    box: list[str] = []
    stderr = proc.stderr
    reader = threading.Thread(target=lambda: box.append(stderr.readline()), daemon=True)
    reader.start()
    reader.join(timeout)
    assert box, "the shim printed no login URL"
    match = re.search(r"Open this URL to log in: (\S+)", box[0])
    assert match, box[0]
    return match.group(1)


def test_callback_listener_is_loopback_only_ignores_junk_and_closes(idp: TestProvider, daemon: Daemon,
                                                                    proxy: Proxy) -> None:
    slow = f"{daemon.env['BROWSER']} --delay 4"
    proc = daemon.shim_async(args(idp, "--oidc-extra-scope=email"), env={"BROWSER": slow})
    try:
        url = _login_url(proc)
        query = dict(urllib.parse.parse_qsl(urllib.parse.urlsplit(url).query))
        state = query["state"]
        assert query["redirect_uri"] == f"http://localhost:{PORT}"
        # Bound to loopback only: 127.0.0.1 and ::1, never a wildcard or another interface.
        assert _listeners(PORT) and _listeners(PORT) <= {LOOPBACK_V4, LOOPBACK_V6}, _listeners(PORT)
        base = f"http://127.0.0.1:{PORT}"
        hostile = {
            f"{base}/?code=stolen&state=not-the-state": 400,
            f"{base}/?code=stolen": 400,
            f"{base}/?error=access_denied&error_description=fake&state=wrong": 400,
            f"{base}/?error=access_denied": 400,
            f"{base}/elsewhere?code=stolen&state={state}": 400,  # right state, wrong path
            f"{base}/favicon.ico": 404,
            f"{base}/?{'junk=' + 'x' * 6000}&state=zz": 400,
        }
        for target, expected in hostile.items():
            assert _get(target) == expected, target
        assert _get(f"{base}/?code=stolen&state={state}", method="POST") == 404
        # Not HTTP at all, and an oversized request line: closed or answered 4xx, never anything else.
        for junk in (b"\x16\x03\x01 not http at all\r\n\r\n",
                     b"GET /?state=" + b"A" * 20000 + b" HTTP/1.1\r\nHost: x\r\n\r\n"):
            answer = _raw_http(junk)
            assert answer == b"" or re.match(rb"HTTP/1\.[01] 4", answer), answer[:100]
        out, err = proc.communicate(timeout=60)
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.communicate()
    # None of that ended the real login early: the browser's redirect, seconds later, completed it.
    assert proc.returncode == 0, err + daemon.log()[-2000:]
    assert json.loads(out)["status"]["token"]
    # The listener closed when the login ended.
    deadline = time.monotonic() + 5
    while _listeners(PORT) and time.monotonic() < deadline:
        time.sleep(0.05)
    assert not _listeners(PORT)
    with pytest.raises(ConnectionRefusedError):
        socket.create_connection(("127.0.0.1", PORT), timeout=2).close()
    # The code went to the token endpoint exactly once, through the proxy we can read.
    codes = proxy.recorder.secrets()["code"]
    assert codes
    assert tracebacks(daemon.log()) == []


def test_replayed_callback_during_another_login_is_ignored(idp: TestProvider, daemon: Daemon, proxy: Proxy) -> None:
    # A first login, whose callback (state + code) an attacker recorded.
    first = daemon.shim(args(idp, "--oidc-extra-scope=profile"))
    assert first.returncode == 0, first.stderr
    old_query = idp.last_auth()
    old_code = sorted(proxy.recorder.secrets()["code"])[-1]
    before = idp.counters()["token_grants"]["authorization_code"]
    # A second login (another session) is pending; the old callback is replayed at its listener.
    slow = f"{daemon.env['BROWSER']} --delay 3"
    proc = daemon.shim_async(args(idp, "--oidc-extra-scope=email", "--oidc-extra-scope=profile"),
                             env={"BROWSER": slow})
    try:
        _login_url(proc)
        replay = f"http://127.0.0.1:{PORT}/?code={urllib.parse.quote(old_code)}&state={old_query['state']}"
        assert _get(replay) == 400
        _out, err = proc.communicate(timeout=60)
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.communicate()
    assert proc.returncode == 0, err
    # Exactly one more code redeemed: the real one; the replayed code never reached the provider.
    assert idp.counters()["token_grants"]["authorization_code"] - before == 1


def test_access_denied_shows_the_providers_message(idp: TestProvider, daemon: Daemon) -> None:
    deny = f"{daemon.env['BROWSER']} --deny"
    result = daemon.shim(args(idp, "--oidc-extra-scope=offline_access", "--oidc-extra-scope=email"),
                         env={"BROWSER": deny})
    assert result.returncode == 1 and result.stdout == ""
    lines = result.stderr.strip().splitlines()
    assert lines[-1] == ("brokerd: the provider refused the login (access_denied: The resource owner denied "
                         "the request)"), result.stderr
    assert not _listeners(PORT)


# ---- a tampered ID token from the real provider -----------------------------------------------------------------

def _forge_subject(url: str, body: bytes) -> bytes | None:
    """Swap the ID token's sub for another user's, keeping the provider's signature (which then fails)."""
    if not urllib.parse.urlsplit(url).path.endswith("/token"):
        return None
    doc = json.loads(body)
    if "id_token" not in doc:
        return None
    header, payload, signature = doc["id_token"].split(".")
    claims = json.loads(base64.urlsafe_b64decode(payload + "=" * (-len(payload) % 4)))
    claims["sub"] = "mallory"
    forged = base64.urlsafe_b64encode(json.dumps(claims).encode()).rstrip(b"=").decode()
    doc["id_token"] = f"{header}.{forged}.{signature}"
    return json.dumps(doc).encode()


def test_tampered_id_token_is_refused_with_one_line_and_not_cached(idp: TestProvider) -> None:
    with Proxy(tamper=_forge_subject) as tampering, Daemon(env=proxy_env(tampering)) as d:
        before = idp.counters()["token_grants"]["authorization_code"]
        result = d.shim(args(idp, "--oidc-extra-scope=email"))
        assert result.returncode == 1 and result.stdout == ""
        last = result.stderr.strip().splitlines()[-1]
        assert last == "brokerd: ID token signature does not verify against the provider's keys", result.stderr
        assert idp.counters()["token_grants"]["authorization_code"] - before == 1  # it did come from the provider
        assert status(d) == []  # nothing cached
        d.stop()
        assert tracebacks(d.log()) == []
        store_files = [p for p in d.state_dir.rglob("*") if p.is_file()] if d.state_dir.exists() else []
        for path in store_files:
            assert b"mallory" not in path.read_bytes()
