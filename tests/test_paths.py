"""The shim and the daemon must agree on the socket path without sharing code (the shim cannot import platformdirs).

Each side runs in its own process with a controlled environment, as kubectl and `brokerd serve` would.
"""

from __future__ import annotations

import os
import subprocess
import sys
from collections.abc import Callable
from pathlib import Path

import pytest

from tests.support.daemon import SHIM

SHIM_SIDE = (
    "import posix, sys\n"
    f"sys.path.insert(0, {str(SHIM.parent.parent)!r})\n"
    "from client_shim import core as shim\n"
    "sys.stdout.buffer.write(shim.socket_path(posix.environ))\n"
)
DAEMON_SIDE = (
    "import os, sys\n"
    "from brokerd.paths import socket_path\n"
    "sys.stdout.buffer.write(os.fsencode(socket_path(os.environ)))\n"
)


def _run(argv: list[str], env: dict[str, str], cwd: Path) -> str:
    result = subprocess.run(argv, env=env, cwd=cwd, capture_output=True, timeout=30, stdin=subprocess.DEVNULL)
    assert result.returncode == 0, result.stderr.decode(errors="replace")
    return os.fsdecode(result.stdout)


def _both(env: dict[str, str], cwd: Path) -> tuple[str, str]:
    base = {"PATH": os.environ.get("PATH", "/usr/bin:/bin"), "HOME": os.environ.get("HOME", "/root")}
    full = {**base, **env}
    shim = _run([sys.executable, "-I", "-S", "-c", SHIM_SIDE], full, cwd)
    daemon = _run([sys.executable, "-c", DAEMON_SIDE], full, cwd)
    return shim, daemon


def _private(path: Path) -> Path:
    path.mkdir(mode=0o700, parents=True, exist_ok=True)
    path.chmod(0o700)
    return path


def _loose(path: Path) -> Path:
    path.mkdir(parents=True, exist_ok=True)
    path.chmod(0o755)
    return path


Case = Callable[[Path], dict[str, str]]


def _symlinked(tmp: Path) -> dict[str, str]:
    target = _private(tmp / "real-runtime")
    link = tmp / "linked-runtime"
    link.symlink_to(target)
    return {"XDG_RUNTIME_DIR": str(link)}


def _below_a_world_writable_dir(tmp: Path) -> dict[str, str]:
    open_dir = tmp / "world"
    open_dir.mkdir()
    open_dir.chmod(0o777)  # no sticky bit: anyone could swap the runtime dir below it
    return {"XDG_RUNTIME_DIR": str(_private(open_dir / "runtime"))}


CASES: dict[str, Case] = {
    "XDG_RUNTIME_DIR": lambda tmp: {"XDG_RUNTIME_DIR": str(_private(tmp / "runtime"))},
    "XDG_RUNTIME_DIR-trailing-slashes": lambda tmp: {"XDG_RUNTIME_DIR": str(_private(tmp / "runtime")) + "//"},
    "XDG_RUNTIME_DIR-not-created-yet": lambda tmp: {"XDG_RUNTIME_DIR": str(tmp / "not" / "yet")},
    "BROKERD_SOCKET": lambda tmp: {"BROKERD_SOCKET": str(tmp / "explicit.sock"),
                                   "XDG_RUNTIME_DIR": str(_private(tmp / "runtime"))},
    "BROKERD_SOCKET-empty": lambda tmp: {"BROKERD_SOCKET": "", "XDG_RUNTIME_DIR": str(_private(tmp / "runtime"))},
    "XDG_RUNTIME_DIR-unset": lambda tmp: {},
    "XDG_RUNTIME_DIR-unset-TMPDIR": lambda tmp: {"TMPDIR": str(_loose(tmp / "tmpdir")) + "/"},
    "XDG_RUNTIME_DIR-unset-TMPDIR-missing": lambda tmp: {"TMPDIR": str(tmp / "no-such-dir")},
    "XDG_RUNTIME_DIR-unset-TMPDIR-relative": lambda tmp: {"TMPDIR": "relative", "TMP": str(_loose(tmp / "tmp2"))},
    "XDG_RUNTIME_DIR-empty": lambda tmp: {"XDG_RUNTIME_DIR": ""},
    "XDG_RUNTIME_DIR-relative": lambda tmp: {"XDG_RUNTIME_DIR": "run/user"},
    "XDG_RUNTIME_DIR-mode-0755": lambda tmp: {"XDG_RUNTIME_DIR": str(_loose(tmp / "loose"))},
    "XDG_RUNTIME_DIR-symlink": _symlinked,
    "XDG_RUNTIME_DIR-below-world-writable": _below_a_world_writable_dir,
}


@pytest.mark.parametrize("case", list(CASES))
def test_shim_and_daemon_compute_the_same_socket_path(tmp_path: Path, case: str) -> None:
    (tmp_path / "relative").mkdir()  # a relative TMPDIR that would exist from the cwd: still not used
    env = CASES[case](tmp_path)
    shim, daemon = _both(env, tmp_path)
    assert shim == daemon
    # And the cases mean what they say.
    if case == "BROKERD_SOCKET":
        assert shim == str(tmp_path / "explicit.sock")
    elif case.startswith(("XDG_RUNTIME_DIR-unset", "XDG_RUNTIME_DIR-empty", "XDG_RUNTIME_DIR-relative")) or case in (
            "XDG_RUNTIME_DIR-mode-0755", "XDG_RUNTIME_DIR-symlink", "XDG_RUNTIME_DIR-below-world-writable"):
        assert f"/runtime-{os.geteuid()}/brokerd/brokerd.sock" in shim or shim.startswith(f"/run/user/{os.geteuid()}/")
    else:
        assert shim.startswith(env["XDG_RUNTIME_DIR"].rstrip("/") + "/brokerd/"), shim
    if case == "XDG_RUNTIME_DIR-unset-TMPDIR" and not Path(f"/run/user/{os.geteuid()}").is_dir():
        assert shim == f"{tmp_path}/tmpdir/runtime-{os.geteuid()}/brokerd/brokerd.sock"


def test_shim_refuses_a_socket_directory_that_others_may_enter(tmp_path: Path) -> None:
    """Issue 11.5 (any uid): the socket's directory must be the user's with mode 0700; one line, exit 3, and the
    listener there never gets a connection."""
    import socket

    run = tmp_path / "run"
    run.mkdir(mode=0o700)
    run.chmod(0o755)
    listener = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    listener.bind(str(run / "brokerd.sock"))
    listener.listen(1)
    listener.setblocking(False)
    try:
        done = subprocess.run([sys.executable, "-I", "-S", str(SHIM), "status"], capture_output=True, text=True,
                              timeout=30, stdin=subprocess.DEVNULL,
                              env={"BROKERD_SOCKET": str(run / "brokerd.sock"), "PATH": "/usr/bin:/bin"})
        with pytest.raises(BlockingIOError):
            listener.accept()  # nobody connected
    finally:
        listener.close()
    assert (done.returncode, done.stdout) == (3, "")
    assert done.stderr == f"brokerd: refusing the directory {run}: its mode is 0755 (it must be yours with mode 0700)\n"
