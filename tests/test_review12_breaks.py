"""Review 12: attacks on f296cf0 (the fixes of review 11) and on what earlier rounds did not reach.

Each of the reviewer's tests fails on f296cf0 and shows code run from a place the user did not install (promise 1);
the last two cover its notes (a relative HOME, a traceback from a removed start directory)."""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

from tests.support.daemon import ROOT
from tests.test_launcher import FINDER, LAUNCHER, PYVER, _baked, _no_shim_venv

MARK_LINE = "import os; open(os.environ['REVIEW12_MARK'], 'a').write('ran from ' + os.getcwd() + '\\n')\n"


def test_a_quote_in_a_stale_tree_path_does_not_choose_the_finder_mapping(tmp_path: Path) -> None:
    """_EDITABLE takes the first `'client_shim': '` in the finder's text.  A source tree whose path holds a `'` is
    written by setuptools with double quotes, so that text can sit inside brokerd's own mapping value, and what
    follows it (here /tmp-like <tmp_path>/evil, anyone's) is taken as a plain absolute path once the tree moved."""
    evil = tmp_path / "evil"
    (evil / "client_shim").mkdir(parents=True)
    (evil / "client_shim" / "__init__.py").write_text("")
    (evil / "client_shim" / "core.py").write_text(MARK_LINE + "def run():\n    raise SystemExit(0)\n")
    tree = f"{tmp_path}/x'client_shim': '{evil}/client_shim'y"  # a nested directory name, as an archive may hold
    venv = _no_shim_venv(tmp_path / "venv")
    # setuptools' finder as it writes it for that tree: MAPPING's repr (double quotes around values with a `'`).
    (venv / "lib" / PYVER / "site-packages" / FINDER).write_text(
        f"MAPPING: dict[str, str] = {{'brokerd': {tree + '/brokerd'!r}, 'client_shim': {tree + '/client_shim'!r}}}\n")
    mark = tmp_path / "mark"
    env = dict(os.environ, REVIEW12_MARK=str(mark), BROKERD_SOCKET="/nonexistent/brokerd.sock",
               BROKERD_NO_AUTOSTART="1")
    result = subprocess.run([str(_baked(venv, Path(tree))), "get-token"], env=env, capture_output=True, text=True,
                            timeout=60, stdin=subprocess.DEVNULL)  # the tree itself is gone (moved)
    assert not mark.exists(), (mark.read_text(), result.stderr)
    assert result.returncode == 3 and len(result.stderr.splitlines()) == 1, result.stderr


def _system_site_venv(where: Path) -> Path:
    """A venv made with --system-site-packages (its user site is on), client_shim and the launcher as pip puts them."""
    base = Path(getattr(sys, "_base_executable", sys.executable))
    done = subprocess.run([str(base), "-m", "venv", "--without-pip", "--system-site-packages", str(where)],
                          capture_output=True, text=True, timeout=120)
    assert done.returncode == 0, done.stderr
    shutil.copytree(ROOT / "client_shim", where / "lib" / PYVER / "site-packages" / "client_shim",
                    ignore=shutil.ignore_patterns("__pycache__"))
    shutil.copy(LAUNCHER, where / "bin" / "kubectl-oidc_login")
    (where / "bin" / "kubectl-oidc_login").chmod(0o755)
    return where


@pytest.mark.parametrize("command", ["clean", "get-token"])
def test_a_relative_pythonuserbase_does_not_run_code_from_the_cwd(tmp_path: Path, command: str) -> None:
    """-E does not cover PYTHONUSERBASE: site.py reads it itself.  A relative one (`export PYTHONUSERBASE="~/.pyuser"`,
    the tilde unexpanded in quotes) makes the user site <cwd>/~/.pyuser/lib/pythonX.Y/site-packages, whose .pth files
    run in `python -E -P -m brokerd clean` and in the autostarted daemon (any interpreter with the user site on: a
    system python of the direct form, a --system-site-packages venv)."""
    venv = _system_site_venv(tmp_path / "venv")
    cwd = tmp_path / "cloned-repo"
    site = cwd / "~" / ".pyuser" / "lib" / PYVER / "site-packages"
    site.mkdir(parents=True)
    (site / "review12.pth").write_text(MARK_LINE)
    state = tmp_path / "state"
    state.mkdir(mode=0o700)
    mark = tmp_path / "mark"
    env = {k: v for k, v in os.environ.items() if k not in ("BROKERD_NO_AUTOSTART", "BROKERD_DAEMON_COMMAND")}
    env.update(REVIEW12_MARK=str(mark), PYTHONUSERBASE="~/.pyuser", HOME=str(tmp_path),
               BROKERD_SOCKET=str(state / "brokerd.sock"), BROKERD_STATE_DIR=str(state),
               XDG_CONFIG_HOME=str(tmp_path), XDG_STATE_HOME=str(tmp_path), XDG_RUNTIME_DIR=str(tmp_path))
    subprocess.run([str(venv / "bin" / "kubectl-oidc_login"), command], cwd=cwd, env=env, capture_output=True,
                   text=True, timeout=60, stdin=subprocess.DEVNULL)
    assert not mark.exists(), mark.read_text()


def test_the_python_brokerd_starts_gets_no_relative_user_base_or_home() -> None:
    """site.py reads PYTHONUSERBASE and HOME (for ~/.local) itself, -E or not."""
    from client_shim.core import child_env

    env = {b"PYTHONUSERBASE": b"~/.pyuser", b"HOME": b"home", b"PATH": b"/bin", b"KEEP": b"x"}
    assert child_env(env) == {b"PATH": b"/bin", b"KEEP": b"x"}
    env = {b"PYTHONUSERBASE": b"/u", b"HOME": b"/home/u"}
    assert child_env(env) == env


def test_serve_in_a_removed_directory_with_a_relative_path_gives_one_line(tmp_path: Path) -> None:
    """cmd_serve makes its paths absolute before leaving its start directory: from a directory that is gone a
    relative BROKERD_STATE_DIR cannot be, which must be one line, not a traceback."""
    gone = tmp_path / "gone"
    gone.mkdir()
    code = ("import os, sys; os.chdir(sys.argv[1]); os.rmdir(sys.argv[1]); sys.argv[1:] = ['serve'];"
            "from brokerd.cli import main; sys.exit(main())")
    env = dict(os.environ, BROKERD_STATE_DIR="state", BROKERD_SOCKET=str(tmp_path / "run" / "b.sock"))
    result = subprocess.run([sys.executable, "-c", code, str(gone)], env=env, capture_output=True, text=True,
                            timeout=60, stdin=subprocess.DEVNULL, cwd=ROOT)
    assert result.returncode == 1, result.stderr
    assert result.stderr.startswith("brokerd: cannot resolve") and len(result.stderr.splitlines()) == 1, result.stderr
