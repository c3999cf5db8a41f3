"""brokerd.notify against a real session bus (dbus-daemon) and a real notification server (dunst under Xvfb).

A person's clicks are played with dunstctl (tests/support/notifications.py); nothing here touches the machine's own
session bus or display.
"""

from __future__ import annotations

import asyncio
import os
import shutil
from collections.abc import Iterator
from pathlib import Path

import pytest
from jeepney import DBusAddress, new_method_call, new_signal
from jeepney.io.asyncio import open_dbus_router

from brokerd.errors import NotificationError
from brokerd.notify import BUS_NAME, CLOSED_BY_CALL, Notifier, probe
from brokerd.probecache import ProbeCache
from tests.support.notifications import NotificationDesktop, missing_tools, start_notification_desktop

ROOT = Path(__file__).resolve().parents[1]

pytestmark = pytest.mark.skipif(bool(missing_tools()),
                                reason=f"needs the Debian packages {', '.join(missing_tools())} (scripts/test "
                                       "installs them as root)")


@pytest.fixture(scope="module")
def desktop() -> Iterator[NotificationDesktop]:
    with start_notification_desktop() as d:
        yield d


async def _clear(d: NotificationDesktop) -> None:
    await asyncio.to_thread(d.dunstctl, "close-all")
    await asyncio.to_thread(d.wait_displayed, 0)


async def test_probe_finds_dunst_and_its_actions(desktop: NotificationDesktop) -> None:
    info = await probe(desktop.bus_address)
    assert info is not None
    assert info.name == "dunst"
    assert info.actions


async def test_probe_says_none_without_a_bus_or_a_server(tmp_path: Path) -> None:
    assert await probe(None) is None
    assert await probe(f"unix:path={tmp_path}/no-bus-here") is None
    assert await probe("tcp:host=127.0.0.1,port=1") is None  # a transport jeepney cannot use
    assert await probe("garbage") is None
    with start_notification_desktop(with_dunst=False) as bare:
        assert await probe(bare.bus_address) is None  # a live bus on which nobody serves notifications


async def test_errors_are_one_notification_error(tmp_path: Path) -> None:
    with pytest.raises(NotificationError, match="cannot connect to the session bus"):
        await Notifier.open(f"unix:path={tmp_path}/no-bus-here")
    with pytest.raises(NotificationError, match="no session bus address"):
        await Notifier.open("")
    with start_notification_desktop(with_dunst=False) as bare:
        async with await Notifier.open(bare.bus_address) as notifier:
            with pytest.raises(NotificationError, match="ServiceUnknown"):
                await notifier.notify("nobody shows this")


async def test_login_notification_click_opens(desktop: NotificationDesktop, tmp_path: Path) -> None:
    await _clear(desktop)
    async with await Notifier.open(desktop.bus_address) as notifier:
        nid = await notifier.notify("kubectl needs a login",
                                    "to https://auth.example.com as kube_login\nClick to open the login page.",
                                    actions=[("default", "Open login page")], expire_ms=0)
        await asyncio.to_thread(desktop.wait_displayed, 1)
        shot = tmp_path / "notification.png"
        await asyncio.to_thread(desktop.screenshot, shot)
        assert shot.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
        if os.environ.get("BROKERD_DOCS_SCREENSHOT"):
            shutil.copyfile(shot, ROOT / "docs" / "agent-notification.png")
        await asyncio.to_thread(desktop.invoke_default)
        # The signal may come before anybody waits for it: it is recorded, not lost.
        await asyncio.sleep(0)
        outcome = await notifier.wait(nid, 20)
        assert outcome.action == "default"
        await notifier.withdraw(nid)
        outcome = await notifier.wait(nid, 20)
        assert outcome.closed == CLOSED_BY_CALL
    await asyncio.to_thread(desktop.wait_displayed, 0)
    shown = [n for n in await asyncio.to_thread(desktop.history) if n["id"] == nid]
    assert shown and shown[0]["summary"] == "kubectl needs a login"
    assert shown[0]["appname"] == "brokerd"


async def test_replaces_id_updates_in_place_and_withdraw_removes(desktop: NotificationDesktop) -> None:
    await _clear(desktop)
    async with await Notifier.open(desktop.bus_address) as notifier:
        nid = await notifier.notify("kubectl needs a login", "waiting", expire_ms=0)
        again = await notifier.notify("kubectl needs a login", "2 callers waiting", replaces_id=nid, expire_ms=0)
        assert again == nid
        await asyncio.to_thread(desktop.wait_displayed, 1)  # replaced, not stacked
        await notifier.withdraw(nid)
        assert (await notifier.wait(nid, 20)).closed == CLOSED_BY_CALL
    await asyncio.to_thread(desktop.wait_displayed, 0)
    shown = [n for n in await asyncio.to_thread(desktop.history) if n["id"] == nid]
    assert [n["body"] for n in shown] == ["2 callers waiting"]


@pytest.mark.parametrize("label, key", [("Deny", "deny"), ("Allow", "allow")])
async def test_confirmation_reports_the_chosen_action(desktop: NotificationDesktop, label: str, key: str) -> None:
    await _clear(desktop)
    async with await Notifier.open(desktop.bus_address) as notifier:
        nid = await notifier.notify("Allow kubectl a token?",
                                    "k9s (pid 4242) via kubectl wants a token for https://auth.example.com "
                                    "as kube_login",
                                    actions=[("allow", "Allow"), ("deny", "Deny")], expire_ms=0, urgency=2)
        await asyncio.to_thread(desktop.wait_displayed, 1)
        if os.environ.get("BROKERD_DOCS_SCREENSHOT") and key == "allow":
            await asyncio.to_thread(desktop.screenshot, ROOT / "docs" / "agent-confirm.png")
        await asyncio.to_thread(desktop.choose, label)
        assert (await notifier.wait(nid, 20)).action == key
        await notifier.withdraw(nid)


async def test_a_forged_signal_from_another_bus_client_is_ignored(desktop: NotificationDesktop) -> None:
    """Anybody on the bus can emit ActionInvoked; only the notification server's counts (confirm = true must not
    be approvable by a process that merely talks on the bus)."""
    await _clear(desktop)
    async with await Notifier.open(desktop.bus_address) as notifier:
        nid = await notifier.notify("Allow kubectl a token?", "", actions=[("allow", "Allow"), ("deny", "Deny")],
                                    expire_ms=0)
        async with open_dbus_router(desktop.bus_address) as other:
            forged = new_signal(DBusAddress("/org/freedesktop/Notifications", interface=BUS_NAME),
                                "ActionInvoked", "us", (nid, "allow"))
            await other.send(forged)
            closed = new_signal(DBusAddress("/org/freedesktop/Notifications", interface=BUS_NAME),
                                "NotificationClosed", "uu", (nid, 2))
            await other.send(closed)
        await asyncio.to_thread(desktop.wait_displayed, 1)
        await asyncio.to_thread(desktop.choose, "Deny")
        assert (await notifier.wait(nid, 20)).action == "deny"
        await notifier.withdraw(nid)


async def test_a_flood_of_other_programs_signals_does_not_lose_ours(desktop: NotificationDesktop) -> None:
    await _clear(desktop)
    async with await Notifier.open(desktop.bus_address) as notifier:
        nid = await notifier.notify("Allow kubectl a token?", "", actions=[("allow", "Allow"), ("deny", "Deny")],
                                    expire_ms=0)
        await asyncio.to_thread(desktop.wait_displayed, 1)
        await asyncio.to_thread(desktop.choose, "Deny")
        async with open_dbus_router(desktop.bus_address) as other:
            for n in range(1, 400):  # closes of other programs' notifications, more than the record keeps
                await other.send(new_signal(DBusAddress("/org/freedesktop/Notifications", interface=BUS_NAME),
                                            "NotificationClosed", "uu", (nid + n, 2)))
            # A round trip after the flood: the bus delivered all of it to us before this reply.
            await other.send_and_get_reply(new_method_call(
                DBusAddress("/org/freedesktop/DBus", bus_name="org.freedesktop.DBus",
                            interface="org.freedesktop.DBus"), "GetId"))
        assert (await notifier.wait(nid, 20)).action == "deny"
        await notifier.withdraw(nid)


async def test_wait_is_bounded(desktop: NotificationDesktop) -> None:
    await _clear(desktop)
    async with await Notifier.open(desktop.bus_address) as notifier:
        nid = await notifier.notify("nobody answers this", "", actions=[("allow", "Allow")], expire_ms=0)
        outcome = await notifier.wait(nid, 0.2)
        assert outcome.timed_out and outcome.action is None
        await notifier.withdraw(nid)
        with pytest.raises(NotificationError, match="not shown through this connection"):
            await notifier.wait(nid + 1000, 1)


async def test_the_server_leaving_ends_the_wait() -> None:
    with start_notification_desktop() as own:
        async with await Notifier.open(own.bus_address) as notifier:
            nid = await notifier.notify("Allow kubectl a token?", "", actions=[("allow", "Allow")], expire_ms=0)
            await asyncio.to_thread(own.stop_dunst)
            outcome = await notifier.wait(nid, 60)
            assert outcome.gone and outcome.action is None


class FakeClock:
    def __init__(self) -> None:
        self.t = 1_800_000_000.0

    def now(self) -> float:
        return self.t

    async def sleep(self, seconds: float) -> None:
        self.t += seconds


async def test_probe_cache_looks_once_per_address_and_again_after_its_ttl() -> None:
    clock = FakeClock()
    cache = ProbeCache(clock, ttl=60, limit=1)
    assert await cache(None) is None
    with start_notification_desktop() as own:
        first = await cache(own.bus_address)
        assert first is not None and first.name == "dunst"
        await asyncio.to_thread(own.stop_dunst)
        clock.t += 59
        assert await cache(own.bus_address) is first  # remembered: no second look within the ttl
        clock.t += 1
        assert await cache(own.bus_address) is None  # looked again: nobody serves notifications any more
        cache.forget(own.bus_address)
        with start_notification_desktop() as other:
            assert await cache(other.bus_address) is not None
            assert list(cache._seen) == [other.bus_address]  # bounded: the older address was dropped


async def test_a_bus_that_never_answers_is_a_bounded_error(tmp_path: Path) -> None:
    """A wedged bus (it accepts the connection, then says nothing): one NotificationError within the limit, and
    probe() says no server, rather than a caller hanging."""
    path = tmp_path / "wedged"
    accepted: list[asyncio.StreamWriter] = []

    async def hold(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        accepted.append(writer)

    server = await asyncio.start_unix_server(hold, path=str(path))
    try:
        with pytest.raises(NotificationError, match=r"did not answer within 0\.3 s"):
            await Notifier.open(f"unix:path={path}", limit=0.3)
        assert await probe(f"unix:path={path}", within=0.3) is None
        assert len(accepted) == 2
    finally:
        for writer in accepted:
            writer.close()
        server.close()
        await server.wait_closed()
