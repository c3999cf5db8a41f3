"""Pipes in the states a plugin's stdout and stderr can be handed over in."""

from __future__ import annotations

import os
import select
import subprocess
import time
from collections.abc import Callable


def full_nonblocking_pipe() -> tuple[int, int]:
    """(read end, write end) of a pipe whose write end is non-blocking and full: the next write raises EAGAIN."""
    read, write = os.pipe()
    os.set_blocking(write, False)
    filled = 0
    while filled < 1 << 22:  # bounded: a pipe holds 64 KiB by default
        try:
            filled += os.write(write, b"x" * 4096)
        except BlockingIOError:
            break
    return read, write


def read_until_exit(read: int, proc: subprocess.Popen[bytes], *, poll: float = 0.1, within: float = 20.0,
                    stop: Callable[[bytes], bool] | None = None) -> bytes:
    """What arrives on ``read`` while ``proc`` runs, until it has exited and nothing more comes (or ``stop(got)``
    holds once it exited), for at most ``within`` s."""
    got = b""
    deadline = time.monotonic() + within
    while time.monotonic() < deadline:
        if proc.poll() is not None and stop is not None and stop(got):
            break
        chunk = os.read(read, 65536) if select.select([read], [], [], poll)[0] else b""
        got += chunk
        if proc.poll() is not None and not chunk:
            break
    return got
