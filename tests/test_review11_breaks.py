"""Review 11: attacks on 20dde67 (the fixes of review 10) and what they did not reach.

Each test fails on 20dde67 and shows one break: code imported or run from the current directory (promise 1), or a
launcher that fails without brokerd's one line and exit 3 (promise 2).  The last two cover the reviewer's untested
notes (the daemon's working directory, a relative BROKERD_DAEMON_COMMAND)."""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

from tests.support.daemon import ROOT, Daemon
from tests.support.planted import brokerd_package_in_checkout, mark_code
from tests.support.wait import poll
from tests.test_launcher import LAUNCHER, _venv

MARK_CODE = mark_code("REVIEW11_MARK")
# `export PYTHONPATH=$PYTHONPATH:/opt/x` with PYTHONPATH unset, or a trailing ':': an empty entry, which Python reads
# as the current directory, ahead of site-packages.  -P does not cover it; -I (or -E) does.
SLOPPY_PYTHONPATHS = [":/nonexistent-review11", "/nonexistent-review11:"]


def _evil_cwd(tmp_path: Path) -> Path:
    return brokerd_package_in_checkout(tmp_path, MARK_CODE)


@pytest.mark.parametrize("pythonpath", SLOPPY_PYTHONPATHS)
def test_autostart_does_not_import_brokerd_from_the_cwd_through_an_empty_pythonpath_entry(
        tmp_path: Path, pythonpath: str) -> None:
    """The launcher runs -I -S, but the daemon it autostarts (`python -P -m brokerd serve`) reads PYTHONPATH: an
    empty entry is the current directory, so kubectl run inside a checkout holding brokerd/ runs that as the daemon."""
    venv = _venv(tmp_path / "venv")
    cwd = _evil_cwd(tmp_path)
    state = tmp_path / "state"
    state.mkdir(mode=0o700)
    mark = tmp_path / "mark"
    env = {k: v for k, v in os.environ.items() if k not in ("BROKERD_NO_AUTOSTART", "BROKERD_DAEMON_COMMAND")}
    env.update(BROKERD_SOCKET=str(state / "brokerd.sock"), REVIEW11_MARK=str(mark), HOME=str(tmp_path),
               PYTHONPATH=pythonpath)
    subprocess.run([str(venv / "bin" / "kubectl-oidc_login"), "get-token"], cwd=cwd, env=env,
                   capture_output=True, text=True, timeout=60, stdin=subprocess.DEVNULL)
    assert not mark.exists(), mark.read_text()


@pytest.mark.parametrize("pythonpath", SLOPPY_PYTHONPATHS)
def test_clean_does_not_import_brokerd_from_the_cwd_through_an_empty_pythonpath_entry(
        tmp_path: Path, pythonpath: str) -> None:
    """`kubectl-oidc_login clean` execs `python -P -m brokerd clean`: the same import through PYTHONPATH."""
    venv = _venv(tmp_path / "venv")
    cwd = _evil_cwd(tmp_path)
    mark = tmp_path / "mark"
    env = dict(os.environ, REVIEW11_MARK=str(mark), HOME=str(tmp_path), XDG_STATE_HOME=str(tmp_path),
               XDG_CONFIG_HOME=str(tmp_path), XDG_RUNTIME_DIR=str(tmp_path), XDG_DATA_HOME=str(tmp_path),
               PYTHONPATH=pythonpath)
    subprocess.run([str(venv / "bin" / "kubectl-oidc_login"), "clean"], cwd=cwd, env=env,
                   capture_output=True, text=True, timeout=60, stdin=subprocess.DEVNULL)
    assert not mark.exists(), mark.read_text()


def test_direct_form_shim_at_the_root_does_not_import_from_the_cwd(tmp_path: Path) -> None:
    """`brokerd kubeconfig convert` writes `python -I -S <dir>/client_shim/shim.py get-token`.  With the package at
    /client_shim (a source tree at /, installed -e), shim.py's parent of a parent is "", and its `or "."` puts the
    current directory on sys.path: kubectl run in a checkout holding client_shim/core.py runs that.  (The shim is
    run here under the name /client_shim/shim.py, as it would be there; no file is written outside tmp_path.)"""
    cwd = tmp_path / "cloned-repo"
    (cwd / "client_shim").mkdir(parents=True)
    (cwd / "client_shim" / "__init__.py").write_text("")
    (cwd / "client_shim" / "core.py").write_text(MARK_CODE + "def run():\n    raise SystemExit(0)\n")
    mark = tmp_path / "mark"
    source = (ROOT / "client_shim" / "shim.py").read_text()
    code = ("g = {'__name__': '__main__', '__file__': '/client_shim/shim.py'}\n"
            f"exec(compile({source!r}, '/client_shim/shim.py', 'exec'), g)\n")
    env = dict(os.environ, REVIEW11_MARK=str(mark), BROKERD_SOCKET="/nonexistent/brokerd.sock",
               BROKERD_NO_AUTOSTART="1")
    subprocess.run([sys.executable, "-I", "-S", "-c", code, "get-token"], cwd=cwd, env=env,
                   capture_output=True, text=True, timeout=60, stdin=subprocess.DEVNULL)
    assert not mark.exists(), mark.read_text()


def test_a_launcher_without_a_python_beside_it_gives_one_line_and_exit_3(tmp_path: Path) -> None:
    """`pip install --user .` (README: `pip install .`, which pip turns into a user install outside a venv) puts the
    launcher in ~/.local/bin, where no python is: sh's `exec: .../python: not found` and exit 127, not brokerd's
    one line and exit 3."""
    bindir = tmp_path / "userbase" / "bin"
    bindir.mkdir(parents=True)
    launcher = bindir / "kubectl-oidc_login"
    shutil.copy(LAUNCHER, launcher)
    launcher.chmod(0o755)
    result = subprocess.run([str(launcher), "get-token"], capture_output=True, text=True, timeout=60,
                            stdin=subprocess.DEVNULL)
    assert result.returncode == 3, (result.returncode, result.stderr)
    assert result.stdout == "" and len(result.stderr.splitlines()) == 1, result.stderr


def test_the_daemon_leaves_the_directory_it_was_started_in(tmp_path: Path) -> None:
    """An autostarted daemon kept the shim's working directory (wherever kubectl ran): a relative BROWSER or an
    empty PATH entry found its command there, and the directory stayed busy.  Relative paths it was given
    (BROKERD_STATE_DIR, BROKERD_SOCKET) still mean what they meant where it started."""
    cwd = tmp_path / "where-kubectl-ran"
    cwd.mkdir()
    d = Daemon(env={"BROKERD_STATE_DIR": "state-rel", "BROKERD_SOCKET": str(tmp_path / "run" / "b.sock")})
    d.socket = tmp_path / "run" / "b.sock"
    d.state_dir = cwd / "state-rel"
    try:
        with open(d.log_path, "ab") as log:
            d.proc = subprocess.Popen([sys.executable, "-m", "brokerd", "serve", "-v"], env=d.env, cwd=cwd,
                                      stdin=subprocess.DEVNULL, stdout=log, stderr=log)
        assert poll(d.alive, 15), d.log()
        assert os.readlink(f"/proc/{d.proc.pid}/cwd") == "/"
        assert (cwd / "state-rel").is_dir(), "the relative state dir was taken from the start directory"
        assert d.cli("status").returncode == 0
    finally:
        d.close()


def test_a_relative_daemon_command_is_refused(tmp_path: Path) -> None:
    """BROKERD_DAEMON_COMMAND with a relative program would run it from the current directory."""
    cwd = tmp_path / "cloned-repo"
    cwd.mkdir()
    mark = tmp_path / "mark"
    (cwd / "evil").write_text(f"#!/bin/sh\necho ran > '{mark}'\n")
    (cwd / "evil").chmod(0o755)
    state = tmp_path / "state"
    state.mkdir(mode=0o700)
    env = {k: v for k, v in os.environ.items() if k != "BROKERD_NO_AUTOSTART"}
    env.update(BROKERD_SOCKET=str(state / "brokerd.sock"), BROKERD_DAEMON_COMMAND="./evil serve")
    result = subprocess.run([sys.executable, "-I", "-S", str(ROOT / "client_shim" / "shim.py"), "get-token"],
                            cwd=cwd, env=env, capture_output=True, text=True, timeout=60, stdin=subprocess.DEVNULL)
    assert not mark.exists()
    assert result.returncode == 3 and "absolute path" in result.stderr, result.stderr
