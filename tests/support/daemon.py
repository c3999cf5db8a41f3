"""Run the real daemon (`python -m brokerd serve`) and the real shim as processes, on a private socket."""

from __future__ import annotations

import base64
import json
import os
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

from tests.support.wait import poll

ROOT = Path(__file__).resolve().parents[2]
SHIM = ROOT / "client_shim" / "shim.py"
BROWSER = ROOT / "tests" / "support" / "browser.py"
BIN = Path(sys.executable).parent  # the venv's bin: brokerd, kubectl-oidc_login
NO_BUS = "unix:path=/nonexistent/brokerd-tests-have-no-session-bus"


def exec_token(result: subprocess.CompletedProcess[str]) -> str:
    """The token in a successful shim run's ExecCredential (asserts the run succeeded and printed one)."""
    assert result.returncode == 0, result.stderr
    cred = json.loads(result.stdout)
    assert cred["kind"] == "ExecCredential", cred
    token: str = cred["status"]["token"]
    return token


def jwt_claims(token: str) -> dict[str, Any]:
    """A JWT's payload, unverified: for reading what the daemon handed out (sub, exp, groups)."""
    payload = token.split(".")[1]
    doc: dict[str, Any] = json.loads(base64.urlsafe_b64decode(payload + "=" * (-len(payload) % 4)))
    return doc


def login_args(issuer: str, *extra: str, client_id: str = "kube_login", secret: str | None = "insecure_secret",
               scopes: Sequence[str] = ("groups",)) -> list[str]:
    """kubelogin's get-token flags as the Authelia guide writes them."""
    args = ["get-token", f"--oidc-issuer-url={issuer}", f"--oidc-client-id={client_id}"]
    if secret is not None:
        args.append(f"--oidc-client-secret={secret}")
    args += [f"--oidc-extra-scope={s}" for s in scopes]
    return [*args, *extra]


def stop_daemons_holding(lock: Path, timeout: float = 10.0) -> int:
    """SIGTERM the daemons that hold ``lock`` (an autostarted daemon's runtime lock): they were started by a test
    through the shim, so the test knows no PID; the lock file names them.  Returns how many were signalled."""
    signalled = []
    for proc in Path("/proc").iterdir():
        if not proc.name.isdigit():
            continue
        try:
            holds = any(os.readlink(fd) == str(lock) for fd in (proc / "fd").iterdir())
        except OSError:
            continue
        if holds:
            try:
                os.kill(int(proc.name), signal.SIGTERM)
            except OSError:
                continue
            signalled.append(proc)
    poll(lambda: not any(p.exists() for p in signalled), timeout)
    return len(signalled)


class Daemon:
    """One daemon process.  Its directory is short (socket paths must stay under 108 bytes) and private."""

    def __init__(self, base: Path | None = None, env: Mapping[str, str] | None = None,
                 config: str | None = None, python: str = sys.executable) -> None:
        """``python``: the interpreter that runs ``-m brokerd serve`` (bench/memory.py: a user's install)."""
        self.python = python
        self.base = base or Path(tempfile.mkdtemp(prefix="bk", dir="/tmp"))
        self._own_base = base is None
        self.socket = self.base / "run" / "brokerd.sock"
        self.state_dir = self.base / "state"
        self.log_path = self.base / "daemon.log"
        self.browser_log = self.base / "browser.log"
        self.config_path = self.base / "config.toml"
        if config is not None:
            self.config_path.write_text(config)
        self.env = dict(os.environ)
        self.env.update({
            "BROKERD_SOCKET": str(self.socket),
            "BROKERD_STATE_DIR": str(self.state_dir),
            "BROKERD_CONFIG": str(self.config_path),
            "BROKERD_NO_AUTOSTART": "1",
            "BROWSER": f"{sys.executable} {BROWSER} --log {self.browser_log}",
            "PATH": f"{BIN}{os.pathsep}{os.environ.get('PATH', '')}",
        })
        self.env.pop("KUBERNETES_EXEC_INFO", None)
        # Never the machine's own session bus: its keyring would get our test keys.  A dead address, not none: with
        # none, brokerd would look for $XDG_RUNTIME_DIR/bus.  tests/support/desktop.py passes a private bus in env.
        self.env["DBUS_SESSION_BUS_ADDRESS"] = NO_BUS
        self.env.update(env or {})
        self.proc: subprocess.Popen[bytes] | None = None

    # -- the daemon -------------------------------------------------------------------------------------------------

    def start(self, timeout: float = 15.0) -> Daemon:
        with open(self.log_path, "ab") as log:
            self.proc = subprocess.Popen([self.python, "-m", "brokerd", "serve", "-v"], env=self.env,
                                         stdin=subprocess.DEVNULL, stdout=log, stderr=log, cwd=self.base)
        proc = self.proc
        poll(lambda: proc.poll() is not None or self.alive(), timeout)
        if proc.poll() is not None:
            raise RuntimeError(f"brokerd exited with {proc.returncode}:\n{self.log()}")
        if not self.alive():
            raise RuntimeError(f"brokerd did not listen within {timeout} s:\n{self.log()}")
        return self

    def alive(self) -> bool:
        probe = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        try:
            probe.connect(str(self.socket))
        except OSError:
            return False
        finally:
            probe.close()
        return True

    def stop(self, sig: int = signal.SIGTERM, timeout: float = 20.0) -> int:
        """Signal our daemon by PID and wait for it; returns its exit status."""
        if self.proc is None:
            return 0
        if self.proc.poll() is None:
            self.proc.send_signal(sig)
        try:
            code = self.proc.wait(timeout=timeout)
        except subprocess.TimeoutExpired:
            self.proc.kill()
            code = self.proc.wait(timeout=5)
        self.proc = None
        return code

    def kill(self) -> None:
        self.stop(signal.SIGKILL)

    def log(self) -> str:
        try:
            return self.log_path.read_text(errors="replace")
        except FileNotFoundError:
            return ""

    def browser_openings(self) -> int:
        try:
            return len(self.browser_log.read_text().splitlines())
        except FileNotFoundError:
            return 0

    def close(self) -> None:
        self.stop()
        if self._own_base:
            shutil.rmtree(self.base, ignore_errors=True)

    def __enter__(self) -> Daemon:
        return self.start()

    def __exit__(self, *exc: object) -> None:
        self.close()

    # -- clients ------------------------------------------------------------------------------------------------------

    def shim_argv(self, args: Sequence[str]) -> list[str]:
        """The fast direct form: absolute interpreter, -I -S, the shim's file."""
        return [sys.executable, "-I", "-S", str(SHIM), *args]

    def shim(self, args: Sequence[str], env: Mapping[str, str] | None = None, timeout: float = 60.0,
             input: str | None = None) -> subprocess.CompletedProcess[str]:
        full = dict(self.env)
        full.update(env or {})
        return subprocess.run(self.shim_argv(args), env=full, capture_output=True, text=True, timeout=timeout,
                              input=input, stdin=None if input is not None else subprocess.DEVNULL)

    def shim_async(self, args: Sequence[str], env: Mapping[str, str] | None = None,
                   cwd: Path | None = None) -> subprocess.Popen[str]:
        full = dict(self.env)
        full.update(env or {})
        return subprocess.Popen(self.shim_argv(args), env=full, stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                                stdin=subprocess.DEVNULL, text=True, cwd=cwd)

    def cli(self, *args: str, env: Mapping[str, str] | None = None,
            timeout: float = 60.0) -> subprocess.CompletedProcess[str]:
        full = dict(self.env)
        full.update(env or {})
        return subprocess.run([sys.executable, "-m", "brokerd", *args], env=full, capture_output=True, text=True,
                              timeout=timeout, stdin=subprocess.DEVNULL)
