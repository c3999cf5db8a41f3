"""Review 10: attacks on a3bc7c7 (the launcher's baked editable path, pipx's data dir and --global home).

Every test here fails on a3bc7c7 and shows one break of promise 1 (no code from a place the user did not install)."""

from __future__ import annotations

import os
import subprocess
from pathlib import Path

from tests.support.planted import brokerd_package_in_checkout, mark_code
from tests.test_launcher import _reached_the_shim, _run, _venv

MARK_CODE = mark_code("REVIEW10_MARK")


def _planted_python(bindir: Path, real_launcher: Path, mark: Path) -> None:
    """What anyone who can write ``bindir`` plants: a symlink that is -ef the victim's launcher, and a 'python'."""
    bindir.mkdir(parents=True)
    (bindir / "kubectl-oidc_login").symlink_to(real_launcher)
    fake = bindir / "python"
    fake.write_text(f"#!/bin/sh\necho planted >> '{mark}'\nexit 0\n")
    fake.chmod(0o755)


def _as_another_user(top: Path) -> None:
    if os.getuid() == 0:  # model another local user's directory (an ownership check in a fix must refuse it)
        for dirpath, dirnames, filenames in os.walk(top):
            for name in [dirpath, *(os.path.join(dirpath, n) for n in dirnames + filenames)]:
                os.lchown(name, 65534, 65534)


def test_a_symlink_in_pipx_global_home_does_not_choose_the_interpreter(tmp_path: Path) -> None:
    """PIPX_GLOBAL_HOME (default /opt/pipx: not the user's) holding a symlink -ef the user's launcher made the
    launcher exec the python beside that symlink: another user's program, run with the user's tokens."""
    venv = _venv(tmp_path / "venv")  # a plain venv, reached through a symlink from ~/bin (not a pipx home)
    home = tmp_path / "home"
    (home / "bin").mkdir(parents=True)
    (home / "bin" / "kubectl-oidc_login").symlink_to(venv / "bin" / "kubectl-oidc_login")
    mark = tmp_path / "mark"
    other = tmp_path / "other-users-opt-pipx"
    _planted_python(other / "venvs" / "brokerd" / "bin", venv / "bin" / "kubectl-oidc_login", mark)
    _as_another_user(other)
    result = _run([str(home / "bin" / "kubectl-oidc_login"), "get-token"],
                  {"HOME": str(home), "PIPX_GLOBAL_HOME": str(other)})
    assert not mark.exists(), "the launcher ran the python planted in PIPX_GLOBAL_HOME"
    _reached_the_shim(result)


def test_a_relative_xdg_data_home_does_not_make_the_cwd_choose_the_interpreter(tmp_path: Path) -> None:
    """XDG_DATA_HOME must be absolute (XDG spec: ignore a relative one); taken as it is, it is the current directory:
    a repository checked out with data/pipx/venvs/brokerd/bin/{kubectl-oidc_login -> the launcher, python}."""
    venv = _venv(tmp_path / "venv")
    home = tmp_path / "home"
    (home / "bin").mkdir(parents=True)
    (home / "bin" / "kubectl-oidc_login").symlink_to(venv / "bin" / "kubectl-oidc_login")
    mark = tmp_path / "mark"
    repo = tmp_path / "checkout"
    _planted_python(repo / "data" / "pipx" / "venvs" / "brokerd" / "bin", venv / "bin" / "kubectl-oidc_login", mark)
    full = dict(os.environ, HOME=str(home), XDG_DATA_HOME="data", BROKERD_SOCKET="/nonexistent/brokerd.sock",
                BROKERD_NO_AUTOSTART="1")
    result = subprocess.run([str(home / "bin" / "kubectl-oidc_login"), "get-token"], cwd=repo, env=full,
                            capture_output=True, text=True, timeout=60, stdin=subprocess.DEVNULL)
    assert not mark.exists(), "the launcher ran the python found under the current directory"
    _reached_the_shim(result)


def _evil_cwd(tmp_path: Path) -> Path:
    return brokerd_package_in_checkout(tmp_path, MARK_CODE)


def test_autostart_does_not_import_brokerd_from_the_current_directory(tmp_path: Path) -> None:
    """The shim autostarts `sys.executable -m brokerd serve`; -m puts the current directory first on sys.path, so
    kubectl run inside a checkout holding a brokerd/ package runs that package as the daemon (not in a3bc7c7's diff,
    but reached through its launcher)."""
    venv = _venv(tmp_path / "venv")
    cwd = _evil_cwd(tmp_path)
    state = tmp_path / "state"
    state.mkdir(mode=0o700)
    mark = tmp_path / "mark"
    env = {k: v for k, v in os.environ.items() if k != "BROKERD_NO_AUTOSTART"}
    env.update(BROKERD_SOCKET=str(state / "brokerd.sock"), REVIEW10_MARK=str(mark), HOME=str(tmp_path))
    subprocess.run([str(venv / "bin" / "kubectl-oidc_login"), "get-token"], cwd=cwd, env=env,
                   capture_output=True, text=True, timeout=60, stdin=subprocess.DEVNULL)
    assert not mark.exists(), mark.read_text()


def test_clean_does_not_import_brokerd_from_the_current_directory(tmp_path: Path) -> None:
    """`kubectl-oidc_login clean` execs `sys.executable -m brokerd clean`: the same current-directory import."""
    venv = _venv(tmp_path / "venv")
    cwd = _evil_cwd(tmp_path)
    mark = tmp_path / "mark"
    env = dict(os.environ, REVIEW10_MARK=str(mark), HOME=str(tmp_path), XDG_STATE_HOME=str(tmp_path),
               XDG_CONFIG_HOME=str(tmp_path), XDG_RUNTIME_DIR=str(tmp_path), XDG_DATA_HOME=str(tmp_path))
    subprocess.run([str(venv / "bin" / "kubectl-oidc_login"), "clean"], cwd=cwd, env=env,
                   capture_output=True, text=True, timeout=60, stdin=subprocess.DEVNULL)
    assert not mark.exists(), mark.read_text()

