"""Review 6: attacks on 85d6219 (the round-5 fixes: _json_line, format_entry/_field of any type, a write-only
trail, _last_byte, the shim's _write/_err on a non-blocking stdout and stderr).

test_held_*: attacks that held (they pass; kept as regression tests).  Every other test fails on the reviewed tree
(85d6219) and shows one break."""

from __future__ import annotations

import json
import os
import select
import socket
import subprocess
import sys
import threading
import time
from pathlib import Path

import pytest

from brokerd import audit
from brokerd.audit import AuditLog, read_entries
from client_shim import protocol
from tests.support.daemon import ROOT
from tests.support.pipes import full_nonblocking_pipe
from tests.support.trail import brokerd_audit, good_record


def _trail(tmp_path: Path, odd: str) -> Path:
    state = tmp_path / "state"
    state.mkdir(mode=0o700)
    (state / audit.AUDIT_FILE).write_text(good_record(0) + "\n" + odd + "\n" + good_record(1) + "\n")
    return state


# -- the reader ------------------------------------------------------------------------------------------------------


@pytest.mark.parametrize("odd", ['{"ts":1700000000,"user":' + "[" * 5000 + "]" * 5000 + "}",
                                 "[" * 100_000])
@pytest.mark.parametrize("extra", [[], ["--json"]])
def test_brokerd_audit_survives_a_deeply_nested_line(tmp_path: Path, odd: str, extra: list[str]) -> None:
    """read_entries catches only ValueError around json.loads (audit.py:464-465), but json.loads of a line nested
    deeper than the recursion limit raises RecursionError (not a ValueError): a traceback, exit 1, and every
    record after the line is not shown.  A torn or edited trail is what round 5 set out to survive."""
    done = brokerd_audit(_trail(tmp_path, odd), *extra)
    assert "Traceback" not in done.stderr, done.stderr[-400:]
    assert done.returncode == 0 and len(done.stdout.splitlines()) == 2, (done.returncode, done.stdout[-400:])


@pytest.mark.parametrize("odd", ['{"ts":1700000000,"user":NaN}', '{"ts":1700000000,"caller":{"pid":1e999}}',
                                 '{"ts":1700000000,"how":-Infinity}'])
def test_brokerd_audit_json_is_strict_json(tmp_path: Path, odd: str) -> None:
    """The writer now keeps the trail strict JSON because "jq and other readers refuse" NaN/Infinity
    (audit.py:479), but `brokerd audit --json` re-dumps what json.loads accepted with allow_nan left True
    (cli_local.py:116): an edited line with NaN, 1e999 or -Infinity in any field but ts comes out as a NaN /
    Infinity token, and `brokerd audit --json | jq` stops there."""
    done = brokerd_audit(_trail(tmp_path, odd), "--json")
    assert done.returncode == 0, done.stderr[-400:]
    for line in done.stdout.splitlines():
        def refuse(name: str, line: str = line) -> None:
            pytest.fail(f"{name} in --json output: {line}")

        json.loads(line, parse_constant=refuse)


# -- the shim: WRITE_WAIT is per write, not per run ----------------------------------------------------------------

CHILD_SHIM = r"""
import sys, time
sys.path.insert(0, sys.argv[1])
from client_shim import core
core.WRITE_WAIT = float(sys.argv[2])
began = time.monotonic()
code = core.main(["get-token", "--issuer-url=https://i", "--client-id=c"])
sys.__stdout__.flush()
import os
os.write(int(sys.argv[3]), b"%d %.3f" % (code, time.monotonic() - began))
"""


def _fake_daemon(directory: Path, messages: int) -> tuple[socket.socket, threading.Thread]:
    directory.mkdir(mode=0o700)
    server = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    server.bind(str(directory / "brokerd.sock"))
    server.listen(1)
    server.settimeout(30)

    def serve() -> None:
        try:
            conn, _ = server.accept()
        except OSError:
            return
        with conn:
            conn.settimeout(30)
            conn.recv(65536)
            for n in range(messages):
                conn.sendall(protocol.message_line(f"login step {n}"))
            conn.sendall(protocol.RESULT + b'{"kind":"ExecCredential"}\n')
            time.sleep(0.2)

    thread = threading.Thread(target=serve, daemon=True)
    thread.start()
    return server, thread


def _run_shim(tmp_path: Path, messages: int, wait: float, *, same_pipe: bool) -> tuple[int, float]:
    server, thread = _fake_daemon(tmp_path / "run", messages)
    read, write = full_nonblocking_pipe()
    report_r, report_w = os.pipe()
    try:
        env = dict(os.environ, BROKERD_SOCKET=str(tmp_path / "run" / "brokerd.sock"), BROKERD_NO_AUTOSTART="1")
        stdout = write if same_pipe else subprocess.DEVNULL
        proc = subprocess.Popen([sys.executable, "-c", CHILD_SHIM, str(ROOT), str(wait), str(report_w)], env=env,
                                stdout=stdout, stderr=write, stdin=subprocess.DEVNULL, pass_fds=(report_w,))
        os.close(report_w)
        report_w = -1
        proc.wait(timeout=60)  # the pipe is never read: it stays full
        assert select.select([report_r], [], [], 5)[0]
        code, took = os.read(report_r, 100).split()
        return int(code), float(took)
    finally:
        for fd in (read, write, report_r, report_w):
            if fd >= 0:
                os.close(fd)
        server.close()
        thread.join(5)


def test_shim_messages_to_a_stuck_stderr_wait_once_not_once_each(tmp_path: Path) -> None:
    """_err (core.py:47-52) waits up to WRITE_WAIT on a full non-blocking stderr for EVERY line and forgets that
    the last one timed out: a login tells the person several lines (shimcaller.tell splits text into one MESSAGE
    per line), so with a stuck stderr the credential reaches kubectl only after lines x 30 s (5 lines: 150 s),
    long after WRITE_WAIT.  Once stderr took nothing for WRITE_WAIT, later lines should be dropped at once."""
    wait = 0.4
    code, took = _run_shim(tmp_path, messages=5, wait=wait, same_pipe=False)
    assert code == 0
    assert took < 2 * wait, f"the shim spent {took:.2f} s on a stderr that takes nothing (WRITE_WAIT {wait} s)"


def test_shim_with_stdout_and_stderr_on_one_stuck_pipe_gives_up_within_write_wait(tmp_path: Path) -> None:
    """`kubectl ... 2>&1 | stuck`: stdout and stderr are one full non-blocking pipe.  main() waits WRITE_WAIT on
    stdout (core.py:390), then _err waits WRITE_WAIT again on the same pipe for the line saying so (core.py:392):
    the shim hangs 2 x WRITE_WAIT (60 s) before exit 3."""
    wait = 0.4
    code, took = _run_shim(tmp_path, messages=0, wait=wait, same_pipe=True)
    assert code == 3
    assert took < 1.6 * wait, f"the shim took {took:.2f} s to give up (WRITE_WAIT {wait} s)"


# -- held ------------------------------------------------------------------------------------------------------------


@pytest.mark.parametrize("user", ["\x1b]0;pwned\x07", "a\nb\rc", "\u202eevil", "\udcff", "\x9b31m"])
def test_held_brokerd_audit_text_escapes_control_characters(tmp_path: Path, user: str) -> None:
    state = tmp_path / "state"
    state.mkdir(mode=0o700)
    doc = json.loads(good_record(0))
    doc.update(user=user, issuer=[user], client_id={"k": user}, how=user, caller={"exe": "/x/" + user, "pid": 3})
    (state / audit.AUDIT_FILE).write_text(json.dumps(doc) + "\n")
    for extra in ([], ["--json"]):
        done = brokerd_audit(state, *extra)
        assert done.returncode == 0 and "Traceback" not in done.stderr, done.stderr[-400:]
        out = done.stdout.rstrip("\n")
        assert out.isprintable() and "\n" not in out, repr(out)


@pytest.mark.parametrize("ts", ["-6.19e10", "2.49e11", "1e400", "-1e400", "1" + "0" * 300, "true", '"1"', "null"])
def test_held_brokerd_audit_with_an_edge_ts(tmp_path: Path, ts: str) -> None:
    done = brokerd_audit(_trail(tmp_path, '{"ts":' + ts + ',"how":"cache"}'))
    assert done.returncode == 0 and "Traceback" not in done.stderr, done.stderr[-400:]


@pytest.mark.parametrize("now", [-6.19e10, 2.49e11, -6.2e10, 2.5e11, float("nan"), 10 ** 400, True])
async def test_held_every_entry_is_kept(tmp_path: Path, now: float) -> None:
    peer = audit.PeerInfo(pid=2 ** 31 - 1, uid=2 ** 32 - 1, gid=0, exe="/opt/\udcff\x1b", ppid=1,
                          parent_exe="\ud800")
    trail = AuditLog(tmp_path)
    trail.start()
    try:
        trail.record(audit.entry(now=now, session="\udcff" * 20, issuer="https://i/\u202e", client_id="c\x00",
                                 user="\ud83d", how="login", peer=peer, server="https://[::1]:6443/p"))
    finally:
        await trail.close()
    [doc] = list(read_entries(tmp_path))
    assert doc["caller"]["exe"] == "/opt/\udcff\x1b" and doc["user"] == "\ud83d"
    assert "Traceback" not in audit.format_entry(doc)


def test_held_write_only_trail_without_root_reads_back(tmp_path: Path) -> None:
    tmp_path.chmod(0o700)
    trail = tmp_path / audit.AUDIT_FILE
    for mode in (0o200, 0o700, 0o644, 0o4600):
        trail.write_text(good_record(0) + "\n" + good_record(1)[:20])
        trail.chmod(mode)
        audit.write_lines(tmp_path, [good_record(2)])
        assert trail.stat().st_mode & 0o777 == 0o600, oct(trail.stat().st_mode)
        assert [e["n"] for e in read_entries(tmp_path)] == [0, 2]


def test_held_last_byte_unknown_starts_a_new_line(tmp_path: Path) -> None:
    fd = os.open(tmp_path / "f", os.O_WRONLY | os.O_CREAT, 0o600)
    try:
        os.write(fd, b"abc")
        assert audit._last_byte(fd, 3) == b""
    finally:
        os.close(fd)


# -- older than 85d6219, but still a traceback in `brokerd audit` ----------------------------------------------------


def test_brokerd_audit_into_head_ends_without_a_traceback(tmp_path: Path) -> None:
    """`brokerd audit | head -1`: print() meets a closed pipe (cli_local.py:116); cli.main (cli.py:341-357) does not
    catch BrokenPipeError: a traceback on stderr and exit 1."""
    state = tmp_path / "state"
    state.mkdir(mode=0o700)
    (state / audit.AUDIT_FILE).write_text("".join(good_record(n) + "\n" for n in range(20_000)))
    env = dict(os.environ, BROKERD_STATE_DIR=str(state))
    proc = subprocess.Popen([sys.executable, "-m", "brokerd", "audit"], env=env, stdout=subprocess.PIPE,
                            stderr=subprocess.PIPE, stdin=subprocess.DEVNULL, cwd=ROOT)
    assert proc.stdout is not None and proc.stderr is not None
    proc.stdout.readline()
    proc.stdout.close()
    err = proc.stderr.read().decode("utf-8", "replace")
    proc.stderr.close()
    proc.wait(timeout=60)
    assert "Traceback" not in err, err[-400:]


def test_brokerd_audit_to_an_ascii_stdout_escapes_rather_than_raises(tmp_path: Path) -> None:
    """for_terminal escapes only non-printable characters: a printable non-ASCII user ("日本") printed to a stdout
    whose encoding cannot hold it (PYTHONIOENCODING=ascii, a C locale without coercion) is UnicodeEncodeError out
    of print() (cli_local.py:116): a traceback, and no later record is shown."""
    state = _trail(tmp_path, '{"ts":1700000000,"user":"日本"}')
    env = dict(os.environ, BROKERD_STATE_DIR=str(state), PYTHONIOENCODING="ascii")
    done = subprocess.run([sys.executable, "-m", "brokerd", "audit"], env=env, capture_output=True, timeout=60,
                          stdin=subprocess.DEVNULL, cwd=ROOT)
    assert b"Traceback" not in done.stderr, done.stderr[-400:]
    assert len(done.stdout.splitlines()) == 3
