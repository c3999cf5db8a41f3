"""A caller for tests that drive sessions in process: records what it is told, has no terminal."""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass, field

from brokerd.errors import UsageError


@dataclass(eq=False)  # hashable by identity, like the server's callers
class Caller:
    env: Mapping[str, str] = field(default_factory=dict)
    interactive: bool = False
    told: list[str] = field(default_factory=list)

    def tell(self, text: str) -> None:
        self.told.append(text)

    async def ask(self, prompt: str, *, secret: bool) -> str:
        raise UsageError("no terminal in this test")
