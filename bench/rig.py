"""The parts every benchmark section uses: the C helpers, a daemon, a one-shot socket client, RSS, JWT peeking.

Everything real: the daemon is ``python -m brokerd serve`` (tests/support/daemon.py), the provider is the test OIDC
provider (tests/provider/server.mjs), logins go through the browser stand-in or the password grant.  Only loopback.
"""

from __future__ import annotations

import contextlib
import json
import os
import select
import socket
import subprocess
import sys
import time
from collections.abc import Iterator, Mapping, Sequence
from pathlib import Path

from bench.harness import BenchError
from client_shim import protocol
from tests.support.daemon import Daemon, login_args
from tests.support.wait import poll

ROOT = Path(__file__).resolve().parents[1]
PY = sys.executable  # the venv's interpreter, absolute: the one the direct form of the shim names
SHIM = str(ROOT / "client_shim" / "shim.py")
C_DIR = ROOT / "bench" / "c"
EXEC_INFO_V1BETA1 = json.dumps({"kind": "ExecCredential", "apiVersion": "client.authentication.k8s.io/v1beta1",
                                "spec": {"interactive": False}}, separators=(",", ":"))

__all__ = ["PY", "ROOT", "SHIM", "Daemon", "login_args"]


def compile_helpers(out_dir: Path) -> dict[str, str]:
    """cc -O2 the C client and load generator into out_dir (at bench time, so they match this machine)."""
    built = {}
    # The C client's protocol constants come from client_shim/protocol.py, so there is one definition.
    forwarded = ",".join(f'"{name}"' for name in protocol.FORWARDED_ENV)
    defines = [f'-DBROKERD_MAGIC="{protocol.MAGIC.decode()}"', f"-DBROKERD_FORWARDED={forwarded}"]
    for name in ("client", "loadgen"):
        target = out_dir / name
        cmd = ["cc", "-O2", "-Wall", *defines, "-o", str(target), str(C_DIR / f"{name}.c")]
        done = subprocess.run(cmd, capture_output=True, text=True, timeout=120)
        if done.returncode != 0:
            raise BenchError(f"cc failed for {name}.c: {done.stderr.strip()}")
        built[name] = str(target)
    return built


def build_request(argv: Sequence[str], env: Mapping[str, str], *, tty: bool = False,
                  program: str = "kubectl-oidc_login") -> bytes:
    """The request bytes the shim would send (client_shim/protocol.py), with the tty flag chosen by us."""
    return protocol.encode_request(list(argv), {k.encode(): v.encode() for k, v in env.items()}, tty=tty,
                                   program=program)


def ask(path: Path, request: bytes, answers: Mapping[str, str] | None = None,
        timeout: float = 60.0) -> tuple[str, str]:
    """One request on a new connection; answers prompts from ``answers`` (prompt text -> reply).
    Returns (kind, body) of the terminal line: ("O", result) or ("X", "code text")."""
    with socket.socket(socket.AF_UNIX, socket.SOCK_STREAM) as sock:
        sock.settimeout(timeout)
        sock.connect(str(path))
        sock.sendall(request)
        buf = b""
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            nl = buf.find(b"\n")
            if nl < 0:
                chunk = sock.recv(65536)
                if not chunk:
                    raise BenchError("the daemon closed the connection without an answer")
                buf += chunk
                continue
            line, buf = buf[:nl], buf[nl + 1:]
            kind, body = line[:1], line[1:].decode()
            if kind in protocol.TERMINAL:
                return kind.decode(), body
            if kind in (protocol.ASK, protocol.ASK_SECRET):
                reply = (answers or {}).get(body.strip(), "")
                sock.sendall(protocol.answer_field(reply.encode()))
        raise BenchError("no answer from the daemon in time")


def peer_pid(path: Path) -> int:
    """The PID of the process serving a Unix socket (SO_PEERCRED), e.g. a daemon a shim autostarted."""
    with socket.socket(socket.AF_UNIX, socket.SOCK_STREAM) as sock:
        sock.connect(str(path))
        pid, _uid = protocol.peer_credentials(sock)
    if pid is None:
        raise BenchError("this platform does not say which process serves a socket")
    return pid


def status_kb(pid: int) -> dict[str, int]:
    """VmRSS, VmHWM, RssAnon ... from /proc/PID/status, in kB."""
    out = {}
    with open(f"/proc/{pid}/status") as f:
        for text in f:
            name, _, value = text.partition(":")
            if value.strip().endswith("kB"):
                out[name] = int(value.split()[0])
    return out


def pss_kb(pid: int) -> int:
    """Proportional set size: shared library pages divided among the processes that map them."""
    with open(f"/proc/{pid}/smaps_rollup") as f:
        for text in f:
            if text.startswith("Pss:"):
                return int(text.split()[1])
    return 0


def cpu_seconds(pid: int) -> float:
    """utime + stime of a process so far (from /proc/PID/stat)."""
    with open(f"/proc/{pid}/stat") as f:
        fields = f.read().rsplit(")", 1)[1].split()
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")




def login_with_browser(daemon: Daemon, args: Sequence[str], attempts: int = 6) -> None:
    """Log in once through the shim and the browser stand-in.  The default client only accepts redirects to
    ports 8000/18000, which other engineers' tests may hold for a moment: retry a few times, bounded."""
    last = ""
    for attempt in range(attempts):
        done = daemon.shim(args, timeout=90)
        if done.returncode == 0:
            return
        last = done.stderr.strip()
        time.sleep(1.0 + attempt)
    raise BenchError(f"login through the browser stand-in failed {attempts} times: {last}\n{daemon.log()[-2000:]}")


def wait_gone(pid: int, timeout: float = 20.0) -> None:
    """Wait (bounded) until a process that is not our child has exited."""
    if not poll(lambda: _gone(pid), timeout, interval=0.01):
        raise BenchError(f"process {pid} did not exit within {timeout} s")


def _gone(pid: int) -> bool:
    try:
        with open(f"/proc/{pid}/stat") as f:
            state = f.read().rsplit(")", 1)[1].split()[0]
    except FileNotFoundError:
        return True
    return state == "Z"


@contextlib.contextmanager
def echo_server(path: Path, reply_bytes: int, loop: str = "asyncio") -> Iterator[subprocess.Popen[bytes]]:
    """bench/echo_server.py on ``loop`` as its own process; stopped by PID on exit."""
    proc = subprocess.Popen([PY, str(ROOT / "bench" / "echo_server.py"), str(path), str(reply_bytes), loop],
                            stdout=subprocess.PIPE, stdin=subprocess.DEVNULL)
    try:
        assert proc.stdout is not None
        ready, _, _ = select.select([proc.stdout], [], [], 15.0)  # bounded: never block on a hung child
        line = os.read(proc.stdout.fileno(), 64) if ready else b""
        if line.strip() != b"ready":
            raise BenchError("the echo server did not start")
        yield proc
    finally:
        if proc.poll() is None:
            proc.terminate()
        try:
            proc.wait(timeout=10)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait(timeout=5)
        if proc.stdout is not None:
            proc.stdout.close()
