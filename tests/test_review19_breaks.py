"""Review 19: attacks on 1b1557e and 68ec821 (the shell part decides whether Python may try to write the first line).

Every test here fails on 68ec821.  Real venvs (tests/test_launcher.py's _venv), real runs of the launcher; what a
run loads is observed with strace.  Two causes:

* 68ec821's look-ahead in the shell part (``[ -w "$d" ] && [ -L "$d/python" ]``) is a proxy for "the first line
  can be written" that common installs pass although pin() refuses them on every run: a launcher with more than
  one name (uv installs it as a hard link into its cache) and an install whose python is a link to a binary in the
  same bin/ (conda, the python:3.x container images, a pyenv version used directly).  Each run of those loads
  client_shim.pin and reads and checks the launcher again (about 0.3-0.4 ms, the cost 68ec821 exists to remove)
  and never gains the 0.8 ms the line would save;
* the same look-ahead now also decides for a launcher whose first line was already written: ``sh <launcher>``,
  which the README names as the way to mend a launcher whose interpreter is gone, no longer writes ``#!/bin/sh``
  back where the venv's python is now a copy, so the kernel keeps failing to start it.
"""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

from tests.test_launcher import PYVER, _reached_the_shim, _venv
from tests.test_launcher_pin import _first_line, _venv_with_python_at, loaded_pin, opened_by

NAME = "kubectl-oidc_login"
ENV = {"BROKERD_SOCKET": "/nonexistent/brokerd.sock", "BROKERD_NO_AUTOSTART": "1"}
BASE = os.path.realpath(getattr(sys, "_base_executable", sys.executable))

needs_strace = pytest.mark.skipif(shutil.which("strace") is None, reason="strace observes what a run loads")


def _try(argv: list[str]) -> subprocess.CompletedProcess[str]:
    """Run like kubectl does; an exec the kernel refuses is a result too (returncode -1, the error as stderr)."""
    try:
        return subprocess.run(argv, env={**os.environ, **ENV}, capture_output=True, text=True, timeout=60,
                              stdin=subprocess.DEVNULL)
    except OSError as exc:
        return subprocess.CompletedProcess(argv, -1, "", f"exec failed (what kubectl reports): {exc}")


def _loads_pin(launcher: Path, tmp_path: Path) -> bool:
    """Whether one run of ``launcher`` (checked to reach the shim) opened client_shim.pin, source or bytecode."""
    return loaded_pin(opened_by([str(launcher), "get-token"], tmp_path))


def _later_runs_pay_for_nothing(launcher: Path, tmp_path: Path) -> None:
    """After the first run: either the line was written (the kernel starts Python from now on), or, since it never
    will be, later runs do not load client_shim.pin to find that out again (68ec821's own promise: "elsewhere
    Python is not even asked to try")."""
    _reached_the_shim(_try([str(launcher), "get-token"]))
    if not _first_line(launcher).startswith(b"#!/bin/sh"):
        return  # written: the speed-up works here
    loaded = [_loads_pin(launcher, tmp_path) for _ in range(2)]
    assert loaded == [False, False], (
        f"{launcher} is never written, yet every run loads client_shim.pin again (runs 2 and 3: {loaded})")


# 1 --------------------------------------------------------------------------------------------------------------

@needs_strace
def test_a_launcher_installed_by_uv_as_a_hard_link_does_not_pay_for_pin_on_every_run(tmp_path: Path) -> None:
    """Breaks the change's premise (0.8 ms saved per kubectl call; 68ec821: nothing loaded where nothing can be
    written) for everyone who installs with uv, likely the most common case after pip.  uv (checked: 0.13.9,
    `uv pip install` of brokerd's wheel into a `uv venv`) hard-links files from its cache and moves the wheel's
    .data/scripts into bin/: bin/kubectl-oidc_login has st_nlink 2, its other name
    ~/.cache/uv/archive-v0/<id>/brokerd-0.1.0.data/scripts/kubectl-oidc_login.  The shell part sees a writable bin/
    and a linked python and passes brokerd.portable=pin; pin() refuses a launcher with more than one name ("not a
    regular file with one name") on every run: each kubectl call loads pin, opens, reads and checks the launcher
    (about 0.3 ms measured: 9.07 vs 8.77 ms median against the same venv where pin is not asked), and the line is
    never written.  The uv install is slower than before this change instead of faster.  Here the cache's name is a
    hard link in tmp_path, as uv makes it."""
    venv = _venv(tmp_path / "venv")
    launcher = venv / "bin" / NAME
    cache = tmp_path / "uv-cache" / "archive-v0" / "x" / "brokerd-0.1.0.data" / "scripts"
    cache.mkdir(parents=True)
    os.link(launcher, cache / NAME)
    assert launcher.stat().st_nlink == 2
    _later_runs_pay_for_nothing(launcher, tmp_path)


# 2 --------------------------------------------------------------------------------------------------------------

@needs_strace
def test_an_install_whose_python_links_to_a_binary_beside_it_does_not_pay_for_pin_on_every_run(
        tmp_path: Path) -> None:
    """The same break for the layouts where ``bin/python`` is a relative link to a binary in the same bin/: a conda
    environment (python -> python3.11), the python:3.x container images (/usr/local/bin/python -> python3 ->
    python3.12, where `pip install brokerd` as root puts the launcher beside them), a pyenv version used without a
    venv.  `[ -L "$d/python" ]` holds, so every run loads pin, whose interpreter() finds no absolute path out of
    the prefix ("the venv's python does not link outside the venv by an absolute path"): never written, paid for
    on every call.  Here: a venv made with --copies whose python is then a link to its python3.N copy, and without
    its pyvenv.cfg: a prefix of its own, as conda's and an image's /usr/local are (the shell part asks Python only
    for a venv).  A venv laid out like this by hand still pays: the shell cannot read a link without a process."""
    venv = _venv(tmp_path / "venv", base=BASE, copies=True)
    launcher = venv / "bin" / NAME
    (venv / "bin" / "python").unlink()
    (venv / "bin" / "python").symlink_to(PYVER)  # conda's layout: python -> python3.N, a binary
    assert not (venv / "bin" / PYVER).is_symlink()
    (venv / "pyvenv.cfg").unlink()  # a prefix of its own (conda, /usr/local of an image), not a venv
    _later_runs_pay_for_nothing(launcher, tmp_path)


# 3 --------------------------------------------------------------------------------------------------------------

def test_sh_on_a_launcher_whose_interpreter_is_gone_mends_it_for_a_venv_with_a_copied_python(tmp_path: Path) -> None:
    """Breaks promise 2/3 (never a broken launcher) and the README's own remedy, a regression of 68ec821.  The
    interpreter the first run wrote is removed (pyenv uninstall); the venv is given a python again, as a copy
    (`python -m venv --upgrade --copies`, or a file system without symlinks).  The kernel cannot start the
    launcher (kubectl: "no such file or directory"); the README: "`sh $(command -v kubectl-oidc_login) version`
    runs the shell part, which ... once the venv has a python again, writes the new line" (here #!/bin/sh, as
    pin() does for a python that is not a link).  On 1b1557e it did.  Since 68ec821 the shell part passes
    brokerd.portable=no when bin/python is not a link, so pin() is never asked: `sh` works, the launcher stays
    dead for kubectl for good, and nothing says why."""
    venv = _venv_with_python_at(tmp_path, tmp_path / "old" / "python3")
    launcher = venv / "bin" / NAME
    _reached_the_shim(_try([str(launcher), "get-token"]))
    assert _first_line(launcher) == f"#!{tmp_path / 'old' / 'python3'} -IS\n".encode()
    (tmp_path / "old" / "python3").unlink()  # the interpreter the line names is uninstalled
    assert _try([str(launcher), "get-token"]).returncode == -1  # the kernel's ENOENT, as the README says
    (venv / "bin" / "python").unlink()
    shutil.copy(BASE, venv / "bin" / "python")  # the venv has a python again: a copy
    _reached_the_shim(_try(["/bin/sh", str(launcher), "get-token"]))  # the README's remedy
    result = _try([str(launcher), "get-token"])
    assert result.returncode != -1, (_first_line(launcher), result.stderr)
    _reached_the_shim(result)
