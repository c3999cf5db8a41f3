"""Review 15: attacks on f251983 (the fixes of review 14).  Each test fails on f251983.

1. `_site` takes sys.implementation.name as sysconfig's `{implementation_lower}`, but sysconfig spells it from
   `_get_implementation()`: "Python" on CPython *and on GraalPy* (whose sys.implementation.name is "graalpy"),
   "PyPy" on PyPy only.  A GraalPy venv has lib/python3.11/site-packages; the launcher looks in lib/graalpy3.11,
   the finder fallback lists that missing directory, site.addsitedir adds nothing: every run says "reinstall"
   (exit 3), which cannot help (promise 4).  Before f251983 it worked there.
2. The PATH readlink loop lets a readlink that fails print to stderr: a readlink without -f (macOS before 12.3's
   /usr/bin/readlink, busybox built without it) ahead of a working one on PATH adds its usage text to every kubectl
   call's stderr although the launcher then works; with no working one the person gets that text and then "no
   readlink found" beside the readlink it just ran (promise 2: one clear line).
"""

from __future__ import annotations

import shutil
from pathlib import Path

import pytest

from tests.support.planted import unshare_mount_ok, without_coreutils
from tests.test_launcher import _venv
from tests.test_review14_breaks import _site_for


def test_graalpy_site_packages_is_lib_python() -> None:
    # GraalPy's sysconfig (graalpython/lib-python/3/sysconfig/__init__.py): posix_venv purelib is
    # '{base}/lib/{implementation_lower}{py_version_short}{abi_thread}/site-packages' with _get_implementation()
    # returning 'Python'; sys.implementation.name is 'graalpy'.
    assert _site_for("/v/bin/python", "graalpy", (3, 11), "") == "/v/lib/python3.11/site-packages"


def _setup(tmp_path: Path) -> tuple[Path, Path, Path]:
    venv = _venv(tmp_path / "venv")
    links = tmp_path / "links"
    links.mkdir()
    (links / "kubectl-oidc_login").symlink_to(venv / "bin" / "kubectl-oidc_login")
    old = tmp_path / "old-bin"  # a readlink without -f, as macOS's before 12.3
    old.mkdir()
    (old / "readlink").write_text('#!/bin/sh\necho "readlink: illegal option -- f" >&2\n'
                                  'echo "usage: readlink [-n] [file ...]" >&2\nexit 1\n')
    (old / "readlink").chmod(0o755)
    good = tmp_path / "gnu-bin"
    good.mkdir()
    readlink = shutil.which("readlink")
    assert readlink
    shutil.copy(readlink, good / "readlink")
    return links, old, good


@pytest.mark.skipif(not unshare_mount_ok(), reason="needs unshare -rm and mount (a private mount namespace)")
def test_a_failing_readlink_on_path_adds_nothing_to_stderr_when_a_later_one_works(tmp_path: Path) -> None:
    links, old, good = _setup(tmp_path)
    result = without_coreutils(tmp_path, [old, good, links], links)
    assert result.returncode == 3, result.stderr
    assert result.stderr.startswith("brokerd: no daemon is listening on /nonexistent/brokerd.sock"), result.stderr


@pytest.mark.skipif(not unshare_mount_ok(), reason="needs unshare -rm and mount (a private mount namespace)")
def test_no_working_readlink_gives_one_line(tmp_path: Path) -> None:
    links, old, _good = _setup(tmp_path)
    result = without_coreutils(tmp_path, [old, links], links)
    assert result.returncode == 3, result.stderr
    assert result.stderr.count("\n") == 1, result.stderr
