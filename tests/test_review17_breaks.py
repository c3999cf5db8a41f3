"""Review 17: attacks on 12fb15c (review 16's fixes to the launcher that writes its interpreter into its first line).

Every test here fails on 12fb15c.  Real venvs (tests/test_launcher.py's _venv), real runs of the launcher or real
pin() calls on real files; where a race with pip must land at one exact moment, pip's own steps (as
pip/_internal/operations/install/wheel.py ZipBackedFile.save does them: unlink, open "wb" + write, chmod by path) are
run from a hook around pin._exchange.  Three causes:

* the cost paid where nothing can be written: pin() imports ``signal`` (enum, functools, collections: ~5 ms) before
  it learns that the temporary file cannot be created, and a written launcher whose check fails goes through
  /bin/sh to a second interpreter start on every call when the line cannot be (or need not be) written again;
* the swap: RENAME_EXCHANGE puts the new file at the launcher's name before it knows it lost, so whatever pip does
  to that name meanwhile (its chmod) lands on the temporary file and is thrown away with it; the "same file" check
  compares the inode only, not what pip did to it in place; two losers' swap-backs undo each other;
* the written line is compared, on later runs, with sys.executable, which CPython normalises lexically (``a/../b``),
  while pin() compared what the kernel resolves.
"""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
import time
from pathlib import Path

import pytest

from client_shim import pin
from tests.support.daemon import ROOT
from tests.support.planted import read_only as _read_only
from tests.test_launcher import LAUNCHER, PYVER, _reached_the_shim, _venv
from tests.test_launcher_pin import _first_line, _leftovers
from tests.test_review16_breaks import upgraded_inside

NAME = "kubectl-oidc_login"
ENV = {"BROKERD_SOCKET": "/nonexistent/brokerd.sock", "BROKERD_NO_AUTOSTART": "1"}
NEWER = b"# a newer release\n"


def _try(argv: list[str], cwd: Path | None = None) -> subprocess.CompletedProcess[str]:
    return subprocess.run(argv, cwd=cwd, env={**os.environ, **ENV}, capture_output=True, text=True, timeout=60,
                          stdin=subprocess.DEVNULL)


def _execs(argv: list[str], tmp_path: Path, prefix: list[str] | None = None) -> list[str]:
    """The programs one run exec'd (strace -f -e execve), after checking the run reached the shim."""
    log = tmp_path / "execve.log"
    result = subprocess.run([*(prefix or []), "strace", "-f", "-qq", "-e", "trace=execve", "-e", "signal=none",
                             "-o", str(log), *argv], env={**os.environ, **ENV}, capture_output=True, text=True,
                            timeout=60, stdin=subprocess.DEVNULL)
    _reached_the_shim(result)
    return [line.split('execve("', 1)[1].split('"', 1)[0] for line in log.read_text().splitlines()
            if 'execve("' in line and "= 0" in line]


needs_strace = pytest.mark.skipif(shutil.which("strace") is None, reason="strace observes the execs")
needs_root_unshare = pytest.mark.skipif(os.geteuid() != 0 or shutil.which("unshare") is None,
                                        reason="a read-only bind mount needs root and unshare -m")


# 1 --------------------------------------------------------------------------------------------------------------

@needs_root_unshare
def test_a_launcher_that_cannot_be_written_does_not_import_signal_on_every_run(tmp_path: Path) -> None:
    """Breaks the change's own premise (it exists to save 0.8 ms a call; pin.py: "where a launcher cannot be written
    (... a read-only ... install), every run comes here, and `import os` alone would cost it a millisecond").  On a
    read-only install the launcher stays ``#!/bin/sh`` and every call runs pin(), which now does ``import signal``
    (enum, functools, collections, operator, keyword, reprlib, types: ~5 ms cold) to block signals *before* trying
    to create its temporary file, which then fails with EROFS.  Measured here, 100 calls each on a read-only bind
    mount: 20.0 ms a call against 14.6 ms for the same launcher with the pin() call removed, a third slower than the
    launcher before this change.  The same holds wherever the directory is not writable."""
    venv = _venv(tmp_path / "venv")
    launcher = venv / "bin" / NAME
    code = f"""
import sys
sys.path.append({str(venv / "lib" / PYVER / "site-packages")!r})
from client_shim import pin
before = set(sys.modules)
try:
    print(pin.pin({str(launcher)!r}, {str(venv / "bin" / "python")!r}))
except OSError as exc:
    print("OSError", exc.errno)
print(" ".join(sorted(set(sys.modules) - before)))
"""
    ran = subprocess.run([*_read_only(venv), str(venv / "bin" / "python"), "-I", "-S", "-c", code],
                         capture_output=True, text=True, timeout=60)
    assert ran.returncode == 0, ran.stderr
    outcome, loaded = [*ran.stdout.splitlines(), "", ""][:2]
    # It learns that nothing can be written (EROFS from access(2)) before it loads anything to write with.
    assert outcome == "it or its directory is not writable", ran.stdout
    assert launcher.read_bytes() == LAUNCHER.read_bytes()
    heavy = {"signal", "enum", "functools", "collections", "ctypes"} & set(loaded.split())
    assert not heavy, f"every run of a launcher that cannot be written imports {sorted(heavy)}"


# 2 --------------------------------------------------------------------------------------------------------------

@needs_root_unshare
@needs_strace
def test_a_written_launcher_that_can_no_longer_be_written_costs_one_interpreter_start(tmp_path: Path) -> None:
    """Promise 3's upgrade inside the venv, where nothing can be written (a read-only install, another user's
    shared one).  After the venv's python is re-pointed (`uv venv --allow-existing --python 3.11.9`, review 16's
    test 3), the written launcher's check fails and it execs /bin/sh on itself, whose shell part starts the venv's
    python, whose pin() cannot write the new line: so every call from then on starts the interpreter twice (the
    kernel's, which only checks and re-execs, then the shell's) plus /bin/sh, about twice what the launcher as
    installed costs, for good, and silently.  The fallback should cost no more than the shell part alone."""
    venv, launcher, _old = upgraded_inside(tmp_path)
    execs = _execs([str(launcher), "get-token"], tmp_path, prefix=_read_only(venv))
    ours = execs[execs.index(str(launcher)):]  # after unshare's and sh's own
    assert len(ours) <= 2, f"one call exec'd {ours}: two interpreter starts on every call"


# 3 --------------------------------------------------------------------------------------------------------------

def _pip_writes(launcher: Path, mode: int = 0o755) -> None:
    """pip's ZipBackedFile.save for a script: unlink, open("wb") + write (0644 under umask 022), chmod +x by name."""
    launcher.unlink()
    with open(launcher, "wb") as dest:
        dest.write(LAUNCHER.read_bytes() + NEWER)
    launcher.chmod(0o644)
    if mode != 0o644:
        launcher.chmod(mode)


def test_pips_reinstall_before_the_swap_wins_although_it_reuses_the_inode_number(
        tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """Breaks review 16's fix for "a reinstall meanwhile wins" (promise 2/3: pip reinstalling concurrently).  The
    swap keeps pip's file only if the name then holds another (st_dev, st_ino) than the file pin() read; pin() read
    it and closed it.  pip replaces a script by unlink, then open("wb"): the old inode is free the moment it is
    unlinked (nothing holds it: /bin/sh and Python closed the launcher before pin() runs) and ext4 gives the new
    file the same inode number straight away (checked here: it does, even with pin()'s temporary file created in
    between).  So `pip install --upgrade brokerd` landing during a first run's write and fsync is undone: the
    launcher is the first run's copy of the OLD release's launcher (written, so it keeps running), pip's file is
    deleted, RECORD's hash no longer matches.  Review 16's test renamed a fresh file over the old one (a new inode
    while the old still exists), which is not what pip does.  (On tmpfs, which never reuses an inode number, this
    passes.)"""
    venv = _venv(tmp_path / "venv")
    launcher = venv / "bin" / NAME
    before = launcher.stat().st_ino
    real_exchange = pin._exchange
    reused: list[bool] = []

    def pip_reinstall_right_before(a: str, b: str) -> bool:
        if not reused:
            _pip_writes(launcher)
            reused.append(launcher.stat().st_ino == before)
        return real_exchange(a, b)

    monkeypatch.setattr(pin, "_exchange", pip_reinstall_right_before)
    outcome = pin.pin(str(launcher), str(venv / "bin" / "python"))
    assert reused and _leftovers(venv) == []
    assert launcher.read_bytes().endswith(NEWER), (
        f"pip's new launcher undone (pin() said {outcome!r}; the new file had the old inode number: {reused[0]})")


def test_pips_chmod_during_the_swap_window_is_not_lost(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """Breaks promise 2 (never a wrong-mode launcher; pip reinstalling concurrently), where the reinstall does get a
    new inode (the old launcher still open: a concurrent kubectl's /bin/sh reading it; or a file system that does
    not reuse inode numbers).  pip writes a script in place: unlink, open("wb") + write (0644), then chmod +x by
    name.  A first run that read the old launcher swaps its new file in with RENAME_EXCHANGE, then sees pip's file
    come out and swaps it back.  If pip's chmod lands between the two swaps, it goes to the first run's temporary
    file (at the launcher's name then), which is deleted; pip's launcher is put back 0644: kubectl gets "permission
    denied" for good, and pip reported success.  A check before the first swap (lstat of the name) would have seen
    pip's new file."""
    venv = _venv(tmp_path / "venv")
    launcher = venv / "bin" / NAME
    held = os.open(launcher, os.O_RDONLY)  # the old launcher, as a concurrent run's /bin/sh holds it
    real_exchange = pin._exchange
    done: list[str] = []

    def pip_reinstall_around_the_swap(a: str, b: str) -> bool:
        if done:
            return real_exchange(a, b)
        done.append(b)
        _pip_writes(launcher, 0o644)
        swapped = real_exchange(a, b)
        launcher.chmod(0o755)  # set_extracted_file_to_default_mode_plus_executable(dest_path)
        return swapped

    monkeypatch.setattr(pin, "_exchange", pip_reinstall_around_the_swap)
    try:
        outcome = pin.pin(str(launcher), str(venv / "bin" / "python"))
    finally:
        os.close(held)
    assert outcome == "the launcher changed while it was being written"
    assert launcher.read_bytes().endswith(NEWER) and _leftovers(venv) == []
    assert launcher.stat().st_mode & 0o777 == 0o755, f"launcher left {launcher.stat().st_mode & 0o777:o}"


def test_a_file_pip_is_still_installing_is_not_swapped_in_with_its_old_mode(tmp_path: Path,
                                                                           monkeypatch: pytest.MonkeyPatch) -> None:
    """Breaks promise 2 (never a wrong-mode launcher).  pin() opens the launcher by name after the answer is out: a
    first run that started on the old file reads pip's new one when pip has written it but not yet made it
    executable (0644), copies that mode into its temporary file, and swaps it in after pip's chmod: the swap checks
    only that the name still holds the same inode, and pip changed that inode in place (its mode; its ctime says
    so).  The launcher ends 0644 and kubectl cannot run it.  Here the file is as pip leaves it between write and
    chmod, and pip's chmod runs right before the swap."""
    venv = _venv(tmp_path / "venv")
    launcher = venv / "bin" / NAME
    launcher.unlink()
    with open(launcher, "wb") as dest:  # pip's new file, written, not yet chmod'ed
        dest.write(LAUNCHER.read_bytes() + NEWER)
    launcher.chmod(0o644)
    real_exchange = pin._exchange
    done: list[str] = []

    def pip_chmod_right_before(a: str, b: str) -> bool:
        if not done:
            done.append(b)
            launcher.chmod(0o755)
        return real_exchange(a, b)

    monkeypatch.setattr(pin, "_exchange", pip_chmod_right_before)
    # A file pip has not made executable yet is not read, let alone swapped: pip's chmod is still to come.
    assert pin.pin(str(launcher), str(venv / "bin" / "python")) == (
        "the launcher is not executable (pip has not finished installing it)")
    assert not done and _leftovers(venv) == []
    assert launcher.read_bytes().endswith(NEWER) and launcher.stat().st_mode & 0o777 == 0o644
    launcher.chmod(0o755)  # pip's chmod; the next first run writes the line
    assert pin.pin(str(launcher), str(venv / "bin" / "python")) is None
    assert launcher.stat().st_mode & 0o777 == 0o755 and launcher.read_bytes().endswith(NEWER)


# 4 --------------------------------------------------------------------------------------------------------------

_CHILD = """
import os, sys, time
sys.path.insert(0, {root!r})
from client_shim import pin
launcher, python, tag, sync = sys.argv[1:5]
real = pin._exchange
calls = [0]

def wait(name):
    for _ in range(3000):
        if os.path.exists(sync + "/" + name):
            return
        time.sleep(0.01)
    raise SystemExit("timed out waiting for " + name)

def step(a, b):
    calls[0] += 1
    open(sync + "/" + tag + "-at-" + str(calls[0]), "w").close()
    wait(tag + "-go-" + str(calls[0]))
    return real(a, b)

pin._exchange = step
print(pin.pin(launcher, python))
"""


def test_two_first_runs_and_a_reinstall_keep_the_reinstalled_launcher(tmp_path: Path) -> None:
    """Breaks promise 2/3 ("a reinstall meanwhile wins"; 20 first runs at once; pip reinstalling concurrently).
    First run A reads the old launcher; `pip install --upgrade` puts the new one in place; first run B (started on
    the new one) reads it.  A swaps (the name holds A's file, A's name pip's), sees it lost; B swaps (the name holds
    B's file, B's name A's), sees it lost too; A swaps back (the name holds pip's file again, A's name B's: A deletes
    it); B swaps back: the name gets what B's name holds, A's copy of the OLD launcher, and B deletes pip's new file.
    The upgrade's launcher is gone and the old release's stays (written, so it keeps running), RECORD's hash wrong.
    Each swap-back exchanges whatever is at the two names then, without checking it is putting back what it took.
    Two real processes; each stops before each of its swaps until told to go.  The old launcher is held open while
    pip writes (a concurrent run's /bin/sh), so pip's file gets a new inode (else test 3's inode reuse decides)."""
    venv = _venv(tmp_path / "venv")
    launcher = venv / "bin" / NAME
    python = str(venv / "bin" / "python")
    sync = tmp_path / "sync"
    sync.mkdir()
    child = _CHILD.format(root=str(ROOT))

    def start(tag: str) -> subprocess.Popen[str]:
        return subprocess.Popen([sys.executable, "-c", child, str(launcher), python, tag, str(sync)],
                                stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, stdin=subprocess.DEVNULL)

    def reached(name: str) -> None:
        for _ in range(3000):
            if (sync / name).exists():
                return
            time.sleep(0.01)
        raise AssertionError(f"never reached {name}")

    def go(name: str) -> None:
        (sync / name).touch()

    procs = []
    try:
        procs.append(start("A"))
        reached("A-at-1")  # A read the old launcher and wrote its file
        held = os.open(launcher, os.O_RDONLY)  # the old one stays open (a concurrent run's /bin/sh): a new inode
        try:
            _pip_writes(launcher)  # pip install --upgrade: the new release's launcher
        finally:
            os.close(held)
        procs.append(start("B"))
        # B finds A writing (one writer per bin directory): it leaves the launcher to A, without a swap of its own.
        out, err = procs[1].communicate(timeout=60)
        assert procs[1].returncode == 0 and out.strip() == "another run is writing it", (out, err)
        assert not (sync / "B-at-1").exists()
        go("A-go-1")
        reached("A-at-2")  # A swapped and saw pip's file come out
        go("A-go-2")
        out, err = procs[0].communicate(timeout=60)
        assert procs[0].returncode == 0 and out.strip() == "the launcher changed while it was being written", (
            out, err)
    finally:
        for proc in procs:
            if proc.poll() is None:
                proc.kill()
            proc.communicate()
    assert _leftovers(venv) == []
    assert launcher.read_bytes().endswith(NEWER), "the upgrade's launcher was replaced by the old release's"


# 5 --------------------------------------------------------------------------------------------------------------

@needs_strace
def test_a_line_the_written_launcher_would_reject_is_not_written(tmp_path: Path) -> None:
    """Breaks the speed-up into a permanent slow-down (the "launcher that alternates" case).  The venv's python
    links to ``/x/link/../python3`` (a directory link followed by ``..``: the kernel resolves it physically, to a
    real python).  pin() stats that path (the kernel's view: the very interpreter) and writes it; the written
    launcher, started by the kernel, compares the venv's python with sys.executable, which CPython normalises
    lexically to ``/x/python3`` (not there, or another file): the check fails, /bin/sh runs the shell part, the
    second interpreter's pin() finds the line already there.  Every call from then on: kernel -> python -> /bin/sh
    -> python, two interpreter starts, for good."""
    real = os.path.realpath(getattr(sys, "_base_executable", sys.executable))
    (tmp_path / "base" / "real" / "sub").mkdir(parents=True)
    (tmp_path / "base" / "real" / "python3").symlink_to(real)
    (tmp_path / "base" / "x").mkdir()
    (tmp_path / "base" / "x" / "link").symlink_to(tmp_path / "base" / "real" / "sub")
    venv = _venv(tmp_path / "venv")
    for link in (venv / "bin").glob("python*"):
        link.unlink()
    (venv / "bin" / "python").symlink_to(f"{tmp_path}/base/x/link/../python3")
    launcher = venv / "bin" / NAME
    _reached_the_shim(_try([str(launcher), "get-token"]))
    execs = _execs([str(launcher), "get-token"], tmp_path)
    assert execs == [str(launcher)] or _first_line(launcher) == b"#!/bin/sh\n", (
        f"written line {_first_line(launcher)!r}; one call exec'd {execs}")
