"""A browser stand-in: logs in to the test provider as a person would, with plain HTTP and HTML forms.

Command line (the URL is the last argument, as a daemon's BROWSER command passes it)::

    python tests/support/browser.py [--user U] [--password P] [--otp CODE] [--deny] [--log FILE]
                                    [--no-follow-callback] [--delay SEC] [--timeout SEC] URL

Every option also has an environment default so ``BROWSER="python tests/support/browser.py"`` works with no
arguments: BROKERD_TEST_USER, BROKERD_TEST_PASSWORD, BROKERD_TEST_OTP, BROKERD_TEST_BROWSER_LOG,
BROKERD_TEST_BROWSER_DENY=1, BROKERD_TEST_BROWSER_NO_FOLLOW=1, BROKERD_TEST_BROWSER_DELAY.

Exit status: 0 when the redirect target answered (status < 400, or < 500 with --deny) or, with
--no-follow-callback, when the redirect to it was reached; 1 with a message on stderr otherwise.
Stdlib only, so it runs under any interpreter without the project's venv.
"""

from __future__ import annotations

import argparse
import http.client
import os
import sys
import time
import urllib.parse
import urllib.request
from dataclasses import dataclass, field
from html.parser import HTMLParser
from http.cookiejar import CookieJar

DEFAULT_OTP = "123456"
LOOPBACK_NAMES = ("localhost", "127.0.0.1", "::1")


class BrowserError(Exception):
    """The login did not go the way a person would expect."""


@dataclass
class Form:
    action: str
    method: str
    fields: dict[str, str] = field(default_factory=dict)
    field_types: dict[str, str] = field(default_factory=dict)
    buttons: list[tuple[str, str, str]] = field(default_factory=list)  # (name, value, label)


class _PageParser(HTMLParser):
    """Collects forms, the title and any element with id="error"."""

    def __init__(self) -> None:
        super().__init__(convert_charrefs=True)
        self.forms: list[Form] = []
        self.title = ""
        self.error: str | None = None
        self.done = False
        self._in: str | None = None
        self._button: dict[str, str] | None = None

    def handle_starttag(self, tag: str, attrs: list[tuple[str, str | None]]) -> None:
        a = {k: v or "" for k, v in attrs}
        if a.get("id") == "error":
            self._in, self.error = "error", ""
        elif a.get("id") == "done":
            self.done = True
        if tag == "title":
            self._in = "title"
        elif tag == "form":
            self.forms.append(Form(a.get("action", ""), a.get("method", "get").upper()))
        elif tag == "input" and self.forms and a.get("name"):
            kind = a.get("type", "text").lower()
            if kind == "submit":
                self.forms[-1].buttons.append((a["name"], a.get("value", ""), a.get("value", "")))
            else:
                self.forms[-1].fields[a["name"]] = a.get("value", "")
                self.forms[-1].field_types[a["name"]] = kind
        elif tag == "button" and self.forms and a.get("type", "submit") == "submit":
            self._button = {"name": a.get("name", ""), "value": a.get("value", ""), "label": ""}

    def handle_endtag(self, tag: str) -> None:
        if tag == "button" and self._button is not None and self.forms:
            b = self._button
            self.forms[-1].buttons.append((b["name"], b["value"], b["label"].strip()))
            self._button = None
        if tag in ("title", "p", "div", "span") and self._in is not None:
            self._in = None

    def handle_data(self, data: str) -> None:
        if self._button is not None:
            self._button["label"] += data
        if self._in == "title":
            self.title += data
        elif self._in == "error" and self.error is not None:
            self.error += data


@dataclass
class LoginResult:
    callback_url: str  # full URL including the query (code, state, iss): keep it out of logs
    callback_status: int | None  # None when the callback was not fetched
    callback_body: str
    pages: list[str]  # host/path of every page visited, no query

    @property
    def callback_params(self) -> dict[str, str]:
        return dict(urllib.parse.parse_qsl(urllib.parse.urlsplit(self.callback_url).query))


def redact(url: str) -> str:
    """scheme://host:port/path without query or fragment, safe for logs."""
    p = urllib.parse.urlsplit(url)
    return f"{p.scheme}://{p.netloc}{p.path}"


class StandInBrowser:
    """One browser window: a cookie jar and an HTTP client that resolves localhost like a browser."""

    def __init__(self, timeout: float = 10.0) -> None:
        self.jar = CookieJar()
        self.timeout = timeout

    def request(self, method: str, url: str, data: bytes | None = None) -> tuple[int, str | None, str]:
        """Returns (status, Location header, body text). Never follows redirects itself."""
        req = urllib.request.Request(url, data=data, method=method)
        self.jar.add_cookie_header(req)
        parts = urllib.parse.urlsplit(url)
        if parts.scheme != "http" or not parts.hostname:
            raise BrowserError(f"stand-in browser only speaks plain http on loopback, got {redact(url)}")
        headers = {k: v for k, v in req.header_items()}
        headers["Host"] = parts.netloc
        headers["User-Agent"] = "brokerd-test-browser/1"
        headers["Accept"] = "text/html,application/xhtml+xml"
        if data is not None:
            headers["Content-Type"] = "application/x-www-form-urlencoded"
        conn = self._connect(parts.hostname, parts.port or 80)
        try:
            target = parts.path or "/"
            if parts.query:
                target += "?" + parts.query
            conn.request(method, target, body=data, headers=headers)
            resp = conn.getresponse()
            self.jar.extract_cookies(resp, req)
            body = resp.read().decode("utf-8", "replace")
            return resp.status, resp.getheader("Location"), body
        finally:
            conn.close()

    def _connect(self, host: str, port: int) -> http.client.HTTPConnection:
        # A browser resolves localhost to both loopback addresses and uses whichever accepts the connection.
        candidates = ["127.0.0.1", "::1"] if host == "localhost" else [host]
        errors: list[str] = []
        for addr in candidates:
            conn = http.client.HTTPConnection(addr, port, timeout=self.timeout)
            try:
                conn.connect()
                return conn
            except OSError as exc:
                conn.close()
                errors.append(f"{addr}: {exc}")
        raise BrowserError(f"cannot connect to {host}:{port} ({'; '.join(errors)})")


def _choose(form: Form, user: str, password: str, otp: str, deny: bool) -> dict[str, str]:
    """Fills a form like a person: which form it is follows from its fields."""
    values = dict(form.fields)
    names = {b[0] for b in form.buttons}
    if form.field_types.get("password") == "password" or "password" in values:
        values["username"], values["password"] = user, password
    elif "otp" in values:
        values["otp"] = otp
    elif "decision" in names:
        values["decision"] = "deny" if deny else "accept"
    elif "abort" in names and deny:
        values["abort"] = "yes"
    elif "user_code" in values and not values["user_code"]:
        raise BrowserError("device code page without a pre-filled user code")
    return values


def login(
    url: str,
    *,
    user: str | None = None,
    password: str | None = None,
    otp: str | None = None,
    deny: bool = False,
    follow_callback: bool = True,
    timeout: float = 30.0,
    max_steps: int = 40,
) -> LoginResult:
    """Opens url, logs in, consents (or denies) and lands on the non-provider redirect target."""
    user = user if user is not None else os.environ.get("BROKERD_TEST_USER", "alice")
    password = password if password is not None else os.environ.get("BROKERD_TEST_PASSWORD", "alice-password")
    otp = otp if otp is not None else os.environ.get("BROKERD_TEST_OTP", DEFAULT_OTP)
    deadline = time.monotonic() + timeout
    provider_origin = urllib.parse.urlsplit(url)[:2]
    browser = StandInBrowser(timeout=min(timeout, 15.0))
    pages: list[str] = []
    method, data = "GET", None
    for _ in range(max_steps):
        if time.monotonic() > deadline:
            raise BrowserError(f"login did not finish within {timeout} s (last page {pages[-1:]})")
        if urllib.parse.urlsplit(url)[:2] != provider_origin:
            host = urllib.parse.urlsplit(url).hostname
            if host not in LOOPBACK_NAMES:
                raise BrowserError(f"redirected off loopback to {redact(url)}")
            if not follow_callback:
                return LoginResult(url, None, "", pages)
            status, _, body = browser.request(method, url, data)  # POST: the provider's form_post page
            pages.append(redact(url))
            return LoginResult(url, status, body, pages)
        status, location, body = browser.request(method, url, data)
        pages.append(redact(url))
        method, data = "GET", None
        if 300 <= status < 400:
            if not location:
                raise BrowserError(f"HTTP {status} without Location at {redact(url)}")
            url = urllib.parse.urljoin(url, location)
            continue
        page = _PageParser()
        page.feed(body)
        if page.error is not None:
            raise BrowserError(f"provider shows an error at {redact(url)} (HTTP {status}): {page.error.strip()}")
        if status != 200:
            raise BrowserError(f"unexpected HTTP {status} at {redact(url)}: {page.title.strip() or body[:200]}")
        if page.done and not page.forms:
            return LoginResult(url, status, body, pages)  # device flow ends on the provider's own page
        if len(page.forms) != 1:
            raise BrowserError(f"expected one form at {redact(url)}, found {len(page.forms)} ({page.title!r})")
        form = page.forms[0]
        values = _choose(form, user, password, otp, deny)
        encoded = urllib.parse.urlencode(values)
        target = urllib.parse.urljoin(url, form.action or url)
        if form.method == "POST":
            method, data, url = "POST", encoded.encode(), target
        else:
            url = urllib.parse.urlunsplit(urllib.parse.urlsplit(target)._replace(query=encoded))
    raise BrowserError(f"login took more than {max_steps} pages")


def add_person_args(ap: argparse.ArgumentParser) -> None:
    """The options both browsers share (this stand-in and chromium_login.py): who logs in, and the openings log."""
    env = os.environ
    ap.add_argument("--user")
    ap.add_argument("--password")
    ap.add_argument("--otp")
    ap.add_argument("--deny", action="store_true", default=env.get("BROKERD_TEST_BROWSER_DENY") == "1")
    ap.add_argument("--log", default=env.get("BROKERD_TEST_BROWSER_LOG"))


def append_log(path: str, url: str) -> None:
    fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_APPEND, 0o600)
    with os.fdopen(fd, "a", encoding="utf-8") as f:
        f.write(f"{time.time():.3f} pid={os.getpid()} open {redact(url)}\n")


def main(argv: list[str] | None = None) -> int:
    env = os.environ
    ap = argparse.ArgumentParser(description="Browser stand-in for brokerd tests")
    add_person_args(ap)
    ap.add_argument(
        "--no-follow-callback",
        dest="follow",
        action="store_false",
        default=env.get("BROKERD_TEST_BROWSER_NO_FOLLOW") != "1",
    )
    ap.add_argument("--delay", type=float, default=float(env.get("BROKERD_TEST_BROWSER_DELAY", "0")))
    ap.add_argument("--timeout", type=float, default=30.0)
    ap.add_argument("url")
    args = ap.parse_args(argv)
    if args.log:
        append_log(args.log, args.url)
    if args.delay > 0:
        time.sleep(min(args.delay, 120.0))
    try:
        result = login(
            args.url,
            user=args.user,
            password=args.password,
            otp=args.otp,
            deny=args.deny,
            follow_callback=args.follow,
            timeout=args.timeout,
        )
    except (BrowserError, OSError, http.client.HTTPException) as exc:
        print(f"browser stand-in: {exc}", file=sys.stderr)
        return 1
    if result.callback_status is None:
        print(f"reached {redact(result.callback_url)} (not fetched)")
        return 0
    print(f"final page {redact(result.callback_url)} status {result.callback_status}")
    limit = 500 if args.deny else 400
    if result.callback_status >= limit:
        print(f"browser stand-in: redirect target answered HTTP {result.callback_status}", file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
