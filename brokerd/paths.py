"""Where brokerd keeps its socket, state and config.

The ``BROKERD_*`` overrides come from the environ mapping the caller passes (cli.py passes ``os.environ``);
the defaults come from platformdirs.  Nothing here runs at import.
"""

from __future__ import annotations

import errno
import logging
import os
import stat
import warnings
from collections.abc import Mapping
from pathlib import Path

import platformdirs

log = logging.getLogger("brokerd.paths")

APP = "brokerd"
SOCKET_NAME = "brokerd.sock"


def socket_path(environ: Mapping[str, str]) -> Path:
    """``$BROKERD_SOCKET``, else ``brokerd.sock`` in the platformdirs user runtime dir (``$XDG_RUNTIME_DIR/brokerd``).

    client_shim/core.py computes the same path without platformdirs; tests/test_paths.py keeps the two in step.
    """
    if value := environ.get("BROKERD_SOCKET"):
        return Path(value)
    with warnings.catch_warnings():
        # platformdirs warns when XDG_RUNTIME_DIR is unset and falls back; the fallback is what we want.
        warnings.simplefilter("ignore")
        return Path(platformdirs.user_runtime_dir(APP)) / SOCKET_NAME


def state_dir(environ: Mapping[str, str]) -> Path:
    if value := environ.get("BROKERD_STATE_DIR"):
        return Path(value)
    return Path(platformdirs.user_state_dir(APP))


def config_file(environ: Mapping[str, str]) -> Path:
    if value := environ.get("BROKERD_CONFIG"):
        return Path(value)
    return Path(platformdirs.user_config_dir(APP)) / "config.toml"


def ensure_private_dir(path: Path) -> None:
    """Create ``path`` (and parents) 0700; tighten an existing one that is looser (and say so); refuse one that
    another user owns (PermissionError), since whoever owns it can read or replace what we put there."""
    path.mkdir(mode=0o700, parents=True, exist_ok=True)
    st = path.stat()
    if st.st_uid != os.geteuid():
        raise PermissionError(errno.EPERM, f"directory is owned by uid {st.st_uid}, not by this user", str(path))
    mode = stat.S_IMODE(st.st_mode)
    if mode != 0o700:
        log.warning("directory %s had mode %03o; tightening to 0700", path, mode)
        path.chmod(0o700)
