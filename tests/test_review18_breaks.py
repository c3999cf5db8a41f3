"""Review 18: attacks on d7b7858 (review 17's fixes to the launcher that writes its interpreter into its first line).

Every test here fails on d7b7858.  Real venvs (tests/test_launcher.py's _venv), real runs of the launcher or real
pin() calls on real files.  Three causes:

* pin.py turns paths (str, decoded by Python with the file system encoding, which is the locale's) back into bytes
  with a hard-coded UTF-8 (``first_line``: the written ``#!`` line; ``_exchange``: renameat2's two names).  Under a
  locale whose encoding is not UTF-8 (de_DE.ISO-8859-1, zh_CN.GB18030, a bare ``LANG=en_US`` on some systems) a
  non-ASCII path is written as other bytes than the file system holds: the kernel can no longer find the
  interpreter the first line names (a broken launcher, for every user and locale), or the swap names files that do
  not exist (every run writes, fsyncs and throws away a copy);
* ``posix.access(bin_dir, W_OK)`` is the only look-ahead before the copy: a launcher that cannot be renamed although
  its directory can be written (``chattr +i`` on the launcher, ``chattr +a`` on bin/) is copied, synced and
  swapped on every run, and the swap fails (EPERM); in an append-only directory the copy cannot even be removed;
* StaleLine ("which its venv no longer runs ... reinstall brokerd") is raised whenever the wanted line differs and
  cannot be written, also where the reason is the environment (no /proc), not the venv.

The locale is built with localedef into the test's own directory (LOCPATH): nothing on the machine changes.
"""

from __future__ import annotations

import os
import posix
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

from client_shim import pin
from tests.support.daemon import ROOT
from tests.test_launcher import LAUNCHER, _reached_the_shim, _venv
from tests.test_launcher_pin import _leftovers, _venv_with_python_at

NAME = "kubectl-oidc_login"
ENV = {"BROKERD_SOCKET": "/nonexistent/brokerd.sock", "BROKERD_NO_AUTOSTART": "1"}
LATIN1 = "de_DE.ISO-8859-1"


def _try(argv: list[str], env: dict[str, str] | None = None) -> subprocess.CompletedProcess[str]:
    """Run like kubectl does; an exec the kernel refuses is a result too (returncode -1, the error as stderr), so the
    assertion says what kubectl would have shown."""
    full = {**os.environ, **ENV, **(env or {})}
    try:
        return subprocess.run(argv, env=full, capture_output=True, text=True, timeout=60, stdin=subprocess.DEVNULL)
    except OSError as exc:
        return subprocess.CompletedProcess(argv, -1, "", f"exec failed (what kubectl reports): {exc}")


@pytest.fixture(scope="module")
def latin1(tmp_path_factory: pytest.TempPathFactory) -> dict[str, str]:
    """The environment of a person whose locale is de_DE.ISO-8859-1 (compiled into a private LOCPATH)."""
    if shutil.which("localedef") is None or not Path("/usr/share/i18n/locales/de_DE").exists():
        pytest.skip("localedef and glibc's locale sources build the ISO-8859-1 locale")
    where = tmp_path_factory.mktemp("locales")
    subprocess.run(["localedef", "-i", "de_DE", "-f", "ISO-8859-1", str(where / LATIN1)], capture_output=True,
                   timeout=60)
    env = {"LOCPATH": str(where), "LC_ALL": LATIN1}
    probe = subprocess.run([sys.executable, "-I", "-S", "-c", "import sys; print(sys.getfilesystemencoding())"],
                           env={**os.environ, **env}, capture_output=True, text=True, timeout=60)
    if probe.stdout.strip() != "iso8859-1":
        pytest.skip(f"the ISO-8859-1 locale did not take ({probe.stdout.strip()!r}, {probe.stderr.strip()!r})")
    return env


# 1 --------------------------------------------------------------------------------------------------------------

@pytest.mark.parametrize("directory", [
    pytest.param("pythön".encode(), id="utf8-name"),  # a UTF-8 name (made under a UTF-8 locale)
    pytest.param(b"pyth\xf6n", id="latin1-name"),  # the same name as an ISO-8859-1 system writes it
])
def test_a_first_run_under_a_latin1_locale_leaves_a_launcher_that_still_starts(tmp_path: Path,
                                                                                latin1: dict[str, str],
                                                                                directory: bytes) -> None:
    """Breaks promise 2 (never a broken launcher) and 3, for good and for everyone.  The venv's python links to an
    interpreter under a non-ASCII directory (pyenv in /home/jürgen, a tool in /opt/工具), the venv itself is under an
    ASCII path, and the first run happens under an ISO-8859-1 locale.  Python decodes the link with the locale's
    encoding (``ö`` as the two characters ``Ã¶``, both printable, no space), first_line() encodes them as UTF-8
    (``c3 83 c2 b6``), _same_binary() stat()s the str (re-encoded correctly: the very interpreter), and the launcher
    gets ``#!/.../pythÃ¶n/python3 -IS``: a path that does not exist.  From then on the kernel refuses to start it
    (ENOENT: kubectl prints "no such file or directory", no hint at the cause), under any locale, for every user,
    until brokerd is reinstalled.  With the second name (the byte 0xF6, as an ISO-8859-1 system names the
    directory) the written line is wrong too; and writing it right (the byte itself) would not do either: Python
    reads the launcher as UTF-8 source and refuses a line holding 0xF6 (SyntaxError) - such a path must not be
    written at all."""
    python = Path(os.fsdecode(bytes(tmp_path) + b"/" + directory + b"/python3"))
    venv = _venv_with_python_at(tmp_path, python)
    launcher = venv / "bin" / NAME
    _reached_the_shim(_try([str(launcher), "get-token"], env=latin1))  # the first run: fine
    written = launcher.read_bytes().partition(b"\n")[0]
    for env in (latin1, {}):  # the next kubectl call, in the same locale and in a UTF-8 one
        result = _try([str(launcher), "get-token"], env=env)
        assert result.returncode == 3 and result.stderr.startswith("brokerd: no daemon is listening"), (
            f"after the first run the launcher starts {written!r} and no longer runs: {result.stderr.strip()}")


def test_a_latin1_locale_and_a_non_ascii_venv_do_not_copy_and_sync_on_every_run(tmp_path: Path,
                                                                                 latin1: dict[str, str]) -> None:
    """Breaks the change's premise (a first run, once; nothing heavy where nothing can be written: review 17's test
    1).  A venv under a non-ASCII path (/home/jürgen/.local/share/pipx/venvs/brokerd) and an ISO-8859-1 locale: pin()
    creates its temporary file under the name Python encodes with the locale (correct), writes and fsyncs it,
    imports ctypes, then hands renameat2 both names encoded as UTF-8 (``_exchange``): ENOENT, the copy is unlinked,
    the launcher stays ``#!/bin/sh``, and the next run does it all again, on every kubectl call, for good (measured
    here: a temporary file, an fsync and ctypes on each run).  Either the line is written once, or a run that cannot
    write it does not copy and sync the launcher each time."""
    venv = _venv(tmp_path / "vénv")
    launcher = venv / "bin" / NAME
    code = f"""
import posix, sys
sys.path.insert(0, {str(ROOT)!r})
from client_shim import pin
synced = []
real = posix.fsync
posix.fsync = lambda fd: (synced.append(fd), real(fd))[1]
for run in (1, 2):
    synced.clear()
    try:
        outcome = pin.pin({str(launcher)!r}, {str(venv / "bin" / "python")!r})
    except OSError as exc:
        outcome = "OSError " + str(exc.errno)
    print(run, outcome, len(synced))
"""
    ran = subprocess.run([sys.executable, "-I", "-c", code], env={**os.environ, **latin1}, capture_output=True,
                         text=True, timeout=60)
    assert ran.returncode == 0, ran.stderr
    assert _leftovers(venv) == []
    second = ran.stdout.splitlines()[1]
    assert second.endswith(" 0"), f"the second run copied and synced the launcher again: {ran.stdout!r}"


# 2 --------------------------------------------------------------------------------------------------------------

def _chattr(flag: str, path: Path) -> None:
    if os.geteuid() != 0 or shutil.which("chattr") is None:
        pytest.skip("file attributes need root and chattr")
    done = subprocess.run(["chattr", flag, str(path)], capture_output=True, text=True, timeout=60)
    if done.returncode != 0:
        pytest.skip(f"this file system takes no {flag}: {done.stderr.strip()}")


def test_an_immutable_launcher_is_not_copied_and_synced_on_every_run(tmp_path: Path,
                                                                     monkeypatch: pytest.MonkeyPatch) -> None:
    """Breaks "nothing heavy where nothing can be written" (d7b7858; review 17's test 1) in another place where
    nothing can be written: an administrator made the installed launcher immutable (``chattr +i``, a usual hardening
    of a shared install).  access(2) on bin/ says writable, so every run (the launcher stays ``#!/bin/sh``, so every
    run is a first run) creates the temporary file, writes it, fsyncs it, imports ctypes, and renameat2 refuses
    (EPERM).  Measured here (40 runs each, medians): 13.3-15.2 ms a call against 10.5-11.2 ms where access(2)
    says no; on a disk where fsync costs, more.  Whether the launcher can be replaced is known before copying it
    (the file's flags: FS_IOC_GETFLAGS; statx's attributes)."""
    venv = _venv(tmp_path / "venv")
    launcher = venv / "bin" / NAME
    _chattr("+i", launcher)
    synced: list[int] = []
    real = posix.fsync

    def counting(fd: int) -> None:
        synced.append(fd)
        real(fd)

    monkeypatch.setattr(posix, "fsync", counting)  # the module pin.py calls it through
    try:
        outcomes = []
        for _ in range(2):
            try:
                outcomes.append(pin.pin(str(launcher), str(venv / "bin" / "python")))
            except OSError as exc:
                outcomes.append(f"OSError {exc.errno}")
    finally:
        subprocess.run(["chattr", "-i", str(launcher)], capture_output=True, timeout=60)
    assert launcher.read_bytes() == LAUNCHER.read_bytes() and _leftovers(venv) == []
    assert synced == [], f"two runs copied and synced the immutable launcher {len(synced)} times ({outcomes})"


def test_an_append_only_bin_directory_collects_no_temporary_files(tmp_path: Path) -> None:
    """Breaks promise 2 ("never ... temp files behind").  bin/ is append-only (``chattr +a``: files may be created,
    none renamed or removed).  access(2) says writable, so each run creates ``.kubectl-oidc_login.<pid>.tmp``,
    writes and syncs it; renameat2 fails (EPERM) and so does the unlink meant to clean up, which is ignored: one
    more 8 KB file in the venv's bin/ per kubectl call, for good (they are never cleaned: each has another pid)."""
    venv = _venv(tmp_path / "venv")
    launcher = venv / "bin" / NAME
    _chattr("+a", venv / "bin")
    try:
        for _ in range(3):
            _reached_the_shim(_try([str(launcher), "get-token"]))
        left = _leftovers(venv)
    finally:
        subprocess.run(["chattr", "-a", str(venv / "bin")], capture_output=True, timeout=60)
    assert launcher.read_bytes() == LAUNCHER.read_bytes()
    assert left == [], f"three runs left {left}"


# 3 --------------------------------------------------------------------------------------------------------------

@pytest.mark.skipif(os.geteuid() != 0 or shutil.which("unshare") is None,
                    reason="a read-only bind mount and a mount namespace without /proc need root and unshare -m")
def test_a_run_without_proc_does_not_tell_the_person_to_reinstall_a_venv_that_is_fine(tmp_path: Path) -> None:
    """Breaks promise 2's "one clear line" with a false one (d7b7858's StaleLine).  A written launcher whose venv is
    unchanged runs where /proc is not mounted (a chroot, a sandbox: bwrap without --proc) on a read-only install:
    its self-check cannot open /proc/self/fd, so it hands the run to the shell part, whose python's pin() wants
    ``#!/bin/sh`` back ("no /proc/self"), cannot write it, and raises StaleLine: every kubectl call prints
    "<launcher> starts <interpreter>, which its venv no longer runs ...: reinstall brokerd".  The venv runs exactly
    that interpreter, and a reinstall changes nothing (the next first run with /proc writes the same line again).
    The line claims an upgrade that did not happen and sends the person to fix the wrong thing."""
    venv = _venv(tmp_path / "venv")
    launcher = venv / "bin" / NAME
    _reached_the_shim(_try([str(launcher), "get-token"]))
    pinned = launcher.read_bytes()
    assert pinned.startswith(b"#!/") and not pinned.startswith(b"#!/bin/sh\n")
    without_proc = ["unshare", "-m", "sh", "-c",
                    'mount --bind "$0" "$0" && mount -o remount,bind,ro "$0" && umount -l /proc && exec "$@"',
                    str(venv)]
    result = _try([*without_proc, str(launcher), "get-token"])
    _reached_the_shim(result)
    assert launcher.read_bytes() == pinned
    assert "no longer runs" not in result.stderr and "reinstall" not in result.stderr, result.stderr
