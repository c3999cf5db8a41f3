"""Review 9: attacks on e82b49d (cmd_audit writing encoded lines itself; _open_locked's fallback to the current trail).
Every test here fails on the reviewed tree and shows one break."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

from tests.support.daemon import ROOT
from tests.support.trail import write_trail

N = 5


@pytest.mark.parametrize("encoding", ["utf-16", "utf-8-sig"])
def test_brokerd_audit_json_repeats_the_bom_before_every_line(tmp_path: Path, encoding: str) -> None:
    """cmd_audit (cli_local.py:133) encodes each line on its own with str.encode(sys.stdout.encoding): a codec that
    starts its output with a BOM (PYTHONIOENCODING=utf-16 / utf-8-sig, as set for Windows-style consumers) emits
    one BEFORE EVERY LINE.  The text layer it replaced (fab39ff) kept the encoder's state and wrote one BOM for the
    stream.  Decoded, lines 2..N start with U+FEFF: `--json` lines no longer parse (json.loads: "Unexpected UTF-8
    BOM"), and the text form carries invisible characters.  Records are corrupted with exit 0."""
    state = write_trail(tmp_path, N)
    env = dict(os.environ, BROKERD_STATE_DIR=str(state), PYTHONIOENCODING=encoding)
    proc = subprocess.run([sys.executable, "-m", "brokerd", "audit", "--json"], capture_output=True,
                          stdin=subprocess.DEVNULL, env=env, cwd=ROOT, timeout=30, check=False)
    assert proc.returncode == 0, proc.stderr
    lines = proc.stdout.decode(encoding).splitlines()
    assert len(lines) == N, lines
    assert [json.loads(line)["user"] for line in lines] == [f"u{i}" for i in range(N)], lines[:2]
