"""Review 21: attacks on 0bd591c (pin compares the new file's extended attributes with the launcher's instead of
refusing any; the shell gate adds [ -O "$0" ]) and on the whole change once more.

Every test here fails on 0bd591c.  Real venvs (tests/test_launcher.py's _venv), real runs of the launcher; what a run
does is observed with strace, as in tests/test_review19_breaks.py and tests/test_review20_breaks.py.
"""

from __future__ import annotations

import os
import shutil
import struct
import subprocess
from pathlib import Path

import pytest

from tests.test_launcher import LAUNCHER, _reached_the_shim, _venv
from tests.test_launcher_pin import _first_line, _leftovers
from tests.test_review19_breaks import ENV, _try

NAME = "kubectl-oidc_login"

needs_strace = pytest.mark.skipif(shutil.which("strace") is None, reason="strace observes what a run does")


def _acl(entries: list[tuple[int, int, int]]) -> bytes:
    """A POSIX ACL as the kernel's system.posix_acl_* xattrs hold it (what setfacl writes)."""
    return struct.pack("<I", 2) + b"".join(struct.pack("<HHI", tag, perm, ident) for tag, perm, ident in entries)


USER_OBJ, USER, GROUP_OBJ, MASK, OTHER, UNDEFINED = 1, 2, 4, 0x10, 0x20, 0xFFFFFFFF
TEAM_DEFAULT = _acl([(USER_OBJ, 7, UNDEFINED), (USER, 5, 4321), (GROUP_OBJ, 5, UNDEFINED), (MASK, 5, UNDEFINED),
                     (OTHER, 5, UNDEFINED)])


def _files_made_in(bin_dir: Path, launcher: Path, tmp_path: Path) -> list[str]:
    """The files one run (checked to reach the shim) created in ``bin_dir`` (strace: openat with O_CREAT)."""
    log = tmp_path / "creat.log"
    result = subprocess.run(["strace", "-f", "-qq", "-e", "trace=openat,unlink", "-o", str(log), str(launcher),
                             "get-token"], env={**os.environ, **ENV}, capture_output=True, text=True, timeout=60,
                            stdin=subprocess.DEVNULL)
    _reached_the_shim(result)
    return [line for line in log.read_text().splitlines() if "O_CREAT" in line and str(bin_dir) in line]


# 1 --------------------------------------------------------------------------------------------------------------

@needs_strace
@pytest.mark.parametrize("how", ["default ACL set on bin/ after the install", "uv's hard link under an ACL'd project"])
def test_a_launcher_without_any_xattr_in_a_directory_with_a_default_acl_is_written(tmp_path: Path, how: str) -> None:
    """Breaks what 0bd591c set out to do (a default ACL no longer stops the write) and, worse than before it, makes
    every kubectl call create and delete a file in the venv's bin/.  0bd591c compares the new file's xattrs with the
    launcher's for equality, but a launcher that has NO extended attribute at all loses nothing in the copy: the new
    file merely gets what the directory hands down (as a `pip install --force-reinstall` would).  Two ordinary ways to
    get there: an admin shares an existing venv with `setfacl -d -m u:ci:rx venv/bin` (a default ACL affects only
    files made later), or uv (review 19: it hard-links the launcher from ~/.cache/uv, which has no default ACL) installs
    into a project directory that has one.  The shell gate passes (this user's launcher, writable bin/, linked python,
    pyvenv.cfg, /proc); pin() locks bin/, re-reads the launcher, creates .kubectl-oidc_login.<pid>.tmp, fchowns,
    fchmods, lists both files' xattrs, finds {} != {system.posix_acl_access: ...} and unlinks it: on every run,
    forever.  On a6094e3 the same launcher was simply written once (its _read saw no xattr).  A directory write per
    kubectl call also wakes every watcher of the venv (IDEs watch .venv/bin for interpreters) and costs a round trip
    each on NFS."""
    project = tmp_path / "project"
    project.mkdir()
    if how.startswith("uv"):
        try:
            os.setxattr(project, "system.posix_acl_default", TEAM_DEFAULT)
        except OSError as exc:
            pytest.skip(f"this file system keeps no POSIX ACLs: {exc}")
        venv = _venv(project / "venv")
        launcher = venv / "bin" / NAME
        cache = tmp_path / "uv-cache" / "archive-v0" / "x" / "brokerd-0.1.0.data" / "scripts"  # no default ACL
        cache.mkdir(parents=True)
        shutil.copy(LAUNCHER, cache / NAME)
        (cache / NAME).chmod(0o755)
        launcher.unlink()
        os.link(cache / NAME, launcher)  # uv: the cache's file, moved/linked into bin/
    else:
        venv = _venv(project / "venv")
        launcher = venv / "bin" / NAME
        try:
            os.setxattr(venv / "bin", "system.posix_acl_default", TEAM_DEFAULT)
        except OSError as exc:
            pytest.skip(f"this file system keeps no POSIX ACLs: {exc}")
    assert os.listxattr(launcher) == []  # nothing a copy could lose
    _reached_the_shim(_try([str(launcher), "get-token"]))
    made = [_files_made_in(venv / "bin", launcher, tmp_path) for _ in range(2)]
    assert _first_line(launcher) != b"#!/bin/sh\n" or made == [[], []], (
        f"{launcher} has no extended attribute to lose, yet it is never written and runs 2 and 3 each create (and "
        f"delete) a file in bin/: {made}")
    assert _leftovers(venv) == []
