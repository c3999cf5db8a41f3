"""Memory-only sessions (--token-cache-storage=none, issue 16) against the write-ahead refresh (session.py rule 1).

The write-ahead save exists to take a refresh token off the disk before it is sent.  A memory-only session whose
token the disk cannot hold has nothing to take off, so it refreshes even while the store cannot be written; one
that was on disk before it became memory-only still makes the save, and nothing is sent when that save fails.
The store is made unwritable for real: its key file is replaced by a directory (a broken state dir).
"""

from __future__ import annotations

from dataclasses import replace
from pathlib import Path

import pytest

from brokerd.store import KEY_NAME, SessionStore
from tests.support.callers import Caller
from tests.support.provider import ProviderFactory, TestProvider
from tests.test_sessions import OPTIONS, grants, manager, settings_for

MEMORY_ONLY = replace(OPTIONS, cache_storage="none")


@pytest.fixture(scope="module")
def idp(provider_factory: ProviderFactory) -> TestProvider:
    return provider_factory()


def _break_store(state: Path) -> bytes:
    """Make every save fail (StoreError) from now on; the store file keeps what it holds.  Returns the key."""
    key_file = state / KEY_NAME
    key = key_file.read_bytes()
    key_file.unlink()
    key_file.mkdir()
    return key


async def test_a_memory_only_session_refreshes_while_the_store_cannot_be_written(idp: TestProvider,
                                                                                 tmp_path: Path) -> None:
    tmp_path.chmod(0o700)
    memory, kept = settings_for(idp), settings_for(idp, "openid", "offline_access")
    async with manager(tmp_path) as mgr:
        await mgr.get_token(memory, MEMORY_ONLY, Caller())  # its save lands without it: not on disk
        await mgr.get_token(kept, OPTIONS, Caller())  # on disk with its refresh token
        assert list(SessionStore(tmp_path).load()) == [kept.key]
        _break_store(tmp_path)
        refreshes, logins = grants(idp, "refresh_token"), grants(idp, "password")
        await mgr.get_token(memory, replace(MEMORY_ONLY, force_refresh=True), Caller())
        assert (grants(idp, "refresh_token"), grants(idp, "password")) == (refreshes + 1, logins)
        # The persisted session's token is on disk and cannot be taken off: it is not sent (a login instead).
        await mgr.get_token(kept, replace(OPTIONS, force_refresh=True), Caller())
        assert (grants(idp, "refresh_token"), grants(idp, "password")) == (refreshes + 1, logins + 1)


async def test_a_session_made_memory_only_after_it_was_saved_is_taken_off_disk_before_its_refresh(
        idp: TestProvider, tmp_path: Path) -> None:
    tmp_path.chmod(0o700)
    s = settings_for(idp)
    async with manager(tmp_path) as mgr:
        await mgr.get_token(s, OPTIONS, Caller())
        await mgr.get_token(s, MEMORY_ONLY, Caller())  # served from memory; from now on memory only
        stored = SessionStore(tmp_path).load()[s.key].tokens
        assert stored.refresh_token  # still on disk: nothing has been saved since
        key = _break_store(tmp_path)
        refreshes, logins = grants(idp, "refresh_token"), grants(idp, "password")
        await mgr.get_token(s, replace(MEMORY_ONLY, force_refresh=True), Caller())
        # The save that would take it off the disk failed: the token on disk was not sent.
        assert (grants(idp, "refresh_token"), grants(idp, "password")) == (refreshes, logins + 1)
        (tmp_path / KEY_NAME).rmdir()
        (tmp_path / KEY_NAME).write_bytes(key)
        (tmp_path / KEY_NAME).chmod(0o600)
    # Closing saved: the session is gone from the disk, so a restart finds nothing of it to send.
    assert s.key not in SessionStore(tmp_path).load()
