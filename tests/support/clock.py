"""A fake ``Clock`` for the session timers: time moves only when the test says so, and the test can wait (bounded)
until the code under test is asleep, instead of sleeping on the wall clock."""

from __future__ import annotations

import asyncio


class FakeClock:
    def __init__(self, start: float) -> None:
        self.t = start
        self._sleepers: list[tuple[float, asyncio.Future[None]]] = []
        self._changed = asyncio.Event()

    def now(self) -> float:
        return self.t

    async def sleep(self, seconds: float) -> None:
        fut: asyncio.Future[None] = asyncio.get_running_loop().create_future()
        entry = (self.t + max(0.0, seconds), fut)
        self._sleepers.append(entry)
        self._changed.set()
        try:
            await fut
        finally:
            self._sleepers.remove(entry)
            self._changed.set()

    @property
    def deadlines(self) -> list[float]:
        return sorted(d for d, f in self._sleepers if not f.done())

    async def asleep(self, count: int = 1, timeout: float = 15.0) -> list[float]:
        """Wait until ``count`` tasks sleep on this clock; their deadlines.  Bounded by ``timeout`` real seconds
        (the code under test may be talking to the real provider meanwhile)."""
        async def settle() -> None:
            while len(self.deadlines) < count:
                self._changed.clear()
                await self._changed.wait()
        await asyncio.wait_for(settle(), timeout)
        return self.deadlines

    def advance_to(self, when: float) -> None:
        """Move time to ``when`` and wake every sleeper whose deadline has come."""
        self.t = max(self.t, when)
        for deadline, fut in self._sleepers:
            if deadline <= self.t and not fut.done():
                fut.set_result(None)
