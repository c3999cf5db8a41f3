"""Log in with a real headless Chromium driven over the Chrome DevTools Protocol.

Same command line as tests/support/browser.py (URL last; credentials from BROKERD_TEST_USER /
BROKERD_TEST_PASSWORD / BROKERD_TEST_OTP; --log / BROKERD_TEST_BROWSER_LOG; --deny / BROKERD_TEST_BROWSER_DENY=1)
plus --screenshot FILE (PNG of the last page). Needs aiohttp, so run it with the project's venv python:

    BROWSER="/work/main/.venv/bin/python tests/support/chromium_login.py"

Chromium gets a fresh profile in a temp dir and is killed by PID (its own process group) at the end.
It returns once the browser has loaded the non-provider redirect target (the localhost callback).
"""

from __future__ import annotations

import argparse
import asyncio
import base64
import contextlib
import itertools
import json
import os
import shutil
import signal
import subprocess
import sys
import tempfile
import time
import urllib.parse
from pathlib import Path
from typing import Any

import aiohttp

# Run as a script beside browser.py (its directory is sys.path[0]): the two browsers share the person's options.
from browser import add_person_args, append_log, redact  # type: ignore[import-not-found]

CHROMIUM = "/usr/bin/chromium"
DEFAULT_OTP = "123456"

# Runs inside the page: fill the one form like a person and press the right button, once per page.
STEP_JS = """
((cred) => {
  const href = location.href;
  if (document.readyState !== 'complete') return {href, state: 'loading'};
  const nav = performance.getEntriesByType('navigation')[0];
  if (!href.startsWith(cred.origin)) return {href, state: 'left', status: nav?.responseStatus ?? 0};
  const err = document.getElementById('error');
  if (err) return {href, state: 'error', text: err.textContent};
  const f = document.forms[0];
  if (!f) return {href, state: document.getElementById('done') ? 'done' : 'noform', title: document.title};
  if (f.dataset.pressed) return {href, state: 'submitting'};
  f.dataset.pressed = '1';
  const el = f.elements;
  if (el.password) { el.username.value = cred.user; el.password.value = cred.password; }
  else if (el.otp) { el.otp.value = cred.otp; }
  const buttons = [...f.querySelectorAll('button, input[type=submit]')];
  const wanted = cred.deny ? ['deny', 'yes'] : ['accept', ''];
  const pick = buttons.find((b) => b.name && wanted.includes(b.value) && (cred.deny || b.name !== 'abort'))
    || buttons.find((b) => b.name !== 'abort' && b.name !== 'decision') || buttons[0];
  pick.click();
  return {href, state: 'submitted', button: pick.textContent};
})
"""


class ChromiumError(Exception):
    """Chromium did not reach the redirect target."""


class Cdp:
    """A minimal CDP session over one page's websocket."""

    def __init__(self, ws: aiohttp.ClientWebSocketResponse) -> None:
        self.ws = ws
        self.ids = itertools.count(1)

    async def call(self, method: str, params: dict[str, Any] | None = None, timeout: float = 10.0) -> Any:
        msg_id = next(self.ids)
        await self.ws.send_json({"id": msg_id, "method": method, "params": params or {}})
        async with asyncio.timeout(timeout):
            while True:
                msg = await self.ws.receive()
                if msg.type != aiohttp.WSMsgType.TEXT:
                    raise ChromiumError(f"devtools connection closed during {method}")
                data = json.loads(msg.data)
                if data.get("id") == msg_id:
                    if "error" in data:
                        raise ChromiumError(f"{method}: {data['error']}")
                    return data.get("result", {})


async def _wait_port(profile: Path, proc: subprocess.Popen[bytes], timeout: float) -> int:
    marker = profile / "DevToolsActivePort"
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if proc.poll() is not None:
            raise ChromiumError(f"chromium exited early with status {proc.returncode}")
        if marker.exists():
            lines = marker.read_text().splitlines()
            if lines and lines[0].isdigit():
                return int(lines[0])
        await asyncio.sleep(0.1)
    raise ChromiumError(f"chromium wrote no DevToolsActivePort within {timeout} s")


async def drive(url: str, cred: dict[str, Any], timeout: float, screenshot: str | None) -> tuple[str, int]:
    """Returns (final URL, HTTP status of the final page)."""
    profile = Path(tempfile.mkdtemp(prefix="brokerd-chromium-"))
    proc = subprocess.Popen(
        [
            CHROMIUM,
            "--headless",
            "--no-sandbox",
            "--disable-gpu",
            "--disable-quic",
            "--no-first-run",
            "--disable-background-networking",
            "--disable-component-update",
            "--disable-sync",
            "--disable-dev-shm-usage",
            f"--user-data-dir={profile}",
            "--remote-debugging-port=0",
            "about:blank",
        ],
        stdin=subprocess.DEVNULL,
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
        start_new_session=True,  # its own process group, so its helpers go when we kill it
    )
    try:
        async with asyncio.timeout(timeout):
            port = await _wait_port(profile, proc, timeout)
            async with aiohttp.ClientSession() as http:
                async with http.get(f"http://127.0.0.1:{port}/json/list") as resp:
                    targets = await resp.json()
                page = next(t for t in targets if t.get("type") == "page")
                async with http.ws_connect(page["webSocketDebuggerUrl"], max_msg_size=64 << 20) as ws:
                    cdp = Cdp(ws)
                    await cdp.call("Page.enable")
                    await cdp.call("Page.navigate", {"url": url})
                    final = await _steps(cdp, cred)
                    if screenshot:
                        shot = await cdp.call("Page.captureScreenshot", {"format": "png"})
                        Path(screenshot).write_bytes(base64.b64decode(shot["data"]))
                    return final
    except TimeoutError as exc:
        raise ChromiumError(f"login in chromium did not finish within {timeout} s") from exc
    finally:
        _stop(proc)
        shutil.rmtree(profile, ignore_errors=True)


async def _steps(cdp: Cdp, cred: dict[str, Any]) -> tuple[str, int]:
    last = ""
    for _ in range(600):  # with the outer timeout this bounds the loop in count and time
        try:
            result = await cdp.call(
                "Runtime.evaluate",
                {"expression": f"{STEP_JS}({json.dumps(cred)})", "returnByValue": True},
            )
        except ChromiumError:
            # the page navigated away while the script ran; look again at the new one
            await asyncio.sleep(0.1)
            continue
        value = result.get("result", {}).get("value") or {}
        state, href = value.get("state"), value.get("href", "")
        if state == "left" and href == "about:blank":
            state = "loading"  # Page.navigate has not committed yet
        if state == "left":
            if not href.startswith("http://"):
                raise ChromiumError(f"browser landed on {href.split('?')[0]} (redirect target unreachable?)")
            return href, int(value.get("status") or 0)
        if state == "error":
            raise ChromiumError(f"provider shows an error at {redact(href)}: {value.get('text', '').strip()}")
        if state == "done":
            return href, 200
        if state == "noform":
            raise ChromiumError(f"page without a form at {redact(href)}: {value.get('title')!r}")
        last = href
        await asyncio.sleep(0.1)
    raise ChromiumError(f"too many steps, last page {redact(last)}")


def _stop(proc: subprocess.Popen[bytes]) -> None:
    if proc.poll() is None:
        try:
            os.killpg(proc.pid, signal.SIGTERM)
            proc.wait(timeout=5)
        except subprocess.TimeoutExpired:
            os.killpg(proc.pid, signal.SIGKILL)
            proc.wait(timeout=5)
        except ProcessLookupError:
            pass
    else:
        # chromium itself is gone; helpers in its group may linger
        with contextlib.suppress(ProcessLookupError):
            os.killpg(proc.pid, signal.SIGKILL)


def login(
    url: str,
    *,
    user: str | None = None,
    password: str | None = None,
    otp: str | None = None,
    deny: bool = False,
    timeout: float = 60.0,
    screenshot: str | None = None,
) -> tuple[str, int]:
    """Blocking entry point. Returns (final URL with its query, HTTP status). Raises ChromiumError."""
    if not os.path.exists(CHROMIUM):
        raise ChromiumError(f"{CHROMIUM} is missing (apt-get install -y chromium)")
    p = urllib.parse.urlsplit(url)
    cred = {
        "origin": f"{p.scheme}://{p.netloc}/",
        "user": user if user is not None else os.environ.get("BROKERD_TEST_USER", "alice"),
        "password": password if password is not None else os.environ.get("BROKERD_TEST_PASSWORD", "alice-password"),
        "otp": otp if otp is not None else os.environ.get("BROKERD_TEST_OTP", DEFAULT_OTP),
        "deny": deny,
    }
    return asyncio.run(drive(url, cred, timeout, screenshot))


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description="Headless Chromium login for brokerd tests")
    add_person_args(ap)
    ap.add_argument("--screenshot")
    ap.add_argument("--timeout", type=float, default=60.0)
    ap.add_argument("url")
    args = ap.parse_args(argv)
    if args.log:
        append_log(args.log, args.url)
    try:
        final, status = login(
            args.url,
            user=args.user,
            password=args.password,
            otp=args.otp,
            deny=args.deny,
            timeout=args.timeout,
            screenshot=args.screenshot,
        )
    except (ChromiumError, OSError, aiohttp.ClientError) as exc:
        print(f"chromium login: {exc}", file=sys.stderr)
        return 1
    print(f"final page {redact(final)} status {status}")
    return 0 if status < (500 if args.deny else 400) else 1


if __name__ == "__main__":
    sys.exit(main())
