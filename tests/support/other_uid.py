"""Running code as another user (the one test double the house rules allow: a second uid, from root).

That user cannot read the checkout when it sits in a 0700 directory (root's home, a ``mktemp -d``), so what it runs
is copied first to a directory of its own that everyone may read, and run from there.
"""

from __future__ import annotations

import contextlib
import os
import shutil
import subprocess
import tempfile
from collections.abc import Iterator, Mapping, Sequence
from pathlib import Path

from tests.support.daemon import ROOT

NOBODY = 65534
# The system interpreter, not the venv's: the venv may live in the unreadable checkout too.
SYSTEM_PYTHON = shutil.which("python3", path="/usr/bin:/bin")


def _open_up(top: Path) -> None:
    """Directories 0755 and files 0644 below ``top``, whatever the umask and the source's modes were."""
    top.chmod(0o755)
    for dirpath, dirnames, filenames in os.walk(top):
        for name in dirnames:
            (Path(dirpath) / name).chmod(0o755)
        for name in filenames:
            (Path(dirpath) / name).chmod(0o644)


@contextlib.contextmanager
def readable_shim() -> Iterator[Path]:
    """A copy of the shim package (client_shim/, stdlib only) that any user can run; yields its shim.py.
    Under /tmp explicitly: TMPDIR may point into a private directory as well."""
    base = Path(tempfile.mkdtemp(prefix="bkshim", dir="/tmp"))
    try:
        shutil.copytree(ROOT / "client_shim", base / "client_shim",
                        ignore=shutil.ignore_patterns("__pycache__", "*.pyc"))
        _open_up(base)
        yield base / "client_shim" / "shim.py"
    finally:
        shutil.rmtree(base, ignore_errors=True)


def run_as(uid: int, argv: Sequence[str], env: Mapping[str, str], cwd: Path,
           timeout: float = 30.0) -> subprocess.CompletedProcess[str]:
    """``argv`` as ``uid`` (its own gid, no supplementary groups) through setpriv, in ``cwd``: a directory that
    user can enter, never the checkout."""
    return subprocess.run(["setpriv", f"--reuid={uid}", f"--regid={uid}", "--clear-groups", "--", *argv],
                          env=dict(env), cwd=cwd, capture_output=True, text=True, timeout=timeout,
                          stdin=subprocess.DEVNULL)
