"""brokerd.store on real files: encryption at rest, modes, setting bad stores aside, and SIGKILL safety."""

from __future__ import annotations

import hashlib
import importlib.util
import json
import logging
import os
import pathlib
import random
import select
import signal
import stat
import subprocess
import sys
import threading
import time
from collections.abc import Iterator
from dataclasses import replace
from types import ModuleType
from typing import Any

import pytest
from cryptography.exceptions import InvalidTag
from cryptography.hazmat.primitives.ciphers.aead import AESGCM

from brokerd.codec import BadEntry, session_from_dict, session_to_dict
from brokerd.errors import StoreError
from brokerd.models import ProviderSettings, Session, SessionKey, TLSOptions, TokenSet, canonical_json
from brokerd.store import (
    FORMAT_VERSION,
    KEY_NAME,
    MAGIC,
    NONCE_SIZE,
    STORE_NAME,
    SessionStore,
    header,
)

ROOT = pathlib.Path(__file__).resolve().parent.parent
WRITER = pathlib.Path(__file__).resolve().parent / "crash_writer.py"

SECRETS = ("ID-TOKEN-s3cr3t", "REFRESH-s3cr3t", "ACCESS-s3cr3t", "CLIENT-SECRET-s3cr3t")


def _load_writer() -> ModuleType:
    # By path, so this works whether or not tests/ becomes a package.
    spec = importlib.util.spec_from_file_location("crash_writer", WRITER)
    assert spec is not None and spec.loader is not None
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


crash_writer = _load_writer()


def make_session(n: int = 0, *, secret: bool = True) -> Session:
    settings = ProviderSettings(
        issuer=f"https://auth{n}.example.com/",
        client_id=f"kubernetes-{n}",
        client_secret=f"{SECRETS[3]}-{n}" if secret else None,
        scopes=("email", "groups", "offline_access"),
        extra_params=(("claims", '{"id_token":{"groups":{"essential":true}}}'),),
        use_access_token=n % 2 == 1,
        redirect_url="http://localhost:8000",
        username=f"user{n}",
        # How to reach the provider is kept too (a private CA, a gateway header), for refreshes after a restart.
        request_headers=(("X-Gateway", f"g{n}"),),
        tls=TLSOptions(ca_files=(f"/etc/ca-{n}.pem",), insecure_skip_verify=n % 3 == 0),
    )
    tokens = TokenSet(
        id_token=f"{SECRETS[0]}-{n}",
        expires_at=1_700_000_000.5 + n,
        issued_at=1_699_996_400.0,
        refresh_token=f"{SECRETS[1]}-{n}",
        access_token=f"{SECRETS[2]}-{n}",
        access_expires_at=1_700_000_100.0,
        refresh_expires_at=1_700_001_800.0 if n % 2 == 0 else None,  # when the provider said (refresh_expires_in)
        claims={"sub": f"u{n}", "groups": ["admins", "devs"], "exp": 1_700_000_000},
    )
    return Session(key=settings.key, settings=settings, tokens=tokens)


def sample() -> dict[SessionKey, Session]:
    minimal_settings = ProviderSettings(issuer="https://minimal.example", client_id="c")
    minimal = Session(minimal_settings.key, minimal_settings, TokenSet(id_token="x.y.z", expires_at=5, issued_at=1))
    sessions = [make_session(0), make_session(1), minimal]
    return {s.key: s for s in sessions}


def mode(path: pathlib.Path) -> int:
    return stat.S_IMODE(path.stat().st_mode)


def corrupt_copies(state: pathlib.Path) -> list[pathlib.Path]:
    return sorted(state.glob(f"{STORE_NAME}.corrupt-*"))


def write_plaintext(state: pathlib.Path, plaintext: bytes, version: int = FORMAT_VERSION) -> None:
    """Encrypt ``plaintext`` exactly as the documented format says, under the store's own key."""
    key = (state / KEY_NAME).read_bytes()
    nonce = os.urandom(NONCE_SIZE)
    (state / STORE_NAME).write_bytes(header(version) + nonce + AESGCM(key).encrypt(nonce, plaintext, header(version)))


def assert_no_secrets(text: str) -> None:
    for secret in SECRETS:
        assert secret not in text


@pytest.fixture
def state(tmp_path: pathlib.Path) -> pathlib.Path:
    return tmp_path / "state" / "brokerd"


@pytest.fixture
def store(state: pathlib.Path) -> SessionStore:
    return SessionStore(state)


@pytest.fixture
def saved(store: SessionStore) -> dict[SessionKey, Session]:
    sessions = sample()
    store.save(sessions)
    return sessions


@pytest.fixture(autouse=True)
def store_logs(caplog: pytest.LogCaptureFixture) -> Iterator[pytest.LogCaptureFixture]:
    caplog.set_level(logging.INFO, logger="brokerd.store")
    yield caplog
    # Whatever a test did, nothing secret may have reached the log.
    assert_no_secrets(caplog.text)


# -- round trip and layout ---------------------------------------------------------------------------------------


def test_round_trip_across_instances(state: pathlib.Path, saved: dict[SessionKey, Session]) -> None:
    loaded = SessionStore(state).load()  # a new instance, as after a daemon restart
    assert loaded == saved
    assert all(k == s.key == s.settings.key for k, s in loaded.items())
    first = loaded[make_session(0).key]
    assert first.settings.client_secret == f"{SECRETS[3]}-0"  # needed to refresh after a restart
    assert first.tokens.refresh_token == f"{SECRETS[1]}-0"


def test_empty_and_missing_store(store: SessionStore) -> None:
    assert store.load() == {}
    store.save({})
    assert store.path.exists()
    assert store.load() == {}


def test_modes_and_no_temp_files(state: pathlib.Path) -> None:
    old = os.umask(0)  # the modes must not depend on a friendly umask
    try:
        store = SessionStore(state)
        for n in range(5):
            store.save({make_session(n).key: make_session(n)})
    finally:
        os.umask(old)
    assert mode(state) == 0o700
    assert mode(state / KEY_NAME) == 0o600
    assert mode(state / STORE_NAME) == 0o600
    assert len((state / KEY_NAME).read_bytes()) == 32
    assert sorted(os.listdir(state)) == sorted([KEY_NAME, STORE_NAME])
    assert store.path == state / STORE_NAME and store.key_path == state / KEY_NAME


def test_loose_dir_and_files_are_tightened(state: pathlib.Path, caplog: pytest.LogCaptureFixture) -> None:
    SessionStore(state).save(sample())
    state.chmod(0o755)
    (state / KEY_NAME).chmod(0o644)
    (state / STORE_NAME).chmod(0o644)
    assert SessionStore(state).load() == sample()
    assert (mode(state), mode(state / KEY_NAME), mode(state / STORE_NAME)) == (0o700, 0o600, 0o600)
    assert caplog.text.count("tightening") == 3


def test_state_dir_that_is_a_file_raises(tmp_path: pathlib.Path) -> None:
    (tmp_path / "f").write_text("")
    with pytest.raises(StoreError):
        SessionStore(tmp_path / "f").load()


def test_store_holds_no_plaintext(state: pathlib.Path, saved: dict[SessionKey, Session]) -> None:
    blob = (state / STORE_NAME).read_bytes()
    for text in [*SECRETS, "kubernetes-0", "auth0.example.com", "admins"]:
        assert text.encode() not in blob
    assert blob.startswith(MAGIC + bytes([FORMAT_VERSION]))
    # The documented format decrypts with the key file and the header as AAD.
    key = (state / KEY_NAME).read_bytes()
    hlen = len(MAGIC) + 1
    plain = AESGCM(key).decrypt(blob[hlen : hlen + NONCE_SIZE], blob[hlen + NONCE_SIZE :], blob[:hlen])
    assert len(json.loads(plain)["sessions"]) == len(saved)


def test_each_save_uses_a_fresh_nonce(state: pathlib.Path, store: SessionStore) -> None:
    store.save(sample())
    first = (state / STORE_NAME).read_bytes()
    store.save(sample())
    second = (state / STORE_NAME).read_bytes()
    assert first[5 : 5 + NONCE_SIZE] != second[5 : 5 + NONCE_SIZE]


def test_clear_keeps_key(state: pathlib.Path, store: SessionStore, saved: dict[SessionKey, Session]) -> None:
    key = (state / KEY_NAME).read_bytes()
    store.clear()
    assert not store.path.exists()
    assert (state / KEY_NAME).read_bytes() == key
    assert store.load() == {}
    store.clear()  # idempotent
    store.save(saved)
    assert store.load() == saved and (state / KEY_NAME).read_bytes() == key


def test_save_rejects_misfiled_session(store: SessionStore) -> None:
    with pytest.raises(StoreError):
        store.save({make_session(1).key: make_session(0)})


@pytest.mark.parametrize("claims", [{"x": {1, 2}}, {"exp": float("nan")}, {"iat": float("inf")}],
                         ids=["set", "nan", "infinity"])
def test_one_unserializable_session_is_skipped_the_others_saved(
        store: SessionStore, claims: dict[str, Any], caplog: pytest.LogCaptureFixture) -> None:
    """Issue 11 item 4: one session's odd data must not cost every other session its (rotated) tokens."""
    s = make_session(0)
    bad = Session(s.key, s.settings, TokenSet(id_token=SECRETS[0], expires_at=1, issued_at=0, claims=claims))
    good = [make_session(n) for n in (1, 2)]
    store.save({bad.key: bad, **{g.key: g for g in good}})
    assert store.load() == {g.key: g for g in good}
    logged = " ".join(r.getMessage() for r in caplog.records if r.name == "brokerd.store")
    assert f"session {s.key.short()} not saved" in logged
    assert_no_secrets(logged)


# -- bad stores are set aside, never overwritten, never fatal -----------------------------------------------------


def assert_moved_aside(state: pathlib.Path, original: bytes, caplog: pytest.LogCaptureFixture) -> None:
    copies = corrupt_copies(state)
    assert len(copies) == 1
    assert copies[0].read_bytes() == original
    assert mode(copies[0]) == 0o600
    assert not (state / STORE_NAME).exists()
    errors = [r for r in caplog.records if r.name == "brokerd.store" and r.levelno >= logging.ERROR]
    assert any("moved it aside" in r.getMessage() for r in errors)


def test_tampered_ciphertext(state: pathlib.Path, store: SessionStore, saved: dict[SessionKey, Session],
                             caplog: pytest.LogCaptureFixture) -> None:
    blob = bytearray((state / STORE_NAME).read_bytes())
    blob[-20] ^= 0x01
    (state / STORE_NAME).write_bytes(bytes(blob))
    assert store.load() == {}
    assert_moved_aside(state, bytes(blob), caplog)
    store.save(saved)  # the daemon carries on with a fresh store under the same key
    assert SessionStore(state).load() == saved


@pytest.mark.parametrize("edit", ["version", "magic", "truncate", "empty"])
def test_damaged_header(state: pathlib.Path, store: SessionStore, saved: dict[SessionKey, Session],
                        caplog: pytest.LogCaptureFixture, edit: str) -> None:
    blob = (state / STORE_NAME).read_bytes()
    damaged = {
        "version": blob[:4] + bytes([FORMAT_VERSION + 1]) + blob[5:],
        "magic": b"XXXX" + blob[4:],
        "truncate": blob[:20],
        "empty": b"",
    }[edit]
    (state / STORE_NAME).write_bytes(damaged)
    assert store.load() == {}
    assert_moved_aside(state, damaged, caplog)


def test_version_byte_is_authenticated(state: pathlib.Path, saved: dict[SessionKey, Session]) -> None:
    # A future format version written under our key must still not decrypt as version 1 (AAD binds the header).
    key = (state / KEY_NAME).read_bytes()
    blob = (state / STORE_NAME).read_bytes()
    with pytest.raises(InvalidTag):
        AESGCM(key).decrypt(blob[5:17], blob[17:], header(FORMAT_VERSION + 1))


@pytest.mark.parametrize("plaintext", [b"not json{", b"[1, 2]", b'{"sessions": 7}', b'"x"', b"\xff\xfe"])
def test_garbage_inside_valid_encryption(state: pathlib.Path, store: SessionStore, saved: dict[SessionKey, Session],
                                         caplog: pytest.LogCaptureFixture, plaintext: bytes) -> None:
    write_plaintext(state, plaintext)
    original = (state / STORE_NAME).read_bytes()
    assert store.load() == {}
    assert_moved_aside(state, original, caplog)


def test_wrong_key(state: pathlib.Path, store: SessionStore, saved: dict[SessionKey, Session],
                   caplog: pytest.LogCaptureFixture) -> None:
    other_key = AESGCM.generate_key(bit_length=256)
    (state / KEY_NAME).write_bytes(other_key)
    original = (state / STORE_NAME).read_bytes()
    assert store.load() == {}
    assert_moved_aside(state, original, caplog)
    assert (state / KEY_NAME).read_bytes() == other_key  # the key itself is fine and stays


def test_missing_key_with_existing_store(state: pathlib.Path, store: SessionStore, saved: dict[SessionKey, Session],
                                         caplog: pytest.LogCaptureFixture) -> None:
    old_key = (state / KEY_NAME).read_bytes()
    original = (state / STORE_NAME).read_bytes()
    (state / KEY_NAME).unlink()
    assert store.load() == {}
    assert_moved_aside(state, original, caplog)
    new_key = (state / KEY_NAME).read_bytes()
    assert len(new_key) == 32 and new_key != old_key and mode(state / KEY_NAME) == 0o600


def test_short_key_file(state: pathlib.Path, store: SessionStore, saved: dict[SessionKey, Session],
                        caplog: pytest.LogCaptureFixture) -> None:
    (state / KEY_NAME).write_bytes(b"short")
    original = (state / STORE_NAME).read_bytes()
    assert store.load() == {}
    assert_moved_aside(state, original, caplog)
    assert [p.read_bytes() for p in state.glob(f"{KEY_NAME}.corrupt-*")] == [b"short"]
    assert len((state / KEY_NAME).read_bytes()) == 32


def test_save_sets_unreadable_store_aside(state: pathlib.Path, store: SessionStore,
                                          caplog: pytest.LogCaptureFixture) -> None:
    store.save({})
    (state / STORE_NAME).write_bytes(b"someone else's precious bytes")
    store.save(sample())  # no load() first: save must still not clobber what it cannot read
    assert [p.read_bytes() for p in corrupt_copies(state)] == [b"someone else's precious bytes"]
    assert store.load() == sample()


def test_repeated_corruption_keeps_every_copy(state: pathlib.Path, store: SessionStore) -> None:
    store.save({})
    for n in range(3):
        (state / STORE_NAME).write_bytes(b"junk %d" % n)
        assert store.load() == {}
    assert sorted(p.read_bytes() for p in corrupt_copies(state)) == [b"junk 0", b"junk 1", b"junk 2"]


def test_save_without_key_sets_store_aside(state: pathlib.Path, store: SessionStore, saved: dict[SessionKey, Session],
                                           caplog: pytest.LogCaptureFixture) -> None:
    original = (state / STORE_NAME).read_bytes()
    (state / KEY_NAME).unlink()
    store.save({make_session(7).key: make_session(7)})
    assert [p.read_bytes() for p in corrupt_copies(state)] == [original]
    assert SessionStore(state).load() == {make_session(7).key: make_session(7)}


@pytest.mark.skipif(os.geteuid() != 0, reason="needs root to hand the directory to another user")
def test_state_dir_owned_by_someone_else_is_refused(state: pathlib.Path) -> None:
    state.mkdir(parents=True, mode=0o700)
    os.chown(state, 65534, 65534)
    with pytest.raises(StoreError, match="owned by uid 65534"):
        SessionStore(state).load()
    assert not os.listdir(state)


# -- entries: skipped one by one, forward compatible ----------------------------------------------------------------


def test_bad_entries_are_skipped_good_ones_kept(state: pathlib.Path, store: SessionStore,
                                                caplog: pytest.LogCaptureFixture) -> None:
    good0, good1 = session_to_dict(make_session(0)), session_to_dict(make_session(1))
    no_token = session_to_dict(make_session(2))
    del no_token["tokens"]["id_token"]
    wrong_type = session_to_dict(make_session(3))
    wrong_type["tokens"]["expires_at"] = "soon"
    bool_time = session_to_dict(make_session(4))
    bool_time["tokens"]["issued_at"] = True
    drifted = session_to_dict(make_session(5))
    drifted["settings"]["client_id"] = "renamed"  # the key no longer matches the settings
    bad_pairs = session_to_dict(make_session(6))
    bad_pairs["settings"]["extra_params"] = [["only-one"]]
    entries = [good0, no_token, 42, wrong_type, None, bool_time, drifted, bad_pairs, good1]
    store.save({})
    write_plaintext(state, json.dumps({"sessions": entries}).encode())
    loaded = store.load()
    assert loaded == {make_session(0).key: make_session(0), make_session(1).key: make_session(1)}
    skipped = [r.getMessage() for r in caplog.records if "skipping session entry" in r.getMessage()]
    assert len(skipped) == 7
    assert any("does not match" in m for m in skipped)
    assert not corrupt_copies(state)  # bad entries cost themselves, not the file


def test_unknown_fields_are_tolerated(state: pathlib.Path, store: SessionStore) -> None:
    entry = session_to_dict(make_session(0))
    entry["added_later"] = {"x": 1}
    entry["settings"]["new_setting"] = True
    entry["tokens"]["token_type"] = "Bearer"
    store.save({})
    write_plaintext(state, json.dumps({"sessions": [entry], "generation": 9, "meta": {}}).encode())
    assert store.load() == {make_session(0).key: make_session(0)}


def test_dict_helpers_round_trip() -> None:
    for s in sample().values():
        assert session_from_dict(json.loads(json.dumps(session_to_dict(s)))) == s


def test_a_store_written_before_refresh_expiry_was_kept_loads_without_it() -> None:
    s = make_session(0)
    assert s.tokens.refresh_expires_at == 1_700_001_800.0
    doc = json.loads(json.dumps(session_to_dict(s)))
    del doc["tokens"]["refresh_expires_at"]
    loaded = session_from_dict(doc)
    assert loaded.tokens.refresh_expires_at is None and loaded.tokens.refresh_token == s.tokens.refresh_token
    doc["tokens"]["refresh_expires_at"] = True  # format drift, not a time: the entry is skipped, as any bad one
    with pytest.raises(BadEntry):
        session_from_dict(doc)


def test_tls_options_are_part_of_the_key_only_when_set() -> None:
    """Issue 11 item 9: a caller's --insecure-skip-tls-verify or CA makes a session of its own; the default TLS
    settings leave the key as it always was, so stored sessions keep their keys."""
    plain = ProviderSettings(issuer="https://auth.example.com/", client_id="k")
    legacy_doc = {"v": 1, "issuer": plain.issuer, "client_id": "k", "client_secret_sha256": None,
                  "scopes": ["openid"], "extra_params": [], "use_access_token": False, "redirect_url": None,
                  "username": None}
    assert plain.key.value == hashlib.sha256(canonical_json(legacy_doc).encode()).hexdigest()
    insecure = replace(plain, tls=TLSOptions(insecure_skip_verify=True))
    other_ca = replace(plain, tls=TLSOptions(ca_files=("/etc/other-ca.pem",)))
    header = replace(plain, request_headers=(("X-Gateway", "a"),))
    assert len({plain.key, insecure.key, other_ca.key, header.key}) == 4


def test_old_store_entry_with_options_is_read_into_the_settings() -> None:
    """A store written when TLS options lived beside the settings (key without them) still loads, its options
    in the settings and the session filed under today's key."""
    s = make_session(3)
    doc = session_to_dict(s)
    doc["key"] = replace(s.settings, tls=TLSOptions(), request_headers=()).key.value  # the old key
    loaded = session_from_dict(json.loads(json.dumps(doc)))
    assert loaded.settings == s.settings and loaded.key == s.key
    doc["key"] = "0" * 64
    with pytest.raises(BadEntry):
        session_from_dict(doc)


# -- key source is pluggable -------------------------------------------------------------------------------------


class MemoryKeySource:
    def __init__(self) -> None:
        self.key: bytes | None = None

    def load(self) -> bytes | None:
        return self.key

    def create(self) -> bytes:
        self.key = AESGCM.generate_key(bit_length=256)
        return self.key

    def describe(self) -> str:
        return "memory"


def test_other_key_source(state: pathlib.Path) -> None:
    keys = MemoryKeySource()
    SessionStore(state, key_source=keys).save(sample())
    assert not (state / KEY_NAME).exists()
    assert SessionStore(state, key_source=keys).load() == sample()


# -- concurrency and crashes ---------------------------------------------------------------------------------------


def test_threads_share_one_store(state: pathlib.Path, store: SessionStore) -> None:
    failures: list[BaseException] = []

    def worker(n: int) -> None:
        try:
            for _ in range(15):
                store.save(crash_writer.generation(n))
                crash_writer.generation_of(store.load())  # always one whole generation
        except BaseException as exc:
            failures.append(exc)

    threads = [threading.Thread(target=worker, args=(n,)) for n in range(4)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(timeout=60)
    assert not failures and not any(t.is_alive() for t in threads)
    assert crash_writer.generation_of(store.load()) in range(4)
    assert sorted(os.listdir(state)) == sorted([KEY_NAME, STORE_NAME])


def test_stale_temp_of_dead_writer_is_removed(state: pathlib.Path, store: SessionStore) -> None:
    store.save(sample())
    dead = subprocess.Popen([sys.executable, "-c", "pass"])
    dead.wait(timeout=30)
    stale = state / f".{STORE_NAME}.{dead.pid}.abcdef.tmp"
    live = state / f".{STORE_NAME}.{os.getppid()}.abcdef.tmp"  # a live writer's temp must be left alone
    stale.write_bytes(b"partial")
    live.write_bytes(b"in progress")
    assert store.load() == sample()
    assert not stale.exists() and live.exists()


def _read_available(fd: int, until: float) -> tuple[bytes, bool]:
    """Read what the child wrote until ``until``; returns (data, eof)."""
    data = b""
    while True:
        remaining = until - time.monotonic()
        if remaining <= 0:
            return data, False
        ready, _, _ = select.select([fd], [], [], remaining)
        if not ready:
            return data, False
        chunk = os.read(fd, 65536)
        if not chunk:
            return data, True
        data += chunk


def _committed(output: bytes) -> list[int]:
    # Only whole lines count: the child prints a generation after save() returned.
    return [int(line) for line in output.split(b"\n")[:-1]]


def run_crash_rounds(state: pathlib.Path, rounds: int, seed: int) -> None:
    rng = random.Random(seed)
    env = {**os.environ, "PYTHONPATH": str(ROOT)}
    last_seen = -1  # the highest generation known to be committed
    mid_write_kills = 0
    for round_no in range(rounds):
        proc = subprocess.Popen([sys.executable, str(WRITER), str(state)], stdout=subprocess.PIPE,
                                stderr=subprocess.DEVNULL, env=env)
        try:
            assert proc.stdout is not None
            fd = proc.stdout.fileno()
            output = b""
            if round_no % 5 == 0:
                # Kill anywhere, including interpreter start-up, load() and key creation.
                output, _ = _read_available(fd, time.monotonic() + rng.uniform(0.0, 0.4))
            else:
                # Wait for the first commit, then kill at a random point among the following writes.
                deadline = time.monotonic() + 20.0
                while b"\n" not in output and time.monotonic() < deadline:
                    chunk, eof = _read_available(fd, min(deadline, time.monotonic() + 0.5))
                    output += chunk
                    assert not eof, "writer exited early"
                assert b"\n" in output, "writer committed nothing within 20 s"
                more, _ = _read_available(fd, time.monotonic() + rng.uniform(0.0, 0.05))
                output += more
                mid_write_kills += 1
            proc.send_signal(signal.SIGKILL)
            proc.wait(timeout=10)
            rest, eof = _read_available(fd, time.monotonic() + 10.0)
            assert eof
            output += rest
        finally:
            if proc.poll() is None:
                proc.kill()
                proc.wait(timeout=10)
            if proc.stdout is not None:
                proc.stdout.close()
        committed = _committed(output)
        if committed:
            assert committed == list(range(committed[0], committed[-1] + 1))
            assert committed[0] == last_seen + 1  # the child resumed from what the last load returned
            last_seen = committed[-1]
        gen = crash_writer.generation_of(SessionStore(state).load())  # asserts one whole generation
        if gen is None:
            assert last_seen == -1, "a committed generation was lost"
        else:
            # The latest commit, or the one in flight when the child died; never older, never invented.
            assert last_seen <= gen <= last_seen + 1
            last_seen = gen
        assert not corrupt_copies(state), "a crash left a store that had to be set aside"
        assert not [n for n in os.listdir(state) if n.endswith(".tmp")]  # the dead writer's temps are gone
    assert mid_write_kills >= rounds // 2 and last_seen > rounds


def crash_seed() -> int:
    """BROKERD_CRASH_SEED replays a failed run; otherwise a fresh seed each run."""
    given = os.environ.get("BROKERD_CRASH_SEED")
    return int(given) if given else random.randrange(1 << 30)


def run_seeded_crash_rounds(state: pathlib.Path, rounds: int) -> None:
    """run_crash_rounds with its seed printed (pytest shows it with a failure) and in the failure message."""
    seed = crash_seed()
    print(f"crash test seed: BROKERD_CRASH_SEED={seed}")
    try:
        run_crash_rounds(state, rounds, seed)
    except AssertionError as exc:
        exc.add_note(f"replay with BROKERD_CRASH_SEED={seed}")
        raise


def test_sigkill_during_writes(state: pathlib.Path) -> None:
    run_seeded_crash_rounds(state, rounds=20)


@pytest.mark.slow
@pytest.mark.timeout(600)
def test_sigkill_during_writes_long(state: pathlib.Path) -> None:
    run_seeded_crash_rounds(state, rounds=200)

