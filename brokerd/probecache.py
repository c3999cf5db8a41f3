"""Which session buses have a notification server: notify.probe per bus address, remembered for a while.

Apart from notify.py so that the daemon can hold one from the start without loading jeepney, the D-Bus library,
until a caller with a desktop first needs a look (issue 14.5: memory after one login).
"""

from __future__ import annotations

from collections import OrderedDict
from typing import TYPE_CHECKING

from brokerd.busaddr import plainly_absent
from brokerd.clock import Clock

if TYPE_CHECKING:
    from brokerd.notify import ServerInfo


class ProbeCache:
    """``probe`` per bus address, remembered for ``ttl`` s, so a burst of background callers costs one look.  A
    bounded number of addresses is kept (the oldest forgotten first); owned by whoever serves the callers."""

    def __init__(self, clock: Clock, ttl: float = 60.0, within: float | None = None, limit: int = 64) -> None:
        self._clock = clock
        self._ttl = ttl
        self._within = within
        self._limit = limit
        self._seen: OrderedDict[str, tuple[float, ServerInfo | None]] = OrderedDict()

    async def __call__(self, address: str | None) -> ServerInfo | None:
        if not address:
            return None
        now = self._clock.now()
        cached = self._seen.get(address)
        if cached is not None and now - cached[0] < self._ttl:
            return cached[1]
        if plainly_absent(address):
            info = None  # a bus that cannot answer: not worth loading jeepney for
        else:
            from brokerd.notify import probe  # jeepney, loaded when a desktop is first looked at

            # ``within`` None: notify's own limit (PROBE_TIMEOUT).
            info = await (probe(address) if self._within is None else probe(address, self._within))
        self._seen[address] = (self._clock.now(), info)
        self._seen.move_to_end(address)
        while len(self._seen) > self._limit:
            self._seen.popitem(last=False)
        return info

    def forget(self, address: str) -> None:
        """A notification that failed after a good probe: look again next time."""
        self._seen.pop(address, None)
