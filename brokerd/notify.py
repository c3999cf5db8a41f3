"""Desktop notifications: a client of org.freedesktop.Notifications on a caller's session bus (jeepney, asyncio).

The daemon serves callers from several desktops (and none), so it never uses its own DBUS_SESSION_BUS_ADDRESS
implicitly: every ``Notifier`` is opened on the address a caller forwarded, and closed when its user is done.

What a person sees and does goes through the notification server; what comes back is a signal on the bus:
``ActionInvoked(id, key)`` when they pick an action, ``NotificationClosed(id, reason)`` when it goes away.  Both
are broadcast (or unicast) signals that any process on the bus could also send, so a signal counts only when its
sender is the bus name that answered our ``Notify`` (the bus daemon stamps senders; they cannot be forged).  A
confirmation must not be approvable by whoever can talk on the bus.  Likewise the server leaving (which ends
the waits on what it showed) is taken only from the bus daemon's own ``NameOwnerChanged``.

Signals are recorded as they arrive (in the router's receive task, through the filter's queue), so one that comes
before anybody waits for it is not lost; the record is bounded.  Every call has a deadline.  Errors leave this
module as ``NotificationError``.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
from collections import OrderedDict
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from types import TracebackType
from typing import Any

from jeepney import DBusAddress, HeaderFields, MatchRule, Message, MessageType, new_method_call
from jeepney.auth import BEGIN, Authenticator
from jeepney.bus import get_bus
from jeepney.bus_messages import message_bus
from jeepney.io.asyncio import DBusConnection, DBusRouter, Proxy
from jeepney.io.common import RouterClosed
from jeepney.wrappers import DBusErrorResponse

from brokerd.errors import NotificationError

log = logging.getLogger("brokerd.notify")

BUS_NAME = "org.freedesktop.Notifications"
BUS_DAEMON = "org.freedesktop.DBus"  # the bus itself: its name and interface
OBJECT = DBusAddress("/org/freedesktop/Notifications", bus_name=BUS_NAME, interface=BUS_NAME)
APP_NAME = "brokerd"
CALL_TIMEOUT = 5.0  # a notification server that takes longer than this to answer a call is as good as none
PROBE_TIMEOUT = 1.0
MAX_RECORDED = 256  # signals remembered per connection (for ids nobody waits on yet)

# NotificationClosed reasons (Desktop Notifications Specification 1.2).
EXPIRED, DISMISSED, CLOSED_BY_CALL, UNDEFINED = 1, 2, 3, 4


@dataclass(frozen=True)
class ServerInfo:
    name: str
    vendor: str
    version: str
    spec_version: str
    capabilities: tuple[str, ...]

    @property
    def actions(self) -> bool:
        """Whether the server shows actions: without them a notification cannot open a login or ask a question."""
        return "actions" in self.capabilities


@dataclass(frozen=True)
class Outcome:
    """How a notification ended for us: ``action`` is the key the person picked; ``closed`` the server's reason;
    ``timed_out`` when the wait ended first; ``gone`` when the notification server left the bus."""

    action: str | None = None
    closed: int | None = None
    timed_out: bool = False
    gone: bool = False


@dataclass
class _Record:
    sender: str | None = None  # the server's unique name, from our Notify reply; None until we know it is ours
    action: str | None = None
    closed: int | None = None
    action_sender: str | None = None
    closed_sender: str | None = None
    changed: asyncio.Event = field(default_factory=asyncio.Event)

    def outcome(self) -> Outcome | None:
        action = self.action if self.action_sender == self.sender else None
        closed = self.closed if self.closed_sender == self.sender else None
        if action is None and closed is None:
            return None
        return Outcome(action=action, closed=closed)


class _Recorder(asyncio.Queue[Message]):
    """The filter's queue: records each signal at once instead of holding it for a reader task."""

    def __init__(self, notifier: Notifier) -> None:
        super().__init__()
        self._notifier = notifier

    def put_nowait(self, item: Message) -> None:
        self._notifier._record(item)


async def _connect(address: str) -> DBusConnection:
    """jeepney's ``open_dbus_connection``, plus closing the socket when it fails or is cancelled part way (a bus
    that accepts and then says nothing would otherwise leave it open)."""
    reader, writer = await asyncio.open_unix_connection(get_bus(address))
    try:
        auth = Authenticator()
        for request in auth:
            writer.write(request)
            await writer.drain()
            data = await reader.read(1024)
            if not data:
                raise EOFError("the bus closed the connection during authentication")
            auth.feed(data)
        writer.write(BEGIN)
        await writer.drain()
        conn = DBusConnection(reader, writer)
        async with DBusRouter(conn) as router:  # Hello must be the first call; its reply names us on the bus
            conn.unique_name = (await Proxy(message_bus, router).Hello())[0]
        return conn
    except BaseException:
        writer.close()
        raise


class Notifier:
    """One connection to a session bus, for notifications.  Use ``async with await Notifier.open(address)``."""

    def __init__(self, address: str, conn: DBusConnection, router: DBusRouter, limit: float) -> None:
        self.address = address
        self.limit = limit
        self._conn = conn
        self._router = router
        self._records: OrderedDict[int, _Record] = OrderedDict()
        self._filters: list[Any] = []
        # Unique names that served notifications and left the bus (or the name), as the bus daemon said; bounded.
        self._gone: OrderedDict[str, None] = OrderedDict()
        self._info: ServerInfo | None = None

    @classmethod
    async def open(cls, address: str, *, limit: float = CALL_TIMEOUT) -> Notifier:
        """Connect to the bus at ``address`` (a D-Bus address such as ``unix:path=/run/user/1000/bus``) and
        subscribe to the notification signals.  Every call through it is answered within ``limit`` s or fails."""
        if not address:
            raise NotificationError("no session bus address (DBUS_SESSION_BUS_ADDRESS) to show a notification on")
        try:
            async with asyncio.timeout(limit):
                conn = await _connect(address)
        except TimeoutError as exc:
            raise NotificationError(f"the session bus at {address} did not answer within {limit:g} s") from exc
        except (OSError, EOFError, ValueError, RuntimeError, KeyError, DBusErrorResponse) as exc:
            # ValueError/KeyError: a malformed address; RuntimeError: a transport jeepney cannot use (tcp:).
            raise NotificationError(f"cannot connect to the session bus at {address}: {exc}") from exc
        router = DBusRouter(conn)
        self = cls(address, conn, router, limit)
        try:
            await self._subscribe()
        except BaseException:
            await self.close()
            raise
        return self

    async def _subscribe(self) -> None:
        # The server leaving the bus ends every wait at once: nobody can answer any more.
        owner = MatchRule(type="signal", sender=BUS_DAEMON, interface=BUS_DAEMON,
                          member="NameOwnerChanged")
        owner.add_arg_condition(0, BUS_NAME)
        rules = (MatchRule(type="signal", interface=BUS_NAME, path=OBJECT.object_path), owner)
        bus = Proxy(message_bus, self._router)
        for rule in rules:
            self._filters.append(self._router.filter(rule, queue=_Recorder(self)))
            await self._call(bus.AddMatch(rule), "subscribe to notification signals")

    async def close(self) -> None:
        for handle in self._filters:
            handle.close()
        self._filters.clear()
        with contextlib.suppress(Exception):
            await self._router.__aexit__(None, None, None)
        with contextlib.suppress(Exception):
            await self._conn.close()
        for record in self._records.values():
            record.changed.set()

    async def __aenter__(self) -> Notifier:
        return self

    async def __aexit__(self, exc_type: type[BaseException] | None, exc: BaseException | None,
                        tb: TracebackType | None) -> None:
        await self.close()

    # -- calls --------------------------------------------------------------------------------------------------

    async def _call(self, awaitable: Any, what: str) -> Any:
        try:
            async with asyncio.timeout(self.limit):
                return await awaitable
        except TimeoutError as exc:
            raise NotificationError(f"{what}: no answer on the session bus within {self.limit:g} s") from exc
        except DBusErrorResponse as exc:
            raise NotificationError(f"{what}: {exc.name}: {' '.join(map(str, exc.data))}".rstrip(": ")) from exc
        except RouterClosed as exc:
            raise NotificationError(f"{what}: the session bus connection is closed") from exc
        except (OSError, EOFError, RuntimeError) as exc:
            raise NotificationError(f"{what}: the session bus connection failed: {exc}") from exc

    async def _method(self, method: str, signature: str | None, body: tuple[Any, ...], what: str) -> Message:
        msg = new_method_call(OBJECT, method, signature, body)
        reply: Message = await self._call(self._router.send_and_get_reply(msg), what)
        if reply.header.message_type is MessageType.error:
            name = reply.header.fields.get(HeaderFields.error_name, "error")
            detail = " ".join(str(x) for x in reply.body)
            raise NotificationError(f"{what}: {name}" + (f": {detail}" if detail else ""))
        return reply

    async def server_info(self) -> ServerInfo:
        if self._info is None:
            info = await self._method("GetServerInformation", None, (), "ask the notification server")
            caps = await self._method("GetCapabilities", None, (), "ask the notification server")
            name, vendor, version, spec = (str(x) for x in info.body[:4])
            self._info = ServerInfo(name, vendor, version, spec, tuple(str(c) for c in caps.body[0]))
        return self._info

    async def notify(self, summary: str, body: str = "", *, actions: Sequence[tuple[str, str]] = (),
                     replaces_id: int = 0, expire_ms: int = -1, urgency: int = 1,
                     hints: Mapping[str, tuple[str, Any]] | None = None) -> int:
        """Show (or, with ``replaces_id``, update in place) a notification; returns its id.

        ``actions`` are (key, label) pairs; the key "default" is what a click on the notification itself does.
        ``expire_ms`` -1 leaves it to the server, 0 keeps it until it is withdrawn or dismissed.
        """
        info = await self.server_info()
        if "body-markup" in info.capabilities:
            body = body.replace("&", "&amp;").replace("<", "&lt;").replace(">", "&gt;")
        flat = [part for pair in actions for part in pair]
        all_hints: dict[str, tuple[str, Any]] = {"urgency": ("y", urgency), **(hints or {})}
        reply = await self._method("Notify", "susssasa{sv}i",
                                   (APP_NAME, replaces_id, "", summary, body, flat, all_hints, expire_ms),
                                   "show a notification")
        nid = int(reply.body[0])
        sender = reply.header.fields.get(HeaderFields.sender)
        record = self._records.get(nid)
        if record is None or (record.sender is not None and replaces_id != nid):
            # A record with a sender is an earlier notification's; one without holds signals that arrived before
            # this reply was read, which are about this notification.
            record = self._records[nid] = _Record()
            self._trim()
        record.sender = sender
        if record.outcome() is not None:
            record.changed.set()
        return nid

    async def withdraw(self, nid: int) -> None:
        """CloseNotification: take it off the screen (no error when it is already gone)."""
        await self._method("CloseNotification", "u", (nid,), "withdraw a notification")

    async def wait(self, nid: int, within: float | None) -> Outcome:
        """Wait, at most ``within`` s (None: no limit but the caller's), for the person to act on notification
        ``nid`` or for it to close."""
        found = self._records.get(nid)
        if found is None:
            raise NotificationError(f"notification {nid} was not shown through this connection")
        try:
            async with asyncio.timeout(within):
                record = found
                while True:
                    outcome = record.outcome()
                    if outcome is not None:
                        return outcome
                    if record.sender in self._gone or not self._filters:
                        return Outcome(gone=True)
                    record.changed.clear()
                    await record.changed.wait()
        except TimeoutError:
            return Outcome(timed_out=True)

    # -- signals (called synchronously by the router's receive task) ---------------------------------------------

    def _record(self, msg: Message) -> None:
        member = msg.header.fields.get(HeaderFields.member)
        sender = msg.header.fields.get(HeaderFields.sender)
        if member == "NameOwnerChanged":
            # Only the bus daemon speaks as org.freedesktop.DBus (it stamps every sender); the other filter passes
            # anything on the Notifications interface, so a client could send a signal of this name there too.
            if (sender != BUS_DAEMON or msg.header.fields.get(HeaderFields.interface) != BUS_DAEMON
                    or len(msg.body) != 3):
                return
            name, old, new = (str(part) for part in msg.body)
            if name != BUS_NAME or not old or old == new:
                return
            # The server that showed our notifications gave up the name (exited, or was replaced): they are gone
            # with it, and nobody will answer them.  Kept by name, not as a flag: a record whose Notify reply is
            # still on its way to ``notify`` learns its sender after this signal was read.
            self._gone[old] = None
            while len(self._gone) > MAX_RECORDED:
                self._gone.popitem(last=False)
            for waiting in self._records.values():
                if waiting.sender == old:
                    waiting.changed.set()
            return
        if member not in ("ActionInvoked", "NotificationClosed") or len(msg.body) < 2:
            return
        nid = int(msg.body[0])
        record = self._records.get(nid)
        if record is None:
            record = self._records[nid] = _Record()
            self._trim()
        if member == "ActionInvoked":
            if record.action is None or record.action_sender != record.sender:
                record.action, record.action_sender = str(msg.body[1]), sender
        elif record.closed is None or record.closed_sender != record.sender:
            record.closed, record.closed_sender = int(msg.body[1]), sender
        record.changed.set()

    def _trim(self) -> None:
        """Forget the oldest records of other programs' notifications first; ours go last."""
        if len(self._records) <= MAX_RECORDED:
            return
        for nid in [n for n, r in self._records.items() if r.sender is None]:
            del self._records[nid]
            if len(self._records) <= MAX_RECORDED:
                return
        while len(self._records) > MAX_RECORDED:
            self._records.popitem(last=False)


async def probe(address: str | None, within: float = PROBE_TIMEOUT) -> ServerInfo | None:
    """Whether a notification server answers on the bus at ``address`` (None: no bus, or nobody serves
    notifications on it, or not within ``within`` s).  Never raises for a missing desktop."""
    if not address:
        return None
    try:
        async with asyncio.timeout(within):
            notifier = await Notifier.open(address, limit=within)
            async with notifier:
                return await notifier.server_info()
    except (NotificationError, TimeoutError) as exc:
        log.debug("no notification server on %s: %s", address, exc)
        return None
