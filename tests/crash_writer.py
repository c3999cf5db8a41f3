"""Child process for the store's crash test: write generations until SIGKILLed.

Usage: crash_writer.py STATE_DIR.  Loads the store, continues from the generation it finds, and prints each
generation number on stdout after ``save()`` has returned, i.e. once it is committed.  Bounded in count and time so
an orphan cannot run on.
"""

from __future__ import annotations

import pathlib
import sys
import time

from brokerd.models import ProviderSettings, Session, SessionKey, TokenSet
from brokerd.store import SessionStore

SESSIONS_PER_GENERATION = 3
MAX_GENERATIONS = 100_000
MAX_SECONDS = 30.0


def generation(gen: int) -> dict[SessionKey, Session]:
    """A self-consistent generation: every field of every session says ``gen``."""
    out: dict[SessionKey, Session] = {}
    for i in range(SESSIONS_PER_GENERATION):
        settings = ProviderSettings(issuer=f"https://idp{i}.example", client_id="kube", client_secret=f"cs-{i}")
        tokens = TokenSet(
            id_token=f"id.{gen}.{i}",
            expires_at=float(gen),
            issued_at=float(gen),
            refresh_token=f"rt.{gen}.{i}",
            # Padding makes each write a few KiB, so kills land inside writes more often.
            access_token=f"at.{gen}.{i}." + "x" * 3000,
            claims={"gen": gen, "i": i},
        )
        out[settings.key] = Session(key=settings.key, settings=settings, tokens=tokens)
    return out


def generation_of(sessions: dict[SessionKey, Session]) -> int | None:
    """The generation ``sessions`` holds, None for an empty store; AssertionError if it is not one whole generation."""
    if not sessions:
        return None
    gen = int(next(iter(sessions.values())).tokens.expires_at)
    assert sessions == generation(gen), f"store holds a mixed or damaged generation near {gen}"
    return gen


def main() -> None:
    store = SessionStore(pathlib.Path(sys.argv[1]))
    found = generation_of(store.load())
    start = 0 if found is None else found + 1
    deadline = time.monotonic() + MAX_SECONDS
    for gen in range(start, start + MAX_GENERATIONS):
        if time.monotonic() > deadline:
            break
        store.save(generation(gen))
        sys.stdout.write(f"{gen}\n")
        sys.stdout.flush()


if __name__ == "__main__":
    main()
