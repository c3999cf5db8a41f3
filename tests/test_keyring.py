"""The store's key in a real Secret Service (dbus-daemon + gnome-keyring-daemon on a private bus), the store waiting
for a locked or absent keyring, `brokerd store migrate`, memory-only sessions, and where the key must never appear."""

from __future__ import annotations

import base64
import json
import os
import signal
import subprocess
import sys
import tempfile
import time
from collections.abc import Iterator
from pathlib import Path

import pytest

from brokerd.keyring import _attributes
from brokerd.store import KEY_NAME, STORE_NAME, SessionStore
from tests.support import desktop as desktop_support
from tests.support.daemon import BIN, BROWSER, Daemon, exec_token, login_args
from tests.support.provider import TestProvider

pytestmark = pytest.mark.skipif(desktop_support.missing() is not None,
                                reason=desktop_support.missing() or "")

WAIT_NOTE = "wait for the keyring to unlock"


@pytest.fixture
def base() -> Iterator[Path]:
    path = Path(tempfile.mkdtemp(prefix="bkk", dir="/tmp"))
    yield path
    import shutil

    shutil.rmtree(path, ignore_errors=True)


@pytest.fixture
def desk(base: Path) -> Iterator[desktop_support.Desktop]:
    with desktop_support.desktop(base / "desk") as d:
        yield d


def _daemon(base: Path, desk: desktop_support.Desktop | None, config: str | None = None) -> Daemon:
    (base / "d").mkdir(parents=True, exist_ok=True)
    return Daemon(base=base / "d", env=desk.env if desk is not None else None, config=config)


def _login(d: Daemon, provider: TestProvider, user: str = "alice", *extra: str) -> str:
    return exec_token(d.shim(login_args(provider.issuer, f"--username={user}", f"--password={user}-password",
                                        *extra)))


def _grants(provider: TestProvider) -> int:
    return int(provider.counters()["token_grants"]["password"])


def _status(d: Daemon) -> dict[str, object]:
    result = d.cli("status", "--json")
    assert result.returncode == 0, result.stderr
    doc: dict[str, object] = json.loads(result.stdout)
    return doc


def _wait_loaded(d: Daemon, sessions: int, timeout: float = 90.0) -> dict[str, object]:
    deadline = time.monotonic() + timeout
    doc: dict[str, object] = {}
    while time.monotonic() < deadline:
        doc = _status(d)
        if not doc.get("store") and len(doc["sessions"]) >= sessions:  # type: ignore[arg-type]
            return doc
        time.sleep(0.5)
    raise AssertionError(f"the stored sessions were not loaded within {timeout} s: {doc}\n{d.log()}")


def _keyring_key(desk: desktop_support.Desktop, state_dir: Path) -> bytes | None:
    items = desk.items(_attributes(state_dir))
    assert len(items) <= 1
    return items[0] if items else None


def test_key_in_keyring_and_a_restart_needs_no_login(provider: TestProvider, base: Path,
                                                      desk: desktop_support.Desktop) -> None:
    d = _daemon(base, desk).start()
    try:
        token = _login(d, provider)
        key = _keyring_key(desk, d.state_dir)
        assert key is not None and len(key) == 32
        assert not (d.state_dir / KEY_NAME).exists()  # the key is not beside the store
        d.stop()
        before = _grants(provider)
        d.start()
        assert _login(d, provider) == token  # the stored session, decrypted with the keyring's key
        assert _grants(provider) == before
        assert not _status(d).get("store")
    finally:
        d.close()


@pytest.mark.parametrize("how", ["locked", "absent"])
def test_a_keyring_locked_or_absent_at_start_costs_no_session(provider: TestProvider, base: Path,
                                                              desk: desktop_support.Desktop, how: str) -> None:
    d = _daemon(base, desk).start()
    try:
        alice = _login(d, provider, "alice")
        d.stop()
        stored = (d.state_dir / STORE_NAME).read_bytes()
        if how == "locked":
            desk.lock()
        else:
            desk.stop_keyring()
        d.start()
        status = d.cli("status")
        assert WAIT_NOTE in status.stdout, status.stdout
        # A login meanwhile works and is heard about; the store is not touched while its key is out of reach.
        result = d.shim(login_args(provider.issuer, "--username=bob", "--password=bob-password"))
        bob = exec_token(result)
        assert WAIT_NOTE in result.stderr
        assert (d.state_dir / STORE_NAME).read_bytes() == stored
        assert list(d.state_dir.glob("*.corrupt-*")) == []
        # The desktop unlocks the keyring (a keyring daemon started with the password, as at a desktop login).
        desk.stop_keyring()
        desk.start_keyring()
        doc = _wait_loaded(d, sessions=2)
        assert len(doc["sessions"]) == 2  # type: ignore[arg-type]
        before = _grants(provider)
        assert _login(d, provider, "alice") == alice
        assert _login(d, provider, "bob") == bob  # the login made meanwhile was merged, not lost
        assert _grants(provider) == before
        # ... and written: a restart serves both without a login.
        d.stop()
        d.start()
        assert _login(d, provider, "alice") == alice
        assert _login(d, provider, "bob") == bob
        assert _grants(provider) == before
    finally:
        d.close()


def test_first_start_with_a_locked_keyring_keeps_logins_and_writes_them_on_unlock(
        provider: TestProvider, base: Path, desk: desktop_support.Desktop) -> None:
    desk.lock()
    d = _daemon(base, desk).start()
    try:
        token = _login(d, provider)
        assert WAIT_NOTE in str(_status(d).get("store"))
        assert not (d.state_dir / KEY_NAME).exists()  # auto did not fall back to a key file beside the store
        assert not (d.state_dir / STORE_NAME).exists()
        desk.stop_keyring()
        desk.start_keyring()
        _wait_loaded(d, sessions=1)
        assert _keyring_key(desk, d.state_dir) is not None
        before = _grants(provider)
        d.stop()
        d.start()
        assert _login(d, provider) == token  # written once the keyring unlocked
        assert _grants(provider) == before
    finally:
        d.close()


def _refreshes(provider: TestProvider) -> int:
    return int(provider.counters()["token_grants"]["refresh_token"])


def _offline(d: Daemon, provider: TestProvider, *extra: str) -> str:
    """bob's session with a refresh token (offline_access)."""
    return exec_token(d.shim(login_args(provider.issuer, "--username=bob", "--password=bob-password", *extra,
                                        scopes=("offline_access",))))


def test_a_login_made_while_the_store_waits_refreshes_and_the_store_stays_untouched(
        provider: TestProvider, base: Path, desk: desktop_support.Desktop) -> None:
    """While the store waits for the keyring a save writes nothing, and the write-ahead save before a refresh counts
    as done: no session in memory has its refresh token in the store file (the daemon has neither read nor written
    it), so there is nothing to take off the disk.  A login made meanwhile refreshes as usual; the stored sessions
    are not in memory, so nothing sends their tokens until the unlock opens the store and saves reach it again."""
    d = _daemon(base, desk).start()
    try:
        _login(d, provider, "alice")
        d.stop()
        stored = (d.state_dir / STORE_NAME).read_bytes()
        desk.lock()
        d.start()
        _offline(d, provider)
        refreshes, logins = _refreshes(provider), _grants(provider)
        bob = _offline(d, provider, "--force-refresh")
        assert (_refreshes(provider), _grants(provider)) == (refreshes + 1, logins)
        assert (d.state_dir / STORE_NAME).read_bytes() == stored
        desk.stop_keyring()
        desk.start_keyring()
        _wait_loaded(d, sessions=2)
        d.stop()
        d.start()
        assert _offline(d, provider) == bob  # the refreshed tokens were written once the keyring unlocked
        assert _grants(provider) == logins
    finally:
        d.close()


def test_no_session_bus_at_start_waits_until_one_appears(provider: TestProvider, base: Path,
                                                         desk: desktop_support.Desktop) -> None:
    """An SSH login: no DBUS_SESSION_BUS_ADDRESS at all.  The store whose key is in the keyring is left alone, and
    when the desktop session's bus appears at $XDG_RUNTIME_DIR/bus the stored sessions load, without a restart."""
    d = _daemon(base, desk).start()
    try:
        token = _login(d, provider)
        d.stop()
        stored = (d.state_dir / STORE_NAME).read_bytes()
        bus = d.env.pop("DBUS_SESSION_BUS_ADDRESS")
        runtime = base / "rt"
        runtime.mkdir(mode=0o700)
        d.env["XDG_RUNTIME_DIR"] = str(runtime)  # ours, empty: never the machine's own
        d.start()
        assert WAIT_NOTE in str(_status(d).get("store"))
        assert (d.state_dir / STORE_NAME).read_bytes() == stored
        assert not (d.state_dir / KEY_NAME).exists()  # no new key file made beside the store
        # The desktop session starts: its bus socket appears where sd-bus would look for it.
        (runtime / "bus").symlink_to(bus.split("unix:path=", 1)[1].split(",", 1)[0])
        _wait_loaded(d, sessions=1)
        before = _grants(provider)
        assert _login(d, provider) == token
        assert _grants(provider) == before
        assert "Traceback" not in d.log()
    finally:
        d.close()


def test_migrate_both_ways_keeps_the_sessions(provider: TestProvider, base: Path,
                                              desk: desktop_support.Desktop) -> None:
    d = _daemon(base, desk).start()
    try:
        token = _login(d, provider)
        refused = d.cli("store", "migrate", "--to", "file")
        assert refused.returncode != 0 and "daemon is running" in refused.stderr
        assert len(refused.stderr.strip().splitlines()) == 1
        d.stop()
        key = _keyring_key(desk, d.state_dir)
        before = _grants(provider)

        moved = d.cli("store", "migrate", "--to", "file")
        assert moved.returncode == 0, moved.stderr
        assert (d.state_dir / KEY_NAME).read_bytes() == key
        assert _keyring_key(desk, d.state_dir) is None
        d.start()
        assert _login(d, provider) == token
        d.stop()

        moved = d.cli("store", "migrate", "--to", "keyring")
        assert moved.returncode == 0, moved.stderr
        assert not (d.state_dir / KEY_NAME).exists()
        assert _keyring_key(desk, d.state_dir) == key
        d.start()
        assert _login(d, provider) == token
        assert _grants(provider) == before
    finally:
        d.close()


def test_keyring_mode_before_migrate_sets_nothing_aside(provider: TestProvider, base: Path,
                                                       desk: desktop_support.Desktop) -> None:
    d = _daemon(base, desk, config='[store]\nkey = "file"\n').start()
    try:
        token = _login(d, provider)
        d.stop()
        stored = (d.state_dir / STORE_NAME).read_bytes()
        d.config_path.write_text('[store]\nkey = "keyring"\n')  # the config changed first, migrate not yet run
        d.start()
        d.stop()
        assert (d.state_dir / STORE_NAME).read_bytes() == stored
        assert list(d.state_dir.glob("*.corrupt-*")) == []
        assert "brokerd store migrate --to keyring" in d.log()
        moved = d.cli("store", "migrate", "--to", "keyring")
        assert moved.returncode == 0, moved.stderr
        before = _grants(provider)
        d.start()
        assert _login(d, provider) == token
        assert _grants(provider) == before
    finally:
        d.close()


def test_migrate_without_a_keyring_is_one_line_and_changes_nothing(provider: TestProvider, base: Path) -> None:
    d = _daemon(base, None).start()
    try:
        _login(d, provider)
        d.stop()
        key = (d.state_dir / KEY_NAME).read_bytes()
        result = d.cli("store", "migrate", "--to", "keyring")
        assert result.returncode != 0
        assert result.stderr.strip().splitlines() == [
            "brokerd: cannot migrate, nothing was changed: the session bus is unreachable"]
        assert (d.state_dir / KEY_NAME).read_bytes() == key
    finally:
        d.close()


def test_sigkill_during_migrate_loses_nothing(provider: TestProvider, base: Path,
                                              desk: desktop_support.Desktop) -> None:
    d = _daemon(base, desk).start()
    try:
        token = _login(d, provider)
        d.stop()
        before = _grants(provider)
        # Kill at each step migrate reports (after 0, 1 or 2 of its lines), in both directions.
        for to in ("file", "keyring", "file", "keyring"):
            for lines in (0, 1, 2):
                proc = subprocess.Popen([sys.executable, "-m", "brokerd", "store", "migrate", "--to", to],
                                        env=d.env, stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                                        stdin=subprocess.DEVNULL, text=True)
                assert proc.stdout is not None
                for _ in range(lines):
                    proc.stdout.readline()
                proc.send_signal(signal.SIGKILL)
                proc.communicate(timeout=30)
                d.start()
                assert _login(d, provider) == token, d.log()
                d.stop()
            finished = d.cli("store", "migrate", "--to", to)  # a second run completes the move
            assert finished.returncode == 0, finished.stderr
            assert (d.state_dir / KEY_NAME).exists() == (to == "file")
            assert (_keyring_key(desk, d.state_dir) is not None) == (to == "keyring")
        assert _grants(provider) == before
        assert list(d.state_dir.glob("*.corrupt-*")) == []
    finally:
        d.close()


def _every_file(root: Path) -> Iterator[tuple[Path, bytes]]:
    for dirpath, _, names in os.walk(root):
        for name in names:
            path = Path(dirpath) / name
            if path.is_file():
                yield path, path.read_bytes()


def test_memory_only_sessions_leave_nothing_on_disk(provider: TestProvider, base: Path) -> None:
    # The whole daemon: [store] persist = false.
    d = _daemon(base, None, config="[store]\npersist = false\n").start()
    try:
        token = _login(d, provider)
        d.stop()
        for path, data in _every_file(d.state_dir) if d.state_dir.exists() else ():
            assert token.encode() not in data, path
            assert path.name not in (STORE_NAME, KEY_NAME), path
    finally:
        d.close()


def test_token_cache_storage_none_keeps_that_session_off_disk(provider: TestProvider, base: Path) -> None:
    d = _daemon(base, None, config='[store]\nkey = "file"\n').start()
    try:
        secret = _login(d, provider, "alice", "--token-cache-storage=none")
        kept = _login(d, provider, "bob")
        d.stop()
        stored = SessionStore(d.state_dir).load()
        assert [s.tokens.id_token for s in stored.values()] == [kept]
        for path, data in _every_file(d.state_dir):
            assert secret.encode() not in data, path
        before = _grants(provider)
        d.start()
        _login(d, provider, "alice", "--token-cache-storage=none")
        assert _grants(provider) == before + 1  # gone with the daemon: a new login (the same second may give the
        # same token bytes, so the grant count is the proof)
    finally:
        d.close()


def test_token_cache_storage_keyring_needs_a_keyring(provider: TestProvider, base: Path,
                                                     desk: desktop_support.Desktop) -> None:
    d = _daemon(base, desk, config='[store]\nkey = "file"\n').start()
    try:
        result = d.shim(login_args(provider.issuer, "--username=alice", "--password=alice-password",
                                   "--token-cache-storage=keyring"))
        assert result.returncode != 0
        assert "--token-cache-storage=keyring" in result.stderr and "Traceback" not in result.stderr
        assert len(result.stderr.strip().splitlines()) == 1, result.stderr
    finally:
        d.close()
    d = _daemon(base / "k", desk).start()
    try:
        _login(d, provider, "alice", "--token-cache-storage=keyring")
    finally:
        d.close()


def test_the_key_is_never_in_logs_child_environments_or_core_dumps(provider: TestProvider, base: Path,
                                                                    desk: desktop_support.Desktop) -> None:
    dump = base / "browser-env"
    browser = (f"sh -c 'env > {dump}; exec {sys.executable} {BROWSER} --log {base / 'browser.log'} \"$0\"'")
    d = _daemon(base, desk)
    d.env["BROWSER"] = browser
    d.start()
    try:
        # An authorization-code login: the daemon starts the browser, a child process.
        exec_token(d.shim(login_args(provider.issuer), env={"BROWSER": browser}))
        key = _keyring_key(desk, d.state_dir)
        assert key is not None
        assert d.proc is not None
        limits = Path(f"/proc/{d.proc.pid}/limits").read_text()
        core = next(line for line in limits.splitlines() if line.startswith("Max core file size"))
        assert core.split()[4:6] == ["0", "0"], core
        d.stop()
        spellings = [key, key.hex().encode(), base64.b64encode(key), base64.urlsafe_b64encode(key).rstrip(b"=")]
        env_dump = dump.read_bytes()
        assert b"DBUS_SESSION_BUS_ADDRESS" in env_dump  # the dump is real: the browser's environment
        for data in (d.log_path.read_bytes(), env_dump):
            for spelling in spellings:
                assert spelling not in data
    finally:
        d.close()


def test_the_daemon_turns_off_core_dumps() -> None:
    code = ("from brokerd.hardening import dumpable, no_core_dumps; import resource; "
            "before = dumpable(); no_core_dumps(); "
            "print(before, dumpable(), resource.getrlimit(resource.RLIMIT_CORE))")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=30,
                         env={**os.environ, "PATH": f"{BIN}{os.pathsep}{os.environ.get('PATH', '')}"})
    assert out.returncode == 0, out.stderr
    assert out.stdout.split(maxsplit=2) == ["True", "False", "(0, 0)\n"]
