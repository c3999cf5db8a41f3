"""brokerd.notices on a real desktop bus with dunst under Xvfb: the pending-login notice (one, replaced, opened by a
click, withdrawn at the end), the Allow/Deny confirmation, the expiry warning, and the terminal y/N answer."""

from __future__ import annotations

import asyncio
import os
import sys
from collections.abc import Awaitable, Callable, Iterator
from pathlib import Path

import aiohttp
import pytest

from brokerd.callback import CallbackServer
from brokerd.clock import SystemClock
from brokerd.models import DEFAULT_LISTEN, ProviderSettings
from brokerd.notices import (
    ALLOW,
    DENY,
    LoginNotice,
    confirm_on_desktop,
    terminal_answer,
    terminal_prompt,
    warn_on_desktop,
)
from brokerd.oidc import OIDCClient
from tests.support.daemon import BROWSER
from tests.support.notifications import NotificationDesktop, missing_tools, start_notification_desktop
from tests.support.provider import TestProvider

ISSUER = "https://auth.example.com"

desktop_only = pytest.mark.skipif(bool(missing_tools()), reason=f"needs the Debian packages "
                                  f"{', '.join(missing_tools())} (scripts/test installs them as root)")


@pytest.fixture(scope="module")
def desktop() -> Iterator[NotificationDesktop]:
    if missing_tools():
        pytest.skip(f"needs the Debian packages {', '.join(missing_tools())}")
    with start_notification_desktop() as d:
        yield d


async def _clear(d: NotificationDesktop) -> None:
    await asyncio.to_thread(d.dunstctl, "close-all")
    await asyncio.to_thread(d.wait_displayed, 0)


async def _history(d: NotificationDesktop, nid: int) -> list[dict[str, object]]:
    return [n for n in await asyncio.to_thread(d.history) if n["id"] == nid]


@desktop_only
async def test_login_notice_is_one_replaced_notification_opened_by_a_click(desktop: NotificationDesktop) -> None:
    await _clear(desktop)
    opened: list[str] = []

    async def open_login_page() -> None:
        opened.append("https://auth.example.com/authorize?...")

    async with await LoginNotice.show(desktop.bus_address, ISSUER, "kube_login", "kubectl",
                                      open_login_page) as notice:
        await notice.update(waiting=3)
        await asyncio.to_thread(desktop.wait_displayed, 1)  # replaced in place, not stacked
        await asyncio.to_thread(desktop.invoke_default)
        await asyncio.wait_for(notice.opened.wait(), 30)
        assert opened == ["https://auth.example.com/authorize?..."]
        nid = notice.nid
    # The login ended: the notice is withdrawn.
    await asyncio.to_thread(desktop.wait_displayed, 0)
    shown = await _history(desktop, nid)
    assert len(shown) == 1
    assert shown[0]["summary"] == "kubectl needs a login"
    assert "3 programs are waiting for it." in str(shown[0]["body"])


@desktop_only
async def test_a_real_login_waits_for_the_click_then_completes(desktop: NotificationDesktop, provider: TestProvider,
                                                              tmp_path: Path) -> None:
    """The flow the session will run for a caller without a terminal, from real parts: the authorization request,
    the loopback listener, the notice, the browser (started only by the click) and the code exchange."""
    await _clear(desktop)
    settings = ProviderSettings(issuer=provider.issuer, client_id="kube_login", client_secret="insecure_secret",
                                scopes=("groups",))
    browser_log = tmp_path / "browser.log"
    browser_env = {"PATH": os.environ["PATH"], "BROKERD_TEST_BROWSER_LOG": str(browser_log)}
    browsers: list[asyncio.subprocess.Process] = []
    callbacks = CallbackServer()
    try:
        async with aiohttp.ClientSession() as http:
            oidc = OIDCClient(http, SystemClock(), request_timeout=10)
            lease = await callbacks.acquire(DEFAULT_LISTEN)
            try:
                auth = await oidc.authorization_request(settings, lease.default_redirect_uri)
                waiter = lease.expect(auth.state)

                async def open_login_page() -> None:
                    # The browser, as BrowserOpener would start it (kept here so the test can wait for it to end).
                    browsers.append(await asyncio.create_subprocess_exec(
                        sys.executable, str(BROWSER), auth.url, env=browser_env,
                        stdout=asyncio.subprocess.DEVNULL, stderr=asyncio.subprocess.DEVNULL))

                async with await LoginNotice.show(desktop.bus_address, settings.issuer, settings.client_id,
                                                  "kubectl", open_login_page) as notice:
                    await asyncio.to_thread(desktop.wait_displayed, 1)
                    assert not browser_log.exists()  # nothing opened on its own
                    await asyncio.to_thread(desktop.invoke_default)
                    result = await asyncio.wait_for(waiter, 60)
                    assert notice.opened.is_set()
                tokens = await oidc.exchange_code(settings, auth, result.code, iss=result.iss)
            finally:
                await lease.release()
    finally:
        await callbacks.close()
        for proc in browsers:
            await asyncio.wait_for(proc.wait(), 60)
    assert [proc.returncode for proc in browsers] == [0]  # one browser, started by the click, and it got through
    assert tokens.claims["sub"] == provider.sub("alice")
    assert f"open {auth.url.split('?')[0]}" in browser_log.read_text()
    await asyncio.to_thread(desktop.wait_displayed, 0)  # withdrawn once the login ended


def _opener() -> tuple[list[int], Callable[[], Awaitable[None]]]:
    """A stand-in for the daemon's "open the login page": it counts its calls."""
    opened: list[int] = []

    async def open_login_page() -> None:
        opened.append(1)

    return opened, open_login_page

@desktop_only
async def test_login_notice_dismissed_is_told_and_opens_nothing(desktop: NotificationDesktop) -> None:
    await _clear(desktop)
    opened, open_login_page = _opener()
    async with await LoginNotice.show(desktop.bus_address, ISSUER, "kube_login", "k9s", open_login_page) as notice:
        await asyncio.to_thread(desktop.wait_displayed, 1)
        await asyncio.to_thread(desktop.dunstctl, "close")  # the person closes it
        await asyncio.wait_for(notice.dismissed.wait(), 30)
        await notice.update(waiting=2)  # no new notification once dismissed
    assert opened == []
    assert await asyncio.to_thread(desktop.displayed) == 0


@desktop_only
async def test_a_terminal_caller_opens_the_login_page_at_once(desktop: NotificationDesktop) -> None:
    await _clear(desktop)
    opened, open_login_page = _opener()
    async with await LoginNotice.show(desktop.bus_address, ISSUER, "kube_login", "k9s", open_login_page) as notice:
        await asyncio.to_thread(desktop.wait_displayed, 1)
        await notice.open_now()
        await notice.open_now()  # a second terminal caller: still one browser
        await asyncio.to_thread(desktop.wait_displayed, 0)  # the notice is taken down
        assert opened == [1]
        assert not notice.dismissed.is_set()


@desktop_only
@pytest.mark.parametrize("label, key", [("Allow", ALLOW), ("Deny", DENY)])
async def test_confirmation_on_the_desktop(desktop: NotificationDesktop, label: str, key: str) -> None:
    await _clear(desktop)

    async def person() -> None:
        await asyncio.to_thread(desktop.wait_displayed, 1)
        await asyncio.to_thread(desktop.choose, label)

    clicker = asyncio.create_task(person())
    outcome = await confirm_on_desktop(desktop.bus_address, "kubectl (pid 12) from k9s (pid 11)", ISSUER,
                                       "kube_login", within=60)
    await clicker
    assert outcome.action == key
    await asyncio.to_thread(desktop.wait_displayed, 0)  # withdrawn after the answer


@desktop_only
async def test_unanswered_confirmation_is_no_and_is_withdrawn(desktop: NotificationDesktop) -> None:
    await _clear(desktop)
    outcome = await confirm_on_desktop(desktop.bus_address, "kubectl (pid 12)", ISSUER, "kube_login", within=0.5)
    assert outcome.timed_out and outcome.action is None
    await asyncio.to_thread(desktop.wait_displayed, 0)


@desktop_only
async def test_expiry_warning_click_means_log_in_now(desktop: NotificationDesktop) -> None:
    await _clear(desktop)

    async def person() -> None:
        await asyncio.to_thread(desktop.wait_displayed, 1)
        await asyncio.to_thread(desktop.invoke_default)

    clicker = asyncio.create_task(person())
    assert await warn_on_desktop(desktop.bus_address, ISSUER, "kube_login", 10, within=60)
    await clicker
    await asyncio.to_thread(desktop.wait_displayed, 0)
    assert not await warn_on_desktop(desktop.bus_address, ISSUER, "kube_login", 10, within=0.2)


@pytest.mark.parametrize("answer, allowed", [("y", True), ("Yes\n", True), (" YES ", True), ("", False),
                                             ("n", False), ("yess", False), ("sure", False)])
def test_terminal_answer_allows_only_an_explicit_yes(answer: str, allowed: bool) -> None:
    assert terminal_answer(answer) is allowed


def test_terminal_prompt_names_the_caller_and_defaults_to_no() -> None:
    prompt = terminal_prompt("kubectl (pid 12) from bash (pid 11)", ISSUER, "kube_login")
    assert prompt == ("brokerd: allow kubectl (pid 12) from bash (pid 11) a token for https://auth.example.com "
                      "as kube_login? [y/N] ")
