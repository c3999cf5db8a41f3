"""How a new token is obtained when the session has none that can be refreshed: the grant types.

The authorization code flow is the default: a loopback listener lease, an authorization request with PKCE, the
browser opened in the caller's session, the redirect routed back by ``state``, the code exchanged.  Messages for the
person go through ``announce``, which reaches every caller waiting on this login, not just the one that started it.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import ssl
from collections.abc import Awaitable, Callable
from dataclasses import replace
from typing import TypeVar
from urllib.parse import parse_qsl, urlsplit

from brokerd.browser import BrowserOpener, browser_url
from brokerd.callback import CallbackServer, check_loopback
from brokerd.errors import LoginDenied, LoginError, LoginTimeout, NotificationError, PolicyRefused, UsageError
from brokerd.models import DEFAULT_LISTEN, Caller, LoginOptions, ProviderSettings, TokenSet
from brokerd.notices import LoginNotice
from brokerd.oidc import OIDCClient
from brokerd.policy import BackgroundLogin
from brokerd.tls import check_regular_file, off_loop

log = logging.getLogger("brokerd.flows")

Announce = Callable[[str], None]
OnNotice = Callable[[LoginNotice | None], None]
LOGIN_DISCOVERY_MAX_AGE = 0.0  # every login: one cheap GET, and a dead provider fails before the browser opens
T = TypeVar("T")


def _program(caller: Caller) -> str:
    """The program named on a notification: kubectl for the plugin (its own name means nothing to a person)."""
    program = str(getattr(caller, "program", "") or "")
    return program if program and not program.startswith(("kubectl", "brokerd")) else "kubectl"


# kubelogin's default for authcode-keyboard: the provider shows the code on its own page.
OOB_REDIRECT = "urn:ietf:wg:oauth:2.0:oob"


def parse_pasted_code(answer: str, state: str) -> tuple[str, str | None]:
    """A typed code, or a pasted redirect URL (``...?code=..&state=..&iss=..``) -> (code, iss)."""
    text = answer.strip()
    if not text:
        raise LoginError("no authorization code was entered")
    if "?" not in text and "code=" not in text:
        return text, None
    params = dict(parse_qsl(urlsplit(text).query or text.lstrip("?"), keep_blank_values=True))
    if "error" in params:
        desc = params.get("error_description", "")
        raise LoginDenied(f"the provider refused the login: {params['error'][:60]}" + (f" ({desc[:200]})" if desc
                                                                                        else ""))
    code = params.get("code", "")
    if not code:
        raise LoginError("the pasted address has no code in it")
    if params.get("state") not in (None, state):
        # A redirect from some other login (an old tab): exchanging it would fail anyway, say why.
        raise LoginError("the pasted address belongs to another login (its state does not match); use the URL "
                         "shown above")
    return code, params.get("iss")


def _load_cert_chain(cert: str, key: str) -> ssl.SSLContext:
    """Blocking (run in a thread, with a time limit): both must be regular files, so a FIFO is refused at once."""
    for path, flag in ((cert, "local-server-cert"), (key, "local-server-key")):
        check_regular_file(path, flag)
    context = ssl.create_default_context(ssl.Purpose.CLIENT_AUTH)
    try:
        context.load_cert_chain(cert, key)
    except (OSError, ssl.SSLError) as exc:
        raise UsageError(f"cannot load --local-server-cert/--local-server-key: {exc}") from exc
    return context


async def _callback_ssl(options: LoginOptions) -> ssl.SSLContext | None:
    if not options.local_server_cert or not options.local_server_key:
        return None
    return await off_loop("reading --local-server-cert/--local-server-key", _load_cert_chain,
                          options.local_server_cert, options.local_server_key)


def _redirect_port(url: str) -> int:
    parts = urlsplit(url)
    return parts.port or (443 if parts.scheme == "https" else 80)


def _listen_addresses(settings: ProviderSettings, options: LoginOptions) -> tuple[str, ...]:
    """Where to listen for the redirect.  With --oidc-redirect-url and no --listen-address, on its port only: the
    browser goes there and nowhere else, so falling back to another port would only lose the code."""
    if not settings.redirect_url or options.listen_addresses != DEFAULT_LISTEN:
        return options.listen_addresses
    host = urlsplit(settings.redirect_url).hostname or "localhost"
    bind = "127.0.0.1" if host == "localhost" else host
    return (f"[{bind}]:{_redirect_port(settings.redirect_url)}" if ":" in bind
            else f"{bind}:{_redirect_port(settings.redirect_url)}",)


class LoginFlows:
    def __init__(self, callbacks: CallbackServer, browser: BrowserOpener, *,
                 listen_non_loopback: Callable[[], bool] = lambda: False) -> None:
        """``listen_non_loopback``: the daemon's [daemon] listen_non_loopback, read at each login."""
        self._callbacks = callbacks
        self._browser = browser
        self._non_loopback_ok = listen_non_loopback

    async def login(self, oidc: OIDCClient, settings: ProviderSettings, options: LoginOptions, caller: Caller,
                    announce: Announce, *, background: BackgroundLogin | None = None,
                    on_notice: OnNotice = lambda notice: None) -> TokenSet:
        """``background``: how a login for a caller without a terminal shows itself (agent.Agent.background):
        "notify" puts up a desktop notification whose click opens the browser; None or "browser" opens it now."""
        grant = options.grant_type
        log.debug("session %s: no token to refresh; logging in (--grant-type=%s)", settings.key.short(), grant)
        if grant in ("auto", "authcode"):
            if options.password is not None and grant == "auto":
                return await self._password(oidc, settings, options, caller)
            return await self._authcode(oidc, settings, options, caller, announce, background, on_notice)
        if grant == "authcode-keyboard":
            return await self._authcode_keyboard(oidc, settings, options, caller, announce)
        if grant == "password":
            return await self._password(oidc, settings, options, caller)
        if grant == "device-code":
            return await self._device(oidc, settings, options, caller, announce, background, on_notice)
        if grant == "client-credentials":
            tokens = await oidc.client_credentials(settings)
            if not tokens.id_token and tokens.access_token:
                # As kubelogin does: with no ID token for a client, the access token is the credential served.
                tokens = replace(tokens, id_token=tokens.access_token,
                                 expires_at=tokens.access_expires_at or tokens.expires_at)
            return tokens
        raise UsageError(f"unknown grant type {grant!r}")

    async def _authcode(self, oidc: OIDCClient, settings: ProviderSettings, options: LoginOptions, caller: Caller,
                        announce: Announce, background: BackgroundLogin | None = None,
                        on_notice: OnNotice = lambda notice: None) -> TokenSet:
        addresses = _listen_addresses(settings, options)
        non_loopback_ok = self._non_loopback_ok()
        if not non_loopback_ok:
            check_loopback(addresses)  # before anything goes out: the caller's flags are wrong, not the provider
        # Fresh discovery first: opening a browser at a provider that is down only makes the person wait.
        await oidc.metadata(settings.issuer, max_age=LOGIN_DISCOVERY_MAX_AGE)
        lease = await self._callbacks.acquire(addresses, await _callback_ssl(options), on_wait=announce,
                                              non_loopback_ok=non_loopback_ok)
        try:
            redirect_uri = settings.redirect_url or lease.default_redirect_uri
            if settings.redirect_url and lease.port != _redirect_port(settings.redirect_url):
                raise UsageError(f"--oidc-redirect-url sends the browser to port {_redirect_port(redirect_uri)} but "
                                 f"brokerd listens on port {lease.port}; make --listen-address match it")
            auth = await oidc.authorization_request(
                settings, redirect_uri, pkce_method=options.pkce_method, login_hint=settings.username)
            browser_url(auth.url, "the login URL (the authorization endpoint)")
            waiter = lease.expect(auth.state, path=urlsplit(redirect_uri).path or "/",
                                  open_url_after=options.open_url_after_authentication,
                                  form_post=settings.registration.response_mode.startswith("form_post"))
            announce(f"Open this URL to log in: {auth.url}")

            async def open_browser() -> None:
                if not await self._browser.open(auth.url, command=options.browser_command, caller_env=caller.env):
                    announce("brokerd could not open a browser (set BROWSER or --browser-command); "
                             "open the URL above yourself")

            notice = None
            if background == "notify":
                notice = await _show_notice(settings, caller, open_browser)
            elif not options.skip_open_browser:
                await open_browser()
            result = await self._wait_shown(waiter, notice, options, on_notice)
            return await oidc.exchange_code(settings, auth, result.code, iss=result.iss, response=result.response)
        finally:
            await lease.release()

    async def _wait_shown(self, waiter: Awaitable[T], notice: LoginNotice | None, options: LoginOptions,
                          on_notice: OnNotice, what: str = "no login was completed in the browser") -> T:
        """Wait for the login; with a notice, until the person closes it too (the notice is withdrawn after)."""
        try:
            if notice is None:
                return await self._wait(waiter, options, what)
            on_notice(notice)
            async with notice:
                return await self._wait_or_dismissed(waiter, notice, options, what)
        finally:
            on_notice(None)

    @staticmethod
    async def _wait(waiter: Awaitable[T], options: LoginOptions,
                    what: str = "no login was completed in the browser") -> T:
        try:
            return await asyncio.wait_for(waiter, options.authentication_timeout)
        except TimeoutError:
            raise LoginTimeout(f"{what} within {options.authentication_timeout:.0f} s") from None

    async def _wait_or_dismissed(self, waiter: Awaitable[T], notice: LoginNotice, options: LoginOptions,
                                 what: str) -> T:
        """The callback, unless the person closes the notification first (then nobody is asked again for a while:
        the session's login retry interval)."""
        dismissed = asyncio.ensure_future(notice.dismissed.wait())
        done = asyncio.ensure_future(self._wait(waiter, options, what))
        try:
            await asyncio.wait({done, dismissed}, return_when=asyncio.FIRST_COMPLETED)
            if done.done():
                return done.result()
            raise LoginDenied("the login notification was closed; log in from a terminal (`brokerd login`) when "
                              "you are ready")
        finally:
            for task in (done, dismissed):
                task.cancel()
                with contextlib.suppress(asyncio.CancelledError, Exception):
                    await task

    async def _authcode_keyboard(self, oidc: OIDCClient, settings: ProviderSettings, options: LoginOptions,
                                 caller: Caller, announce: Announce) -> TokenSet:
        """For SSH sessions: the URL goes to the caller's terminal, the person types back the code, or pastes the
        whole address the browser ended on (then state and iss are checked as the loopback listener would)."""
        redirect_uri = settings.redirect_url or OOB_REDIRECT
        if settings.registration.response_mode.startswith("form_post"):
            raise UsageError("--oidc-response-mode=form_post cannot work with --grant-type=authcode-keyboard (the "
                             "browser posts the answer, there is no address to paste); use query.jwt or query")
        auth = await oidc.authorization_request(
            settings, redirect_uri, pkce_method=options.pkce_method, login_hint=settings.username)
        announce(f"Open this URL in a browser on any machine to log in: {auth.url}")
        try:
            answer = await asyncio.wait_for(
                caller.ask("Enter the code (or paste the address the browser ended on): ", secret=False),
                options.authentication_timeout)
        except TimeoutError:
            raise LoginTimeout(
                f"no code was entered within {options.authentication_timeout:.0f} s") from None
        if response := dict(parse_qsl(urlsplit(answer.strip()).query)).get("response"):
            return await oidc.exchange_code(settings, auth, "", response=response)  # JARM: verified, code inside
        code, iss = parse_pasted_code(answer, auth.state)
        # A pasted address is a redirect and must carry iss where the provider sends one; a typed code cannot.
        return await oidc.exchange_code(settings, auth, code, iss=iss, redirected=code != answer.strip())

    async def _password(self, oidc: OIDCClient, settings: ProviderSettings, options: LoginOptions,
                        caller: Caller) -> TokenSet:
        username = settings.username
        if not username:
            username = (await caller.ask("Username: ", secret=False)).strip()
        password = options.password
        if password is None:
            password = await caller.ask("Password: ", secret=True)
        return await oidc.password_grant(settings, username, password)

    async def _device(self, oidc: OIDCClient, settings: ProviderSettings, options: LoginOptions, caller: Caller,
                      announce: Announce, background: BackgroundLogin | None = None,
                      on_notice: OnNotice = lambda notice: None) -> TokenSet:
        """The same rule as the code flow for a caller without a terminal: "notify" shows the user code on a
        notification whose click opens the verification page; nothing opens before that click."""
        device = await oidc.start_device_authorization(settings, pkce=options.pkce_method != "no")
        # Both are the provider's words: checked before they are shown or reach a browser command line.
        shown = browser_url(device.verification_uri, "the device flow's verification_uri")
        url = shown
        if device.verification_uri_complete is not None:
            url = browser_url(device.verification_uri_complete, "the device flow's verification_uri_complete")
        announce(f"Open {shown} and enter the code {device.user_code}")

        async def open_browser() -> None:
            if not await self._browser.open(url, command=options.browser_command, caller_env=caller.env):
                announce("brokerd could not open a browser (set BROWSER or --browser-command); "
                         "open the URL above yourself")

        notice = None
        if background == "notify":
            notice = await _show_notice(settings, caller, open_browser, user_code=device.user_code)
        elif not options.skip_open_browser:
            await open_browser()
        return await self._wait_shown(oidc.poll_device_token(settings, device), notice, options, on_notice,
                                      "the device login was not completed")


async def _show_notice(settings: ProviderSettings, caller: Caller, open_browser: Callable[[], Awaitable[None]], *,
                       user_code: str | None = None) -> LoginNotice:
    """The pending login's notification on the caller's bus; PolicyRefused (one line) when it cannot be shown."""
    try:
        return await LoginNotice.show(caller.env.get("DBUS_SESSION_BUS_ADDRESS", ""), settings.issuer,
                                      settings.client_id, _program(caller), open_browser, user_code=user_code)
    except NotificationError as exc:
        # The server went away since the probe.  No surprise tab: the caller hears what to do.
        raise PolicyRefused(f"a login to {settings.issuer} is needed, this program has no terminal and the desktop "
                            f"notification failed ({exc}); log in from a terminal: `brokerd login` or any kubectl "
                            "command there") from None
