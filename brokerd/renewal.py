"""One renewal of a session (a refresh or a login), shared by every caller that waits for it: the task, the
messages said so far (a caller that joins late hears them too) and the pending login's desktop notice.  What a
renewal does, and what happens when it fails, is the session's (``session.LiveSession``)."""

from __future__ import annotations

import asyncio
from dataclasses import dataclass, field
from typing import Literal

from brokerd.models import Caller, TokenSet
from brokerd.notices import LoginNotice


@dataclass(eq=False)
class Renewal:
    """One refresh or login of a session, shared by every caller that waits for it."""

    allow_login: bool
    task: asyncio.Task[TokenSet] | None = None
    logging_in: bool = False
    messages: list[str] = field(default_factory=list)
    callers: set[Caller] = field(default_factory=set)
    how: Literal["refresh", "login"] = "refresh"
    notice: LoginNotice | None = None  # the pending login's desktop notification, when it has one

    @property
    def running(self) -> asyncio.Task[TokenSet]:
        assert self.task is not None  # set right after construction, before anyone can see the renewal
        return self.task

    def announce(self, text: str) -> None:
        self.messages.append(text)
        for caller in list(self.callers):
            caller.tell(text)

    def attach(self, notice: LoginNotice | None) -> None:
        self.notice = notice

    def join(self, caller: Caller) -> None:
        self.callers.add(caller)
        for text in self.messages:
            caller.tell(text)
