"""What the daemon shows and asks a person on their desktop, built on notify.py: the pending-login notice, the
confirmation (Allow/Deny, or y/N at a terminal) and the warning ahead of a login.

Each function or object here owns its notification and its bus connection from start to end: the notification is
withdrawn and the connection closed whatever happens, so nothing is left on the screen once nobody waits for it.
Nothing here decides *whether* to show something; that is policy.py's and the session's.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
from collections.abc import Awaitable, Callable
from types import TracebackType
from typing import TYPE_CHECKING

from brokerd.errors import NotificationError

if TYPE_CHECKING:
    from brokerd.notify import Notifier, Outcome

# brokerd.notify (and jeepney, the D-Bus library under it) is imported where a notification is first shown, not
# here: flows.py imports this module at the daemon's start, and most daemons never show one (issue 14.5).

log = logging.getLogger("brokerd.notices")

OPEN = "default"  # a click on the notice itself opens the login page (dunst, GNOME and KDE all do "default")
ALLOW, DENY = "allow", "deny"
CRITICAL = 2


def login_text(issuer: str, client_id: str, program: str, waiting: int,
               user_code: str | None = None) -> tuple[str, str]:
    """``user_code``: the device flow's code, shown so the person can check it against the login page."""
    summary = f"{program} needs a login"
    body = f"to {issuer} as {client_id}\nClick to open the login page."
    if user_code is not None:
        body += f"\nThe code to confirm there: {user_code}"
    if waiting > 1:
        body += f"\n{waiting} programs are waiting for it."
    return summary, body


class LoginNotice:
    """The one notification of a pending login.  ``update`` replaces it in place; a click runs ``on_open`` (open
    the login page in the browser) once; ``dismissed`` is set when the person closes it without opening it.

        async with await LoginNotice.show(address, issuer, client_id, "kubectl", on_open) as notice:
            ...  # the login waits for its callback; notice.update(waiting=n) as callers join
    """

    def __init__(self, notifier: Notifier, nid: int, issuer: str, client_id: str, program: str,
                 on_open: Callable[[], Awaitable[object]], user_code: str | None = None) -> None:
        self._notifier = notifier
        self._user_code = user_code
        self._nid = nid
        self._issuer = issuer
        self._client_id = client_id
        self._program = program
        self._on_open = on_open
        self.opened = asyncio.Event()
        self.dismissed = asyncio.Event()
        self._watch = asyncio.create_task(self._watch_clicks(), name="login-notice")

    @classmethod
    async def show(cls, address: str, issuer: str, client_id: str, program: str,
                   on_open: Callable[[], Awaitable[object]], *, waiting: int = 1,
                   user_code: str | None = None) -> LoginNotice:
        from brokerd.notify import Notifier

        notifier = await Notifier.open(address)
        try:
            summary, body = login_text(issuer, client_id, program, waiting, user_code)
            nid = await notifier.notify(summary, body, actions=[(OPEN, "Open login page")], expire_ms=0)
        except BaseException:
            await notifier.close()
            raise
        return cls(notifier, nid, issuer, client_id, program, on_open, user_code)

    @property
    def nid(self) -> int:
        return self._nid

    async def update(self, *, waiting: int) -> None:
        """Replace the text (never a second notification); ignored once the person opened or dismissed it."""
        if self.opened.is_set() or self.dismissed.is_set():
            return
        summary, body = login_text(self._issuer, self._client_id, self._program, waiting, self._user_code)
        try:
            await self._notifier.notify(summary, body, actions=[(OPEN, "Open login page")], replaces_id=self._nid,
                                        expire_ms=0)
        except NotificationError as exc:
            log.debug("login notice not updated: %s", exc)

    async def open_now(self) -> None:
        """A caller at a terminal joined: open the login page at once (once), and take the notice down."""
        if self.opened.is_set():
            return
        self.opened.set()
        self._watch.cancel()
        with contextlib.suppress(NotificationError):
            await self._notifier.withdraw(self._nid)
        await self._open()

    async def _open(self) -> None:
        try:
            await self._on_open()
        except Exception:  # the opener reports its own failures to the callers; the notice stays honest
            log.exception("opening the login page from the notification failed")

    async def _watch_clicks(self) -> None:
        # Bounded by the notice's owner: close() cancels this when the login ends.
        from brokerd.notify import DISMISSED  # loaded already: this notice was shown through it

        outcome = await self._notifier.wait(self._nid, None)
        if outcome.action is not None and not self.opened.is_set():
            self.opened.set()
            await self._open()
        elif outcome.closed == DISMISSED and not self.opened.is_set():
            self.dismissed.set()

    async def close(self) -> None:
        """Withdraw the notice and close the connection (the login ended, one way or another)."""
        self._watch.cancel()
        with contextlib.suppress(asyncio.CancelledError):
            await self._watch
        with contextlib.suppress(NotificationError):
            await self._notifier.withdraw(self._nid)
        await self._notifier.close()

    async def __aenter__(self) -> LoginNotice:
        return self

    async def __aexit__(self, exc_type: type[BaseException] | None, exc: BaseException | None,
                        tb: TracebackType | None) -> None:
        await self.close()


def confirm_text(who: str, issuer: str, client_id: str) -> tuple[str, str]:
    return "Allow a cluster token?", f"{who} asks for a token for {issuer} as {client_id}."


def terminal_prompt(who: str, issuer: str, client_id: str) -> str:
    """The y/N question the shim shows on the caller's terminal (the protocol's Q prompt)."""
    return f"brokerd: allow {who} a token for {issuer} as {client_id}? [y/N] "


def terminal_answer(text: str) -> bool:
    """Only an explicit yes allows; anything else, an empty line included, denies."""
    return text.strip().lower() in ("y", "yes")


async def confirm_on_desktop(address: str, who: str, issuer: str, client_id: str, *, within: float) -> Outcome:
    """Ask with Allow/Deny; the notification is withdrawn when the answer (or ``within`` s) comes.  Allowed only
    when ``outcome.action == ALLOW``: deny, dismissal, no answer and a notification server that left all refuse."""
    from brokerd.notify import Notifier

    async with await Notifier.open(address) as notifier:
        summary, body = confirm_text(who, issuer, client_id)
        nid = await notifier.notify(summary, body, actions=[(ALLOW, "Allow"), (DENY, "Deny")], expire_ms=0,
                                    urgency=CRITICAL)
        try:
            return await notifier.wait(nid, within)
        finally:
            with contextlib.suppress(NotificationError):
                await notifier.withdraw(nid)


def expiry_text(issuer: str, client_id: str, minutes: int) -> tuple[str, str]:
    return (f"Login to {issuer} needed in {minutes} min",
            f"The session as {client_id} ends then. Click to log in now, at a moment of your choosing.")


async def warn_on_desktop(address: str, issuer: str, client_id: str, minutes: int, *, within: float) -> bool:
    """Show the warning (once; the caller remembers that it did); True when the person clicked it to log in now.
    It stays for ``within`` s at most and is withdrawn after."""
    from brokerd.notify import Notifier

    async with await Notifier.open(address) as notifier:
        summary, body = expiry_text(issuer, client_id, minutes)
        nid = await notifier.notify(summary, body, actions=[(OPEN, "Log in now")], expire_ms=0)
        try:
            outcome = await notifier.wait(nid, within)
        finally:
            with contextlib.suppress(NotificationError):
                await notifier.withdraw(nid)
        return outcome.action == OPEN
