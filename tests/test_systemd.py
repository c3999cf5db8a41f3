"""systemd adapters and units: socket activation through real processes, sd_notify on real datagram sockets,
the rendered units through `systemd-analyze verify`, install/uninstall, and (once `brokerd serve` exists) the daemon
itself under systemd-socket-activate."""

from __future__ import annotations

import asyncio
import contextlib
import importlib.util
import itertools
import json
import os
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import time
from collections.abc import Iterator
from pathlib import Path

import pytest

from brokerd import install
from brokerd.errors import ConfigError
from brokerd.systemd import (
    Notifier,
    listen_fds,
    listen_fds_with_names,
    outside_unit_argv,
    watchdog_interval,
    watchdog_task,
)
from client_shim import protocol
from tests.support.wait import wait_until

REPO = Path(__file__).resolve().parent.parent
SOCKET_ACTIVATE = shutil.which("systemd-socket-activate")
SYSTEMD_ANALYZE = shutil.which("systemd-analyze")

# The child reports what listen_fds_with_names() gave it; with --accept it then serves one connection on the first
# socket, which proves the descriptor is the live listening socket and not just a number.
CHILD = r"""
import json, os, socket, sys
from brokerd.errors import ConfigError
from brokerd.systemd import listen_fds_with_names
try:
    got = listen_fds_with_names()
except ConfigError as exc:
    print(json.dumps({"error": str(exc)}), flush=True)
    sys.exit(0)
report = {
    "pid": os.getpid(),
    "sockets": [
        {"name": name, "fd": s.fileno(), "family": int(s.family), "type": int(s.type),
         "inheritable": os.get_inheritable(s.fileno())}
        for s, name in got
    ],
    "env_left": sorted(k for k in os.environ if k.startswith("LISTEN_")),
}
print(json.dumps(report), flush=True)
if "--accept" in sys.argv:
    listener = got[0][0]
    listener.settimeout(10)
    conn, _ = listener.accept()
    conn.sendall(b"hello from %d" % os.getpid())
    conn.close()
"""

# Puts the inherited descriptors at 3, 4, ... and sets LISTEN_* for its own PID, as systemd does, then execs the
# child (exec keeps the PID, so LISTEN_PID stays right).
WRAPPER = r"""
import os, sys
fds = [int(x) for x in sys.argv[1].split(",")]
for i, fd in enumerate(fds):
    os.dup2(fd, 3 + i)  # dup2 leaves the copy inheritable
os.environ["LISTEN_PID"] = str(os.getpid())
os.environ["LISTEN_FDS"] = str(len(fds))
if sys.argv[2]:
    os.environ["LISTEN_FDNAMES"] = sys.argv[2]
os.execv(sys.executable, [sys.executable, *sys.argv[3:]])
"""


@pytest.fixture
def short_dir() -> Iterator[Path]:
    # Unix socket paths must stay under 108 bytes; pytest's tmp_path can be longer.
    path = Path(tempfile.mkdtemp(prefix="bsd-", dir="/tmp"))
    try:
        yield path
    finally:
        shutil.rmtree(path, ignore_errors=True)


def child_env(**extra: str) -> dict[str, str]:
    env = {k: v for k, v in os.environ.items() if not k.startswith(("LISTEN_", "NOTIFY_", "WATCHDOG_"))}
    env["PYTHONPATH"] = str(REPO)
    env.update(extra)
    return env


def wait_for_path(path: Path, proc: subprocess.Popen[bytes], timeout: float = 10.0) -> None:
    wait_until(lambda: path.exists() or proc.poll() is not None, f"{path} to appear", timeout, interval=0.02)
    assert path.exists(), f"process exited early: {proc.returncode}"


def stop(proc: subprocess.Popen[bytes]) -> None:
    if proc.poll() is None:
        proc.kill()
    proc.wait(timeout=10)


# --- listen_fds ---------------------------------------------------------------------------------------------


@pytest.mark.skipif(SOCKET_ACTIVATE is None, reason="systemd-socket-activate not installed")
def test_listen_fds_through_systemd_socket_activate(short_dir: Path) -> None:
    assert SOCKET_ACTIVATE is not None
    sock_path = short_dir / "a.sock"
    script = short_dir / "child.py"
    script.write_text(CHILD)
    proc = subprocess.Popen(
        [SOCKET_ACTIVATE, "-l", str(sock_path), "--fdname=brokerd.socket", "-E", "PYTHONPATH",
         sys.executable, str(script), "--accept"],
        env=child_env(), stdout=subprocess.PIPE, stderr=subprocess.PIPE,
    )
    try:
        wait_for_path(sock_path, proc)
        # systemd-socket-activate execs the child only on the first connection, like a socket unit.
        with socket.socket(socket.AF_UNIX, socket.SOCK_STREAM) as client:
            client.settimeout(10)
            client.connect(str(sock_path))
            reply = client.recv(100)
        out, err = proc.communicate(timeout=20)
    finally:
        stop(proc)
    assert proc.returncode == 0, err.decode()
    report = json.loads(out.decode().splitlines()[0])
    # exec keeps the PID, so the one that served us is the one LISTEN_PID named
    assert reply == b"hello from %d" % report["pid"]
    assert report["sockets"] == [
        {"name": "brokerd.socket", "fd": 3, "family": int(socket.AF_UNIX), "type": int(socket.SOCK_STREAM),
         "inheritable": False}
    ]
    assert report["env_left"] == []


def run_wrapped(fds: list[int], names: str, *child_args: str, script: Path) -> dict[str, object]:
    out = subprocess.run(
        [sys.executable, "-c", WRAPPER, ",".join(map(str, fds)), names, str(script), *child_args],
        env=child_env(), pass_fds=fds, capture_output=True, timeout=30, check=True,
    )
    result: dict[str, object] = json.loads(out.stdout.decode().splitlines()[0])
    return result


def test_listen_fds_two_sockets_with_names(short_dir: Path) -> None:
    script = short_dir / "child.py"
    script.write_text(CHILD)
    with socket.socket(socket.AF_UNIX, socket.SOCK_STREAM) as unix, \
            socket.socket(socket.AF_INET, socket.SOCK_STREAM) as tcp:
        unix.bind(str(short_dir / "b.sock"))
        unix.listen()
        tcp.bind(("127.0.0.1", 0))
        tcp.listen()
        report = run_wrapped([unix.fileno(), tcp.fileno()], "main:extra", script=script)
    sockets = report["sockets"]
    assert isinstance(sockets, list)
    assert [(s["name"], s["fd"], s["family"], s["inheritable"]) for s in sockets] == [
        ("main", 3, int(socket.AF_UNIX), False),
        ("extra", 4, int(socket.AF_INET), False),
    ]
    assert report["env_left"] == []


def test_listen_fds_without_names_reports_unknown(short_dir: Path) -> None:
    script = short_dir / "child.py"
    script.write_text(CHILD)
    with socket.socket(socket.AF_UNIX, socket.SOCK_STREAM) as unix:
        report = run_wrapped([unix.fileno()], "", script=script)
    sockets = report["sockets"]
    assert isinstance(sockets, list)
    assert [s["name"] for s in sockets] == ["unknown"]


def test_listen_fds_rejects_a_descriptor_that_is_not_a_socket(short_dir: Path) -> None:
    script = short_dir / "child.py"
    script.write_text(CHILD)
    r, w = os.pipe()
    try:
        report = run_wrapped([r], "", script=script)
    finally:
        os.close(r)
        os.close(w)
    assert "not a usable socket" in str(report["error"])


def test_listen_fds_ignores_variables_meant_for_another_process() -> None:
    env = {"LISTEN_PID": str(os.getpid() + 100_000), "LISTEN_FDS": "1", "LISTEN_FDNAMES": "x", "OTHER": "1"}
    assert listen_fds(environ=env) == []
    assert env == {"OTHER": "1"}  # unset even when they were not ours, so no child picks them up


def test_listen_fds_without_variables_and_keeping_them() -> None:
    assert listen_fds(environ={}) == []
    env = {"LISTEN_PID": "1", "LISTEN_FDS": "1"}
    assert listen_fds(unset_environment=False, environ=env) == []
    assert env == {"LISTEN_PID": "1", "LISTEN_FDS": "1"}


@pytest.mark.parametrize("count", ["two", "-1"])
def test_listen_fds_rejects_a_bad_count(count: str) -> None:
    env = {"LISTEN_PID": str(os.getpid()), "LISTEN_FDS": count}
    with pytest.raises(ConfigError, match="LISTEN_FDS"):
        listen_fds_with_names(environ=env)
    assert env == {}


def test_listen_fds_zero_is_empty() -> None:
    assert listen_fds(environ={"LISTEN_PID": str(os.getpid()), "LISTEN_FDS": "0"}) == []


# --- Notifier -----------------------------------------------------------------------------------------------


@contextlib.contextmanager
def notify_receiver(address: str) -> Iterator[socket.socket]:
    """A datagram socket like the manager's: SO_PASSCRED on, so each message carries the sender's PID."""
    sock = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM)
    sock.bind(("\0" + address[1:]) if address.startswith("@") else address)
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_PASSCRED, 1)
    sock.settimeout(5)
    try:
        yield sock
    finally:
        sock.close()


def receive(sock: socket.socket) -> tuple[str, int]:
    data, ancdata, _, _ = sock.recvmsg(4096, socket.CMSG_SPACE(12))
    pid = -1
    for level, kind, payload in ancdata:
        if level == socket.SOL_SOCKET and kind == socket.SCM_CREDENTIALS:
            pid = int.from_bytes(payload[:4], sys.byteorder)
    return data.decode(), pid


@pytest.mark.parametrize("abstract", [False, True], ids=["path", "abstract"])
def test_notifier_messages(short_dir: Path, abstract: bool) -> None:
    address = f"@brokerd-test-{os.getpid()}-{short_dir.name}" if abstract else str(short_dir / "notify")
    with notify_receiver(address) as receiver:
        env = {"NOTIFY_SOCKET": address}
        with Notifier.from_environ(env, unset_environment=True) as notifier:
            assert env == {}
            assert notifier.enabled
            assert notifier.ready()
            assert receive(receiver) == ("READY=1", os.getpid())
            notifier.ready("serving 0 sessions")
            assert receive(receiver)[0] == "READY=1\nSTATUS=serving 0 sessions"
            notifier.status("line one\nREADY=1")
            assert receive(receiver)[0] == "STATUS=line one READY=1"
            notifier.stopping()
            assert receive(receiver)[0] == "STOPPING=1"
            notifier.watchdog_ping()
            assert receive(receiver)[0] == "WATCHDOG=1"
            before = time.monotonic_ns() // 1000
            notifier.reloading()
            after = time.monotonic_ns() // 1000
            first, second = receive(receiver)[0].split("\n")
            assert first == "RELOADING=1"
            name, _, usec = second.partition("=")
            assert name == "MONOTONIC_USEC"
            assert before <= int(usec) <= after


def test_notifier_from_a_child_process_carries_its_pid(short_dir: Path) -> None:
    # NotifyAccess=main: systemd accepts only datagrams whose sender PID is the main PID.
    address = str(short_dir / "notify")
    with notify_receiver(address) as receiver:
        child = subprocess.run(
            [sys.executable, "-c",
             "import os; from brokerd.systemd import Notifier; "
             "n = Notifier.from_environ(); print(os.getpid()); n.ready('up'); n.close()"],
            env=child_env(NOTIFY_SOCKET=address), capture_output=True, timeout=30, check=True,
        )
        message, pid = receive(receiver)
    assert message == "READY=1\nSTATUS=up"
    assert pid == int(child.stdout)


@pytest.mark.parametrize("address", [None, "", "relative/path", "vsock:2:1234"])
def test_notifier_without_a_usable_socket_is_a_no_op(address: str | None) -> None:
    notifier = Notifier(address)
    assert not notifier.enabled
    assert not notifier.ready()
    assert not notifier.status("x")
    assert not notifier.watchdog_ping()
    assert Notifier.from_environ({}).enabled is False


def test_notifier_send_failure_raises(short_dir: Path) -> None:
    with Notifier(str(short_dir / "nobody-listens")) as notifier, pytest.raises(OSError):
        notifier.ready()


# --- watchdog -----------------------------------------------------------------------------------------------


def test_watchdog_interval() -> None:
    me = str(os.getpid())
    assert watchdog_interval(environ={}) is None
    assert watchdog_interval(environ={"WATCHDOG_USEC": "30000000"}) == 30.0
    assert watchdog_interval(environ={"WATCHDOG_USEC": "30000000", "WATCHDOG_PID": me}) == 30.0
    assert watchdog_interval(environ={"WATCHDOG_USEC": "30000000", "WATCHDOG_PID": "1"}) is None
    assert watchdog_interval(environ={"WATCHDOG_USEC": "0"}) is None
    assert watchdog_interval(environ={"WATCHDOG_USEC": "soon"}) is None
    env = {"WATCHDOG_USEC": "500000", "WATCHDOG_PID": me}
    assert watchdog_interval(True, environ=env) == 0.5
    assert env == {}


async def test_watchdog_task_pings_at_half_the_interval(short_dir: Path) -> None:
    address = str(short_dir / "notify")
    with notify_receiver(address) as receiver, Notifier(address) as notifier:
        receiver.setblocking(False)
        loop = asyncio.get_running_loop()
        started = time.monotonic()
        task = asyncio.create_task(watchdog_task(notifier, 0.4))
        times = []
        try:
            for _ in range(3):
                message = await asyncio.wait_for(loop.sock_recv(receiver, 100), timeout=5)
                assert message == b"WATCHDOG=1"
                times.append(time.monotonic() - started)
        finally:
            task.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await task
    assert times[0] < 0.15
    gaps = [b - a for a, b in itertools.pairwise(times)]
    assert all(0.15 <= gap < 0.35 for gap in gaps), gaps
    with pytest.raises(ValueError):
        await watchdog_task(notifier, 0)


def test_outside_unit_argv() -> None:
    argv = ["xdg-open", "http://127.0.0.1:8000/x"]
    assert outside_unit_argv(argv, {"DISPLAY": ":0"}, environ={}) == argv
    wrapped = outside_unit_argv(argv, {"WAYLAND_DISPLAY": "wayland-0", "DISPLAY": ":0"},
                                environ={"INVOCATION_ID": "abc"})
    assert wrapped == ["systemd-run", "--user", "--collect", "--quiet", "--no-block",
                       "--setenv=DISPLAY=:0", "--setenv=WAYLAND_DISPLAY=wayland-0", "--", *argv]


# --- units and install --------------------------------------------------------------------------------------


@pytest.mark.parametrize("name", install.UNIT_NAMES)
def test_systemd_dir_matches_the_packaged_templates(name: str) -> None:
    # systemd/ is the rendered example; brokerd/units/*.in is the source.  Regenerate with
    # `python -c "from brokerd import install; ..."` (see docs/systemd.md) when this fails.
    rendered = install.render_unit(name, install.EXAMPLE_EXEC_START)
    assert (REPO / "systemd" / name).read_text() == rendered


def test_install_and_uninstall(tmp_path: Path) -> None:
    unit_dir = tmp_path / "config" / "systemd" / "user"
    old_umask = os.umask(0o077)  # install must not inherit a private umask: units are 0644
    try:
        written = install.install_units(unit_dir, "/opt/brokerd/bin/brokerd")
    finally:
        os.umask(old_umask)
    assert written == [unit_dir / "brokerd.service", unit_dir / "brokerd.socket"]
    for path in written:
        assert path.stat().st_mode & 0o777 == 0o644
        assert install.PLACEHOLDER not in path.read_text()
    assert "\nExecStart=/opt/brokerd/bin/brokerd serve\n" in written[0].read_text()
    assert sorted(p.name for p in unit_dir.iterdir()) == ["brokerd.service", "brokerd.socket"]  # no temp left

    # what `systemctl --user enable` leaves behind
    wants = unit_dir / "sockets.target.wants"
    wants.mkdir()
    (wants / "brokerd.socket").symlink_to(unit_dir / "brokerd.socket")
    (wants / "other.socket").symlink_to("/dev/null")
    removed = install.uninstall_units(unit_dir)
    assert sorted(removed) == sorted([*written, wants / "brokerd.socket"])
    assert [p.name for p in wants.iterdir()] == ["other.socket"]
    assert install.uninstall_units(unit_dir) == []
    assert install.uninstall_units(tmp_path / "missing") == []


def test_install_rejects_a_multiline_command(tmp_path: Path) -> None:
    with pytest.raises(ValueError):
        install.install_units(tmp_path, "/bin/brokerd\nExecStartPre=/bin/evil")
    assert list(tmp_path.iterdir()) == []


def test_default_unit_dir() -> None:
    assert install.default_unit_dir({"XDG_CONFIG_HOME": "/x/cfg", "HOME": "/home/u"}) == Path("/x/cfg/systemd/user")
    assert install.default_unit_dir({"HOME": "/home/u"}) == Path("/home/u/.config/systemd/user")
    assert install.default_unit_dir({"XDG_CONFIG_HOME": "rel", "HOME": "/home/u"}) == Path(
        "/home/u/.config/systemd/user")


def test_default_exec_start(tmp_path: Path) -> None:
    bindir = tmp_path / "venv" / "bin"
    bindir.mkdir(parents=True)
    python = bindir / "python"
    script = bindir / "brokerd"
    script.write_text("#!/bin/sh\n")
    script.chmod(0o755)
    # The interpreter with -E -P even beside pip's console script (which Python's variables would reach).
    assert install.default_exec_start(str(python)) == f"{python} -E -P -m brokerd"
    assert install.default_exec_start() == f"{sys.executable} -E -P -m brokerd"


@pytest.mark.parametrize(("argv", "line"), [
    (["/usr/bin/brokerd"], "/usr/bin/brokerd"),
    (["/home/a b/bin/brokerd"], '"/home/a b/bin/brokerd"'),
    (["/x/50%/brokerd"], "/x/50%%/brokerd"),
    (["/x/$HOME/python", "-m", "a$b"], "/x/$HOME/python -m a$$b"),
    (['/x/"q"\\/python'], '"/x/\\"q\\"\\\\/python"'),
])
def test_exec_start_quoting(argv: list[str], line: str) -> None:
    assert install.exec_start_line(argv) == line


def test_exec_start_word_rejects_control_characters() -> None:
    for bad in ["", "a\nb", "a\0b"]:
        with pytest.raises(ValueError):
            install.exec_start_word(bad)


# --- systemd-analyze verify ---------------------------------------------------------------------------------


def analyze(unit_dir: Path, *, user: bool, runtime_dir: Path) -> tuple[int, list[str]]:
    assert SYSTEMD_ANALYZE is not None
    env = dict(os.environ)
    # `--user` needs XDG_RUNTIME_DIR ("Failed to lookup RuntimeDirectory path") even without a user manager.
    env["XDG_RUNTIME_DIR"] = str(runtime_dir)
    cmd = [SYSTEMD_ANALYZE, *(["--user"] if user else []), "verify", "--man=no",
           str(unit_dir / "brokerd.service"), str(unit_dir / "brokerd.socket")]
    done = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=60)
    # verify exits 0 on "Unknown key ..., ignoring" and similar: the messages about our units are what count.
    ours = [line for line in (done.stdout + done.stderr).splitlines() if "brokerd" in line or str(unit_dir) in line]
    return done.returncode, ours


@pytest.fixture
def runtime_dir(short_dir: Path) -> Path:
    path = short_dir / "run"
    path.mkdir(mode=0o700)
    return path


@pytest.mark.skipif(SYSTEMD_ANALYZE is None, reason="systemd-analyze not installed")
@pytest.mark.parametrize("user", [False, True], ids=["system", "user"])
def test_units_pass_systemd_analyze_verify(tmp_path: Path, runtime_dir: Path, user: bool) -> None:
    # ExecStart must name an executable that exists here, so render with this interpreter, not the example path.
    install.install_units(tmp_path, install.default_exec_start())
    assert analyze(tmp_path, user=user, runtime_dir=runtime_dir) == (0, [])


@pytest.mark.skipif(SYSTEMD_ANALYZE is None, reason="systemd-analyze not installed")
def test_verify_accepts_a_quoted_program_path(tmp_path: Path, short_dir: Path, runtime_dir: Path) -> None:
    odd = short_dir / "a b%$x"
    odd.mkdir()
    shutil.copy("/bin/true", odd / "python")
    install.install_units(tmp_path / "u", install.default_exec_start(str(odd / "python")))
    assert analyze(tmp_path / "u", user=True, runtime_dir=runtime_dir) == (0, [])


@pytest.mark.skipif(SYSTEMD_ANALYZE is None, reason="systemd-analyze not installed")
def test_verify_check_catches_mistakes(tmp_path: Path, runtime_dir: Path) -> None:
    # The control for the two tests above: a typo and a missing program must both be reported.
    install.install_units(tmp_path, install.default_exec_start())
    service = tmp_path / "brokerd.service"
    service.write_text(service.read_text().replace("LockPersonality=yes", "LockPersonalty=yes"))
    rc, lines = analyze(tmp_path, user=True, runtime_dir=runtime_dir)
    assert any("LockPersonalty" in line for line in lines), lines
    install.install_units(tmp_path, "/nonexistent/brokerd")
    rc, lines = analyze(tmp_path, user=True, runtime_dir=runtime_dir)
    assert rc != 0
    assert any("/nonexistent/brokerd" in line for line in lines), lines


# --- MemoryDenyWriteExecute ---------------------------------------------------------------------------------

MDWE_CHILD = r"""
import ctypes, mmap, sys
libc = ctypes.CDLL(None, use_errno=True)
# PR_SET_MDWE (Linux 6.3+) is the kernel's own form of MemoryDenyWriteExecute=: no W+X mappings, no mprotect
# that adds execute.  systemd 252 does the same with a seccomp filter.
if libc.prctl(65, 1, 0, 0, 0) != 0:
    print("unsupported", flush=True)
    sys.exit(0)
try:
    mmap.mmap(-1, 4096, prot=mmap.PROT_READ | mmap.PROT_WRITE | mmap.PROT_EXEC)
    print("not enforced", flush=True)
    sys.exit(1)
except OSError:
    pass
import asyncio, uvloop, aiohttp, aiohttp.web, joserfc.jwt
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.hazmat.primitives.ciphers.aead import AESGCM
from joserfc.jwk import ECKey
key = ECKey.generate_key("P-256")
assert joserfc.jwt.decode(joserfc.jwt.encode({"alg": "ES256"}, {"a": 1}, key), key).claims == {"a": 1}
AESGCM(AESGCM.generate_key(256)).encrypt(b"0" * 12, b"data", None)
async def main():
    app = aiohttp.web.Application()
    app.router.add_get("/", lambda request: aiohttp.web.Response(text="ok"))
    runner = aiohttp.web.AppRunner(app)
    await runner.setup()
    site = aiohttp.web.TCPSite(runner, "127.0.0.1", 0)
    await site.start()
    port = runner.addresses[0][1]
    async with aiohttp.ClientSession() as session, session.get(f"http://127.0.0.1:{port}/") as resp:
        assert await resp.text() == "ok"
    await runner.cleanup()
uvloop.run(main())
print("ok", flush=True)
"""


def test_daemon_stack_runs_without_writable_executable_memory() -> None:
    """Evidence for the unit's MemoryDenyWriteExecute= note: brokerd's own stack does not need W+X memory."""
    done = subprocess.run([sys.executable, "-c", MDWE_CHILD], env=child_env(), capture_output=True, timeout=60)
    out = done.stdout.decode().strip()
    if out == "unsupported":
        pytest.skip("kernel has no PR_SET_MDWE (needs Linux 6.3+)")
    assert done.returncode == 0, done.stderr.decode()[-2000:]
    assert out == "ok"


# --- brokerd serve under socket activation ------------------------------------------------------------------


def brokerd_cli_available() -> bool:
    try:
        return importlib.util.find_spec("brokerd.cli") is not None
    except ImportError:
        return False


def raw_request(sock_path: Path, *args: str) -> list[str]:
    """One request (client_shim/protocol.py), without the shim."""
    with socket.socket(socket.AF_UNIX, socket.SOCK_STREAM) as client:
        client.settimeout(20)
        client.connect(str(sock_path))
        client.sendall(protocol.encode_request(args, {}, tty=False, program="brokerd"))
        data = b""
        while not data.endswith(b"\n") or data.split(b"\n")[-2][:1] not in protocol.TERMINAL:
            chunk = client.recv(65536)
            if not chunk:
                break
            data += chunk
    return data.decode().splitlines()


@pytest.mark.skipif(SOCKET_ACTIVATE is None, reason="systemd-socket-activate not installed")
@pytest.mark.skipif(not brokerd_cli_available(), reason="brokerd serve not available yet")
def test_brokerd_serve_under_socket_activation(short_dir: Path) -> None:
    """What brokerd.service relies on: `brokerd serve` takes the socket from LISTEN_FDS, sends READY=1 once it
    answers, answers on that socket, and on SIGTERM sends STOPPING=1, exits 0 and leaves the socket file alone
    (systemd owns it; unlinking it would orphan the socket unit)."""
    assert SOCKET_ACTIVATE is not None
    sock_path = short_dir / "brokerd.sock"
    notify_path = short_dir / "notify"
    env = child_env(
        NOTIFY_SOCKET=str(notify_path),
        BROKERD_STATE_DIR=str(short_dir / "state"),
        BROKERD_CONFIG=str(short_dir / "config.toml"),
        # the daemon must use the activated socket, not bind this one
        BROKERD_SOCKET=str(short_dir / "not-this.sock"),
        XDG_RUNTIME_DIR=str(short_dir),
    )
    passed = ["PYTHONPATH", "NOTIFY_SOCKET", "BROKERD_STATE_DIR", "BROKERD_CONFIG", "BROKERD_SOCKET",
              "XDG_RUNTIME_DIR"]
    with notify_receiver(str(notify_path)) as receiver:
        log = short_dir / "daemon.log"
        with log.open("wb") as log_file:
            proc = subprocess.Popen(
                [SOCKET_ACTIVATE, "-l", str(sock_path), "--fdname=brokerd.socket",
                 *(f"-E{name}" for name in passed), sys.executable, "-m", "brokerd", "serve"],
                env=env, stdin=subprocess.DEVNULL, stdout=log_file, stderr=log_file,
            )
        try:
            wait_for_path(sock_path, proc)
            lines = raw_request(sock_path, "version")  # this connection is what starts the daemon
            assert lines and lines[-1].startswith("O"), lines
            messages: list[str] = []
            while not any("READY=1" in m.split("\n") for m in messages):
                messages.append(receive(receiver)[0])  # 5 s timeout each, bounded by the loop below
                assert len(messages) < 50, messages
            shim = REPO / "client_shim" / "shim.py"
            if shim.exists():
                # `status`: the shim answers `version` itself, without the daemon (issue 14).
                done = subprocess.run([sys.executable, "-I", "-S", str(shim), "status"],
                                      env=child_env(BROKERD_SOCKET=str(sock_path), XDG_RUNTIME_DIR=str(short_dir)),
                                      capture_output=True, timeout=30)
                assert done.returncode == 0, done.stderr.decode()
                assert done.stdout.startswith(b'{"sessions"'), done.stdout
            assert not (short_dir / "not-this.sock").exists()
            # `systemctl status brokerd` shows how many sessions the daemon holds.
            assert any("STATUS=serving 0 session(s)" in m.split("\n") for m in messages), messages
            proc.send_signal(signal.SIGTERM)
            proc.wait(timeout=20)
            while not any("STOPPING=1" in m.split("\n") for m in messages):
                messages.append(receive(receiver)[0])
                assert len(messages) < 100, messages
        finally:
            stop(proc)
    assert proc.returncode == 0, log.read_text()[-2000:]
    assert sock_path.exists()
