"""Review 16: attacks on 147ba7e (the launcher's first run writes its interpreter into its first line: pin.py).

Every test here fails on b6352fe.  Real venvs (tests/test_launcher.py's _venv), real runs of the launcher; the shim
reaches for a socket nobody serves and says so (exit 3), which shows it ran.  Two causes recur:

* the pinned file finds its venv by string surgery on sys.argv[0] (``rpartition("/")`` twice), where the shell part
  used the directory the kernel resolved ($0's directory, then ``"$d/python"``): a path spelled ``./name``,
  ``dir//name`` or ``dir/./name`` gives the wrong site-packages after the first run;
* the first line is a frozen copy of the venv's python link at the first run: when that link later changes (an
  upgrade inside the venv) or its target goes, the launcher runs something else or the kernel fails to start it,
  and no check is left (the shell's "no working python beside this launcher" no longer runs).
"""

from __future__ import annotations

import grp
import os
import shutil
import signal
import subprocess
import sys
from collections.abc import Callable
from pathlib import Path

import pytest

from client_shim import pin
from tests.support.daemon import ROOT
from tests.test_launcher import LAUNCHER, PYVER, _reached_the_shim, _venv
from tests.test_launcher_pin import _first_line, _leftovers, _venv_with_python_at

NAME = "kubectl-oidc_login"
ENV = {"BROKERD_SOCKET": "/nonexistent/brokerd.sock", "BROKERD_NO_AUTOSTART": "1"}


def _try(argv: list[str], cwd: Path | None = None,
         env: dict[str, str] | None = None) -> subprocess.CompletedProcess[str]:
    """Run like kubectl does; an exec the kernel refuses is a result too (returncode -1, the error as stderr), so the
    assertion says what kubectl would have shown."""
    full = {**os.environ, **ENV, **(env or {})}
    try:
        return subprocess.run(argv, cwd=cwd, env=full, capture_output=True, text=True, timeout=60,
                              stdin=subprocess.DEVNULL)
    except OSError as exc:
        return subprocess.CompletedProcess(argv, -1, "", f"exec failed (what kubectl reports): {exc}")


def _one_line(result: subprocess.CompletedProcess[str], needle: str) -> None:
    assert result.returncode > 0 and "Traceback" not in result.stderr and needle in result.stderr, (
        result.returncode, result.stderr)
    assert len(result.stderr.strip().splitlines()) == 1, result.stderr


def _first_run(venv: Path) -> Path:
    launcher = venv / "bin" / NAME
    _reached_the_shim(_try([str(launcher), "get-token"]))
    assert launcher.read_bytes().startswith(b"#!/") and not launcher.read_bytes().startswith(b"#!/bin/sh\n")
    return launcher


# 1 --------------------------------------------------------------------------------------------------------------

@pytest.mark.parametrize("how", ["./NAME from bin/", "bin//NAME", "bin/./NAME", "PATH entry with a trailing slash"])
def test_a_pinned_launcher_keeps_working_however_its_path_is_spelled(tmp_path: Path, how: str) -> None:
    """Breaks promise 3 (a working launcher stops working after its own first run).  The pinned file computes
    ``_bin = dirname(argv[0])`` and then site-packages as ``dirname(_bin) + "/lib/..."`` by string: for argv[0]
    ``/v/bin/./NAME`` or ``/v/bin//NAME`` (``./NAME`` becomes ``cwd + "/./NAME"``) that is ``/v/bin/lib/...``, so
    every run after the first says "cannot find the brokerd package ...; reinstall", exit 3, no token.  The shell part
    (first run) handled all four.  ``./kubectl-oidc_login`` from the venv's bin/ is how a person tries it; a PATH entry
    written with a trailing slash (``PATH=$VENV/bin/:$PATH``) makes execvp (env, dash, xargs, anything but bash and Go)
    run ``$VENV/bin//kubectl-oidc_login``."""
    venv = _venv(tmp_path / "venv")
    _first_run(venv)
    bin_dir = venv / "bin"
    if how == "./NAME from bin/":
        result = _try([f"./{NAME}", "get-token"], cwd=bin_dir)
    elif how == "bin//NAME":
        result = _try([f"{bin_dir}//{NAME}", "get-token"])
    elif how == "bin/./NAME":
        result = _try([f"{bin_dir}/./{NAME}", "get-token"])
    else:
        result = _try(["/usr/bin/env", NAME, "get-token"], env={"PATH": f"{bin_dir}/:/usr/bin:/bin"})
    _reached_the_shim(result)


# 2 --------------------------------------------------------------------------------------------------------------

def test_a_pinned_launcher_whose_interpreter_is_gone_is_mended_through_sh(tmp_path: Path) -> None:
    """Promise 2, where no launcher can keep it: once the interpreter the first run wrote is removed (pyenv
    uninstall, `uv python uninstall`, the distribution dropping python3.11), the kernel cannot start the launcher
    (ENOENT; kubectl: "no such file or directory") and nothing of it runs to say more.  The venv's own python is
    gone with it here.  What the README promises instead: `sh` on the launcher runs its shell part, whose one line
    names the missing python; once the venv has an interpreter again, that run writes the line anew."""
    venv = _venv_with_python_at(tmp_path, tmp_path / "base" / "python3")
    launcher = _first_run(venv)
    (tmp_path / "base" / "python3").unlink()  # the base interpreter is uninstalled
    assert _try([str(launcher), "get-token"]).returncode == -1  # the kernel's refusal, as documented
    _one_line(_try(["/bin/sh", str(launcher), "get-token"]), "no working python beside this launcher")
    real = os.path.realpath(getattr(sys, "_base_executable", sys.executable))
    (tmp_path / "new-base").mkdir()
    (tmp_path / "new-base" / "python3").symlink_to(real)
    (venv / "bin" / "python").unlink()
    (venv / "bin" / "python").symlink_to(tmp_path / "new-base" / "python3")  # the venv mended (re-pointed)
    _reached_the_shim(_try(["/bin/sh", str(launcher), "get-token"]))
    assert _first_line(launcher) == f"#!{tmp_path / 'new-base' / 'python3'} -IS\n".encode()
    _reached_the_shim(_try([str(launcher), "get-token"]))


# 3 --------------------------------------------------------------------------------------------------------------

def upgraded_inside(tmp_path: Path) -> tuple[Path, Path, Path]:
    """A venv whose launcher was written (first run) for tmp_path/old-release/python3, then re-pointed to
    tmp_path/new-release/python3 as `uv venv --allow-existing` or `virtualenv -p` over it do; the old release is
    still installed (another file than the new one).  (venv, launcher, the old release's python)."""
    real = os.path.realpath(getattr(sys, "_base_executable", sys.executable))
    venv = _venv_with_python_at(tmp_path, tmp_path / "old-release" / "python3")
    launcher = _first_run(venv)
    (tmp_path / "new-release").mkdir()
    (tmp_path / "new-release" / "python3").symlink_to(real)
    (venv / "bin" / "python").unlink()
    (venv / "bin" / "python").symlink_to(tmp_path / "new-release" / "python3")  # what uv / virtualenv write
    old = tmp_path / "old-release" / "python3"
    old.unlink()  # another inode from now on: the same binary copied would be another file too
    shutil.copy(real, old)
    return venv, launcher, old


def test_a_patch_upgrade_inside_the_venv_keeps_the_launcher_working(tmp_path: Path) -> None:
    """Promise 3 ("Python upgraded inside the venv: patch: works").  `uv venv --allow-existing --python NEW` and
    `virtualenv -p NEW` over an existing venv (checked: uv 0.13.9, virtualenv 21.x) re-point bin/python to the new
    interpreter and keep site-packages and bin/kubectl-oidc_login.  The pinned launcher sees that the venv's python
    is no longer the file it names, hands over to the shell part (which runs the new one) and is written again; the
    old release can then go.  Here the two "releases" are two links to this interpreter."""
    venv, launcher, old = upgraded_inside(tmp_path)
    _reached_the_shim(_try([str(launcher), "get-token"]))
    assert _first_line(launcher) == f"#!{tmp_path / 'new-release' / 'python3'} -IS\n".encode()
    old.unlink()
    assert subprocess.run([str(venv / "bin" / "python"), "-c", "pass"], timeout=60).returncode == 0  # venv is fine
    _reached_the_shim(_try([str(launcher), "get-token"]))


def _cpython(wanted: Callable[[tuple[int, int]], bool]) -> str | None:
    """A CPython binary on this machine whose version ``wanted`` accepts, as its own sys.executable names it."""
    pyenv = "/root/.pyenv/versions"
    candidates = [f"{pyenv}/{v}/bin/python{v.rpartition('.')[0]}" for v in sorted(os.listdir(pyenv))] \
        if os.path.isdir(pyenv) else []
    candidates += [p for m in range(8, 16) if (p := shutil.which(f"python3.{m}")) is not None]
    for cand in candidates:
        try:
            out = subprocess.run([cand, "-I", "-c", "import sys; print(sys.implementation.name, *sys.version_info[:2],"
                                  " sys.executable)"], capture_output=True, text=True, timeout=30)
        except OSError:
            continue
        parts = out.stdout.split()
        if out.returncode == 0 and len(parts) == 4 and parts[0] == "cpython" and parts[3].startswith("/") \
                and (int(parts[1]), int(parts[2])) >= (3, 8) and wanted((int(parts[1]), int(parts[2]))):
            return parts[3]
    return None


def _relink(venv: Path, python: str) -> None:
    """What `uv venv --allow-existing --python X` (uv 0.13.9) and `virtualenv -p X` over an existing venv do to
    bin/: python -> X, python3 and python3.N -> python; site-packages and the launcher stay."""
    for link in (venv / "bin").glob("python*"):
        link.unlink()
    (venv / "bin" / "python").symlink_to(python)
    (venv / "bin" / "python3").symlink_to("python")
    (venv / "bin" / os.path.basename(python)).symlink_to("python")


def test_a_minor_upgrade_inside_the_venv_is_not_overridden_by_the_pinned_line(tmp_path: Path) -> None:
    """Breaks promise 4 (never a different interpreter than the venv itself would run) and promise 3 ("minor: one
    'reinstall' line").  After `uv venv --allow-existing --python 3.12` (or `virtualenv -p python3.12`) over the venv,
    the venv runs 3.12 and has no brokerd for it: the launcher as installed says "cannot find the brokerd package ...
    reinstall".  The pinned one keeps running the old 3.11 binary from the old site-packages, silently, while its
    sys.executable (the daemon it autostarts, `clean`, `setup`) is the venv's 3.12."""
    other = _cpython(lambda version: version > sys.version_info[:2])
    if other is None:
        pytest.skip("no CPython of a later minor version on this machine")
    venv = _venv(tmp_path / "venv")
    _first_run(venv)
    _relink(venv, other)
    ran = subprocess.run([str(venv / "bin" / "python"), "-c",
                          f"import sys; print(sys.version_info[:2] != {sys.version_info[:2]!r})"],
                         capture_output=True, text=True, timeout=60)
    assert ran.stdout.strip() == "True", ran  # the venv itself now runs the other minor version
    _one_line(_try([str(venv / "bin" / NAME), "get-token"]), "cannot find the brokerd package")


# 4 --------------------------------------------------------------------------------------------------------------

@pytest.mark.skipif(os.geteuid() != 0, reason="giving a file to another group needs root")
def test_the_rewrite_keeps_the_launchers_group(tmp_path: Path) -> None:
    """Breaks promise 2 (never a wrong-owner launcher).  pin() checks the owner but writes a new file, which gets the
    writer's group (or the directory's): a shared install (root:kubeusers, 0750, so kubeusers may run it) run once by
    root becomes root:root 0750 and every kubeusers member gets "permission denied" from then on."""
    venv = _venv(tmp_path / "venv")
    launcher = venv / "bin" / NAME
    gid = 4321 if os.getegid() != 4321 else 4322
    os.chown(launcher, -1, gid)
    launcher.chmod(0o750)
    _first_run(venv)
    st = launcher.stat()
    assert (st.st_gid, st.st_mode & 0o7777) == (gid, 0o750), (
        f"group {st.st_gid} ({_group(st.st_gid)}), mode {st.st_mode & 0o7777:o}: the group that could run it lost it")


def _group(gid: int) -> str:
    try:
        return grp.getgrgid(gid).gr_name
    except KeyError:
        return "?"


# 5 --------------------------------------------------------------------------------------------------------------

def test_sigterm_during_the_rewrite_leaves_no_temp_file(tmp_path: Path) -> None:
    """Breaks promise 2 (never temp files behind).  SIGTERM (or SIGHUP: the terminal closed; a timeout(1) around
    kubectl) while the first run writes: Python's default action for both is to die, the ``except BaseException``
    cleanup never runs, and a 0600 ``.kubectl-oidc_login.<pid>.tmp`` stays in the venv's bin/ for good (nothing
    removes it later; pip does not know it).  The fsync is made slow here (a slow disk cannot be had on demand);
    the signal, the process and the files are real."""
    venv = _venv(tmp_path / "venv")
    launcher = venv / "bin" / NAME
    child = subprocess.Popen([sys.executable, "-c", f"""
import posix, sys, time
sys.path.insert(0, {str(ROOT)!r})
from client_shim import pin
real = posix.fsync
def slow(fd):
    real(fd)
    posix.write(1, b"writing\\n")
    time.sleep(2)
posix.fsync = slow
pin.pin({str(launcher)!r}, {str(venv / "bin" / "python")!r})
"""], stdout=subprocess.PIPE, stdin=subprocess.DEVNULL)
    try:
        assert child.stdout is not None and child.stdout.readline() == b"writing\n"
        child.send_signal(signal.SIGTERM)
        child.wait(timeout=30)
    finally:
        if child.poll() is None:
            child.kill()
            child.wait()
        if child.stdout is not None:
            child.stdout.close()
    # The signal waited for the write to end (it was blocked meanwhile), then ended the process.
    assert child.returncode == -signal.SIGTERM
    assert launcher.read_bytes() != LAUNCHER.read_bytes() and _leftovers(venv) == []


# 6 --------------------------------------------------------------------------------------------------------------

def test_pip_uninstall_between_the_check_and_the_rename_is_not_undone(tmp_path: Path,
                                                                     monkeypatch: pytest.MonkeyPatch) -> None:
    """Promise 2 (pip uninstalling concurrently).  pip uninstall stashes each file away by rename, then deletes it;
    landing just before the first run puts its new file in place, a check-then-rename would put a launcher back into
    bin/ that no RECORD lists.  The swap is one step (renameat2 RENAME_EXCHANGE), which fails when the launcher is
    gone.  Forced here by running pip's step right before the swap."""
    venv = _venv(tmp_path / "venv")
    launcher = venv / "bin" / NAME
    stash = tmp_path / "pip-uninstall-stash"
    stash.mkdir()
    real_exchange = pin._exchange
    done: list[str] = []

    def uninstall_right_before(a: str, b: str) -> bool:
        if not done:
            done.append(b)
            launcher.rename(stash / NAME)
        return real_exchange(a, b)

    monkeypatch.setattr(pin, "_exchange", uninstall_right_before)
    with pytest.raises(FileNotFoundError):
        pin.pin(str(launcher), str(venv / "bin" / "python"))
    assert done
    assert not launcher.exists(), "pip uninstalled the launcher; the first run put it back"
    assert _leftovers(venv) == []


def test_a_reinstall_just_before_the_swap_wins(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """The other half: pip install --force-reinstall puts a new launcher in place right before the swap; the swap
    is undone and the new file stays, for its own first run."""
    venv = _venv(tmp_path / "venv")
    launcher = venv / "bin" / NAME
    real_exchange = pin._exchange
    done: list[str] = []

    def reinstall_right_before(a: str, b: str) -> bool:
        if not done:
            done.append(b)
            fresh = launcher.with_name("fresh")
            fresh.write_bytes(LAUNCHER.read_bytes() + b"# a newer release\n")
            fresh.rename(launcher)
        return real_exchange(a, b)

    monkeypatch.setattr(pin, "_exchange", reinstall_right_before)
    assert pin.pin(str(launcher), str(venv / "bin" / "python")) == "the launcher changed while it was being written"
    assert launcher.read_bytes().endswith(b"# a newer release\n") and _leftovers(venv) == []


# 7 --------------------------------------------------------------------------------------------------------------

@pytest.mark.skipif(os.geteuid() != 0, reason="planting files as another uid needs root")
def test_a_copied_pinned_launcher_runs_no_other_users_code(tmp_path: Path) -> None:
    """Breaks promise 1 (no code from other users' files).  The launcher as installed refuses to run where no venv
    python is beside it ("outside a venv (pip install --user, a copy)": one line, exit 3).  A pinned launcher is
    started by the kernel, takes ``dirname(dirname(argv[0]))/lib/python3.X/site-packages`` as its venv without any
    check, and imports client_shim from there (or processes its .pth files, in the fallback): a copy in
    /tmp/<dir>/ imports whatever another user put under /tmp/lib/.  Here a sticky world-writable directory stands
    for /tmp, and uid 4321 plants the package."""
    venv = _venv(tmp_path / "venv")
    launcher = _first_run(venv)
    shared = tmp_path / "shared"
    shared.mkdir()
    shared.chmod(0o1777)
    mine = shared / "mine"
    mine.mkdir()
    shutil.copy2(launcher, mine / NAME)
    planted = shared / "lib" / PYVER / "site-packages" / "client_shim"
    planted.mkdir(parents=True)
    (planted / "__init__.py").write_text("")
    (planted / "core.py").write_text("import posix\n\ndef run(pin=False):\n"
                                     "    posix.write(2, b'code planted by uid 4321 ran\\n')\n    posix._exit(42)\n")
    for root, dirs, files in os.walk(shared / "lib"):
        for name in [root, *(os.path.join(root, n) for n in dirs + files)]:
            os.chown(name, 4321, 4321)
    result = _try([str(mine / NAME), "get-token"])
    assert "planted" not in result.stderr and result.returncode == 3, result.stderr


# 8 --------------------------------------------------------------------------------------------------------------

@pytest.mark.parametrize("subcommand", ["clean", "setup"])
def test_clean_and_setup_from_a_pinned_launcher_whose_venv_python_is_gone_say_one_line(tmp_path: Path,
                                                                                       subcommand: str) -> None:
    """Breaks promise 2 (never a traceback).  The pinned launcher runs without the venv's bin/python (the change's
    own test shows it working that way for get-token), and sets sys.executable to that missing file; `clean` and
    `setup` then os.execve() it unguarded: FileNotFoundError traceback, exit 1.  As installed, the shell part said
    "no working python beside this launcher", exit 3."""
    venv = _venv(tmp_path / "venv")
    launcher = _first_run(venv)
    for link in (venv / "bin").glob("python*"):
        link.unlink()
    (venv / "bin" / "python").symlink_to(tmp_path / "removed-release" / "python3")  # dangling
    _one_line(_try([str(launcher), subcommand]), "python")


# 9 --------------------------------------------------------------------------------------------------------------

def test_an_interpreter_path_holding_a_coding_cookie_is_not_written(tmp_path: Path) -> None:
    """Breaks promise 2 (never a broken launcher).  Python reads a PEP 263 encoding declaration from a file's first
    two lines, and the first line is now ``#!<path> -IS``: an interpreter under a directory named like
    ``coding=x`` (or ``coding:latin-1`` ...) makes every later run die with "SyntaxError: encoding problem: x", exit 1,
    no token.  first_line() checks spaces, control characters and length, not this."""
    venv = _venv_with_python_at(tmp_path, tmp_path / "coding=x" / "python3")
    launcher = venv / "bin" / NAME
    _reached_the_shim(_try([str(launcher), "get-token"]))
    _reached_the_shim(_try([str(launcher), "get-token"]))


# 10 -------------------------------------------------------------------------------------------------------------

def test_the_slow_fallback_under_a_python_without_sysconfigs_venv_scheme_says_one_line(tmp_path: Path) -> None:
    """Breaks promise 2 (never a traceback), a regression of this change's edit to _ANY: ``sysconfig.get_path(
    "purelib", "venv", ...)`` raises KeyError('venv') on Python 3.10 and older (the "venv" scheme is 3.11's).  A venv
    re-pointed to such a Python (`uv venv --allow-existing --python 3.10`), or the launcher run as `python3.10 FILE`,
    printed "cannot find the brokerd package ...; reinstall" before (get_path("purelib") exists everywhere); now a
    KeyError traceback, exit 1."""
    older = _cpython(lambda version: version < (3, 11))
    if older is None:
        pytest.skip("no CPython older than 3.11 on this machine")
    venv = _venv(tmp_path / "venv")  # not run yet: as installed
    _relink(venv, older)
    _one_line(_try([str(venv / "bin" / NAME), "get-token"]), "cannot find the brokerd package")
    _one_line(_try([older, "-I", "-S", str(venv / "bin" / NAME), "get-token"]), "cannot find the brokerd package")
