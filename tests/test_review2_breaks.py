"""Second hostile review (after the keyring, agent and client-auth merges and the first review's fixes): breaks
found, one test each.

Each test is marked ``xfail(strict=True)`` with the reason: it fails today for that reason, and the mark comes off
with the fix.  Real components: the test provider, real daemon processes, real sockets, real files.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import os
import shutil
import subprocess
import sys
import tempfile
from collections.abc import Iterator
from pathlib import Path

import pytest
from jeepney import DBusAddress, message_bus, new_method_call, new_signal
from jeepney.io.asyncio import open_dbus_router

from brokerd.audit import AUDIT_FILE
from brokerd.notify import BUS_NAME, Notifier
from brokerd.store import KEY_NAME, STORE_NAME, SessionStore
from tests.support import desktop as desktop_support
from tests.support import notifications as notifications_support
from tests.support.daemon import Daemon, login_args
from tests.support.provider import ProviderFactory, TestProvider
from tests.support.wait import poll


@contextlib.contextmanager
def _desktop_daemon(config: str | None = None) -> Iterator[tuple[desktop_support.Desktop, Daemon]]:
    """A private desktop (session bus, Secret Service) and a daemon on it, both gone afterwards."""
    base = Path(tempfile.mkdtemp(prefix="bkr", dir="/tmp"))
    try:
        with desktop_support.desktop(base / "desk") as desk:
            (base / "d").mkdir()
            d = Daemon(base=base / "d", env=desk.env, config=config)
            try:
                yield desk, d
            finally:
                d.close()
    finally:
        shutil.rmtree(base, ignore_errors=True)


def test_a_fifo_lock_file_gets_one_clear_line_not_a_traceback() -> None:
    """statelock.hold opens the lock with O_NOFOLLOW (a symlink is refused cleanly) but not a FIFO: os.fdopen in
    'r+b' raises io.UnsupportedOperation, which no caller converts; `brokerd serve` and `brokerd clean` die with a
    traceback."""
    d = Daemon()
    try:
        d.state_dir.mkdir(mode=0o700, parents=True)
        os.mkfifo(d.state_dir / "daemon.lock", 0o600)
        with open(d.log_path, "ab") as log:
            served = subprocess.run([sys.executable, "-m", "brokerd", "serve"], env=d.env, stdin=subprocess.DEVNULL,
                                    stdout=log, stderr=log, cwd=d.base, timeout=30)
        cleaned = d.cli("clean", timeout=30)
        assert served.returncode != 0 and cleaned.returncode != 0
        assert "Traceback" not in d.log(), d.log()[-2000:]
        assert "Traceback" not in cleaned.stderr, cleaned.stderr
        assert len(cleaned.stderr.strip().splitlines()) == 1, cleaned.stderr
    finally:
        d.close()


def _password_args(issuer: str, *extra: str, password: str = "alice-password") -> list[str]:
    return login_args(issuer, "--grant-type=password", "--username=alice", f"--password={password}", *extra,
                      scopes=("offline_access",))


def test_a_failed_login_while_the_store_was_unreadable_does_not_cost_the_stored_session(
        provider_factory: ProviderFactory) -> None:
    """SessionManager._adopt_stored (the re-read before the first save) skips every key already in memory, even an
    entry with no tokens at all (a login that failed, kept for login_retry_interval).  keywait's adopt() takes the
    stored tokens for such an entry; _adopt_stored does not, and the merged save then writes the store without that
    session: its refresh token is gone from disk and memory (house rule: nothing is lost)."""
    if os.geteuid() != 0:
        pytest.skip("needs root to hand the state dir to another uid for a moment")
    idp = provider_factory({"rotate_refresh_tokens": True, "id_token_ttl": 3600, "access_token_ttl": 3600})
    d = Daemon()
    try:
        d.start()
        assert d.shim(_password_args(idp.issuer)).returncode == 0, d.log()[-2000:]  # session X, saved
        d.stop()
        assert len(SessionStore(d.state_dir).load()) == 1
        os.chown(d.state_dir, 65534, 65534)
        d.start()
        assert poll(lambda: "sessions not loaded" in d.log(), 15), d.log()
        failed = d.shim(_password_args(idp.issuer, password="not-the-password"))  # X's key: a login that fails
        assert failed.returncode != 0
        os.chown(d.state_dir, 0, 0)
        ok = d.shim(login_args(idp.issuer, "--grant-type=password", "--username=alice", "--password=alice-password",
                               scopes=("offline_access", "email")))  # session Y: the first save that works
        assert ok.returncode == 0, (ok.stderr, d.log()[-2000:])
        d.stop()
        kept = SessionStore(d.state_dir).load()
        assert len(kept) == 2, ("stored session X was dropped by the merge after the store became readable",
                                d.log()[-1500:])
    finally:
        d.close()


@pytest.mark.skipif(desktop_support.missing() is not None, reason=desktop_support.missing() or "")
def test_logout_while_the_keyring_is_locked_is_not_undone_by_the_unlock(provider: TestProvider) -> None:
    """SessionManager.logout only looks at sessions in memory; while the WaitingStore waits, the stored ones are not
    there, so `logout --all` (and `brokerd clean` with the daemon running) says "no matching sessions", revokes
    nothing and records nothing.  When the keyring unlocks, keywait.watch adopts them: the session the person ended
    serves again, its refresh token alive at the provider."""
    with _desktop_daemon() as (desk, d):
        d.start()
        assert d.shim(_password_args(provider.issuer)).returncode == 0, d.log()[-2000:]
        d.stop()
        desk.lock()
        d.start()
        assert "wait for the keyring" in d.cli("status").stdout
        out = d.cli("logout", "--all")
        assert out.returncode == 0, out.stderr
        desk.stop_keyring()
        desk.start_keyring()  # the desktop unlocks
        assert poll(lambda: "the keyring answered" in d.log(), 60), d.log()[-2000:]
        doc = json.loads(d.cli("status", "--json").stdout)
        assert doc["sessions"] == [], ("a session ended by `logout --all` came back after the unlock",
                                       out.stdout, doc["sessions"])


@pytest.mark.skipif(desktop_support.missing() is not None, reason=desktop_support.missing() or "")
def test_a_reread_that_meets_a_locked_keyring_still_loads_after_the_unlock(provider: TestProvider) -> None:
    """SessionManager._reload (the re-read of a store unreadable at start) goes through WaitingStore.load, which
    swallows KeyringUnavailable, returns {} and starts waiting; _reload takes {} as "read".  But keywait.watch runs
    only when the store waited at start, so nothing retries: the stored sessions never load after the unlock, every
    save is a no-op for the daemon's life (logins made meanwhile are never written), status says "wait" for ever."""
    if os.geteuid() != 0:
        pytest.skip("needs root to hand the state dir to another uid for a moment")
    with _desktop_daemon() as (desk, d):
        d.start()
        assert d.shim(_password_args(provider.issuer)).returncode == 0, d.log()[-2000:]  # session X
        d.stop()
        os.chown(d.state_dir, 65534, 65534)
        d.start()
        assert poll(lambda: "sessions not loaded" in d.log(), 15), d.log()
        desk.lock()
        os.chown(d.state_dir, 0, 0)
        bob = d.shim(login_args(provider.issuer, "--grant-type=password", "--username=bob",
                                "--password=bob-password", scopes=("offline_access",)))
        assert bob.returncode == 0, (bob.stderr, d.log()[-2000:])  # its save re-reads: the keyring is locked
        desk.stop_keyring()
        desk.start_keyring()  # the desktop unlocks
        loaded = poll(lambda: len(json.loads(d.cli("status", "--json").stdout)["sessions"]) == 2, 30)
        assert loaded, ("the stored session never loaded after the unlock", d.cli("status").stdout,
                        d.log()[-2000:])


@pytest.mark.skipif(desktop_support.missing() is not None, reason=desktop_support.missing() or "")
def test_sessions_loaded_after_the_unlock_keep_max_session_age_and_idle_logout(provider: TestProvider) -> None:
    """keywait's SessionManager.adopt sets only the tokens of a stored session; _adopt_stored (the start) also sets
    logged_in_at, last_served_at and the policy.  Adopted after an unlock, a session has logged_in_at None, so
    session_end() is None: no max_session_age, no idle_logout, refreshes for ever; the next save writes the
    None over the stored login time, so even a restart counts the age from then."""
    config = f'[policy."{provider.issuer}"]\nmax_session_age = "1h"\nidle_logout = "1h"\n'
    with _desktop_daemon(config) as (desk, d):
        d.start()
        assert d.shim(_password_args(provider.issuer)).returncode == 0, d.log()[-2000:]
        before = json.loads(d.cli("status", "--json").stdout)["sessions"][0]
        assert before["session_ends_at"] is not None and before["idle_logout_at"] is not None
        d.stop()
        desk.lock()
        d.start()
        desk.stop_keyring()
        desk.start_keyring()  # the desktop unlocks
        assert poll(lambda: "the keyring answered" in d.log(), 60), d.log()[-2000:]
        after = json.loads(d.cli("status", "--json").stdout)["sessions"]
        assert len(after) == 1
        assert after[0]["session_ends_at"] == before["session_ends_at"], (
            "the session's max_session_age was forgotten by the adopt after the unlock", after[0])
        assert after[0]["idle_logout_at"] is not None, after[0]


def test_a_fifo_in_place_of_the_store_key_is_refused_not_waited_on(provider: TestProvider) -> None:
    """FileKeySource.load opens the key file with a plain open(): for a FIFO that waits for a writer for ever
    (client_auth and tls open key files O_NONBLOCK and check S_ISREG; the store's key file is not).  The load
    thread holds the store's lock, so every save waits too: the daemon answers nobody, not even status,
    and a SIGTERM cannot finish its final save."""
    d = Daemon()
    try:
        d.state_dir.mkdir(mode=0o700, parents=True)
        os.mkfifo(d.state_dir / KEY_NAME, 0o600)
        d.start()
        try:
            status = d.cli("status", timeout=20)
        except subprocess.TimeoutExpired:
            pytest.fail("brokerd status got no answer: the daemon is wedged on the FIFO")
        assert status.returncode == 0, status.stderr
        try:
            result = d.shim(_password_args(provider.issuer), timeout=40)
        except subprocess.TimeoutExpired:
            pytest.fail("a login got no answer: the daemon is wedged on the FIFO")
        assert result.stderr.strip(), "the caller was not told about the store"
        assert d.stop(timeout=15) == 0, "SIGTERM did not stop the daemon"
    finally:
        d.close()


def test_brokerd_audit_never_prints_control_characters_from_the_provider(provider: TestProvider) -> None:
    """audit.user_of takes preferred_username/email/name from the ID token as is and cli.cmd_audit prints
    format_entry's line without for_terminal; `brokerd status` passes the same claim through _shown.  An email (or
    display name) with ESC sequences (OSC 52 sets the clipboard, OSC 0 the title, CSI rewrites lines) reaches the
    person's terminal."""
    provider.set_user("carol", password="carol-password", email="\x1b]0;owned\x07carol@example.com")
    with Daemon() as d:
        result = d.shim(login_args(provider.issuer, "--grant-type=password", "--username=carol",
                                   "--password=carol-password", scopes=("email",)))
        assert result.returncode == 0, (result.stderr, d.log()[-1500:])
        d.stop()  # the trail is flushed
        out = d.cli("audit")
        assert out.returncode == 0, out.stderr
        assert "carol@example.com" in out.stdout, out.stdout
        assert "\x1b" not in out.stdout, repr(out.stdout)
        as_json = d.cli("audit", "--json")
        assert as_json.returncode == 0, as_json.stderr
        assert "\x1b" not in as_json.stdout, repr(as_json.stdout)
        assert json.loads(as_json.stdout.splitlines()[-1])["user"] == "\x1b]0;owned\x07carol@example.com"


def test_a_removed_lock_file_does_not_let_a_second_daemon_share_the_store(provider_factory: ProviderFactory) -> None:
    """statelock locks an inode, not the path: once daemon.lock is unlinked (a person clearing what looks like a
    stale lock file, a cleanup of the state dir), the running daemon keeps its lock on the old inode and a second
    daemon (another socket path) creates a new file, locks it and loads the same store.  Neither checks that the
    path still names the file it locked."""
    idp = provider_factory({"rotate_refresh_tokens": True, "id_token_ttl": 3600, "access_token_ttl": 3600})
    first = Daemon()
    second = Daemon(env={"BROKERD_STATE_DIR": str(first.state_dir)})
    try:
        first.start()
        assert first.shim(_password_args(idp.issuer)).returncode == 0, first.log()[-2000:]  # the store holds R1
        (first.state_dir / "daemon.lock").unlink()
        try:
            second.start()
        except RuntimeError:
            return  # refused: the store keeps one owner (what the fix should do)
        before = idp.counters()["refresh_reuse_detected"]
        for d in (second, first):
            d.shim(_password_args(idp.issuer, "--force-refresh"))
        assert idp.counters()["refresh_reuse_detected"] == before, "one refresh token was sent by both daemons"
    finally:
        second.close()
        first.close()


@pytest.mark.skipif(desktop_support.missing() is not None, reason=desktop_support.missing() or "")
def test_a_keyring_locked_mid_run_costs_a_refresh_not_a_login(provider: TestProvider) -> None:
    """The store reads the key from the Secret Service on every save.  Locked after the start (KeePassXC locks on
    screen lock; seahorse), each save raises KeyringUnavailable; the refresh token of a stored session is in
    on_disk, so the write-ahead rule forbids sending it (rightly, the disk still holds it) and LiveSession._renew
    falls through to a login: a browser or a notification for a session whose refresh token is valid, and its old
    grant is never revoked.  The key the daemon already read (or WaitingStore's waiting) would keep it refreshing."""
    with _desktop_daemon() as (desk, d):
        d.start()
        assert d.shim(_password_args(provider.issuer)).returncode == 0, d.log()[-2000:]
        d.stop()
        d.start()  # the session is a stored one now (its refresh token is on disk)
        # The socket answers before the store is read: lock only once it was (mid-run, not at start).
        assert poll(lambda: "loaded 1 session(s)" in d.log(), 15), d.log()[-2000:]
        desk.lock()
        grants = provider.counters()["token_grants"]
        result = d.shim(_password_args(provider.issuer, "--force-refresh"))
        assert result.returncode == 0, (result.stderr, d.log()[-2000:])
        after = provider.counters()["token_grants"]
        assert after["password"] == grants["password"], ("a login instead of a refresh", result.stderr)
        assert after["refresh_token"] == grants["refresh_token"] + 1


def test_a_fifo_audit_file_does_not_keep_the_daemon_from_stopping(provider: TestProvider) -> None:
    """audit.write_lines opens the trail O_WRONLY|O_APPEND|O_CREAT|O_NOFOLLOW without O_NONBLOCK: a FIFO with no
    reader blocks that open in the writer's thread, and AuditLog.close (run at shutdown, after the sessions' final
    save) awaits it: the daemon never exits and keeps the state dir locked against its own restart."""
    d = Daemon()
    try:
        d.state_dir.mkdir(mode=0o700, parents=True)
        os.mkfifo(d.state_dir / AUDIT_FILE, 0o600)
        d.start()
        result = d.shim(_password_args(provider.issuer), timeout=60)
        assert result.returncode == 0, (result.stderr, d.log()[-1500:])
        assert d.stop(timeout=20) == 0, ("SIGTERM did not stop the daemon", d.log()[-1500:])
    finally:
        d.close()


@pytest.mark.skipif(desktop_support.missing() is not None, reason=desktop_support.missing() or "")
def test_file_mode_with_the_key_in_a_locked_keyring_sets_nothing_aside(provider: TestProvider) -> None:
    """GuardedFileKeySource.load refuses when the key is in the keyring, but it suppresses KeyringUnavailable: with
    the keyring locked (or not running: an SSH login), "no key file" reads as "no key", SessionStore._key moves the
    store aside and creates a new key file, and every stored session (its refresh token) is gone from the daemon."""
    with _desktop_daemon('[store]\nkey = "keyring"\n') as (desk, d):
        d.start()
        assert d.shim(_password_args(provider.issuer)).returncode == 0, d.log()[-2000:]
        d.stop()
        stored = (d.state_dir / STORE_NAME).read_bytes()
        d.config_path.write_text('[store]\nkey = "file"\n')  # the config changed, migrate not run yet
        desk.lock()
        d.start()
        d.shim(_password_args(provider.issuer, "--force-refresh"))
        d.stop()
        assert list(d.state_dir.glob("*.corrupt-*")) == [], ("the store was set aside", d.log()[-1500:])
        assert (d.state_dir / STORE_NAME).read_bytes() == stored


@pytest.mark.skipif(bool(notifications_support.missing_tools()), reason="needs dbus-daemon, dunst, Xvfb")
async def test_a_forged_name_owner_changed_does_not_end_the_wait() -> None:
    """review2: Notifier._record treats any NameOwnerChanged it is handed as the bus daemon's.  The bus-side match
    rule names sender org.freedesktop.DBus, but the first filter (interface org.freedesktop.Notifications, any
    sender) also takes a signal named NameOwnerChanged: any bus client can send one with the server's unique name
    as the old owner, and every wait ends as "gone": a login notice stops answering its click, a confirmation is
    refused."""
    with notifications_support.start_notification_desktop() as desk:
        async with await Notifier.open(desk.bus_address) as notifier:
            nid = await notifier.notify("Allow kubectl a token?", "", actions=[("allow", "Allow"), ("deny", "Deny")],
                                        expire_ms=0)
            async with open_dbus_router(desk.bus_address) as other:
                owner = await other.send_and_get_reply(new_method_call(message_bus, "GetNameOwner", "s", (BUS_NAME,)))
                server = str(owner.body[0])
                forged = new_signal(DBusAddress("/org/freedesktop/Notifications", interface=BUS_NAME),
                                    "NameOwnerChanged", "sss", (BUS_NAME, server, ""))
                await other.send(forged)
                await asyncio.sleep(0)
            await asyncio.to_thread(desk.wait_displayed, 1)
            await asyncio.to_thread(desk.choose, "Allow")
            outcome = await notifier.wait(nid, 20)
            assert not outcome.gone, "a forged NameOwnerChanged from another bus client ended the wait"
            assert outcome.action == "allow"
