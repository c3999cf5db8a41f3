"""Review 14: attacks on c89618f (the fixes of review 13).

Each test fails on c89618f; the last covers the reviewer's untested note (site-packages' name on free-threaded
CPython and PyPy).  The first: `command -p readlink` looks only in the shell's standard path (confstr _CS_PATH, dash's
built-in default), never in PATH.  Where that path holds no readlink (NixOS and Guix: /bin and /usr/bin hold only sh
and env; coreutils live under /run/current-system/sw/bin, reached through PATH) a launcher reached through a symlink
outside the user's pipx homes (the user's own ~/bin link, a home-manager link) prints "readlink: not found", then
"no working python beside this launcher (/python)" (the empty result taken as a directory), exit 3: it worked before
c89618f, whose PATH lookup found readlink there (promise 2: one clear line; promise 4: it keeps working).
"""

from __future__ import annotations

import os
import shutil
import sys
from pathlib import Path

import pytest

from tests.support.planted import unshare_mount_ok, without_coreutils
from tests.test_launcher import _venv


@pytest.mark.skipif(not unshare_mount_ok(), reason="needs unshare -rm and mount (a private mount namespace)")
def test_a_symlinked_launcher_works_where_the_standard_path_has_no_readlink(tmp_path: Path) -> None:
    venv = _venv(tmp_path / "venv")
    links = tmp_path / "links"  # the user's own bin directory, not a pipx home: the readlink fallback
    links.mkdir()
    (links / "kubectl-oidc_login").symlink_to(venv / "bin" / "kubectl-oidc_login")
    sw = tmp_path / "sw-bin"  # NixOS's /run/current-system/sw/bin: on PATH, not in the standard path
    sw.mkdir()
    readlink = shutil.which("readlink")
    assert readlink
    shutil.copy(readlink, sw / "readlink")
    result = without_coreutils(tmp_path, [sw, links], links)
    assert result.returncode == 3, result.stderr
    assert result.stderr.startswith("brokerd: no daemon is listening on /nonexistent/brokerd.sock"), result.stderr


def test_a_socket_in_the_current_directory_takes_its_autostart_lock_there(tmp_path: Path,
                                                                          monkeypatch: pytest.MonkeyPatch) -> None:
    """BROKERD_SOCKET=x.sock (or ./x.sock, which _clean makes x.sock) in a private current directory: connect()
    checks "." but _autostart takes os.path.dirname(b"x.sock") == b"" as the directory, so its lock is
    b"" + b"/autostart.lock": the root of the filesystem.  A user gets "lost the connection to the daemon:
    Permission denied" (exit 3) and no daemon; root gets /autostart.lock.  (The relative socket itself is left
    alone on purpose; this is the lock beside it.)"""
    from client_shim import core

    monkeypatch.chdir(tmp_path)
    tmp_path.chmod(0o700)
    opened: list[bytes] = []
    real_open = os.open

    def fake_open(path: object, flags: int, mode: int = 0o777, *args: object, **kwargs: object) -> int:
        if isinstance(path, bytes) and path.endswith(b"autostart.lock"):
            opened.append(path)
            raise PermissionError(13, "stopped by the test")
        return real_open(path, flags, mode, *args, **kwargs)  # type: ignore[arg-type]

    monkeypatch.setattr(os, "open", fake_open)
    with pytest.raises(PermissionError):
        core.connect({b"BROKERD_SOCKET": b"x.sock", b"PATH": b"/usr/bin:/bin"})
    assert opened and not opened[0].startswith(b"/"), opened


def _site_for(executable: str, name: str, version: tuple[int, int], abiflags: str) -> str:
    """The launcher's own `_site = ...` statement, run against a stand-in for `sys`."""
    from types import SimpleNamespace

    from tests.test_launcher import LAUNCHER

    text = LAUNCHER.read_text()
    start = text.index("\n_site = ") + 1
    statement = text[start:text.index("\n# Where client_shim is", start)]
    fake = SimpleNamespace(executable=executable, implementation=SimpleNamespace(name=name),
                           version_info=(*version, 0, "final", 0), abiflags=abiflags)
    scope: dict[str, object] = {"sys": fake, "_bin": executable.rpartition("/")[0]}
    exec(statement, scope)
    return os.path.normpath(str(scope["_site"]))  # the launcher leaves ".." to the kernel (bin/../lib/...)


def test_the_launcher_names_site_packages_as_sysconfig_does() -> None:
    """Reviewer's note (no interpreter here to run it): a free-threaded CPython's venv has lib/python3.13t, PyPy's
    lib/pypy3.11; the launcher looked only in lib/pythonX.Y, and then told the person to reinstall, which cannot help.
    This interpreter's own name is checked against sysconfig."""
    import sysconfig

    assert _site_for("/v/bin/python", "cpython", (3, 11), "") == "/v/lib/python3.11/site-packages"
    assert _site_for("/v/bin/python", "cpython", (3, 13), "t") == "/v/lib/python3.13t/site-packages"
    assert _site_for("/v/bin/python", "pypy", (3, 11), "") == "/v/lib/pypy3.11/site-packages"
    here = _site_for("/v/bin/python", sys.implementation.name, sys.version_info[:2], sys.abiflags)
    expected = sysconfig.get_path("purelib", "venv" if "venv" in sysconfig.get_scheme_names() else "posix_prefix",
                                  vars={"base": "/v", "platbase": "/v"})
    assert here == expected
