"""Issue 14 item 1: the installed kubectl-oidc_login launcher (launchers/) in real venv layouts.

The editable layout is the test venv itself (scripts/test installs with -e; tests/test_e2e_kubectl.py and
tests/test_kubeconfig.py run kubectl through it).  Here: a venv laid out as `pip install .` leaves it, moved to
another directory, reached through a pipx-style symlink, and run by an interpreter whose site-packages has no brokerd;
and the source path an editable build writes into the launcher (setup.py), current and stale.
"""

from __future__ import annotations

import ast
import importlib.util
import os
import shutil
import subprocess
import sys
from pathlib import Path
from typing import Any

import pytest

from client_shim import pin
from tests.support.daemon import BIN, ROOT

LAUNCHER = ROOT / "launchers" / "kubectl-oidc_login"
PYVER = f"python{sys.version_info[0]}.{sys.version_info[1]}"
FINDER = "__editable___brokerd_0_1_0_finder.py"


def _setup_module() -> Any:
    """setup.py, loaded without running setup() (it runs only as __main__, as setuptools' build backend runs it)."""
    spec = importlib.util.spec_from_file_location("brokerd_setup", ROOT / "setup.py")
    assert spec is not None and spec.loader is not None
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def _baked(venv: Path, source: Path, version: tuple[int, int] = sys.version_info[:2]) -> Path:
    """The launcher as an editable build installs it: ``source`` written into its marked line, for ``version``."""
    launcher = venv / "bin" / "kubectl-oidc_login"
    launcher.write_text(_setup_module().bake(LAUNCHER.read_text(), str(source), version))
    launcher.chmod(0o755)
    return launcher


def _venv(where: Path, *, base: str | None = None, copies: bool = False) -> Path:
    """A venv (of ``base``, else this interpreter's; ``--copies``) with brokerd's client_shim where `pip install .`
    puts it, and the launcher in bin/ (0755, as pip)."""
    base = base or str(getattr(sys, "_base_executable", sys.executable))
    done = subprocess.run([base, "-m", "venv", "--without-pip", *(["--copies"] if copies else []), str(where)],
                          capture_output=True, text=True, timeout=120)
    assert done.returncode == 0, done.stderr
    site = where / "lib" / PYVER / "site-packages"
    shutil.copytree(ROOT / "client_shim", site / "client_shim", ignore=shutil.ignore_patterns("__pycache__"))
    shutil.copy(LAUNCHER, where / "bin" / "kubectl-oidc_login")
    (where / "bin" / "kubectl-oidc_login").chmod(0o755)
    return where


def _run(argv: list[str], env: dict[str, str] | None = None) -> subprocess.CompletedProcess[str]:
    full = dict(os.environ)
    full.update({"BROKERD_SOCKET": "/nonexistent/brokerd.sock", "BROKERD_NO_AUTOSTART": "1"})
    full.update(env or {})
    return subprocess.run(argv, env=full, capture_output=True, text=True, timeout=60, stdin=subprocess.DEVNULL)


def _reached_the_shim(result: subprocess.CompletedProcess[str]) -> None:
    # The shim ran: it looked for the daemon on the socket it was given (exit 3 and its one-line message).
    assert result.returncode == 3, result.stderr
    assert result.stderr.startswith("brokerd: no daemon is listening on /nonexistent/brokerd.sock"), result.stderr


def test_pip_layout_moved_venv_and_pipx_symlink(tmp_path: Path) -> None:
    venv = _venv(tmp_path / "venv")
    _reached_the_shim(_run([str(venv / "bin" / "kubectl-oidc_login"), "get-token", "--oidc-issuer-url=x"]))

    moved = tmp_path / "elsewhere" / "venv2"
    moved.parent.mkdir()
    venv.rename(moved)
    _reached_the_shim(_run([str(moved / "bin" / "kubectl-oidc_login"), "get-token"]))

    # pipx: ~/.local/bin/kubectl-oidc_login -> $PIPX_HOME/venvs/brokerd/bin/kubectl-oidc_login
    home = tmp_path / "pipx"
    (home / "venvs").mkdir(parents=True)
    moved.rename(home / "venvs" / "brokerd")
    bindir = tmp_path / "local-bin"
    bindir.mkdir()
    (bindir / "kubectl-oidc_login").symlink_to(home / "venvs" / "brokerd" / "bin" / "kubectl-oidc_login")
    fake_home = tmp_path / "home"
    (fake_home / ".local" / "share").mkdir(parents=True)
    for env in ({"PIPX_HOME": str(home)},  # found by a stat
                {"PIPX_HOME": str(tmp_path / "not-pipx"), "HOME": str(fake_home)},  # by readlink
                {"HOME": str(fake_home)}):  # by readlink, without PIPX_HOME
        _reached_the_shim(_run([str(bindir / "kubectl-oidc_login"), "get-token"], env))
    # Found by a stat, no readlink (PATH has none): PIPX_HOME, pipx's data dir under XDG_DATA_HOME, then its default
    # home.  (pipx --global's /opt/pipx is left to readlink: tests/test_review10_breaks.py.)
    data = tmp_path / "xdg-data"
    data.mkdir()
    (data / "pipx").symlink_to(home)
    no_path = {"HOME": str(fake_home), "PATH": "/nonexistent"}
    for env in ({"PIPX_HOME": str(home)}, {"XDG_DATA_HOME": str(data)}):
        _reached_the_shim(_run([str(bindir / "kubectl-oidc_login"), "get-token"], {**no_path, **env}))
    (fake_home / ".local" / "share" / "pipx").symlink_to(home)  # pipx's default home: found by a stat
    _reached_the_shim(_run([str(bindir / "kubectl-oidc_login"), "get-token"], no_path))
    # Called by name through PATH, as kubectl's plugin lookup does.
    _reached_the_shim(_run(["kubectl-oidc_login", "get-token"],
                           {"PATH": f"{bindir}{os.pathsep}{os.environ['PATH']}", "PIPX_HOME": "/nonexistent"}))


def test_the_interpreter_runs_isolated(tmp_path: Path) -> None:
    venv = _venv(tmp_path / "venv")
    # -I: PYTHON* variables are ignored; -S: no site, so a .pth file in site-packages never runs.
    (venv / "lib" / PYVER / "site-packages" / "evil.pth").write_text("import sys; sys.exit(42)\n")
    result = _run([str(venv / "bin" / "kubectl-oidc_login"), "get-token"], {"PYTHONSTARTUP": "/dev/null",
                                                                            "PYTHONPATH": str(tmp_path)})
    _reached_the_shim(result)


def test_site_packages_without_brokerd_gives_one_clear_line(tmp_path: Path) -> None:
    venv = _venv(tmp_path / "venv")
    shutil.rmtree(venv / "lib" / PYVER / "site-packages" / "client_shim")  # as after a minor Python upgrade
    result = _run([str(venv / "bin" / "kubectl-oidc_login"), "get-token"])
    assert result.returncode == 3 and result.stdout == ""
    assert result.stderr.count("\n") == 1 and "reinstall brokerd" in result.stderr, result.stderr


@pytest.mark.skipif(not (BIN / "kubectl-oidc_login").exists(), reason="the package is not installed in this venv")
def test_the_installed_launchers_are_the_isolated_ones() -> None:
    # scripts/test installs with `pip install -e .`, so this also checks the editable build wrote this tree's path.
    expected = _setup_module().bake(LAUNCHER.read_text(), str(ROOT))
    assert f"_pkg = {str(ROOT)!r} if sys.version_info[:2] == {sys.version_info[:2]!r} else _site" in expected
    # As installed, or with the interpreter written into its first line by its first run (client_shim/pin.py).
    target = pin.interpreter(str(BIN))
    assert target is not None
    line = pin.first_line(target)
    assert line is not None
    for name in ("kubectl-oidc_login", "brokerd-shim"):
        installed = (BIN / name).read_text()
        assert installed in (expected, line.decode() + expected.partition("\n")[2]), \
            f"{name} is not launchers/{name} as an editable build writes it; pip install -e ."
        _reached_the_shim(_run([str(BIN / name), "get-token"]))


def _no_shim_venv(where: Path) -> Path:
    venv = _venv(where)
    shutil.rmtree(venv / "lib" / PYVER / "site-packages" / "client_shim")  # where an editable install has none
    return venv


def test_an_editable_launcher_imports_from_the_source_path_written_into_it(tmp_path: Path) -> None:
    source = tmp_path / "checkout"
    shutil.copytree(ROOT / "client_shim", source / "client_shim", ignore=shutil.ignore_patterns("__pycache__"))
    venv = _no_shim_venv(tmp_path / "venv")
    # No finder in site-packages: only the written path can have found the package.
    _reached_the_shim(_run([str(_baked(venv, source)), "get-token"]))
    shutil.rmtree(source / "client_shim")
    result = _run([str(venv / "bin" / "kubectl-oidc_login"), "get-token"])
    assert result.returncode == 3 and result.stdout == "" and "reinstall brokerd" in result.stderr, result.stderr


def test_a_stale_source_path_falls_back_to_setuptools_finder(tmp_path: Path) -> None:
    """The source tree moved (and was installed again from there): the path in the launcher is gone, the finder
    in site-packages maps the new place."""
    moved = tmp_path / "moved"
    shutil.copytree(ROOT / "client_shim", moved / "client_shim", ignore=shutil.ignore_patterns("__pycache__"))
    venv = _no_shim_venv(tmp_path / "venv")
    (venv / "lib" / PYVER / "site-packages" / FINDER).write_text(
        f"MAPPING: dict[str, str] = {{'client_shim': {str(moved / 'client_shim')!r}}}\n")
    _reached_the_shim(_run([str(_baked(venv, tmp_path / "gone")), "get-token"]))


def test_bake_writes_any_path_as_a_literal_and_refuses_a_changed_template() -> None:
    setup = _setup_module()
    odd = "/tmp/it's a \\ \"path\"\n"
    text = setup.bake(LAUNCHER.read_text(), odd)
    line = next(ln for ln in text.splitlines() if ln.startswith("_pkg = "))
    written = ast.parse(line).body[0]
    assert isinstance(written, ast.Assign) and isinstance(written.value, ast.IfExp)
    assert ast.literal_eval(written.value.body) == odd  # the path, taken for the version it names
    assert ast.unparse(written.value.test) == f"sys.version_info[:2] == {sys.version_info[:2]!r}"
    with pytest.raises(RuntimeError, match="exactly one line"):
        setup.bake(text, "/x")  # already written: the marked line is gone
