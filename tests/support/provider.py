"""Run the test OIDC provider (tests/provider/server.mjs) as a real process and drive its /__test/ API.

Stdlib only (subprocess + urllib), so sync and async tests can use it alike; from async code wrap the
blocking calls in ``asyncio.to_thread`` when the event loop must keep serving something meanwhile.
"""

from __future__ import annotations

import base64
import contextlib
import json
import os
import selectors
import shutil
import subprocess
import sys
import tempfile
import time
import urllib.error
import urllib.request
from collections.abc import Callable
from pathlib import Path
from typing import Any, Literal

from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric import ec, ed25519, rsa
from joserfc import jwk

PROVIDER_DIR = Path(__file__).resolve().parent.parent / "provider"
SERVER = PROVIDER_DIR / "server.mjs"
START_TIMEOUT = 20.0  # node starts in about 1 s; a start that hangs is retried (see launch_provider)
START_ATTEMPTS = 3

# Defaults of the provider's JSON config, repeated here so tests can refer to them by name.
KUBE_LOGIN_CLIENT_ID = "kube_login"
KUBE_LOGIN_CLIENT_SECRET = "insecure_secret"
DEFAULT_OTP = "123456"
USERS = {
    "alice": {"password": "alice-password", "email": "alice@example.com", "groups": ["admins", "dev"]},
    "bob": {"password": "bob-password", "email": "bob@example.com", "groups": ["dev"]},
}


class ProviderError(Exception):
    """The test provider could not be started or did not answer as expected."""


class TestProvider:
    """A running provider process. ``issuer`` is ``http://127.0.0.1:PORT``."""

    __test__ = False  # not a pytest test class despite the name

    def __init__(self, proc: subprocess.Popen[bytes], issuer: str, log_path: Path, config: dict[str, Any]):
        self.proc = proc
        self.issuer = issuer
        self.log_path = log_path
        self.config = config

    @property
    def port(self) -> int:
        return int(self.issuer.rsplit(":", 1)[1])

    def _call(self, method: str, path: str, body: dict[str, Any] | None = None) -> Any:
        data = json.dumps(body).encode() if body is not None else None
        req = urllib.request.Request(f"{self.issuer}/__test/{path}", data=data, method=method)
        if data is not None:
            req.add_header("Content-Type", "application/json")
        try:
            with urllib.request.urlopen(req, timeout=10) as resp:
                return json.loads(resp.read() or b"null")
        except urllib.error.HTTPError as exc:
            with exc:
                detail = exc.read()[:200]
            raise ProviderError(f"{method} /__test/{path}: HTTP {exc.code} {detail!r}") from exc

    def counters(self) -> dict[str, Any]:
        result: dict[str, Any] = self._call("GET", "counters")
        return result

    def reset(self) -> None:
        """Zero the counters (faults, keys and tokens stay)."""
        self._call("POST", "reset", {})

    def fault(
        self,
        target: str,
        kind: str = "status",
        *,
        count: int | None = 1,
        status: int | None = None,
        seconds: float | None = None,
        body: Any = None,
        grant_type: str | None = None,
    ) -> None:
        """Break the next ``count`` requests (None: until cleared) to ``target``.

        target: token, discovery, jwks, revocation, userinfo, device_authorization, auth, pushed_authorization.
        kind: status (default 500), delay (``seconds``, then served normally), drop (connection closed),
        empty_body (200, no body), nonstandard_error (400 {"error":"weird"}), html (200 text/html page),
        bad_id_token (the grant is processed for real, then the answer's ID token gets a broken signature).
        grant_type (token only): hit only requests of that grant (authorization_code, refresh_token,
        device_code, password, client_credentials); others pass untouched and do not use up ``count``.
        """
        spec: dict[str, Any] = {"target": target, "kind": kind, "count": count}
        for key, value in (("status", status), ("seconds", seconds), ("body", body), ("grant_type", grant_type)):
            if value is not None:
                spec[key] = value
        self._call("POST", "fault", spec)

    def clear_faults(self) -> None:
        self._call("POST", "faults/clear", {})

    def rotate_keys(self, keep_old: bool = False) -> dict[str, Any]:
        """New signing key (new kid); the old one stays in the JWKS only when keep_old.

        Returns {"kid": new kid, "kids": every kid now in the JWKS}."""
        result: dict[str, Any] = self._call("POST", "rotate_keys", {"keep_old": keep_old, "key": rsa_jwk()})
        return result

    def revoke_all(self, user: str) -> int:
        """Admin action: drop every session, grant and token of the user. Returns how many records went."""
        return int(self._call("POST", "revoke_all", {"user": user})["removed"])

    def set_user(self, name: str, **fields: Any) -> str:
        """Add or change a user (password, email, name, groups, email_verified). Returns its sub."""
        return str(self._call("POST", "set_user", {"name": name, "fields": fields})["sub"])

    def users(self) -> dict[str, Any]:
        """name -> {"sub": ..., "groups": [...]}"""
        result: dict[str, Any] = self._call("GET", "users")
        return result

    def sub(self, user: str) -> str:
        return str(self.users()[user]["sub"])

    def last_auth(self) -> dict[str, str]:
        """Query parameters of the last GET /auth ({} before the first)."""
        result: dict[str, str] = self._call("GET", "last_auth")
        return result

    def last_pushed(self) -> dict[str, str]:
        """Form parameters of the last pushed authorization request, without client credentials ({} before)."""
        result: dict[str, str] = self._call("GET", "last_pushed")
        return result

    def log(self) -> str:
        """What the provider wrote to stderr so far."""
        return self.log_path.read_text(errors="replace") if self.log_path.exists() else ""

    def __enter__(self) -> TestProvider:
        return self

    def __exit__(self, *exc: object) -> None:
        self.stop()

    def stop(self) -> None:
        """Terminate the process (by its PID) and remove its temp dir. Idempotent."""
        if self.proc.poll() is None:
            self.proc.terminate()
            try:
                self.proc.wait(timeout=5)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait(timeout=5)
        if self.proc.stdout is not None:
            self.proc.stdout.close()
        shutil.rmtree(self.log_path.parent, ignore_errors=True)


ProviderFactory = Callable[..., TestProvider]
"""The type of the ``provider_factory`` fixture: ``(config: dict | None = None, port: int = 0) -> TestProvider``."""


def node_modules_missing() -> str | None:
    """An explanation when the provider's npm dependencies are not installed, else None."""
    if shutil.which("node") is None:
        return "node is not on PATH; the test provider needs Node.js 20+"
    if not (PROVIDER_DIR / "node_modules" / "oidc-provider").is_dir():
        return (
            f"{PROVIDER_DIR}/node_modules is missing: run scripts/test (it runs `npm ci` in tests/provider), "
            f"or `cd tests/provider && npm ci`"
        )
    return None


def launch_provider(config: dict[str, Any] | None = None, port: int = 0) -> TestProvider:
    """Start a provider and return it once it prints its issuer; the caller must call stop().

    A start that hangs is retried with a fresh process (seen rarely, only in long full-suite runs: node sits
    after importing oidc-provider without printing; see _process_state in the error for where it sat)."""
    problem = node_modules_missing()
    if problem:
        raise ProviderError(problem)
    failures: list[str] = []
    for _attempt in range(START_ATTEMPTS):
        started = _launch_once(dict(config or {}), port)
        if isinstance(started, TestProvider):
            return started
        failures.append(started)
        sys.stderr.write(f"test provider start failed, retrying: {started}\n")
    raise ProviderError("test provider did not start: " + " / then: ".join(failures))


def rsa_jwk() -> dict[str, str]:
    """A fresh RS256 private key as a JWK, for the provider to sign with (node's own key generation can hang)."""
    key = rsa.generate_private_key(public_exponent=65537, key_size=2048)
    numbers = key.private_numbers()
    pub = numbers.public_numbers

    def b64(value: int) -> str:
        raw = value.to_bytes((value.bit_length() + 7) // 8, "big")
        return base64.urlsafe_b64encode(raw).rstrip(b"=").decode()

    return {"kty": "RSA", "n": b64(pub.n), "e": b64(pub.e), "d": b64(numbers.d), "p": b64(numbers.p),
            "q": b64(numbers.q), "dp": b64(numbers.dmp1), "dq": b64(numbers.dmq1), "qi": b64(numbers.iqmp)}


def client_key_pair(kind: str = "RSA", kid: str | None = None) -> tuple[bytes, dict[str, Any]]:
    """A client's private key as PKCS#8 PEM and its public JWK (for the client's ``jwks`` in the provider config):
    what a private_key_jwt client is registered with.  kind: RSA, P-256, P-384, P-521 or Ed25519."""
    private: rsa.RSAPrivateKey | ec.EllipticCurvePrivateKey | ed25519.Ed25519PrivateKey
    if kind == "RSA":
        private = rsa.generate_private_key(public_exponent=65537, key_size=2048)
    elif kind == "Ed25519":
        private = ed25519.Ed25519PrivateKey.generate()
    else:
        private = ec.generate_private_key({"P-256": ec.SECP256R1(), "P-384": ec.SECP384R1(),
                                           "P-521": ec.SECP521R1()}[kind])
    pem = private.private_bytes(serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8,
                                serialization.NoEncryption())
    key_type: Literal["RSA", "EC", "OKP"] = "RSA" if kind == "RSA" else "OKP" if kind == "Ed25519" else "EC"
    public = dict(jwk.import_key(pem, key_type).as_dict(private=False))
    if kid is not None:
        public["kid"] = kid
    return pem, public


def _launch_once(config: dict[str, Any], port: int) -> TestProvider | str:
    config.setdefault("signing_key", rsa_jwk())
    workdir = Path(tempfile.mkdtemp(prefix="brokerd-provider-"))
    # The config holds passwords and client secrets: a 0600 file, never argv or the environment of others.
    config_path = workdir / "config.json"
    fd = os.open(config_path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
    with os.fdopen(fd, "w") as f:
        json.dump(config, f)
    log_path = workdir / "provider.log"
    with open(log_path, "wb") as log:
        proc = subprocess.Popen(
            ["node", str(SERVER), "--port", str(port), "--config", str(config_path)],
            stdout=subprocess.PIPE,
            stderr=log,
            stdin=subprocess.DEVNULL,
            cwd=PROVIDER_DIR,
        )
    issuer, problem = _read_issuer(proc, START_TIMEOUT)
    config_path.unlink(missing_ok=True)
    if issuer is not None:
        return TestProvider(proc, issuer, log_path, config)
    state = _process_state(proc.pid)
    with contextlib.suppress(ProcessLookupError):
        proc.kill()
    proc.wait(timeout=5)
    if proc.stdout is not None:
        proc.stdout.close()
    text = f"{problem}; process state: {state}; its log: {log_path.read_text()[-1000:]}"
    shutil.rmtree(workdir, ignore_errors=True)
    return text


def _process_state(pid: int) -> str:
    """Where a hung node sits: its state, CPU time and each thread's kernel wait channel (Linux /proc)."""
    try:
        stat = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
        threads = []
        for task in sorted(Path(f"/proc/{pid}/task").iterdir()):
            wchan = (task / "wchan").read_text().strip() or "-"
            tstate = (task / "stat").read_text().rsplit(")", 1)[1].split()[0]
            threads.append(f"{task.name}:{tstate}:{wchan}")
        return f"state {stat[0]}, utime+stime {int(stat[11]) + int(stat[12])} ticks, threads {' '.join(threads)}"
    except (OSError, IndexError, ValueError) as exc:
        return f"unknown ({exc})"
    finally:
        _native_stacks(pid)


def _native_stacks(pid: int) -> None:
    """Append the hung node's native stacks to /tmp/brokerd-provider-hangs.log (for whoever chases it next)."""
    if shutil.which("gdb") is None:
        return
    with contextlib.suppress(OSError, subprocess.SubprocessError):
        out = subprocess.run(["gdb", "-p", str(pid), "-batch", "-ex", "thread apply all bt 12"],
                             capture_output=True, text=True, timeout=30).stdout
        with open("/tmp/brokerd-provider-hangs.log", "a") as f:
            f.write(f"==== pid {pid} at {time.ctime()}\n{out[-20000:]}\n")


def _read_issuer(proc: subprocess.Popen[bytes], timeout: float) -> tuple[str | None, str]:
    """(the issuer line, or None; what happened, for the error message).  Bounded by ``timeout``."""
    assert proc.stdout is not None
    fd = proc.stdout.fileno()
    got = b""
    started = time.monotonic()
    with selectors.DefaultSelector() as sel:
        sel.register(fd, selectors.EVENT_READ)
        while b"\n" not in got:
            left = timeout - (time.monotonic() - started)
            if left <= 0:
                return None, f"no issuer line after {timeout:g} s (stdout so far: {got[:200]!r})"
            if sel.select(min(left, 0.5)):
                chunk = os.read(fd, 4096)
                if not chunk:
                    return None, f"node closed stdout (exit status {proc.wait(timeout=5)}) after {got[:200]!r}"
                got += chunk
            elif proc.poll() is not None:
                return None, f"node exited with status {proc.returncode} before printing its issuer"
    line = got.split(b"\n", 1)[0].decode(errors="replace").strip()
    if line.startswith("http://127.0.0.1:"):
        return line, ""
    return None, f"unexpected first line on stdout: {line[:200]!r}"


def start_provider(config: dict[str, Any] | None = None, port: int = 0) -> TestProvider:
    """Start a provider (bounded wait for its issuer line). Stop it with stop(), or use it as a context
    manager: ``with start_provider({...}) as p:`` stops it by PID when the block ends."""
    return launch_provider(config, port)
