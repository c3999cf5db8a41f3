"""The Caller of sessions.py for a socket client: where its messages go, how it is asked, who it is (peer process,
program, cluster) and whose desktop it may use."""

from __future__ import annotations

import asyncio
from collections.abc import Mapping
from typing import TYPE_CHECKING

from brokerd import execcred
from brokerd.audit import PeerInfo, cluster_server
from brokerd.errors import ProtocolError, UsageError
from brokerd.peers import is_local_peer
from client_shim import protocol

if TYPE_CHECKING:
    from brokerd.server import Limits


def _without_desktop(env: Mapping[str, str]) -> Mapping[str, str]:
    return {k: v for k, v in env.items() if k not in protocol.DESKTOP_ENV}


class ShimCaller:
    """The Caller of sessions.py, speaking the socket protocol to one client."""

    def __init__(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter, env: Mapping[str, str],
                 exec_info: execcred.ExecInfo, limits: Limits, *, may_choose_browser: bool,
                 pid: int | None, peer: PeerInfo | None = None, program: str = "") -> None:
        self._may_choose_browser = may_choose_browser
        self._pid = pid
        self._chooses_browser: bool | None = None
        # The caller's desktop only when it may choose the browser (asked only when it sent one: a /proc lookup).
        has_desktop = any(name in env for name in protocol.DESKTOP_ENV)
        self.env = _without_desktop(env) if has_desktop and not self.chooses_browser else env
        self.exec_info = exec_info
        self.peer = peer  # for the audit trail and the confirmation; a record, not an authentication
        self.program = program
        self.asked_to_log_in = False  # `brokerd login`: a person asked for this login, so it is no surprise
        self.cluster = cluster_server(env.get("KUBERNETES_EXEC_INFO"))
        self.interactive = exec_info.interactive
        self._reader = reader
        self._writer = writer
        self._limits = limits

    @property
    def chooses_browser(self) -> bool:
        """May this caller pick the program that opens the login page?  Not when it is relayed from another host."""
        if self._chooses_browser is None:
            self._chooses_browser = self._may_choose_browser and is_local_peer(self._pid)
        return self._chooses_browser

    def tell(self, text: str) -> None:
        if self._writer.is_closing():
            return
        for line in text.splitlines() or [""]:
            self._writer.write(protocol.message_line(line))

    async def ask(self, prompt: str, *, secret: bool) -> str:
        if not self.interactive:
            raise UsageError(f"brokerd needs an answer to {prompt.strip()!r} but kubectl gave the plugin no terminal "
                             "(set interactiveMode: IfAvailable and run kubectl in a terminal)")
        self._writer.write(protocol.prompt_line(prompt, secret=secret))
        await self._writer.drain()
        try:
            raw = await asyncio.wait_for(self._reader.readuntil(b"\0"), self._limits.answer_timeout)
        except (asyncio.IncompleteReadError, asyncio.LimitOverrunError, TimeoutError) as exc:
            raise UsageError("no answer was given on the terminal") from exc
        if not raw.startswith(protocol.ANSWER):
            raise ProtocolError("unexpected answer from the client")
        return raw[1:-1].decode("utf-8", "replace")

