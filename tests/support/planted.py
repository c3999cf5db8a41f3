"""What the launcher and shim review tests plant where kubectl runs: a brokerd package in a cloned checkout, and a
machine whose standard directories hold no coreutils (NixOS, Guix), in a private mount namespace."""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
from pathlib import Path


def mark_code(variable: str) -> str:
    """Python that appends ``ran: <its file>`` to the file named by the environment variable ``variable``."""
    return f"import os\nopen(os.environ[{variable!r}], 'a').write('ran: ' + __file__ + '\\n')\n"


def brokerd_package_in_checkout(tmp_path: Path, code: str) -> Path:
    """tmp_path/cloned-repo holding a brokerd/ package whose import runs ``code``: the directory to run in."""
    cwd = tmp_path / "cloned-repo"
    (cwd / "brokerd").mkdir(parents=True)
    (cwd / "brokerd" / "__init__.py").write_text(code)
    (cwd / "brokerd" / "__main__.py").write_text("")
    return cwd


def unshare_mount_ok() -> bool:
    """Can this machine give a test a private mount namespace (``unshare -rm``) in which it may mount?"""
    if not shutil.which("unshare"):
        return False
    try:
        done = subprocess.run(["unshare", "-rm", "sh", "-c", "mount -t tmpfs none /mnt"], capture_output=True,
                              timeout=30)
    except (OSError, subprocess.TimeoutExpired):
        return False
    return done.returncode == 0


def read_only(path: Path) -> list[str]:
    """A prefix that runs a command with ``path`` mounted read-only (a private mount namespace: nothing else sees
    it), as a read-only root file system (Kubernetes' readOnlyRootFilesystem), a read-only NFS /opt or an image
    layer would hold it.  Needs root and unshare -m."""
    return ["unshare", "-m", "sh", "-c", 'mount --bind "$0" "$0" && mount -o remount,bind,ro "$0" && exec "$@"',
            str(path)]


def without_coreutils(tmp_path: Path, path_dirs: list[Path], links: Path) -> subprocess.CompletedProcess[str]:
    """Run links/kubectl-oidc_login get-token with /usr/bin (and /bin) holding only sh and env (and the venv's base
    interpreter if it lives there), PATH=path_dirs: NixOS's layout, whose coreutils are reached through PATH only."""
    fake = tmp_path / "usr-bin"
    fake.mkdir()
    shutil.copy(os.path.realpath("/bin/sh"), fake / "sh")
    env_tool = shutil.which("env")
    assert env_tool
    shutil.copy(os.path.realpath(env_tool), fake / "env")
    hidden = ["/usr/bin"] + ([] if os.path.islink("/bin") else ["/bin"])
    base = os.path.realpath(getattr(sys, "_base_executable", sys.executable))
    for path in {base, os.path.realpath(links / "kubectl-oidc_login")}:
        if os.path.dirname(path) in hidden:
            shutil.copy(path, fake / os.path.basename(path))
    mounts = " && ".join(f"mount --bind {fake} {d}" for d in hidden)
    search = ":".join(str(p) for p in path_dirs)
    script = (f'{mounts} && exec /usr/bin/env -i HOME=/nonexistent PATH={search} '
              'BROKERD_SOCKET=/nonexistent/brokerd.sock BROKERD_NO_AUTOSTART=1 "$0" get-token')
    return subprocess.run(["unshare", "-rm", "sh", "-c", script, str(links / "kubectl-oidc_login")],
                          capture_output=True, text=True, timeout=60, stdin=subprocess.DEVNULL)
