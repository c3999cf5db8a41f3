"""Audit trails for the tests of `brokerd audit` and the trail's writer: good records, a trail of many, a run of
the command on a state directory."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import time
from pathlib import Path

from brokerd import audit
from tests.support.daemon import ROOT


def good_record(n: int = 0) -> str:
    """One record as the daemon writes it (audit.entry), numbered ``n``."""
    doc = audit.entry(now=time.time(), session="s" * 12, issuer="https://i", client_id="c", user="u", how="cache",
                      peer=None, server=None)
    doc["n"] = n
    return json.dumps(doc)


def write_trail(tmp_path: Path, records: int) -> Path:
    """A state directory whose trail holds ``records`` records (users u0, u1, ...); returns the directory."""
    state = tmp_path / "state"
    state.mkdir(mode=0o700)
    with (state / audit.AUDIT_FILE).open("w") as f:
        for i in range(records):
            f.write(json.dumps({"ts": 1_700_000_000 + i, "session": "s" * 12, "how": "cache", "user": f"u{i}",
                                "issuer": "https://issuer.example", "client_id": "c"}) + "\n")
    return state


def brokerd_audit(state: Path, *extra: str) -> subprocess.CompletedProcess[str]:
    """`brokerd audit ...` on ``state``, as a person runs it."""
    env = dict(os.environ, BROKERD_STATE_DIR=str(state))
    return subprocess.run([sys.executable, "-m", "brokerd", "audit", *extra], env=env, capture_output=True,
                          text=True, timeout=60, stdin=subprocess.DEVNULL, cwd=ROOT)
