"""Opening the login URL in the caller's desktop session.

Order: ``--browser-command`` (run with the URL as its one argument, no shell), else ``BROWSER`` (the caller's, or
the daemon's own when the caller sends none; Python's webbrowser convention: ``:``-separated commands, ``%s``
stands for the URL, else it is appended), else the platform's opener.  The browser never gets the caller's
stdout: kubectl reads the ExecCredential from it.

Only an ``http(s)://`` URL with a host and no whitespace or control characters is ever passed (``browser_url``):
the login URL and a device flow's ``verification_uri`` come from the provider, and a value such as
``--gpu-launcher=...`` would otherwise be an option of the browser, which runs a program.  Since a checked URL
starts with ``http``, it can never be read as an option, whichever command gets it.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import os
import shlex
import shutil
import sys
from collections.abc import Mapping
from urllib.parse import urlsplit

from brokerd import systemd
from brokerd.errors import LoginError
from brokerd.oidc_wire import safe_text
from client_shim.protocol import DESKTOP_ENV

log = logging.getLogger("brokerd.browser")


def browser_url(url: str, what: str = "the login URL") -> str:
    """``url`` when it is safe to hand to a browser command: http(s), a host, no whitespace or control characters.
    LoginError (one line, the value shortened and made printable) otherwise."""
    try:
        parts = urlsplit(url)
    except ValueError:
        parts = None
    if (parts is None or parts.scheme not in ("http", "https") or not parts.netloc
            or not url.startswith(("http://", "https://")) or any(c.isspace() or not c.isprintable() for c in url)):
        raise LoginError(f"{what} from the provider is not an http(s) URL, so it is not opened: {safe_text(url, 80)!r}")
    return url


def candidate_commands(url: str, command: str | None, env: Mapping[str, str]) -> list[list[str]]:
    """The commands to try, in order; ``env`` is the daemon's environment with the caller's desktop over it."""
    if command:
        return [[command, url]]
    commands = []
    for entry in (env.get("BROWSER") or "").split(os.pathsep):
        try:
            argv = shlex.split(entry)
        except ValueError:
            log.warning("ignoring a BROWSER entry that does not parse as a command line")
            continue
        if not argv:
            continue
        if any("%s" in a for a in argv):
            commands.append([a.replace("%s", url) for a in argv])
        else:
            commands.append([*argv, url])
    default = ["open"] if sys.platform == "darwin" else ["xdg-open"]
    commands.append([*default, url])
    return commands


class BrowserOpener:
    """Starts browsers and reaps them; ``close`` stops waiting for any still running (it never kills them)."""

    def __init__(self, base_env: Mapping[str, str]) -> None:
        self._base_env = dict(base_env)
        self._reapers: set[asyncio.Task[None]] = set()

    async def open(self, url: str, *, command: str | None, caller_env: Mapping[str, str]) -> bool:
        url = browser_url(url)  # callers check first, with their own wording; this is the last line of defence
        env = dict(self._base_env)
        forwarded = {k: v for k, v in caller_env.items() if k in DESKTOP_ENV}
        env.update(forwarded)
        for argv in candidate_commands(url, command, env):
            if shutil.which(argv[0], path=env.get("PATH")) is None:
                log.debug("browser command %s not found", argv[0])
                continue
            # Under systemd, the user manager starts the browser as its own unit: stopping brokerd.service must not
            # kill it, and it must not inherit the daemon's sandbox.  The URL carries no secret (state and the PKCE
            # challenge are public), so it may appear in systemd-run's argv.
            argv = systemd.outside_unit_argv(argv, forwarded)
            try:
                proc = await asyncio.create_subprocess_exec(
                    *argv, stdin=asyncio.subprocess.DEVNULL, stdout=asyncio.subprocess.DEVNULL,
                    stderr=asyncio.subprocess.DEVNULL, env=env, start_new_session=True)
            except OSError as exc:
                log.warning("could not start browser command %s: %s", argv[0], exc.strerror)
                continue
            log.info("opened the login page with %s (pid %d)", os.path.basename(argv[0]), proc.pid)
            task = asyncio.create_task(self._reap(proc, argv[0]))
            self._reapers.add(task)
            task.add_done_callback(self._reapers.discard)
            return True
        return False

    @staticmethod
    async def _reap(proc: asyncio.subprocess.Process, name: str) -> None:
        code = await proc.wait()
        if code:
            log.warning("browser command %s exited with status %d", os.path.basename(name), code)

    async def close(self, grace: float = 2.0) -> None:
        # Openers (xdg-open, a browser's remote call) hand the URL over and exit within moments: reap those rather
        # than leave their process transports to be collected half-open.  A browser that stays is left running.
        if self._reapers:
            await asyncio.wait(list(self._reapers), timeout=grace)
        for task in list(self._reapers):
            task.cancel()
        for task in list(self._reapers):
            with contextlib.suppress(asyncio.CancelledError):
                await task
