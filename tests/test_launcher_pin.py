"""Issue 14 item 1: the installed launcher's first run writes its interpreter into its first line (client_shim/pin.py),
so kubectl's later calls start Python without /bin/sh.  Real venvs (as `pip install .` lays them out, from
tests/test_launcher.py), real runs of the launcher; the shim reaches for a socket nobody serves and says so (exit 3),
which shows it ran."""

from __future__ import annotations

import os
import posix
import resource
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

from client_shim import pin
from tests.support.planted import read_only
from tests.test_launcher import LAUNCHER, PYVER, _reached_the_shim, _run, _venv

NAME = "kubectl-oidc_login"


def _first_line(path: Path) -> bytes:
    return path.read_bytes().partition(b"\n")[0] + b"\n"


def _expected_line(venv: Path) -> bytes:
    """``#!<the base interpreter the venv's python links to> -IS``: what the venv itself runs, outside it."""
    outside = next(os.readlink(p) for p in sorted((venv / "bin").glob("python*"))
                   if os.path.islink(p) and os.readlink(p).startswith("/"))
    return b"#!" + outside.encode() + b" -IS\n"


def _pinned_text(venv: Path) -> bytes:
    return _expected_line(venv) + LAUNCHER.read_bytes().partition(b"\n")[2]


def _leftovers(venv: Path) -> list[str]:
    return sorted(p.name for p in (venv / "bin").iterdir() if p.name.endswith(".tmp"))


def test_the_first_run_writes_the_interpreter_and_later_runs_need_no_shell(tmp_path: Path) -> None:
    venv = _venv(tmp_path / "venv")
    launcher = venv / "bin" / NAME
    mode = launcher.stat().st_mode
    assert _first_line(launcher) == b"#!/bin/sh\n"
    _reached_the_shim(_run([str(launcher), "get-token"]))
    # Only the first line changed, to the interpreter the venv's python links to outside the venv; mode kept.
    pinned = _pinned_text(venv)
    assert launcher.read_bytes() == pinned
    assert launcher.stat().st_mode == mode and _leftovers(venv) == []
    _reached_the_shim(_run([str(launcher), "get-token"]))
    assert launcher.read_bytes() == pinned  # written once
    # `sh` on the file still runs the shell part, and changes nothing.
    _reached_the_shim(_run(["/bin/sh", str(launcher), "get-token"]))
    assert launcher.read_bytes() == pinned
    # With the venv's python gone, the written launcher hands over to the shell part, whose one line says so.
    for link in (venv / "bin").glob("python*"):
        link.unlink()
    gone = _run([str(launcher), "get-token"])
    assert gone.returncode == 3 and "no working python beside this launcher" in gone.stderr, gone.stderr
    assert gone.stderr.count("\n") == 1 and launcher.read_bytes() == pinned


def test_a_written_launcher_still_works_moved_and_through_a_pipx_link(tmp_path: Path) -> None:
    venv = _venv(tmp_path / "venv")
    _reached_the_shim(_run([str(venv / "bin" / NAME), "get-token"]))
    assert _first_line(venv / "bin" / NAME) != b"#!/bin/sh\n"
    home = tmp_path / "pipx"
    (home / "venvs").mkdir(parents=True)
    moved = home / "venvs" / "brokerd"
    venv.rename(moved)
    _reached_the_shim(_run([str(moved / "bin" / NAME), "get-token"]))
    links = tmp_path / "local-bin"
    links.mkdir()
    (links / "relative").symlink_to(Path("..") / "pipx" / "venvs" / "brokerd" / "bin" / NAME)
    (links / NAME).symlink_to("relative")  # a chain of links, the first relative
    # No PIPX_HOME, no pipx home under HOME, no readlink on PATH: found by the interpreter's own readlink.
    _reached_the_shim(_run([str(links / NAME), "get-token"],
                           {"HOME": str(tmp_path / "nobody"), "PATH": "/nonexistent", "PIPX_HOME": "/nonexistent"}))
    # Called through a relative path, from the directory holding the link.
    result = subprocess.run([f"./{NAME}", "get-token"], cwd=links, capture_output=True, text=True, timeout=60,
                            env={**os.environ, "BROKERD_SOCKET": "/nonexistent/brokerd.sock",
                                 "BROKERD_NO_AUTOSTART": "1"}, stdin=subprocess.DEVNULL)
    _reached_the_shim(result)


def test_a_written_launcher_starts_the_daemon_with_the_venvs_python(tmp_path: Path) -> None:
    """The kernel starts the base interpreter; the daemon it autostarts must still be the venv's python (which
    has brokerd), not the base one (which has not)."""
    venv = _venv(tmp_path / "venv")
    launcher = venv / "bin" / NAME
    _reached_the_shim(_run([str(launcher), "get-token"]))
    assert launcher.read_bytes() == _pinned_text(venv)
    record = tmp_path / "started"
    stand_in = venv / "lib" / PYVER / "site-packages" / "brokerd"  # a daemon that says who runs it, then fails
    stand_in.mkdir()
    (stand_in / "__init__.py").write_text("")
    (stand_in / "__main__.py").write_text(f"import sys\nopen({str(record)!r}, 'w').write(sys.executable)\n"
                                          "sys.exit(1)\n")
    sock_dir = tmp_path / "run"
    sock_dir.mkdir(mode=0o700)
    result = _run([str(launcher), "get-token"], {"BROKERD_SOCKET": str(sock_dir / "brokerd.sock"),
                                                 "BROKERD_NO_AUTOSTART": ""})
    assert result.returncode == 3 and "the daemon exited at start" in result.stderr, result.stderr
    assert record.read_text() == str(venv / "bin" / "python")


def test_twelve_first_runs_at_once_write_one_launcher(tmp_path: Path) -> None:
    venv = _venv(tmp_path / "venv")
    env = {**os.environ, "BROKERD_SOCKET": "/nonexistent/brokerd.sock", "BROKERD_NO_AUTOSTART": "1"}
    procs = [subprocess.Popen([str(venv / "bin" / NAME), "get-token"], env=env, stdin=subprocess.DEVNULL,
                              stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True) for _ in range(12)]
    for proc in procs:
        out, err = proc.communicate(timeout=60)
        _reached_the_shim(subprocess.CompletedProcess(proc.args, proc.returncode, out, err))
    assert (venv / "bin" / NAME).read_bytes() == _pinned_text(venv)
    assert _leftovers(venv) == []


def _limit_file_size() -> None:
    resource.setrlimit(resource.RLIMIT_FSIZE, (1024, 1024))


def test_a_write_that_fails_leaves_the_launcher_and_no_temp_file(tmp_path: Path) -> None:
    venv = _venv(tmp_path / "venv")
    launcher = venv / "bin" / NAME
    env = {**os.environ, "BROKERD_SOCKET": "/nonexistent/brokerd.sock", "BROKERD_NO_AUTOSTART": "1"}
    # Bytecode first, as pip compiles it at install (CPython would write a truncated .pyc under this limit).
    compiled = subprocess.run([sys.executable, "-m", "compileall", "-q", str(venv / "lib")], capture_output=True,
                              timeout=60)
    assert compiled.returncode == 0, compiled.stderr
    # Files may grow to 1 KiB only: the new launcher cannot be written (EFBIG; Python ignores SIGXFSZ).
    result = subprocess.run([str(launcher), "get-token"], env=env, capture_output=True, text=True, timeout=60,
                            stdin=subprocess.DEVNULL, preexec_fn=_limit_file_size)
    _reached_the_shim(result)
    assert launcher.read_bytes() == LAUNCHER.read_bytes() and _leftovers(venv) == []
    _reached_the_shim(_run([str(launcher), "get-token"]))  # and the next run writes it
    assert launcher.read_bytes() == _pinned_text(venv)


def _venv_with_python_at(tmp_path: Path, python: Path) -> Path:
    """A venv whose python links to ``python`` (itself a link to this interpreter's base)."""
    base = os.path.realpath(getattr(sys, "_base_executable", sys.executable))
    python.parent.mkdir(parents=True, exist_ok=True)
    python.symlink_to(base)
    venv = _venv(tmp_path / "venv")
    for link in (venv / "bin").glob("python*"):
        link.unlink()
    (venv / "bin" / "python").symlink_to(python)
    return venv


@pytest.mark.parametrize("where", ["with space/python3", "long-" + "x" * 120 + "/python3"])
def test_an_interpreter_path_a_first_line_cannot_hold_is_not_written(tmp_path: Path, where: str) -> None:
    venv = _venv_with_python_at(tmp_path, tmp_path / where)
    for _ in range(2):
        _reached_the_shim(_run([str(venv / "bin" / NAME), "get-token"]))
    assert (venv / "bin" / NAME).read_bytes() == LAUNCHER.read_bytes()


def test_a_venv_made_with_copies_keeps_the_shell(tmp_path: Path) -> None:
    """--copies: bin/python is the venv's own file, which a moved venv would not have at the old path."""
    venv = _venv(tmp_path / "venv", base=os.path.realpath(getattr(sys, "_base_executable", sys.executable)),
                 copies=True)
    _reached_the_shim(_run([str(venv / "bin" / NAME), "get-token"]))
    assert (venv / "bin" / NAME).read_bytes() == LAUNCHER.read_bytes()
    assert pin.pin(str(venv / "bin" / NAME), str(venv / "bin" / "python")) == (
        "the venv's python does not link outside the venv by an absolute path")


@pytest.mark.skipif(os.geteuid() != 0, reason="giving a file to another uid needs root")
def test_another_users_launcher_is_not_written(tmp_path: Path) -> None:
    venv = _venv(tmp_path / "venv")
    os.chown(venv / "bin" / NAME, 4321, 4321)
    _reached_the_shim(_run([str(venv / "bin" / NAME), "get-token"]))
    assert (venv / "bin" / NAME).read_bytes() == LAUNCHER.read_bytes()
    assert (venv / "bin" / NAME).stat().st_uid == 4321


def test_the_interpreter_is_the_first_absolute_link_out_of_the_venv(tmp_path: Path) -> None:
    bin_dir = tmp_path / "v" / "bin"
    bin_dir.mkdir(parents=True)
    (bin_dir / "python").symlink_to("python3")
    (bin_dir / "python3").symlink_to(bin_dir / "python3.11")  # absolute, but inside the venv: followed
    (bin_dir / "python3.11").symlink_to("/usr/bin/python3")
    assert pin.interpreter(str(bin_dir)) == "/usr/bin/python3"
    (bin_dir / "python3.11").unlink()
    (bin_dir / "python3.11").symlink_to("../../../usr/bin/python3")  # leaves the venv relatively: lost on a move
    assert pin.interpreter(str(bin_dir)) is None
    (bin_dir / "python3.11").unlink()
    assert pin.interpreter(str(bin_dir)) is None  # dangling
    (bin_dir / "python3.11").symlink_to("python")  # a loop
    assert pin.interpreter(str(bin_dir)) is None


def test_a_planted_temp_name_is_not_written_through(tmp_path: Path) -> None:
    venv = _venv(tmp_path / "venv")
    launcher = venv / "bin" / NAME
    victim = tmp_path / "victim"
    victim.write_text("mine\n")
    (venv / "bin" / f".{NAME}.{os.getpid()}.tmp").symlink_to(victim)
    with pytest.raises(FileExistsError):
        pin.pin(str(launcher), str(venv / "bin" / "python"))
    assert victim.read_text() == "mine\n" and launcher.read_bytes() == LAUNCHER.read_bytes()


def test_a_launcher_replaced_while_it_is_written_is_left_to_its_own_first_run(tmp_path: Path,
                                                                             monkeypatch: pytest.MonkeyPatch) -> None:
    """pip reinstalls between the read and the rename: the new file stays, the temp file goes."""
    venv = _venv(tmp_path / "venv")
    launcher = venv / "bin" / NAME
    real_fsync = os.fsync

    def reinstall_meanwhile(fd: int) -> None:
        real_fsync(fd)
        fresh = launcher.with_name("fresh")
        fresh.write_bytes(LAUNCHER.read_bytes() + b"# a newer release\n")
        fresh.rename(launcher)

    monkeypatch.setattr(posix, "fsync", reinstall_meanwhile)  # the module pin.py calls it through
    assert pin.pin(str(launcher), str(venv / "bin" / "python")) == "the launcher changed while it was being written"
    assert launcher.read_bytes().endswith(b"# a newer release\n") and _leftovers(venv) == []


def test_a_line_that_can_no_longer_be_written_goes_back_to_the_shell(tmp_path: Path) -> None:
    """The venv's python is re-pointed where a #! line cannot name it (a path with a space): the written line is
    stale, the run hands over to the shell part, and the launcher gets `#!/bin/sh` back rather than a second start
    of Python on every run."""
    venv = _venv(tmp_path / "venv")
    launcher = venv / "bin" / NAME
    _reached_the_shim(_run([str(launcher), "get-token"]))
    assert launcher.read_bytes() == _pinned_text(venv)
    spaced = tmp_path / "with space" / "python3"
    spaced.parent.mkdir()
    shutil.copy(os.path.realpath(getattr(sys, "_base_executable", sys.executable)), spaced)  # another file
    for link in (venv / "bin").glob("python*"):
        link.unlink()
    (venv / "bin" / "python").symlink_to(spaced)
    _reached_the_shim(_run([str(launcher), "get-token"]))
    assert launcher.read_bytes() == LAUNCHER.read_bytes() and _leftovers(venv) == []
    _reached_the_shim(_run([str(launcher), "get-token"]))


@pytest.mark.skipif(os.geteuid() != 0 or shutil.which("unshare") is None,
                    reason="a read-only bind mount needs root and unshare -m")
def test_a_stale_line_that_cannot_be_rewritten_says_so_once_per_run(tmp_path: Path) -> None:
    """The venv was pointed at another interpreter, and the install is read-only now: each run starts Python twice
    (the named one checks, the venv's runs), so the person gets one line saying why and what to do."""
    venv = _venv(tmp_path / "venv")
    launcher = venv / "bin" / NAME
    _reached_the_shim(_run([str(launcher), "get-token"]))
    pinned = launcher.read_bytes()
    assert pinned == _pinned_text(venv)
    other = tmp_path / "other-release" / "python3"
    other.parent.mkdir()
    shutil.copy(os.path.realpath(getattr(sys, "_base_executable", sys.executable)), other)
    for link in (venv / "bin").glob("python*"):
        link.unlink()
    (venv / "bin" / "python").symlink_to(other)
    result = _run([*read_only(venv), str(launcher), "get-token"])
    _reached_the_shim(result)
    lines = result.stderr.splitlines()
    assert len(lines) == 2 and "cannot be rewritten (it or its directory is not writable)" in lines[1], result.stderr
    assert "reinstall brokerd" in lines[1] and launcher.read_bytes() == pinned


def opened_by(argv: list[str], tmp_path: Path) -> str:
    """Every path one run opened (strace -f -e openat), after checking the run reached the shim."""
    log = tmp_path / "openat.log"
    result = subprocess.run(["strace", "-f", "-qq", "-e", "trace=openat", "-o", str(log), *argv],
                            env={**os.environ, "BROKERD_SOCKET": "/nonexistent/brokerd.sock",
                                 "BROKERD_NO_AUTOSTART": "1"},
                            capture_output=True, text=True, timeout=60, stdin=subprocess.DEVNULL)
    _reached_the_shim(result)
    return log.read_text()


def loaded_pin(opened: str) -> bool:
    """Whether client_shim.pin was loaded: its source, or its cached bytecode."""
    return "client_shim/pin.py" in opened or "client_shim/__pycache__/pin." in opened


@pytest.mark.skipif(shutil.which("strace") is None or os.geteuid() != 0 or shutil.which("unshare") is None,
                    reason="strace observes the opens; a read-only bind mount needs root and unshare -m")
def test_where_nothing_can_be_written_the_shell_part_does_not_ask_python_to_try(tmp_path: Path) -> None:
    """A read-only install, or a venv made with --copies: every run goes through the shell part, and loading
    client_shim.pin to find out again that nothing can be written would cost each of them 0.4 ms."""
    venv = _venv(tmp_path / "venv")
    launcher = venv / "bin" / NAME
    opened = opened_by([*read_only(venv), str(launcher), "get-token"], tmp_path)
    assert "client_shim/core" in opened and not loaded_pin(opened)
    assert launcher.read_bytes() == LAUNCHER.read_bytes()
    (venv / "bin" / "python").unlink()  # a copy, as --copies leaves it: not a link
    shutil.copy(os.path.realpath(getattr(sys, "_base_executable", sys.executable)), venv / "bin" / "python")
    opened = opened_by([str(launcher), "get-token"], tmp_path)
    assert "client_shim/core" in opened and not loaded_pin(opened)
    assert launcher.read_bytes() == LAUNCHER.read_bytes()
    # Writable, with a linked python: it does try (and write).
    (venv / "bin" / "python").unlink()
    (venv / "bin" / "python").symlink_to("python3")
    opened = opened_by([str(launcher), "get-token"], tmp_path)
    assert loaded_pin(opened) and launcher.read_bytes() == _pinned_text(venv)


def test_an_acl_set_on_the_launcher_alone_is_not_lost(tmp_path: Path) -> None:
    """An ACL the directory hands down comes with the new file (tests/test_review20_breaks.py); one set on the
    launcher alone (setfacl -m u:4321:rx) would not: then nothing is written, and no temporary file stays."""
    import struct

    venv = _venv(tmp_path / "venv")
    launcher = venv / "bin" / NAME
    user_obj, user, group_obj, mask, other, undefined = 1, 2, 4, 0x10, 0x20, 0xFFFFFFFF
    acl = struct.pack("<I", 2) + b"".join(struct.pack("<HHI", *entry) for entry in (
        (user_obj, 7, undefined), (user, 5, 4321), (group_obj, 5, undefined), (mask, 5, undefined),
        (other, 5, undefined)))
    try:
        os.setxattr(launcher, "system.posix_acl_access", acl)
    except OSError as exc:
        pytest.skip(f"this file system keeps no POSIX ACLs: {exc}")
    _reached_the_shim(_run([str(launcher), "get-token"]))
    assert launcher.read_bytes() == LAUNCHER.read_bytes() and _leftovers(venv) == []
    assert pin.pin(str(launcher), str(venv / "bin" / "python")) == (
        "the launcher has extended attributes (an ACL, a capability) a new file would not get")
    assert os.getxattr(launcher, "system.posix_acl_access") == acl and _leftovers(venv) == []
