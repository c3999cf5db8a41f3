"""Review 13: attacks on eea0364 (the fixes of review 12) and on what earlier rounds did not reach.

Each test fails on eea0364: the first shows a program from kubectl's current directory run by the launcher's shell
part (promise 1, docs/threat-model.md "No code from where kubectl happens to run"); the second the README's promise
for a minor Python upgrade broken by an editable build's written source path (promise 4; the fix writes the minor
version with the path, so the test writes the previous one); the third a traceback from help or version with
stdout closed (promise 2); the last the reviewer's untested hardening note (a stale path searched by the fallbacks)."""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

from tests.test_launcher import FINDER, PYVER, _baked, _no_shim_venv, _run, _venv


@pytest.mark.parametrize("entry", ["", "node_modules/.bin"])
def test_the_launchers_readlink_is_not_looked_up_in_the_current_directory(tmp_path: Path, entry: str) -> None:
    """A launcher reached through a symlink that is not in the user's pipx homes (the user's own ~/bin link, pipx
    --global's /usr/local/bin link, which 20dde67 sends to readlink on purpose) runs `readlink -f` through PATH.
    An empty PATH entry (`PATH=$EXTRA:$PATH` with EXTRA unset) or a relative one (`./node_modules/.bin`) makes
    that a program in the directory kubectl runs in (a cloned repository).  kubectl itself (Go >= 1.19) refuses to
    run anything found that way; the launcher must not either."""
    venv = _venv(tmp_path / "venv")
    links = tmp_path / "bin"
    links.mkdir()
    (links / "kubectl-oidc_login").symlink_to(venv / "bin" / "kubectl-oidc_login")
    repo = tmp_path / "cloned-repo"
    planted = repo / entry if entry else repo
    planted.mkdir(parents=True)
    mark = tmp_path / "mark"
    real = shutil.which("readlink")
    assert real
    (planted / "readlink").write_text(f'#!/bin/sh\necho "ran from $PWD" >> {mark}\nexec {real} "$@"\n')
    (planted / "readlink").chmod(0o755)
    env = {k: v for k, v in os.environ.items() if k not in ("PIPX_HOME", "XDG_DATA_HOME")}
    env.update(PATH=f"{entry}:{os.environ['PATH']}", HOME=str(tmp_path / "home"),
               BROKERD_SOCKET="/nonexistent/brokerd.sock", BROKERD_NO_AUTOSTART="1")
    result = subprocess.run([str(links / "kubectl-oidc_login"), "get-token"], cwd=repo, env=env,
                            capture_output=True, text=True, timeout=60, stdin=subprocess.DEVNULL)
    assert not mark.exists(), (mark.read_text(), result.stderr)
    assert result.returncode == 3, result.stderr


def test_an_editable_launcher_after_a_minor_python_upgrade_says_to_reinstall(tmp_path: Path) -> None:
    """README: after `python3.N+1 -m venv --upgrade` (site-packages moves to lib/python3.N+1) "the launcher says on
    stderr that it cannot find brokerd for that interpreter and exits 3".  An editable launcher takes the written
    source path without asking whether this interpreter's site-packages holds brokerd at all, so it goes on: with
    autostart it spawns `python -E -P -m brokerd serve`, which cannot import brokerd (its finder is in the old
    lib/python3.N), and the person reads "the daemon exited at start (status 1); run `brokerd serve` to see why",
    whose `brokerd serve` is a ModuleNotFoundError traceback; `kubectl oidc-login clean` prints "No module named
    brokerd" and exits 1.  (Seen with a real 3.11 venv upgraded to 3.12.)"""
    source = tmp_path / "checkout"
    root = Path(__file__).resolve().parent.parent
    shutil.copytree(root / "client_shim", source / "client_shim", ignore=shutil.ignore_patterns("__pycache__"))
    venv = _no_shim_venv(tmp_path / "venv")  # this interpreter's site-packages: empty, as after the upgrade
    old = venv / "lib" / f"python{sys.version_info[0]}.{sys.version_info[1] - 1}" / "site-packages"
    old.mkdir(parents=True)  # where the editable install's finder and .pth still are
    (old / FINDER).write_text(f"MAPPING: dict[str, str] = {{'client_shim': {str(source / 'client_shim')!r}}}\n")
    (old / "__editable__.brokerd-0.1.0.pth").write_text("import __editable___brokerd_0_1_0_finder\n")
    assert not (venv / "lib" / PYVER / "site-packages" / FINDER).exists()
    # Installed (and its path written) under the previous minor version; run now by this one.
    result = _run([str(_baked(venv, source, (sys.version_info[0], sys.version_info[1] - 1))), "get-token"])
    assert result.returncode == 3 and "reinstall brokerd" in result.stderr, result.stderr


@pytest.mark.parametrize("command", ["version", "--help"])
def test_help_and_version_with_stdout_closed_give_one_line_not_a_traceback(tmp_path: Path, command: str) -> None:
    """Started with stdout closed (`kubectl oidc-login version >&-`, a supervisor that closes it), -I -S leaves
    sys.stdout None and usage.main's sys.stdout.write raises AttributeError: a traceback through the launcher.
    `brokerd audit` answers the same case with one line (cli_local.cmd_audit)."""
    venv = _venv(tmp_path / "venv")
    result = subprocess.run(["/bin/sh", "-c", 'exec "$0" "$1" >&-', str(venv / "bin" / "kubectl-oidc_login"),
                             command], capture_output=True, text=True, timeout=60, stdin=subprocess.DEVNULL)
    assert "Traceback" not in result.stderr and len(result.stderr.splitlines()) == 1, result.stderr
    assert result.returncode != 0, result.stderr


def test_a_stale_written_path_is_not_searched_by_the_fallbacks(tmp_path: Path) -> None:
    """When the written source path has no client_shim (the tree moved and its old place holds something else), the
    launcher falls back to site's processing of the .pth files, whose `import __editable___..._finder` was looked up
    in that stale directory first, ahead of site-packages."""
    stale = tmp_path / "old-place"
    stale.mkdir()
    mark = tmp_path / "mark"
    (stale / "__editable___brokerd_0_1_0_finder.py").write_text(
        f"open({str(mark)!r}, 'a').write('ran from the stale path\\n')\n")
    venv = _no_shim_venv(tmp_path / "venv")
    (venv / "lib" / PYVER / "site-packages" / "__editable__.brokerd-0.1.0.pth").write_text(
        "import __editable___brokerd_0_1_0_finder\n")
    result = _run([str(_baked(venv, stale)), "get-token"])
    assert not mark.exists(), result.stderr
    assert result.returncode == 3 and "reinstall brokerd" in result.stderr, result.stderr
