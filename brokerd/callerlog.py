"""kubelogin's ``-v``: a caller asks to see the daemon's log lines about its own request.

``get-token -v1`` (or higher) makes the daemon tell that caller, on its stderr, the debug and info lines logged
while its request is served: discovery, the client picked for its TLS options, refresh, which grant logs in.  The
daemon's own log level is not changed.  It works through a context variable, so the lines follow the request into
the renewal task it starts (asyncio copies the context into a task), and no other caller sees them.  Only a weak
reference to the caller is kept: a background timer that inherited the context never keeps a caller alive.

The lines are the daemon's log lines, so they carry what its log may carry: never a token or a secret.
"""

from __future__ import annotations

import asyncio
import contextlib
import inspect
import logging
import weakref
from collections.abc import Callable, Iterator
from contextvars import ContextVar

Tell = Callable[[str], None]
# (a weak reference to the caller's tell, the loop it must be called on)
_target: ContextVar[tuple[Callable[[], Tell | None], asyncio.AbstractEventLoop] | None] = ContextVar(
    "brokerd_caller_log", default=None)

LOGGER = "brokerd"


def level_for(verbosity: int) -> int | None:
    """The lowest level a caller with ``-v N`` is told; None: nothing (kubelogin's default, -v0)."""
    return logging.DEBUG if verbosity >= 1 else None


@contextlib.contextmanager
def telling(tell: Callable[[str], None], verbosity: int) -> Iterator[None]:
    """Within this block (and tasks started in it), brokerd's log lines also go to ``tell``."""
    if level_for(verbosity) is None:
        yield
        return
    ref: Callable[[], Tell | None] = weakref.WeakMethod(tell) if inspect.ismethod(tell) else weakref.ref(tell)
    token = _target.set((ref, asyncio.get_running_loop()))
    try:
        yield
    finally:
        _target.reset(token)


class CallerHandler(logging.Handler):
    """Sends each brokerd record to the caller of the current context, if it asked with -v."""

    def emit(self, record: logging.LogRecord) -> None:
        target = _target.get()
        tell = target[0]() if target is not None else None
        if target is None or tell is None:
            return
        try:
            text = record.getMessage()
        except (TypeError, ValueError):
            return
        flat = " ".join("".join(c if c.isprintable() else " " for c in text).split())
        line = f"brokerd [{record.levelname.lower()}] {flat}"
        loop = target[1]
        try:
            running = asyncio.get_running_loop()
        except RuntimeError:
            running = None
        if running is loop:
            tell(line)
        elif not loop.is_closed():
            # A worker thread (asyncio.to_thread copies the context): the caller's stream belongs to the loop.
            with contextlib.suppress(RuntimeError):
                loop.call_soon_threadsafe(tell, line)


def install() -> Callable[[], None]:
    """Let brokerd's loggers make debug records for callers that ask (the daemon's own handlers must carry their
    level: cli_local.py sets it); returns the undo."""
    logger = logging.getLogger(LOGGER)
    handler = CallerHandler(logging.DEBUG)
    old_level = logger.level
    logger.setLevel(logging.DEBUG)
    logger.addHandler(handler)

    def undo() -> None:
        logger.removeHandler(handler)
        logger.setLevel(old_level)

    return undo
