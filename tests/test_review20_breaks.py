"""Review 20: attacks on a6094e3 (the shell part asks Python to write the first line only for a writable venv with a
linked python, pyvenv.cfg and /proc, or for a line written before) and on the whole change once more.

Every test here fails on a6094e3.  Real venvs (tests/test_launcher.py's _venv), real runs of the launcher; what a run
loads is observed with strace, as in tests/test_review19_breaks.py.  One cause: the shell gate still lets through
installs that pin() refuses on every run, so each kubectl call loads client_shim.pin, opens, reads and checks the
launcher (0.3-0.4 ms) and never gains the 0.8 ms the written line would save, which is what 68ec821 and a6094e3 exist
to prevent ("elsewhere it is not even asked").
"""

from __future__ import annotations

import os
import shutil
import struct
import subprocess
import tempfile
from collections.abc import Iterator
from pathlib import Path

import pytest

from tests.test_launcher import LAUNCHER, PYVER, _reached_the_shim, _venv
from tests.test_review19_breaks import ENV, _later_runs_pay_for_nothing

NAME = "kubectl-oidc_login"

needs_strace = pytest.mark.skipif(shutil.which("strace") is None, reason="strace observes what a run loads")


def _acl(entries: list[tuple[int, int, int]]) -> bytes:
    """A POSIX ACL as the kernel's system.posix_acl_* xattrs hold it (what setfacl writes)."""
    return struct.pack("<I", 2) + b"".join(struct.pack("<HHI", tag, perm, ident) for tag, perm, ident in entries)


# 1 --------------------------------------------------------------------------------------------------------------

@needs_strace
def test_a_venv_under_a_default_acl_is_written_or_not_asked(tmp_path: Path) -> None:
    """Breaks the premise of the change (0.8 ms a call) and a6094e3's own promise ("elsewhere it is not even asked")
    for every install on a file system that lists an ACL on each file: a directory with a default ACL (a shared
    project directory, `setfacl -d -m g:team:rx`), and, likely the most common, a home on NFSv4, whose client lists
    system.nfs4_acl on every file.  pin()'s _read refuses any xattr but the SELinux label ("extended attributes a
    copy would lose"), while the shell gate (writable bin/, linked python, pyvenv.cfg, /proc) passes: every kubectl
    call loads client_shim.pin, reads and checks the launcher, and the line is never written.  The refusal is
    needless here: the temporary file is created in the same directory and inherits the same default ACL, so after
    fchmod its ACL is byte for byte the launcher's (checked by hand: getxattr equal)."""
    user_obj, user, group_obj, mask, other, undefined = 1, 2, 4, 0x10, 0x20, 0xFFFFFFFF
    project = tmp_path / "project"
    project.mkdir()
    try:
        os.setxattr(project, "system.posix_acl_default",
                    _acl([(user_obj, 7, undefined), (user, 5, 4321), (group_obj, 5, undefined), (mask, 5, undefined),
                          (other, 5, undefined)]))
    except OSError as exc:
        pytest.skip(f"this file system keeps no POSIX ACLs: {exc}")
    venv = _venv(project / "venv")  # made under the project directory: every file inherits its default ACL
    launcher = venv / "bin" / NAME
    assert "system.posix_acl_access" in os.listxattr(launcher)
    _later_runs_pay_for_nothing(launcher, tmp_path)


# 2 --------------------------------------------------------------------------------------------------------------

@pytest.fixture
def shared_dir() -> Iterator[Path]:
    """A directory other uids can reach (pytest's tmp_path is root's, 0700)."""
    where = Path(tempfile.mkdtemp(prefix="brokerd-review20-", dir="/tmp"))
    where.chmod(0o755)
    try:
        yield where
    finally:
        shutil.rmtree(where, ignore_errors=True)


@needs_strace
@pytest.mark.skipif(os.geteuid() != 0 or shutil.which("setpriv") is None or PYVER != "python3.11"
                    or not os.access("/usr/bin/python3.11", os.X_OK),
                    reason="a second uid needs root and setpriv; a base python others may run")
def test_a_team_venv_installed_by_another_member_is_not_asked_on_every_run(shared_dir: Path, tmp_path: Path) -> None:
    """The same break for a venv shared by a team: a group-writable (setgid) directory where any member may
    `pip install -U brokerd`, so bin/ is writable by the group and the launcher belongs to whoever installed it.
    For every other member the gate passes ([ -w "$d" ] holds through the group) and pin() returns "the launcher is
    another user's" on every run: each call pays for loading pin and reading the launcher, forever if the installer
    (an admin, a CI account) never runs kubectl itself.  The shell could tell with a builtin (`[ -O "$0" ]`, dash
    has it) as cheaply as it tells the other cases.  Here uid 4321 installed it, uid 4322 (group 4321) runs it."""
    venv = _venv(shared_dir / "venv", base="/usr/bin/python3.11")
    launcher = venv / "bin" / NAME
    for dirpath, dirnames, filenames in os.walk(venv):
        for name in [dirpath, *(os.path.join(dirpath, n) for n in dirnames + filenames)]:
            os.lchown(name, 4321, 4321)
    (venv / "bin").chmod(0o2775)  # the team's directory: group-writable, setgid
    member = ["setpriv", "--reuid", "4322", "--regid", "4321", "--clear-groups"]
    env = {**os.environ, **ENV, "HOME": str(shared_dir)}
    first = subprocess.run([*member, str(launcher), "get-token"], env=env, capture_output=True, text=True, timeout=60,
                           stdin=subprocess.DEVNULL)
    _reached_the_shim(first)
    assert launcher.read_bytes() == LAUNCHER.read_bytes()  # another member's launcher: rightly not written
    log = tmp_path / "openat.log"
    loaded = []
    for _ in range(2):
        result = subprocess.run(["strace", "-f", "-qq", "-e", "trace=openat", "-o", str(log), *member, str(launcher),
                                 "get-token"], env=env, capture_output=True, text=True, timeout=60,
                                stdin=subprocess.DEVNULL)
        _reached_the_shim(result)
        loaded.append(any("client_shim/pin.py" in line or "client_shim/__pycache__/pin." in line
                          for line in log.read_text().splitlines()))
    assert loaded == [False, False], (
        f"{launcher} is another member's and never written by this one, yet every run loads client_shim.pin "
        f"(runs 2 and 3: {loaded})")

