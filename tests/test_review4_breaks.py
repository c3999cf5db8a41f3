"""Review 4: attacks on 4218ba3..a3312d6 (the round-3 fixes and the new launcher).

test_held_*: attacks that held (they pass; kept as regression tests).  Every other test fails on the reviewed tree
(a3312d6) and shows one break."""

from __future__ import annotations

import asyncio
import json
import os
import shutil
import subprocess
import sys
import time
from pathlib import Path

import pytest

from brokerd import audit
from brokerd.audit import AuditLog, read_entries
from tests.support.daemon import ROOT, Daemon, login_args
from tests.support.provider import TestProvider

LAUNCHER = ROOT / "launchers" / "kubectl-oidc_login"
PYVER = f"python{sys.version_info[0]}.{sys.version_info[1]}"
FINDER = "__editable___brokerd_0_1_0_finder.py"


# -- launcher: setuptools' editable finder, read as bytes -----------------------------------------------------------


def _editable_venv(where: Path, mapping: dict[str, str]) -> Path:
    """A venv with no client_shim in site-packages and setuptools' finder holding ``mapping`` (written as setuptools
    writes it: ``MAPPING: dict[str, str] = {mapping!r}``)."""
    base = Path(getattr(sys, "_base_executable", sys.executable))
    done = subprocess.run([str(base), "-m", "venv", "--without-pip", str(where)], capture_output=True, text=True,
                          timeout=120)
    assert done.returncode == 0, done.stderr
    site = where / "lib" / PYVER / "site-packages"
    (site / FINDER).write_text(f"import sys\nMAPPING: dict[str, str] = {mapping!r}\n", encoding="utf-8")
    shutil.copy(LAUNCHER, where / "bin" / "kubectl-oidc_login")
    (where / "bin" / "kubectl-oidc_login").chmod(0o755)
    return where


def _planted(directory: Path, marker: str) -> None:
    """A client_shim package that only says where it was imported from."""
    pkg = directory / "client_shim"
    pkg.mkdir(parents=True)
    (pkg / "__init__.py").write_text("")
    (pkg / "core.py").write_text(f"def run(pin=False):\n    print({marker!r})\n    raise SystemExit(0)\n")


def _launch(venv: Path, cwd: Path) -> subprocess.CompletedProcess[str]:
    env = dict(os.environ, BROKERD_SOCKET="/nonexistent/brokerd.sock", BROKERD_NO_AUTOSTART="1")
    return subprocess.run([str(venv / "bin" / "kubectl-oidc_login"), "get-token"], env=env, cwd=cwd,
                          capture_output=True, text=True, timeout=60, stdin=subprocess.DEVNULL)


def test_editable_mapping_at_the_root_imports_client_shim_from_the_current_directory(tmp_path: Path) -> None:
    """``'client_shim': '/client_shim'`` passes the checks (starts with / and ends with /client_shim), and
    ``_src[:-12]`` is b"": sys.path gets "" -- the current directory.  kubectl runs the plugin in whatever
    directory the user is in (a cloned repo, /tmp, a download dir): its client_shim/ is imported and run."""
    venv = _editable_venv(tmp_path / "venv", {"client_shim": "/client_shim"})
    cwd = tmp_path / "somebody-elses-checkout"
    _planted(cwd, "RAN-CODE-FROM-CWD")
    done = _launch(venv, cwd)
    assert "RAN-CODE-FROM-CWD" not in done.stdout, (done.stdout, done.stderr)


def test_editable_mapping_is_a_python_literal_not_a_path(tmp_path: Path) -> None:
    """The finder holds ``repr()`` of the path: a backslash is doubled, a control or non-UTF-8 character becomes
    ``\\t``/``\\udcff``.  The launcher takes the literal's bytes as the path, so a source tree at ``/x/a\\b``
    is looked for at ``/x/a\\\\b`` -- a different directory, which someone else may own (e.g. under /tmp)."""
    real = tmp_path / "a\\b"  # one backslash: where the user's source tree really is
    _planted(real, "REAL-TREE")
    other = tmp_path / "a\\\\b"  # two: what the launcher reads out of the finder
    _planted(other, "SOMEONE-ELSES-TREE")
    venv = _editable_venv(tmp_path / "venv", {"client_shim": str(real / "client_shim")})
    done = _launch(venv, tmp_path)
    assert "SOMEONE-ELSES-TREE" not in done.stdout, (done.stdout, done.stderr)


# -- audit: the cut-back of a failed write ---------------------------------------------------------------------------

CHILD_TWO_WRITERS = r"""
import json, os, resource, signal, sys
sys.path.insert(0, sys.argv[1])
from pathlib import Path
from brokerd import audit
signal.signal(signal.SIGXFSZ, signal.SIG_IGN)
d = Path(sys.argv[2])
line = lambda who, n: json.dumps({"who": who, "n": n, "pad": "y" * 80})
audit.write_lines(d, [line("A", 0)])
size = (d / audit.AUDIT_FILE).stat().st_size
real = audit._write_all
def other_daemon_first(fd, data):
    # Daemon B (same trail) appends its record between A's fstat and A's write: O_APPEND puts it first.
    b = os.open(d / audit.AUDIT_FILE, os.O_WRONLY | os.O_APPEND)
    os.write(b, (line("B", 0) + "\n").encode())
    os.close(b)
    real(fd, data)
audit._write_all = other_daemon_first
soft, hard = resource.getrlimit(resource.RLIMIT_FSIZE)
resource.setrlimit(resource.RLIMIT_FSIZE, (size + 400, hard))  # A's batch fits part way: a full disk
try:
    audit.write_lines(d, [line("A", n) for n in range(1, 6)])
except OSError as exc:
    print("failed:", exc.strerror, file=sys.stderr)
"""


def test_cut_back_of_a_failed_write_removes_another_daemons_record(tmp_path: Path) -> None:
    """Two daemons do write one trail: with ``[store] persist = false`` no state lock is taken (daemon.py:139), so
    two daemons on two sockets share the state dir's audit.jsonl.  A's write fails part way (disk full) and
    ``os.ftruncate(fd, before)`` (audit.py:222) cuts the file back to the size A saw at open -- removing B's record,
    appended by O_APPEND in between, together with A's torn tail."""
    done = subprocess.run([sys.executable, "-c", CHILD_TWO_WRITERS, str(ROOT), str(tmp_path)],
                          capture_output=True, text=True, timeout=60)
    assert done.returncode == 0, done.stderr
    assert "failed:" in done.stderr  # A's batch did fail part way
    assert ("B", 0) in [(e["who"], e["n"]) for e in read_entries(tmp_path)]


def test_two_memory_only_daemons_share_one_trail(provider: TestProvider, tmp_path: Path) -> None:
    """The precondition of the test above, for real: the second daemon is not refused (the state lock is taken
    only when persist is true), and both append to the same audit.jsonl with separate writer threads.  Allowed
    (a memory-only daemon writes no store), so the trail serializes its writers (flock): both records arrive whole."""
    config = "[store]\npersist = false\n"
    a = Daemon(config=config)
    b = Daemon(config=config, env={"BROKERD_STATE_DIR": str(a.state_dir)})
    try:
        a.start()
        try:
            b.start()
        except RuntimeError:
            return  # refused: one writer per trail
        args = login_args(provider.issuer, "--username=alice", "--password=alice-password")
        assert a.shim(args).returncode == 0
        assert b.shim(args).returncode == 0
        a.stop()
        b.stop()
        entries = list(read_entries(a.state_dir))
        assert len(entries) == 2, f"two daemons share the trail; both records must be there: {entries}"
        lines = (a.state_dir / audit.AUDIT_FILE).read_text().splitlines()
        assert len(lines) == 2 and all(json.loads(line)["how"] for line in lines), lines
    finally:
        b.close()
        a.close()


# -- audit: the reader (`brokerd audit`) on a record with an odd ts -------------------------------------------------


@pytest.mark.parametrize("ts", ["NaN", "Infinity", "1e400", '"soon"', "null"])
def test_brokerd_audit_survives_a_record_with_an_odd_ts(tmp_path: Path, ts: str) -> None:
    """json.loads accepts NaN/Infinity (and json.dumps in AuditLog.record writes them: allow_nan is on), 1e400 is
    inf.  format_entry calls time.localtime(float(ts)) (audit.py:435): ValueError/OverflowError; read_entries'
    float(doc.get("ts")) (audit.py:425, with --since) raises on a string or null.  cli.main catches only
    BrokerError/ShimError: a traceback instead of a skipped line or a one-line error."""
    state = tmp_path / "state"
    state.mkdir(mode=0o700)
    good = json.dumps(audit.entry(now=time.time(), session="s" * 12, issuer="https://i", client_id="c",
                                  user="u", how="cache", peer=None, server=None))
    (state / audit.AUDIT_FILE).write_text(good + "\n" + '{"ts":' + ts + ',"how":"cache"}\n' + good + "\n")
    env = dict(os.environ, BROKERD_STATE_DIR=str(state))
    for extra in ([], ["--since", "1h"]):
        done = subprocess.run([sys.executable, "-m", "brokerd", "audit", *extra], env=env, capture_output=True,
                              text=True, timeout=60, stdin=subprocess.DEVNULL)
        assert "Traceback" not in done.stderr, (extra, done.stderr[-1500:])
        assert len(done.stdout.splitlines()) >= 2, (extra, done.stdout)


async def test_a_nan_ts_is_not_written_as_invalid_json(tmp_path: Path) -> None:
    """AuditLog.record dumps with allow_nan: a float NaN/inf in a record becomes the bare token NaN/Infinity,
    which is not JSON; `brokerd audit --json` passes it on, and jq and every other strict reader reject the line."""
    trail = AuditLog(tmp_path)
    trail.start()
    trail.record({"ts": float("nan"), "how": "cache"})
    await trail.close()
    raw = (tmp_path / audit.AUDIT_FILE).read_text()
    json.loads(raw, parse_constant=lambda name: pytest.fail(f"not JSON: {name} in {raw!r}"))


# -- held -------------------------------------------------------------------------------------------------------------


async def test_held_a_write_that_fails_at_once_every_time_does_not_spin(tmp_path: Path,
                                                                       monkeypatch: pytest.MonkeyPatch) -> None:
    calls: list[int] = []

    def failing(directory: Path, lines: list[str], *args: int) -> None:
        calls.append(len(lines))
        raise OSError(28, "No space left on device")

    monkeypatch.setattr(audit, "write_lines", failing)
    trail = AuditLog(tmp_path)
    trail.start()
    began = time.monotonic()
    n = 0
    while time.monotonic() - began < 0.6 and n < 2000:
        trail.record({"n": n})
        n += 1
        await asyncio.sleep(0.001)
    took = time.monotonic() - began
    await trail.close()
    assert len(calls) <= took / audit.COALESCE + 3, (len(calls), took)


async def test_held_close_keeps_records_made_while_the_last_write_runs(tmp_path: Path,
                                                                      monkeypatch: pytest.MonkeyPatch) -> None:
    real = audit.write_lines

    def slow(directory: Path, lines: list[str], *args: int) -> None:
        time.sleep(0.2)
        real(directory, lines, *args)

    monkeypatch.setattr(audit, "write_lines", slow)
    trail = AuditLog(tmp_path)
    trail.start()
    trail.record({"n": 0})
    await asyncio.sleep(0.05)  # the first write is in the thread
    for i in range(1, 50):
        trail.record({"n": i})
    closing = asyncio.create_task(trail.close())
    await asyncio.sleep(0)
    trail.record({"n": 50})  # during close, before the writer ends
    await closing
    assert [e["n"] for e in read_entries(tmp_path)] == list(range(51))
