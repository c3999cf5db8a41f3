"""Review 7: attacks on 5c57078 (cmd_audit's stdout handling and json_line(ascii_only), read_entries' RecursionError,
the shim's _stuck).  Every test here fails on the reviewed tree and shows one break."""

from __future__ import annotations

import os
import select
import subprocess
import sys
import threading
import time
from pathlib import Path

from brokerd import audit
from tests.support.daemon import ROOT
from tests.support.pipes import full_nonblocking_pipe
from tests.support.trail import good_record
from tests.test_review6_breaks import _fake_daemon


def _state(tmp_path: Path, odd: str) -> Path:
    state = tmp_path / "state"
    state.mkdir(mode=0o700)
    (state / audit.AUDIT_FILE).write_text(good_record(0) + "\n" + odd + "\n" + good_record(1) + "\n")
    return state


def _audit(state: Path, *extra: str, shell_redirect: str = "") -> subprocess.CompletedProcess[str]:
    env = dict(os.environ, BROKERD_STATE_DIR=str(state))
    cmd = ["sh", "-c", f'exec "$@" {shell_redirect}', "sh", sys.executable, "-m", "brokerd", "audit", *extra]
    return subprocess.run(cmd, env=env, stdout=None if shell_redirect else subprocess.PIPE, stderr=subprocess.PIPE,
                          text=True, timeout=60, stdin=subprocess.DEVNULL, cwd=ROOT)


def test_brokerd_audit_json_survives_a_nan_beside_a_moderately_deep_nest(tmp_path: Path) -> None:
    """json.loads takes a line nested 600 deep (read_entries, audit.py:464), and json.dumps refuses its NaN
    (ValueError), so json_line (audit.py:485) falls back to _finite (audit.py:496-504): plain Python recursion, two
    frames per level in 3.11 (the comprehension), RecursionError past ~480 levels.  cmd_audit (cli_local.py:121)
    catches only BrokenPipeError: a traceback, exit 1, and NO record printed (not even the good ones)."""
    odd = '{"ts":1700000000,"x":NaN,"user":' + "[" * 600 + "]" * 600 + "}"
    done = _audit(_state(tmp_path, odd), "--json")
    assert "Traceback" not in done.stderr, done.stderr[-300:]
    assert done.returncode == 0 and len(done.stdout.splitlines()) >= 2, (done.returncode, done.stdout[-300:])


def test_brokerd_audit_with_stdout_closed_has_no_traceback(tmp_path: Path) -> None:
    """`brokerd audit >&-`: sys.stdout is None.  Before 5c57078, print() to a None stdout did nothing (exit 0); now
    out.write / out.flush (cli_local.py:121-122) raise AttributeError: a traceback and exit 1."""
    done = _audit(_state(tmp_path, good_record(2)), shell_redirect=">&-")
    assert "Traceback" not in done.stderr, done.stderr[-300:]


def test_brokerd_audit_to_a_full_disk_gives_one_line_not_a_traceback(tmp_path: Path) -> None:
    """`brokerd audit > /dev/full` (a full disk, or stdout opened read-only): out.write/flush raise OSError
    (ENOSPC/EBADF), cmd_audit handles only EPIPE (cli_local.py:123): a traceback.  The promise: bad input/an odd
    environment gives a one-line error."""
    done = _audit(_state(tmp_path, good_record(2)), shell_redirect=">/dev/full")
    assert "Traceback" not in done.stderr, done.stderr[-300:]
    assert done.returncode != 0


CHILD = r"""
import sys, time, os
sys.path.insert(0, sys.argv[1])
from client_shim import core
core.WRITE_WAIT = float(sys.argv[2])
os.set_blocking(1, False)
code = core.main(["get-token", "--issuer-url=https://i", "--client-id=c"])
os.write(int(sys.argv[3]), b"%d" % code)
"""


def test_shim_credential_to_a_briefly_full_stdout_after_a_stuck_stderr(tmp_path: Path) -> None:
    """_stuck (core.py:34, 47) is one flag for the whole run, not per pipe: once a login message waited WRITE_WAIT
    on a stuck stderr, the credential's write to a DIFFERENT, non-blocking stdout that is full only for a moment
    (kubectl reads it a few hundred ms later) is not waited on at all: TimeoutError at the first EAGAIN, exit 3,
    the credential lost although kubectl would have read it well within WRITE_WAIT.  The flag should be per open
    pipe (fstat st_dev/st_ino of the fd that timed out), not global."""
    wait = 1.0
    server, thread = _fake_daemon(tmp_path / "run", messages=1)
    err_r, err_w = full_nonblocking_pipe()  # stderr: never read
    out_r, out_w = full_nonblocking_pipe()  # stdout: full now, drained 0.3 s after the stderr wait ends
    report_r, report_w = os.pipe()
    got = bytearray()

    def drain() -> None:
        time.sleep(wait + 0.3)
        deadline = time.monotonic() + 20
        while time.monotonic() < deadline and select.select([out_r], [], [], deadline - time.monotonic())[0]:
            chunk = os.read(out_r, 1 << 16)
            if not chunk:
                return
            got.extend(chunk)

    reader = threading.Thread(target=drain, daemon=True)
    try:
        env = dict(os.environ, BROKERD_SOCKET=str(tmp_path / "run" / "brokerd.sock"), BROKERD_NO_AUTOSTART="1")
        reader.start()
        proc = subprocess.Popen([sys.executable, "-c", CHILD, str(ROOT), str(wait), str(report_w)], env=env,
                                stdout=out_w, stderr=err_w, stdin=subprocess.DEVNULL, pass_fds=(report_w,))
        for fd in (out_w, report_w):
            os.close(fd)
        out_w = report_w = -1
        proc.wait(timeout=60)
        assert select.select([report_r], [], [], 5)[0]
        code = int(os.read(report_r, 100))
        reader.join(25)
        assert code == 0 and b'"ExecCredential"' in bytes(got), (code, bytes(got[-80:]))
    finally:
        for fd in (err_r, err_w, out_r, out_w, report_r, report_w):
            if fd >= 0:
                os.close(fd)
        server.close()
        thread.join(5)
