"""Waiting for a condition a real process brings about: the one bounded poll loop of the tests and benchmarks.

It waits for a state (a file appears, a counter moves, a process exits), never for an amount of time, and gives up
with an AssertionError that says what it waited for, so a hung daemon fails the test instead of hanging it.
"""

from __future__ import annotations

import time
from collections.abc import Callable

Detail = str | Callable[[], str]  # what the failure says; a callable is asked only on failure (e.g. daemon.log)


def _message(what: Detail, timeout: float) -> str:
    text = what() if callable(what) else what
    return f"timed out after {timeout} s waiting for {text}"


def poll(predicate: Callable[[], object], timeout: float, interval: float = 0.05) -> bool:
    """Call ``predicate`` every ``interval`` seconds until it is true (True) or ``timeout`` has passed (False).
    For callers that raise their own error (a benchmark's BenchError, a start-up failure with the log)."""
    deadline = time.monotonic() + timeout
    while not predicate():
        if time.monotonic() > deadline:
            return False
        time.sleep(interval)
    return True


def wait_until(predicate: Callable[[], object], what: Detail, timeout: float = 20.0, interval: float = 0.05) -> None:
    """Poll ``predicate`` until it is true; AssertionError after ``timeout`` seconds."""
    if not poll(predicate, timeout, interval):
        raise AssertionError(_message(what, timeout))
