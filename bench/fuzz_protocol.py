"""Bounded fuzz run of the daemon's socket protocol: >= 100k hypothesis-generated bad requests against a real
`brokerd serve` process.  Not part of the test suite (it takes minutes); tests/test_fuzz_protocol.py runs the same
strategies briefly on every test run.

    .venv/bin/python bench/fuzz_protocol.py [--cases 100000] [--seed N] [--max-seconds 1800]

Exits 0 when every answer kept the protocol invariants (tests/support/hostile.py: check_answer), the daemon is
still up, answers `version`, and its log has no traceback and no "internal error"; 1 otherwise.
"""

from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

from hypothesis import HealthCheck, Phase, given, seed, settings

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from tests.support.daemon import Daemon  # after the path setup above
from tests.support.hostile import (
    LOGGED_INTERNAL_ERRORS,
    bad_requests,
    check_answer,
    dead_issuer,
    exchange,
    request,
)


class Budget(Exception):
    """The time bound was reached before the case count."""


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--cases", type=int, default=100_000)
    ap.add_argument("--seed", type=int, default=1)
    ap.add_argument("--max-seconds", type=float, default=1800.0)
    args = ap.parse_args()
    issuer = dead_issuer()
    stats = {"cases": 0, "X": 0, "O": 0, "none": 0}
    started = time.monotonic()
    with Daemon() as daemon:
        @seed(args.seed)
        @settings(max_examples=args.cases, deadline=None, database=None, phases=[Phase.generate, Phase.shrink],
                  suppress_health_check=list(HealthCheck))
        @given(data=bad_requests(issuer))
        def fuzz(data: bytes) -> None:
            if time.monotonic() - started > args.max_seconds:
                raise Budget
            answer = check_answer(data, exchange(daemon.socket, data, timeout=15))
            assert daemon.proc is not None and daemon.proc.poll() is None, "the daemon died"
            stats["cases"] += 1
            kind = answer.terminal[:1].decode() if answer.terminal else "none"
            stats[kind] += 1
            if stats["cases"] % 10_000 == 0:
                rate = stats["cases"] / (time.monotonic() - started)
                print(f"{stats['cases']} cases, {rate:.0f}/s: {stats}", flush=True)

        try:
            fuzz()
        except Budget:
            print(f"stopped at the time bound ({args.max_seconds:g} s)", file=sys.stderr)
        final = check_answer(request("version"), exchange(daemon.socket, request("version")))
        log = daemon.log()
        ok = (final.terminal is not None and final.terminal.startswith(b"O") and "Traceback" not in log
              and not any(words in log for words in LOGGED_INTERNAL_ERRORS))
        if not ok:
            print(log[-5000:], file=sys.stderr)
    elapsed = time.monotonic() - started
    print(f"{stats['cases']} cases in {elapsed:.0f} s ({stats['cases'] / elapsed:.0f}/s): {stats}; "
          f"daemon {'healthy' if ok else 'NOT healthy'}")
    return 0 if ok and stats["cases"] >= min(args.cases, 100_000) else 1


if __name__ == "__main__":
    sys.exit(main())
