"""Review 5: attacks on 6a61d8e (the round-4 fixes: shared trail under flock, strict JSON, odd timestamps, the
editable mapping, a non-blocking stdout).

test_held_*: attacks that held (they pass; kept as regression tests).  Every other test fails on the reviewed tree
(53d737a) and shows one break."""

from __future__ import annotations

import asyncio
import fcntl
import os
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import pytest

from brokerd import audit
from brokerd.audit import AuditLog, read_entries
from tests.support.daemon import ROOT
from tests.support.pipes import full_nonblocking_pipe, read_until_exit
from tests.support.trail import brokerd_audit, good_record

SHIM = ROOT / "client_shim" / "shim.py"


# -- the reader: `brokerd audit` guards only ts ------------------------------------------------------------------


def test_brokerd_audit_survives_a_huge_integer_ts(tmp_path: Path) -> None:
    """json.loads turns a 400-digit number into an int; _finite_number calls math.isfinite(int) (audit.py:497),
    which converts to float: OverflowError, out of read_entries and a traceback in `brokerd audit`."""
    state = tmp_path / "state"
    state.mkdir(mode=0o700)
    (state / audit.AUDIT_FILE).write_text(good_record(0) + "\n" + '{"ts":' + "1" * 400 + ',"how":"cache"}\n'
                                          + good_record(1) + "\n")
    for extra in ([], ["--json"], ["--since", "1h"]):
        done = brokerd_audit(state, *extra)
        assert "Traceback" not in done.stderr, (extra, done.stderr[-800:])
        assert len(done.stdout.splitlines()) == 2, (extra, done.stdout)


@pytest.mark.parametrize("odd", ['"how":null', '"caller":"kubectl"', '"caller":{"pid":1,"exe":5}',
                                 '"how":{"a":1}', '"caller":[1]'])
def test_brokerd_audit_survives_a_record_with_an_odd_field(tmp_path: Path, odd: str) -> None:
    """The round-4 fix made an odd ts print ????, but format_entry still formats every other field as if it had
    our type: f"{how:7}" on null/an object is TypeError (audit.py:510), caller.get on a str/list and exe.rsplit on
    an int are AttributeError (audit.py:507, :77).  An edited trail, or a record from another version: a
    traceback, and every record after it is not shown."""
    state = tmp_path / "state"
    state.mkdir(mode=0o700)
    (state / audit.AUDIT_FILE).write_text(
        good_record(0) + "\n" + '{"ts":1700000000,' + odd + '}\n' + good_record(1) + "\n")
    done = brokerd_audit(state)
    assert "Traceback" not in done.stderr, done.stderr[-800:]
    assert len(done.stdout.splitlines()) >= 2, done.stdout


# -- the writer: record() must never raise into the token path --------------------------------------------------


async def test_record_with_a_non_finite_float_and_a_lone_surrogate_does_not_raise(tmp_path: Path) -> None:
    """record(): the first dumps fails (NaN) and the _finite(doc) retry succeeds with ensure_ascii=False; the line
    then cannot be encoded (a lone surrogate: a non-UTF-8 exe path) and the ASCII retry (audit.py:337) dumps the
    ORIGINAL doc with allow_nan=False: ValueError out of record(), i.e. out of server.py:266 while serving a token.
    """
    trail = AuditLog(tmp_path)
    trail.start()
    try:
        trail.record({"ts": 1.0, "x": float("nan"), "caller": {"exe": "/opt/\udcffkubectl"}})
    finally:
        await trail.close()
    [doc] = list(read_entries(tmp_path))
    assert doc["x"] is None and doc["caller"]["exe"] == "/opt/\udcffkubectl"


async def test_record_that_cannot_be_json_is_dropped_not_raised(tmp_path: Path) -> None:
    """"drop only on TypeError": a ValueError that _finite cannot cure (an int past the 4300-digit str limit, a
    circular value) goes through the retry and out of record() (audit.py:329) -- ValueError or RecursionError."""
    trail = AuditLog(tmp_path)
    trail.start()
    circular: dict[str, object] = {"ts": 1.0}
    circular["self"] = circular
    try:
        for doc in ({"ts": 1.0, "n": 10 ** 5000}, circular):
            try:
                trail.record(doc)
            except (ValueError, RecursionError) as exc:
                pytest.fail(f"record() raised {type(exc).__name__}: {str(exc)[:80]}")
    finally:
        await trail.close()


def test_entry_with_a_clock_before_year_1_does_not_raise() -> None:
    """entry() replaces a `now` that _finite_number rejects, but _finite_number accepts |now| < 1e11, and
    datetime.fromtimestamp (audit.py:168) covers only years 1..9999 (about -6.2e10 .. 2.5e11): a clock at
    -7e10 passes the check and fails the record (and the token it records) with ValueError."""
    doc = audit.entry(now=-7e10, session="s" * 12, issuer="https://i", client_id="c", user=None, how="cache",
                      peer=None, server=None)
    assert isinstance(doc["ts"], float)


# -- a trail left write-only --------------------------------------------------------------------------------------

CHILD_WRITE_ONLY = r"""
import os, sys
sys.path.insert(0, sys.argv[1])
from pathlib import Path
from brokerd import audit
os.setgid(65534); os.setuid(65534)  # not root: DAC applies
audit.write_lines(Path(sys.argv[2]), sys.argv[3:])
"""


def test_a_write_only_trail_is_fixed_not_kept_write_only(tmp_path: Path) -> None:
    """_open_trail falls back to O_WRONLY on PermissionError and says "its mode is fixed below", but the fix only
    clears group/other bits (audit.py:282: 0o200 & 0o077 == 0): the trail stays write-only, so `brokerd audit`
    (read_entries swallows the OSError, audit.py:481) silently shows nothing of the current file, and
    _last_byte cannot pread (audit.py:293): a torn last line is not ended and the next batch's first record is
    glued to it -- lost."""
    if os.geteuid() != 0:
        pytest.skip("needs root to switch to an unprivileged uid")
    base = Path(tempfile.mkdtemp(prefix="review5-"))  # pytest's tmp_path is under a 0700 root-only directory
    base.chmod(0o711)
    state = base / "state"
    state.mkdir(mode=0o700)
    os.chown(state, 65534, 65534)
    trail = state / audit.AUDIT_FILE
    trail.write_text(good_record(0) + "\n" + good_record(1)[:40])  # a torn last line (a full disk)
    os.chown(trail, 65534, 65534)
    trail.chmod(0o200)
    done = subprocess.run([sys.executable, "-c", CHILD_WRITE_ONLY, str(ROOT), str(state), good_record(2),
                           good_record(3)], capture_output=True, text=True, timeout=60)
    try:
        assert done.returncode == 0, done.stderr
        assert trail.stat().st_mode & 0o777 == 0o600, oct(trail.stat().st_mode)
        assert [e["n"] for e in read_entries(state)] == [0, 2, 3]
    finally:
        shutil.rmtree(base)


# -- the shim: stdout is waited on, stderr is not -----------------------------------------------------------------


def test_a_full_non_blocking_stderr_gives_a_one_line_error_not_a_traceback(tmp_path: Path) -> None:
    """main() now waits on a non-blocking stdout (core.py:376), but _err (core.py:34-37) still does a bare
    posix.write(2, ...) loop: a non-blocking stderr (a terminal some other program left O_NONBLOCK, one shared
    open file description) that is full raises BlockingIOError out of main() -- a traceback and exit 1, not the
    one-line error and exit 3 (and a MESSAGE during a login is reported as a lost connection)."""
    read, write = full_nonblocking_pipe()
    try:
        env = dict(os.environ, BROKERD_SOCKET=str(tmp_path / "none.sock"), BROKERD_NO_AUTOSTART="1")
        proc = subprocess.Popen([sys.executable, "-I", "-S", str(SHIM), "get-token", "--issuer-url=https://i",
                                 "--client-id=c"], env=env, stdout=subprocess.PIPE, stderr=write,
                                stdin=subprocess.DEVNULL)
        time.sleep(0.5)
        got = read_until_exit(read, proc)
        code = proc.wait(timeout=20)
        assert proc.stdout is not None
        proc.stdout.close()
    finally:
        os.close(write)
    text = got.lstrip(b"x").decode("utf-8", "replace")
    # Seen: exit 120 (the traceback itself met the full pipe, then the interpreter's final flush failed), and not
    # a byte of the error reached the user.
    assert code == 3 and "Traceback" not in text and "brokerd" in text, (code, text[-800:])


# -- held -----------------------------------------------------------------------------------------------------------

CHILD_WRITER = r"""
import sys
sys.path.insert(0, sys.argv[1])
from pathlib import Path
from brokerd import audit
who = sys.argv[3]
for n in range(150):
    audit.write_lines(Path(sys.argv[2]), ['{"who":"%s","n":%d,"pad":"%s"}' % (who, n, "p" * 200)],
                      max_bytes=2000, keep=1000)
"""


def test_held_two_writers_rotating_at_once_lose_and_repeat_nothing(tmp_path: Path) -> None:
    procs = [subprocess.Popen([sys.executable, "-c", CHILD_WRITER, str(ROOT), str(tmp_path), who])
             for who in "AB"]
    for proc in procs:
        assert proc.wait(timeout=120) == 0
    seen = [(e["who"], e["n"]) for e in read_entries(tmp_path, keep=1000)]
    assert sorted(seen) == sorted((who, n) for who in "AB" for n in range(150))
    for who in "AB":  # each writer's own order is kept
        assert [n for w, n in seen if w == who] == list(range(150))


def test_held_a_lock_held_forever_delays_but_does_not_hang(tmp_path: Path) -> None:
    tmp_path.chmod(0o700)
    fd = os.open(tmp_path / audit.AUDIT_FILE, os.O_WRONLY | os.O_CREAT, 0o600)
    fcntl.flock(fd, fcntl.LOCK_EX)
    try:
        began = time.monotonic()
        audit.write_lines(tmp_path, [good_record(0)])
        assert time.monotonic() - began < audit.LOCK_WAIT + 1
    finally:
        os.close(fd)
    assert [e["n"] for e in read_entries(tmp_path)] == [0]


def test_held_a_torn_line_is_ended_before_the_next_batch(tmp_path: Path) -> None:
    tmp_path.chmod(0o700)
    (tmp_path / audit.AUDIT_FILE).write_text(good_record(0) + "\n" + good_record(1)[:30])
    audit.write_lines(tmp_path, [good_record(2)])
    assert [e["n"] for e in read_entries(tmp_path)] == [0, 2]


async def test_held_records_in_order_across_a_rotation(tmp_path: Path) -> None:
    trail = AuditLog(tmp_path, max_bytes=600, keep=100)
    trail.start()
    for n in range(60):
        trail.record({"ts": 1.0, "n": n})
        if n % 7 == 0:
            await asyncio.sleep(0.01)
    await trail.close()
    assert [e["n"] for e in read_entries(tmp_path, keep=100)] == list(range(60))


@pytest.mark.parametrize("name", ["Ünïcödé dir", "with space", "quote\"d", "日本語"])
def test_held_editable_mapping_with_a_legit_odd_path(tmp_path: Path, name: str) -> None:
    from tests.test_review4_breaks import _editable_venv, _launch, _planted

    real = tmp_path / name / "src"
    _planted(real, "from the source tree")
    link = tmp_path / "linked"
    link.symlink_to(real)  # a symlinked source tree
    for tree in (real, link):
        venv = _editable_venv(tmp_path / f"venv-{tree.name}", {"client_shim": f"{tree}/client_shim"})
        done = _launch(venv, tmp_path)
        assert done.stdout.strip() == "from the source tree", (tree, done.stdout, done.stderr)
