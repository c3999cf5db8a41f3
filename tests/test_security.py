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
import sys
import tempfile
import threading
import time
import urllib.parse
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from tests.support.daemon import SHIM, Daemon, login_args
from tests.support.hostile import Proxy, exchange, proxy_env, request, tracebacks
from tests.support.net import module_port
from tests.support.other_uid import NOBODY, SYSTEM_PYTHON
from tests.support.provider import ProviderFactory, TestProvider
from tests.support.wait import wait_until


def redirect_port() -> int:
    """This module's own redirect port, so other tests' use of 8000/18000 cannot interfere (picked at first use)."""
    return module_port(__name__)


@pytest.fixture(scope="module")
def idp(provider_factory: ProviderFactory) -> TestProvider:
    return provider_factory({"default_client": {"redirect_uris": [f"http://localhost:{redirect_port()}"]}})


@pytest.fixture(scope="module")
def proxy() -> Iterator[Proxy]:
    with Proxy() as p:
        yield p


@pytest.fixture(scope="module")
def daemon(proxy: Proxy) -> Iterator[Daemon]:
    with Daemon(env=proxy_env(proxy)) as d:
        yield d


def args(idp: TestProvider, *extra: str) -> list[str]:
    return login_args(idp.issuer, f"--listen-address=127.0.0.1:{redirect_port()}", *extra)


def status(d: Daemon) -> list[dict[str, Any]]:
    raw = exchange(d.socket, request("status"))
    assert raw.startswith(b"O"), raw
    sessions: list[dict[str, Any]] = json.loads(raw[1:])["sessions"]
    return sessions


# ---- the socket: only our own uid ------------------------------------------------------------------------------

NEEDS_ROOT = pytest.mark.skipif(os.getuid() != 0 or SYSTEM_PYTHON is None or shutil.which("setpriv") is None,
                                reason="needs root, setpriv and /usr/bin/python3 (to become another uid)")

# Run as another uid with `python3 -I -S -c`: nothing is read from the checkout, which may sit in a 0700 directory.
RAW_CLIENT = """
import socket, sys
s = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
s.settimeout(20)
s.connect(sys.argv[1])
s.sendall(bytes.fromhex(sys.argv[2]))
out = b""
while chunk := s.recv(65536):
    out += chunk
sys.stdout.write(out.decode())
"""

# Another user's listener: makes its directory (unless it exists), listens, says "ready", then reports how many
# bytes its first caller sent before hanging up.
LISTENER = """
import os, socket, sys
path = sys.argv[1]
os.makedirs(os.path.dirname(path), mode=0o700, exist_ok=True)
s = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
s.bind(path)
os.chmod(path, 0o777)
s.listen(1)
print("ready", flush=True)
s.settimeout(20)
try:
    conn, _ = s.accept()
except TimeoutError:
    print("nobody came", flush=True)
    sys.exit(0)
conn.settimeout(20)
got = b""
while chunk := conn.recv(65536):
    got += chunk
print(f"got {len(got)} bytes", flush=True)
"""


def as_user(uid: int, *argv: str, env: dict[str, str] | None = None,
            **kwargs: Any) -> subprocess.Popen[str]:
    return subprocess.Popen(["setpriv", f"--reuid={uid}", f"--regid={uid}", "--clear-groups", "--", *argv],
                            env=env or {"PATH": "/usr/bin:/bin"}, stdin=subprocess.DEVNULL, stdout=subprocess.PIPE,
                            stderr=subprocess.PIPE, text=True, **kwargs)


def run_shim(socket_path: Path, *args: str) -> subprocess.CompletedProcess[str]:
    env = {"BROKERD_SOCKET": str(socket_path), "BROKERD_NO_AUTOSTART": "1", "PATH": "/usr/bin:/bin"}
    return subprocess.run([sys.executable, "-I", "-S", str(SHIM), *args], env=env, capture_output=True, text=True,
                          timeout=30, stdin=subprocess.DEVNULL)


@NEEDS_ROOT
def test_other_uid_is_refused_by_the_peer_check_and_logged(daemon: Daemon) -> None:
    def as_nobody() -> subprocess.CompletedProcess[str]:
        assert SYSTEM_PYTHON is not None
        proc = as_user(NOBODY, SYSTEM_PYTHON, "-I", "-S", "-c", RAW_CLIENT, str(daemon.socket),
                       request("version").hex())
        out, err = proc.communicate(timeout=30)
        return subprocess.CompletedProcess(proc.args, proc.returncode, out, err)

    # As installed: the 0700 directory alone keeps the other user out.
    blocked = as_nobody()
    assert blocked.returncode == 1 and "PermissionError" in blocked.stderr, blocked
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
    assert refused.returncode == 0, refused
    assert refused.stdout == "X1 brokerd: brokerd serves only the user that runs it\n"
    assert f"refused a connection from uid {NOBODY} (only uid 0 may use this daemon)" in daemon.log()
    # And our own uid still gets in.
    assert exchange(daemon.socket, request("version")).startswith(b"O")


@NEEDS_ROOT
def test_shim_and_daemon_refuse_a_socket_directory_another_user_made(tmp_path: Path) -> None:
    """Issue 11.5: another user who creates the socket's directory first (the /tmp/runtime-<uid> fallback) gets
    nothing: the shim does not connect (not one byte of kubectl's arguments, client secret included), and the
    daemon will not serve from there.  Both say the same line."""
    assert SYSTEM_PYTHON is not None
    shared = Path(tempfile.mkdtemp(prefix="bkshared", dir="/tmp"))
    try:
        shared.chmod(0o1777)  # like /tmp
        sock_path = shared / "runtime-0" / "brokerd" / "brokerd.sock"
        listener = as_user(NOBODY, SYSTEM_PYTHON, "-I", "-S", "-c", LISTENER, str(sock_path))
        try:
            assert listener.stdout is not None
            assert listener.stdout.readline() == "ready\n", listener.stderr
            shim = run_shim(sock_path, *login_args("https://idp.invalid", "--oidc-client-secret=s3cret"))
            line = f"brokerd: refusing the directory {sock_path.parent}: it is owned by uid {NOBODY} " \
                   "(it must be yours with mode 0700)\n"
            assert (shim.returncode, shim.stdout, shim.stderr) == (3, "", line)
            # The daemon, pointed at the same place, refuses it with the same line.
            served = subprocess.run([sys.executable, "-m", "brokerd", "serve"], capture_output=True, text=True,
                                    timeout=60, env={**os.environ, "BROKERD_SOCKET": str(sock_path),
                                                     "BROKERD_STATE_DIR": str(tmp_path / "state"),
                                                     "BROKERD_CONFIG": str(tmp_path / "none.toml")})
            assert (served.returncode, served.stderr) == (2, line), served
        finally:
            listener.terminate()  # our own child, by PID
            out, _ = listener.communicate(timeout=20)
        assert "got" not in out, out  # no caller ever reached the other user's listener
    finally:
        shutil.rmtree(shared, ignore_errors=True)


@NEEDS_ROOT
def test_shim_sends_nothing_to_a_listener_of_another_uid(tmp_path: Path) -> None:
    """Issue 11.5: even in the user's own 0700 directory, the shim checks who listens (SO_PEERCRED) before it
    sends a byte."""
    assert SYSTEM_PYTHON is not None
    private = Path(tempfile.mkdtemp(prefix="bk", dir="/tmp"))
    try:
        private.chmod(0o755)
        run = private / "run"
        run.mkdir(mode=0o700)
        os.chown(run, NOBODY, NOBODY)  # long enough for the other user to bind there ...
        sock_path = run / "brokerd.sock"
        listener = as_user(NOBODY, SYSTEM_PYTHON, "-I", "-S", "-c", LISTENER, str(sock_path))
        try:
            assert listener.stdout is not None
            assert listener.stdout.readline() == "ready\n", listener.stderr
            os.chown(run, 0, 0)  # ... then the directory is ours and private again, the listener still theirs
            shim = run_shim(sock_path, *login_args("https://idp.invalid", "--oidc-client-secret=s3cret"))
            out, _ = listener.communicate(timeout=20)
        finally:
            if listener.poll() is None:
                listener.kill()
                listener.wait(timeout=10)
        assert (shim.returncode, shim.stdout) == (3, ""), shim
        assert shim.stderr == f"brokerd: refusing the socket {sock_path}: it is served by uid {NOBODY}, not by you\n"
        assert out.splitlines()[-1] == "got 0 bytes", out
    finally:
        shutil.rmtree(private, ignore_errors=True)


HIGH_UID = 3_000_000_000  # >= 2**31: negative when unpacked as a signed int


@NEEDS_ROOT
def test_a_uid_above_2_to_the_31_is_served_by_its_own_daemon(tmp_path: Path) -> None:
    """Issue 11.14: ucred's uid is unsigned.  Unpacked as "3i", uid 3000000000 read as negative and the daemon
    refused its own user.  The daemon and the shim run as that uid from a copy of the code it can read."""
    code = Path(tempfile.mkdtemp(prefix="bkcode", dir="/tmp"))
    home = Path(tempfile.mkdtemp(prefix="bkhome", dir="/tmp"))
    try:
        code.chmod(0o755)
        for package in ("brokerd", "client_shim"):
            shutil.copytree(SHIM.parents[1] / package, code / package,
                            ignore=shutil.ignore_patterns("__pycache__"))
        os.chown(home, HIGH_UID, HIGH_UID)
        env = {"PATH": "/usr/bin:/bin", "PYTHONPATH": str(code), "HOME": str(home),
               "BROKERD_SOCKET": str(home / "run" / "brokerd.sock"), "BROKERD_STATE_DIR": str(home / "state"),
               "BROKERD_CONFIG": str(home / "none.toml"), "BROKERD_NO_AUTOSTART": "1"}
        probe = as_user(HIGH_UID, sys.executable, "-c", "import aiohttp, brokerd.daemon", env=env)
        _, probe_err = probe.communicate(timeout=60)
        if probe.returncode != 0:
            pytest.skip(f"the interpreter's packages are not readable by another uid: {probe_err}")
        daemon = as_user(HIGH_UID, sys.executable, "-m", "brokerd", "serve", "-v", env=env)
        try:
            deadline = time.monotonic() + 30
            done = None
            while time.monotonic() < deadline and daemon.poll() is None:
                shim = as_user(HIGH_UID, sys.executable, "-I", "-S", str(code / "client_shim" / "shim.py"),
                               "status", env=env)  # the shim answers `version` itself; status asks the daemon
                out, err = shim.communicate(timeout=30)
                done = (shim.returncode, out, err)
                if "no daemon is listening" not in err:
                    break
                time.sleep(0.1)
        finally:
            daemon.terminate()
            _, log = daemon.communicate(timeout=30)
        assert done is not None and done[0] == 0 and json.loads(done[1]) == {"sessions": []}, (done, log)
        assert "refused a connection" not in log, log
    finally:
        shutil.rmtree(code, ignore_errors=True)
        shutil.rmtree(home, ignore_errors=True)


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
    conn = http.client.HTTPConnection("127.0.0.1", redirect_port(), timeout=5)
    try:
        conn.request(method, parts.path + ("?" + parts.query if parts.query else ""))
        return conn.getresponse().status
    finally:
        conn.close()


def _raw_http(data: bytes) -> bytes:
    with socket.create_connection(("127.0.0.1", redirect_port()), timeout=5) as s:
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
    seen, grants = len(proxy.recorder.exchanges), idp.counters()["token_grants"]["authorization_code"]
    slow = f"{daemon.env['BROWSER']} --delay 4"
    proc = daemon.shim_async(args(idp, "--oidc-extra-scope=email"), env={"BROWSER": slow})
    try:
        url = _login_url(proc)
        query = dict(urllib.parse.parse_qsl(urllib.parse.urlsplit(url).query))
        state = query["state"]
        assert query["redirect_uri"] == f"http://localhost:{redirect_port()}"
        # Bound to loopback only: 127.0.0.1 and ::1, never a wildcard or another interface.
        listening = _listeners(redirect_port())
        assert listening and listening <= {LOOPBACK_V4, LOOPBACK_V6}, listening
        base = f"http://127.0.0.1:{redirect_port()}"
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
    wait_until(lambda: not _listeners(redirect_port()), "the callback listener to close", 5)
    with pytest.raises(ConnectionRefusedError):
        socket.create_connection(("127.0.0.1", redirect_port()), timeout=2).close()
    # The code went to the token endpoint exactly once, through the proxy we can read (the stolen codes never).
    redeemed = [ex for ex in proxy.recorder.exchanges[seen:] if b"grant_type=authorization_code" in ex.request_body]
    assert len(redeemed) == 1
    assert idp.counters()["token_grants"]["authorization_code"] - grants == 1
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
        replay = (f"http://127.0.0.1:{redirect_port()}/?code={urllib.parse.quote(old_code)}"
                  f"&state={old_query['state']}")
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
    assert not _listeners(redirect_port())


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
