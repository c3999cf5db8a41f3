"""Review 8: attacks on fab39ff (cmd_audit's stdout handling, _open_locked's single deadline, LOCK_WAIT = 5 s).
Every test here fails on the reviewed tree and shows one break."""

from __future__ import annotations

import asyncio
import fcntl
import os
import subprocess
import sys
import threading
import time
from pathlib import Path

import pytest

from brokerd import audit
from tests.support.daemon import ROOT
from tests.support.trail import write_trail

N = 3000


def test_brokerd_audit_to_a_nonblocking_stdout_loses_records_silently(tmp_path: Path) -> None:
    """`brokerd audit` with a stdout left O_NONBLOCK (a terminal another program set so: the case the shim waits on,
    core.py:37-50) and a reader that is a moment late.  cmd_audit (cli_local.py:121-130) writes through sys.stdout's
    TextIOWrapper, which on EAGAIN drops what the pipe could not take WITHOUT raising: the new `except OSError`
    branch never runs, so no line on stderr and exit 0 with most records missing."""
    state = write_trail(tmp_path, N)
    read, write = os.pipe()
    os.set_blocking(write, False)
    env = dict(os.environ, BROKERD_STATE_DIR=str(state))
    proc = subprocess.Popen([sys.executable, "-m", "brokerd", "audit"], stdout=write, stderr=subprocess.PIPE,
                            stdin=subprocess.DEVNULL, env=env, cwd=ROOT)
    os.close(write)
    try:
        time.sleep(1.5)  # a pager that starts a moment later
        data = b""
        deadline = time.monotonic() + 30
        while time.monotonic() < deadline and (chunk := os.read(read, 1 << 16)):
            data += chunk
        proc.wait(30)
    finally:
        os.close(read)
        if proc.poll() is None:
            proc.kill()
    assert proc.stderr is not None
    with proc.stderr:
        err = proc.stderr.read().decode()
    lines = data.count(b"\n")
    # Either every record, or a one-line error and a non-zero exit: never a silent, truncated success.
    assert lines == N or (proc.returncode != 0 and err.strip()), (lines, proc.returncode, err[-200:])


def test_open_locked_past_the_deadline_returns_a_rotated_away_file(tmp_path: Path,
                                                                  monkeypatch: pytest.MonkeyPatch) -> None:
    """_open_locked (audit.py:260): `if same or time.monotonic() > deadline: return fd`.  When the lock is won just
    after the single deadline (the other writers, rotating under heavy load, let go during the waiter's last 5 ms
    sleep) the fd it returns is the file it opened seconds ago, which the others rotated away: the batch is written
    to audit.jsonl.N or, after KEEP+1 rotations, to an unlinked file: the record is lost.  (Before fab39ff a
    rotated-away fd was reopened.)  Simulated deterministically: the others rotate while the waiter sleeps."""
    state = tmp_path / "state"
    state.mkdir(mode=0o700)
    path = state / audit.AUDIT_FILE
    audit.write_lines(state, ['{"ts":1,"n":"first"}'])
    monkeypatch.setattr(audit, "LOCK_WAIT", 0.2)
    holder = os.open(path, os.O_RDWR)
    fcntl.flock(holder, fcntl.LOCK_EX)
    real_sleep = time.sleep
    calls = []

    def sleep(seconds: float) -> None:
        calls.append(seconds)
        if len(calls) == 1:
            real_sleep(0.3)  # across the deadline, while the others write and rotate
            for n in range(audit.KEEP + 1):
                audit._rotate(path, audit.KEEP)
                fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_APPEND, 0o600)
                os.write(fd, f'{{"ts":2,"n":"other{n}"}}\n'.encode())
                os.close(fd)
            fcntl.flock(holder, fcntl.LOCK_UN)
        else:
            real_sleep(seconds)

    monkeypatch.setattr(time, "sleep", sleep)
    try:
        audit.write_lines(state, ['{"ts":3,"n":"MINE"}'])
    finally:
        monkeypatch.setattr(time, "sleep", real_sleep)
        os.close(holder)
    kept = "".join(p.read_text() for p in audit.audit_files(state))
    assert '"MINE"' in kept, kept


async def test_lock_wait_equal_to_close_timeout_loses_the_last_records_at_shutdown(tmp_path: Path) -> None:
    """LOCK_WAIT went from 2 s to 5 s (audit.py:235) = CLOSE_TIMEOUT (audit.py:51).  With another daemon holding the
    trail's lock (the case LOCK_WAIT exists for), each batch now takes 5 s before it `appends anyway`, so close()
    can never see a second batch through: a record served 1 s before SIGTERM is dropped ("stopping without the last
    1 record(s)"); with 2 s both batches were written within close's 5 s."""
    state = tmp_path / "state"
    state.mkdir(mode=0o700)
    audit.write_lines(state, ['{"ts":1,"n":"first"}'])
    holder = os.open(state / audit.AUDIT_FILE, os.O_RDWR)
    fcntl.flock(holder, fcntl.LOCK_EX)
    release = threading.Timer(15.0, lambda: fcntl.flock(holder, fcntl.LOCK_UN))
    release.start()
    log = audit.AuditLog(state)
    log.start()
    try:
        log.record({"ts": 2, "n": "A"})
        await asyncio.sleep(1.0)
        log.record({"ts": 3, "n": "B"})  # the last token served
        await asyncio.sleep(0.5)
        await log.close()  # SIGTERM: the process exits right after this
        kept = (state / audit.AUDIT_FILE).read_text()
    finally:
        release.cancel()
        fcntl.flock(holder, fcntl.LOCK_UN)
        os.close(holder)
    assert '"B"' in kept, kept
