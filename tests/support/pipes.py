"""Pipes in the states a plugin's stdout and stderr can be handed over in."""

from __future__ import annotations

import os


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
