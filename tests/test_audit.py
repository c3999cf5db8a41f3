"""brokerd.audit: peer info from real processes, the trail's files (rotation, modes, never a secret, with the tokens
of a real login), the reader and `brokerd audit`, and the per-session counters."""

from __future__ import annotations

import asyncio
import json
import os
import shutil
import socket
import stat
import subprocess
import sys
import tempfile
import time
from collections.abc import Iterator
from pathlib import Path

import aiohttp
import pytest

from brokerd.audit import (
    AUDIT_FILE,
    AuditLog,
    Counters,
    NotRegularFile,
    PeerInfo,
    audit_files,
    cluster_server,
    entry,
    format_entry,
    peer_info,
    read_entries,
    user_of,
    write_lines,
)
from brokerd.clock import SystemClock
from brokerd.models import ProviderSettings
from brokerd.oidc import OIDCClient
from tests.support.daemon import BIN
from tests.support.provider import TestProvider

CONNECT = ("import socket, sys; s = socket.socket(socket.AF_UNIX); s.connect(sys.argv[1]); "
           "sys.stdout.write('connected\\n'); sys.stdout.flush(); sys.stdin.read()")
SETUID_CONNECT = ("import os, socket, sys; os.setgid(int(sys.argv[2])); os.setuid(int(sys.argv[2])); "
                  "s = socket.socket(socket.AF_UNIX); s.connect(sys.argv[1]); sys.stdout.write('connected\\n'); "
                  "sys.stdout.flush(); sys.stdin.read()")


@pytest.fixture
def listener(tmp_path: Path) -> Iterator[tuple[socket.socket, str]]:
    path = str(tmp_path / "s")
    server = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    server.bind(path)
    server.listen(4)
    server.settimeout(30)
    try:
        yield server, path
    finally:
        server.close()


def _connect_child(argv: list[str]) -> subprocess.Popen[str]:
    child = subprocess.Popen(argv, stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True)
    assert child.stdout is not None
    assert child.stdout.readline() == "connected\n"
    return child


def _end(child: subprocess.Popen[str]) -> None:
    assert child.stdin is not None and child.stdout is not None
    child.stdin.close()
    child.wait(30)
    child.stdout.close()


def test_peer_info_names_a_real_child_and_its_parent(listener: tuple[socket.socket, str]) -> None:
    server, path = listener
    child = _connect_child([sys.executable, "-c", CONNECT, path])
    conn, _ = server.accept()
    try:
        info = peer_info(conn)
        assert info is not None
        assert (info.pid, info.uid, info.gid) == (child.pid, os.getuid(), os.getgid())
        assert info.exe == os.path.realpath(sys.executable)
        assert info.ppid == os.getpid()
        assert info.parent_exe == os.readlink("/proc/self/exe")
        assert info.describe() == (f"{os.path.basename(info.exe)} (pid {child.pid}) from "
                                   f"{os.path.basename(info.parent_exe)} (pid {os.getpid()})")
        _end(child)
        # The credentials were taken at connect; the process is gone now: what /proc said is None, not an error.
        gone = peer_info(conn)
        assert gone is not None
        assert gone.pid == child.pid and gone.exe is None and gone.ppid is None and gone.parent_exe is None
    finally:
        conn.close()
    assert peer_info(None) is None


def test_peer_info_reads_the_parent_past_a_command_name_with_parentheses(
        listener: tuple[socket.socket, str], tmp_path: Path) -> None:
    server, path = listener
    odd = tmp_path / "we) ir (d"  # the comm field of /proc/<pid>/stat is "(we) ir (d)"
    odd.symlink_to(sys.executable)
    child = _connect_child([str(odd), "-c", CONNECT, path])
    conn, _ = server.accept()
    try:
        info = peer_info(conn)
        assert info is not None and info.ppid == os.getpid()
    finally:
        _end(child)
        conn.close()


@pytest.mark.skipif(os.geteuid() != 0, reason="needs root to run a child under a uid above 2**31")
def test_peer_uid_is_unsigned() -> None:
    base = Path(tempfile.mkdtemp(prefix="bka", dir="/tmp"))  # reachable by the other uid (pytest's tmp is 0700)
    base.chmod(0o755)
    path = str(base / "s")
    server = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    try:
        server.bind(path)
        server.listen(1)
        server.settimeout(30)
        os.chmod(path, 0o777)
        big = 3_000_000_000  # a valid uid_t that a signed read would turn negative
        child = _connect_child([sys.executable, "-c", SETUID_CONNECT, path, str(big)])
        conn, _ = server.accept()
        try:
            info = peer_info(conn)
            assert info is not None and info.uid == big and info.gid == big
        finally:
            _end(child)
            conn.close()
    finally:
        server.close()
        shutil.rmtree(base, ignore_errors=True)


def test_cluster_server_keeps_only_the_server() -> None:
    info = {"apiVersion": "client.authentication.k8s.io/v1", "kind": "ExecCredential",
            "spec": {"interactive": False, "cluster": {
                "server": "https://admin:hunter2@k8s.example.com:6443/base?token=abc#frag",
                "certificate-authority-data": "LS0tLS1CRUdJTi1DQS1EQVRB", "config": {"secret": "s3cr3t"}}}}
    assert cluster_server(json.dumps(info)) == "https://k8s.example.com:6443/base"
    assert cluster_server(json.dumps({"spec": {"cluster": {"server": "https://[::1]:6443"}}})) == "https://[::1]:6443"
    for raw in (None, "", "not json", "[]", '{"spec": 1}', '{"spec": {"cluster": {"server": 5}}}'):
        assert cluster_server(raw) is None


@pytest.fixture
async def real_login(provider: TestProvider) -> tuple[ProviderSettings, dict[str, str]]:
    """A real password-grant login at the test provider: the settings (with their secret) and every secret
    value the trail must never contain."""
    settings = ProviderSettings(issuer=provider.issuer, client_id="kube_login", client_secret="insecure_secret",
                                scopes=("groups", "email", "offline_access"))
    async with aiohttp.ClientSession() as http:
        tokens = await OIDCClient(http, SystemClock(), request_timeout=10).password_grant(
            settings, "alice", "alice-password")
    secrets = {"id_token": tokens.id_token, "client_secret": "insecure_secret", "password": "alice-password"}
    if tokens.access_token:
        secrets["access_token"] = tokens.access_token
    if tokens.refresh_token:
        secrets["refresh_token"] = tokens.refresh_token
    return settings, {**secrets, "claims_user": user_of(tokens.claims) or ""}


async def test_trail_of_a_real_login_rotates_is_private_and_holds_no_secret(
        real_login: tuple[ProviderSettings, dict[str, str]], tmp_path: Path,
        listener: tuple[socket.socket, str]) -> None:
    settings, secrets = real_login
    user = secrets.pop("claims_user")
    assert user and "refresh_token" in secrets and "access_token" in secrets
    server, path = listener
    child = _connect_child([sys.executable, "-c", CONNECT, path])
    conn, _ = server.accept()
    peer = peer_info(conn)
    exec_info = json.dumps({"spec": {"cluster": {"server": "https://k8s.example.com:6443",
                                                 "certificate-authority-data": "Q0EtREFUQS1NQVJLRVI=",
                                                 "config": {"token": "CONFIG-SECRET-MARKER"}}}})
    secrets["ca"] = "Q0EtREFUQS1NQVJLRVI="
    secrets["config"] = "CONFIG-SECRET-MARKER"
    state = tmp_path / "state"
    audit = AuditLog(state, max_bytes=2000, keep=2)
    audit.start()
    try:
        for n in range(60):
            audit.record(entry(now=time.time(), session=str(settings.key), issuer=settings.issuer,
                               client_id=settings.client_id, user=user, how=("cache", "refresh", "login")[n % 3],
                               peer=peer, server=cluster_server(exec_info)))
        # record() only queued them: nothing was written on the caller's path.
        assert not (state / AUDIT_FILE).exists()
        await audit.close()
    finally:
        _end(child)
        conn.close()
    files = audit_files(state, keep=2)
    assert [f.name for f in files] == [f"{AUDIT_FILE}.2", f"{AUDIT_FILE}.1", AUDIT_FILE]  # rotated, bounded
    assert not (state / f"{AUDIT_FILE}.3").exists()
    assert stat.S_IMODE(state.stat().st_mode) == 0o700
    for f in files:
        assert stat.S_IMODE(f.stat().st_mode) == 0o600
        assert f.stat().st_size <= 2000
        text = f.read_text()
        for name, value in secrets.items():
            assert value not in text, f"{name} found in {f.name}"
    docs = list(read_entries(state, keep=2))
    assert docs and len(docs) < 60  # the oldest rotated away
    last = docs[-1]
    assert last["how"] == "login" and last["user"] == user and last["issuer"] == settings.issuer
    assert last["session"] == settings.key.short()
    assert last["cluster"] == "https://k8s.example.com:6443"
    assert peer is not None
    assert last["caller"] == {"pid": child.pid, "uid": os.getuid(), "exe": os.path.realpath(sys.executable),
                              "ppid": os.getpid(), "parent_exe": os.readlink("/proc/self/exe")}


def _write(state: Path, docs: list[dict[str, object]]) -> None:
    state.mkdir(mode=0o700, parents=True, exist_ok=True)
    with (state / AUDIT_FILE).open("a") as f:
        for doc in docs:
            f.write(json.dumps(doc) + "\n")
        f.write('{"torn": \n')  # a line cut short by a crash is skipped, not fatal


def _sample(now: float) -> list[dict[str, object]]:
    peer = PeerInfo(pid=10, uid=1000, gid=1000, exe="/usr/bin/kubectl", ppid=9, parent_exe="/usr/bin/k9s")
    return [entry(now=now - 7200, session="aaaaaaaaaaaa" + "0" * 52, issuer="https://a.example", client_id="c",
                  user="alice", how="login", peer=peer, server=None),
            entry(now=now - 60, session="bbbbbbbbbbbb" + "0" * 52, issuer="https://b.example", client_id="c",
                  user="bob", how="cache", peer=None, server="https://k8s:6443")]


def test_reader_filters_by_time_and_session(tmp_path: Path) -> None:
    now = time.time()
    _write(tmp_path, _sample(now))
    assert [d["user"] for d in read_entries(tmp_path)] == ["alice", "bob"]
    assert [d["user"] for d in read_entries(tmp_path, since=now - 3600)] == ["bob"]
    assert [d["user"] for d in read_entries(tmp_path, session="aaaa")] == ["alice"]
    line = format_entry(next(read_entries(tmp_path)))
    assert "login" in line and "alice @ https://a.example (c)" in line
    assert "kubectl (pid 10) from k9s (pid 9)" in line


def _brokerd(args: list[str], state: Path) -> subprocess.CompletedProcess[str]:
    env = {**os.environ, "BROKERD_STATE_DIR": str(state)}
    return subprocess.run([str(BIN / "brokerd"), *args], env=env, capture_output=True, text=True, timeout=60,
                          check=False)


def test_brokerd_audit_command_without_a_daemon(tmp_path: Path) -> None:
    now = time.time()
    _write(tmp_path, _sample(now))
    plain = _brokerd(["audit"], tmp_path)
    assert plain.returncode == 0, plain.stderr
    assert len(plain.stdout.splitlines()) == 2 and "bob @ https://b.example" in plain.stdout
    as_json = _brokerd(["audit", "--json", "--since", "1h"], tmp_path)
    assert [json.loads(x)["user"] for x in as_json.stdout.splitlines()] == ["bob"]
    one = _brokerd(["audit", "--session", "aaaaaaaaaaaa"], tmp_path)
    assert "alice" in one.stdout and "bob" not in one.stdout
    bad = _brokerd(["audit", "--since", "yesterday"], tmp_path)
    assert bad.returncode == 2
    assert bad.stderr.strip().splitlines() == [
        "brokerd: --since: expected a duration such as \"12h\", \"10m\" or \"90s\", got 'yesterday'"]
    empty = _brokerd(["audit"], tmp_path / "none")
    assert empty.returncode == 0 and empty.stdout == ""


async def test_a_write_failure_is_logged_not_raised(tmp_path: Path, caplog: pytest.LogCaptureFixture) -> None:
    blocker = tmp_path / "file"
    blocker.write_text("")
    audit = AuditLog(blocker / "state")  # a directory that cannot be made
    audit.start()
    audit.record({"how": "cache"})
    await asyncio.sleep(0)
    await audit.close()
    assert "audit: cannot write" in caplog.text


def test_counters() -> None:
    counters = Counters()
    peer = PeerInfo(pid=10, uid=1000, gid=1000, exe="/usr/bin/kubectl", ppid=9, parent_exe="/usr/bin/k9s")
    counters.renewed("s1", "login")
    counters.served("s1", peer, 100.0)
    counters.renewed("s1", "refresh")
    tally = counters.served("s1", None, 200.0)
    assert tally.describe() == {"tokens_served": 2, "refreshes": 1, "logins": 1, "last_caller": None,
                                "last_served_at": 200.0}
    counters.served("s2", peer, 300.0)
    assert counters.sessions["s2"].last_caller == "kubectl (pid 10) from k9s (pid 9)"
    counters.forget("s1")
    assert set(counters.sessions) == {"s2"}


async def test_the_pending_batch_is_bounded_and_a_drop_is_logged(tmp_path: Path,
                                                                caplog: pytest.LogCaptureFixture) -> None:
    audit = AuditLog(tmp_path / "state", max_pending=3)  # no writer started: records pile up
    for n in range(5):
        audit.record({"n": n})
    await audit.close()
    assert [d["n"] for d in read_entries(tmp_path / "state")] == [2, 3, 4]
    assert "audit: 2 record(s) dropped" in caplog.text


def test_a_fifo_in_the_trails_place_is_refused_even_with_a_reader(tmp_path: Path) -> None:
    """review2: O_NONBLOCK keeps a reader-less FIFO from blocking the open; with a reader the open succeeds, so the
    writer must still refuse anything but a regular file rather than hand the records to whoever reads."""
    state = tmp_path / "state"
    state.mkdir(mode=0o700)
    os.mkfifo(state / AUDIT_FILE, 0o600)
    reader = os.open(state / AUDIT_FILE, os.O_RDONLY | os.O_NONBLOCK)
    try:
        with pytest.raises(NotRegularFile):
            write_lines(state, ['{"how":"cache"}'])
        assert os.read(reader, 100) == b"", "a record reached the FIFO's reader"
        os.close(reader)
        reader = -1
        with pytest.raises(NotRegularFile):  # no reader: ENXIO from the open, reported the same way
            write_lines(state, ['{"how":"cache"}'])
    finally:
        if reader >= 0:
            os.close(reader)


async def test_a_burst_is_written_in_a_few_batches_and_a_lone_record_at_once(
        tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """One write per token served cost more CPU than serving it (bench/run section 3): a burst gathers into a write
    per COALESCE s; a record after a quiet spell is written at once (a SIGKILL right after it keeps it)."""
    from brokerd import audit

    batches: list[int] = []
    real = audit.write_lines

    def counting(directory: Path, lines: list[str], *args: int) -> None:
        batches.append(len(lines))
        real(directory, lines, *args)

    monkeypatch.setattr(audit, "write_lines", counting)
    trail = AuditLog(tmp_path)
    trail.start()
    try:
        began = time.monotonic()
        for i in range(100):  # 100 tokens in about 0.25 s (longer on a busy machine: the bound below follows)
            trail.record({"n": i})
            await asyncio.sleep(0.0025)
        took = time.monotonic() - began
        await trail.flush()
        assert sum(batches) == 100 and len(batches) <= took / audit.COALESCE + 3, (batches, took)
        await asyncio.sleep(audit.COALESCE * 2)  # quiet
        written = len(batches)
        trail.record({"n": 100})
        deadline = time.monotonic() + audit.COALESCE * 0.8
        while len(batches) == written and time.monotonic() < deadline:
            await asyncio.sleep(0.005)
        assert batches[written:] == [1], batches
    finally:
        await trail.close()
    assert [doc["n"] for doc in read_entries(tmp_path)] == list(range(101))
