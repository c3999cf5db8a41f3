"""Where brokerd keeps its socket, state and config.

The ``BROKERD_*`` overrides come from the environ mapping the caller passes (the CLI passes ``os.environ``);
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

from brokerd.errors import ConfigError
from client_shim.protocol import private_dir_problem

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
    problem = private_dir_problem(str(path), st.st_uid, (st.st_mode & ~0o777) | 0o700, os.geteuid())
    if problem:  # not ours (a looser mode of our own directory is fixed below)
        raise PermissionError(errno.EPERM, problem, str(path))
    mode = stat.S_IMODE(st.st_mode)
    if mode != 0o700:
        log.warning("directory %s had mode %03o; tightening to 0700", path, mode)
        path.chmod(0o700)


def ensure_socket_dir(path: Path) -> None:
    """ensure_private_dir for the socket's directory, refused with the line the shim prints for it too."""
    try:
        ensure_private_dir(path)
    except OSError as exc:
        raise ConfigError(exc.strerror or str(exc)) from None
