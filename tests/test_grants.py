"""Each grant type end to end: the real shim -> the real daemon -> the real test provider.

Also the provider-facing HTTP options of a session: TLS trust (--certificate-authority[-data],
--insecure-skip-tls-verify) against the provider behind an HTTPS proxy, --oidc-request-header, and HTTP_PROXY from
the daemon's environment (a recording forward proxy, which is also how PKCE on the device flow is checked: the test
provider does not enforce it there).  Interactive prompts go through a pseudo-terminal, as a person would type.
"""

from __future__ import annotations

import asyncio
import base64
import contextlib
import hashlib
import json
import os
import pty
import re
import select
import ssl
import subprocess
import sys
import termios
import time
from collections.abc import AsyncIterator, Mapping, Sequence
from dataclasses import dataclass, field, replace
from pathlib import Path
from urllib.parse import parse_qsl

import aiohttp
import pytest
from aiohttp import web

from brokerd.clock import SystemClock
from brokerd.errors import UsageError
from brokerd.models import ProviderSettings, TLSOptions
from brokerd.tls import ProviderClients, off_loop
from tests.support.apiserver import make_tls
from tests.support.browser import login as browser_login
from tests.support.daemon import Daemon, exec_token, jwt_claims, login_args
from tests.support.kube import needs_kubectl, run_kubectl, start_apiserver, write_kubeconfig
from tests.support.provider import ProviderFactory, TestProvider

# setsid (start_new_session) happened already; adopting the pty as the controlling terminal needs an ioctl.
_ADOPT_TTY = ("import fcntl, os, sys, termios; fcntl.ioctl(0, termios.TIOCSCTTY, 0); "
              "os.execv(sys.argv[1], sys.argv[1:])")


class PtyRun:
    """stdin and stderr on the pty (messages and prompts arrive on ``master``), stdout on a pipe."""

    def __init__(self, argv: Sequence[str], env: Mapping[str, str]) -> None:
        self.master, slave = pty.openpty()
        self.proc = subprocess.Popen([sys.executable, "-c", _ADOPT_TTY, *argv], stdin=slave, stderr=slave,
                                     stdout=subprocess.PIPE, env=dict(env), start_new_session=True)
        os.close(slave)
        self.seen = ""

    def expect(self, pattern: str, timeout: float = 30.0) -> re.Match[str]:
        """Read the terminal until ``pattern`` matches what was written since the last match (bounded)."""
        deadline = time.monotonic() + timeout
        while True:
            found = re.search(pattern, self.seen)
            if found:
                self.seen = self.seen[found.end():]
                return found
            left = deadline - time.monotonic()
            if left <= 0:
                raise AssertionError(f"{pattern!r} not seen within {timeout} s; terminal shows {self.seen!r}")
            ready, _, _ = select.select([self.master], [], [], min(left, 0.2))
            if ready:
                try:
                    chunk = os.read(self.master, 4096)
                except OSError:  # EIO: every slave fd is closed, the child is gone
                    chunk = b""
                if not chunk:
                    raise AssertionError(f"{pattern!r} not seen before the terminal closed: {self.seen!r}")
                self.seen += chunk.decode("utf-8", "replace")

    def wait_echo_off(self, timeout: float = 10.0) -> None:
        """Wait until the program has turned echo off (typing earlier would race its TCSAFLUSH)."""
        deadline = time.monotonic() + timeout
        while termios.tcgetattr(self.master)[3] & termios.ECHO:
            if time.monotonic() > deadline:
                raise AssertionError("echo was never turned off for the secret prompt")
            time.sleep(0.01)

    def send(self, text: str) -> None:
        os.write(self.master, text.encode())

    def finish(self, timeout: float = 60.0) -> tuple[int, str, str]:
        """(exit status, stdout, everything else the terminal showed)."""
        try:
            out, _ = self.proc.communicate(timeout=timeout)
        except subprocess.TimeoutExpired:
            self.proc.kill()
            self.proc.communicate(timeout=5)
            raise
        with contextlib.suppress(OSError):
            while select.select([self.master], [], [], 0.1)[0]:
                chunk = os.read(self.master, 4096)
                if not chunk:
                    break
                self.seen += chunk.decode("utf-8", "replace")
        os.close(self.master)
        return self.proc.returncode, out.decode(), self.seen


# ---- a recording proxy: forward (HTTP_PROXY) or reverse (in front of the provider, optionally over TLS) ---------

@dataclass
class Seen:
    method: str
    path: str
    headers: Mapping[str, str]
    form: dict[str, str]
    at: float


@dataclass
class RecordingProxy:
    upstream: str | None = None  # None: a forward proxy for absolute-form requests
    ssl: ssl.SSLContext | None = None
    seen: list[Seen] = field(default_factory=list)
    url: str = ""

    @contextlib.asynccontextmanager
    async def running(self) -> AsyncIterator[RecordingProxy]:
        async with aiohttp.ClientSession() as client:  # no trust_env: never through a proxy ourselves
            self._client = client
            runner = web.ServerRunner(web.Server(self._handle), access_log=None)
            await runner.setup()
            site = web.TCPSite(runner, "127.0.0.1", 0, ssl_context=self.ssl)
            await site.start()
            port = runner.addresses[0][1]
            self.url = f"{'https' if self.ssl else 'http'}://127.0.0.1:{port}"
            try:
                yield self
            finally:
                await runner.cleanup()

    def paths(self, path: str) -> list[Seen]:
        return [s for s in self.seen if s.path == path]

    async def _handle(self, request: web.BaseRequest) -> web.Response:
        body = await request.read()
        form = dict(parse_qsl(body.decode("utf-8", "replace"))) if body else {}
        self.seen.append(Seen(request.method, request.path, dict(request.headers), form, time.monotonic()))
        base = self.upstream or f"http://{request.headers['Host']}"
        headers = {k: v for k, v in request.headers.items()
                   if k.lower() not in ("host", "content-length", "transfer-encoding", "connection")
                   and not k.lower().startswith("proxy-")}
        async with self._client.request(request.method, base + request.path_qs, data=body, headers=headers,
                                        allow_redirects=False) as resp:
            data = await resp.read()
            out = {k: v for k, v in resp.headers.items() if k.lower() in ("content-type", "location")}
        if self.upstream and request.path == "/.well-known/openid-configuration":
            data = data.replace(self.upstream.encode(), self.url.encode())  # the proxy is the issuer now
        return web.Response(status=resp.status, body=data, headers=out)


def _s256(verifier: str) -> str:
    return base64.urlsafe_b64encode(hashlib.sha256(verifier.encode()).digest()).rstrip(b"=").decode()






def _proxied_daemon(proxy_url: str) -> Daemon:
    d = Daemon()
    for name in ("NO_PROXY", "no_proxy", "HTTPS_PROXY", "https_proxy", "ALL_PROXY", "all_proxy"):
        d.env.pop(name, None)
    d.env["HTTP_PROXY"] = proxy_url
    return d.start()


# ---- password ---------------------------------------------------------------------------------------------------

def test_password_grant_with_flags(provider: TestProvider, daemon: Daemon) -> None:
    before = provider.counters()["token_grants"]["password"]
    token = exec_token(daemon.shim(login_args(provider.issuer, "--username=bob", "--password=bob-password")))
    assert jwt_claims(token)["sub"] == provider.sub("bob")  # grant auto + --username: the password grant, as kubelogin
    assert provider.counters()["token_grants"]["password"] == before + 1
    assert daemon.browser_openings() == 0
    assert "bob-password" not in daemon.log()


def test_password_prompted_on_the_terminal_without_echo(provider: TestProvider, daemon: Daemon) -> None:
    run = PtyRun(daemon.shim_argv(login_args(provider.issuer, "--grant-type=password")), daemon.env)
    run.expect("Username: ")
    run.send("alice\n")
    run.expect("Password: ")
    run.wait_echo_off()
    run.send("alice-password\n")
    code, out, terminal = run.finish()
    assert code == 0, terminal
    assert jwt_claims(json.loads(out)["status"]["token"])["sub"] == provider.sub("alice")
    assert "alice-password" not in terminal


def test_password_missing_without_a_terminal_is_one_clear_line(provider: TestProvider, daemon: Daemon) -> None:
    result = daemon.shim(login_args(provider.issuer, "--grant-type=password", "--username=alice"))
    assert result.returncode == 2 and result.stdout == ""
    assert result.stderr.count("\n") == 1 and "Password" in result.stderr and "terminal" in result.stderr


def test_wrong_password_is_reported(provider: TestProvider, daemon: Daemon) -> None:
    result = daemon.shim(login_args(provider.issuer, "--username=alice", "--password=nope"))
    assert result.returncode != 0 and "invalid_grant" in result.stderr
    assert "nope" not in result.stderr + daemon.log()


# ---- client credentials -----------------------------------------------------------------------------------------

def test_client_credentials_serves_the_access_token(provider: TestProvider, daemon: Daemon) -> None:
    before = provider.counters()["token_grants"]["client_credentials"]
    args = login_args(provider.issuer, "--grant-type=client-credentials", scopes=())
    token = exec_token(daemon.shim(args))
    assert token and exec_token(daemon.shim(args)) == token  # cached in the daemon
    assert provider.counters()["token_grants"]["client_credentials"] == before + 1
    bad = daemon.shim(login_args(provider.issuer, "--grant-type=client-credentials", "--username=x", scopes=()))
    assert bad.returncode == 2 and "--username" in bad.stderr


# ---- device code ------------------------------------------------------------------------------------------------

async def test_device_code_with_pkce_through_http_proxy_honours_slow_down(provider: TestProvider) -> None:
    provider.clear_faults()
    async with RecordingProxy().running() as proxy:
        d = await asyncio.to_thread(_proxied_daemon, proxy.url)
        try:
            provider.fault("token", status=400, body={"error": "slow_down"}, count=1)
            result = await asyncio.to_thread(d.shim, login_args(provider.issuer, "--grant-type=device-code"),
                                             timeout=90)
            exec_token(result)
            assert re.search(r"Open http://127\.0\.0\.1:\d+/device\S* and enter the code [A-Z]{4}-[A-Z]{4}",
                             result.stderr), result.stderr
            assert d.browser_openings() == 1  # the verification page was opened too
        finally:
            await asyncio.to_thread(d.close)
    (start,) = proxy.paths("/device/auth")
    assert start.form["code_challenge_method"] == "S256"
    polls = proxy.paths("/token")
    assert len(polls) == 2, [p.form.get("grant_type") for p in polls]
    assert all(_s256(p.form["code_verifier"]) == start.form["code_challenge"] for p in polls)
    assert polls[1].at - polls[0].at >= 9.5  # slow_down: interval 5 s became 10 s
    assert proxy.paths("/.well-known/openid-configuration")  # HTTP_PROXY from the daemon's environment is used


async def test_device_code_without_pkce_when_asked(provider: TestProvider) -> None:
    """--oidc-pkce-method=no: for a provider that refuses PKCE on the device flow, none is sent."""
    provider.clear_faults()
    async with RecordingProxy().running() as proxy:
        d = await asyncio.to_thread(_proxied_daemon, proxy.url)
        try:
            args = login_args(provider.issuer, "--grant-type=device-code", "--oidc-pkce-method=no",
                              "--oidc-extra-scope=email")
            exec_token(await asyncio.to_thread(d.shim, args, timeout=90))
        finally:
            await asyncio.to_thread(d.close)
    (start,) = proxy.paths("/device/auth")
    assert "code_challenge" not in start.form and "code_challenge_method" not in start.form
    assert all("code_verifier" not in p.form for p in proxy.paths("/token"))


# ---- authcode-keyboard ------------------------------------------------------------------------------------------

KEYBOARD_CLIENT = {
    "client_id": "kbd", "client_secret": "kbd-secret", "token_endpoint_auth_method": "client_secret_basic",
    "redirect_uris": ["http://localhost:18999/done"], "grant_types": ["authorization_code"],
    "response_types": ["code"], "scope": "openid groups email profile",
}


def test_authcode_keyboard_reads_the_pasted_redirect_from_the_terminal(provider_factory: ProviderFactory) -> None:
    p = provider_factory({"clients": [KEYBOARD_CLIENT]})
    with Daemon() as d:
        args = login_args(p.issuer, "--grant-type=authcode-keyboard", "--oidc-redirect-url=http://localhost:18999/done",
                          client_id="kbd", secret="kbd-secret")
        run = PtyRun(d.shim_argv(args), d.env)
        url = run.expect(r"to log in: (\S+)").group(1)
        landed = browser_login(url, follow_callback=False)  # nothing listens there: the person copies the address
        run.expect("Enter the code")
        run.send(landed.callback_url + "\n")
        code, out, terminal = run.finish()
        assert code == 0, terminal + d.log()
        assert jwt_claims(json.loads(out)["status"]["token"])["sub"] == p.sub("alice")
        assert d.browser_openings() == 0
        assert p.last_auth()["code_challenge_method"] == "S256"


def test_authcode_keyboard_defaults_to_the_oob_redirect(provider: TestProvider, daemon: Daemon) -> None:
    run = PtyRun(daemon.shim_argv(login_args(provider.issuer, "--grant-type=authcode-keyboard")), daemon.env)
    url = run.expect(r"to log in: (\S+)").group(1)
    assert "redirect_uri=urn%3Aietf%3Awg%3Aoauth%3A2.0%3Aoob" in url
    run.expect("Enter the code")
    run.send("\n")
    code, out, terminal = run.finish()
    assert code != 0 and out == ""
    assert "no authorization code was entered" in terminal


# ---- TLS and request headers ------------------------------------------------------------------------------------

async def test_tls_options_and_request_headers_apply_to_the_session(provider: TestProvider, tmp_path: Path) -> None:
    ca_file = tmp_path / "ca.pem"
    server_ssl = make_tls(str(ca_file))
    ca_b64 = base64.b64encode(ca_file.read_bytes()).decode()
    async with RecordingProxy(upstream=provider.issuer, ssl=server_ssl).running() as proxy:
        d = await asyncio.to_thread(Daemon().start)
        try:
            def shim(*extra: str) -> subprocess.CompletedProcess[str]:
                return d.shim(login_args(proxy.url, "--grant-type=client-credentials",
                                         "--oidc-request-header=X-Tenant=blue", *extra, scopes=()))

            untrusted = await asyncio.to_thread(shim, "--session-name=untrusted")
            assert untrusted.returncode != 0 and untrusted.stdout == ""
            assert "certificate verification failed" in untrusted.stderr, untrusted.stderr
            for extra in ([f"--certificate-authority={ca_file}"],
                          [f"--certificate-authority-data={ca_b64}", "--session-name=data"],
                          ["--insecure-skip-tls-verify", "--session-name=insecure"]):
                exec_token(await asyncio.to_thread(shim, *extra))
        finally:
            await asyncio.to_thread(d.close)
    tokens = proxy.paths("/token")
    assert len(tokens) == 3
    assert all(s.headers.get("X-Tenant") == "blue" for s in proxy.seen)


@pytest.mark.parametrize("flags", [["--certificate-authority={fifo}"],
                                   ["--local-server-cert={fifo}", "--local-server-key={fifo}"]])
def test_a_fifo_for_a_file_flag_fails_that_caller_alone(provider: TestProvider, tmp_path: Path,
                                                         flags: list[str]) -> None:
    """A FIFO (or a hung network file) named by one caller: read off the event loop, regular files only.  That
    caller gets one line at once; a second caller at the same time is served as usual."""
    fifo = tmp_path / "ca.fifo"
    os.mkfifo(fifo)
    with Daemon() as d:
        bad = d.shim_async(login_args(provider.issuer, "--session-name=fifo", *(f.format(fifo=fifo) for f in flags)))
        good = d.shim_async(login_args(provider.issuer, "--grant-type=client-credentials", scopes=()))
        try:
            out, err = good.communicate(timeout=60)
            assert good.returncode == 0, err + d.log()
            assert json.loads(out)["kind"] == "ExecCredential"
            bad_out, bad_err = bad.communicate(timeout=60)
        finally:
            for proc in (good, bad):
                if proc.poll() is None:
                    proc.kill()
                    proc.wait()
        assert bad.returncode == 2 and bad_out == ""
        assert bad_err.strip().splitlines() == [bad_err.strip()] and f"{fifo} is not a regular file" in bad_err
        assert "Traceback" not in d.log()


async def test_file_work_that_hangs_fails_after_its_limit_and_the_loop_keeps_running(tmp_path: Path) -> None:
    """What a hung network file does (stood in for by a blocking open of a FIFO): that request gets one line after
    the limit; the event loop was free meanwhile."""
    fifo = tmp_path / "hang.fifo"
    os.mkfifo(fifo)

    def blocking_read() -> bytes:
        with open(fifo, "rb") as fh:  # blocks until a writer comes
            return fh.read()

    ticks = 0

    async def ticker() -> None:
        nonlocal ticks
        while True:
            ticks += 1
            await asyncio.sleep(0.01)

    task = asyncio.create_task(ticker())
    try:
        with pytest.raises(UsageError, match=r"^reading --certificate-authority took longer than 0.5 s"):
            await off_loop("reading --certificate-authority", blocking_read, limit=0.5)
        assert ticks > 1  # the loop ran other work while the thread was stuck
    finally:
        task.cancel()
        # Let the stuck thread go: a writer appears and closes at once, so its read ends with EOF.
        os.close(os.open(fifo, os.O_WRONLY | os.O_NONBLOCK))


async def test_an_evicted_http_client_is_closed_once_its_last_request_has_ended(provider: TestProvider) -> None:
    clients = ProviderClients(SystemClock(), request_timeout=20.0, max_clients=1)
    base = ProviderSettings(issuer=provider.issuer, client_id="kube_login")
    try:
        first = await clients.client_for(base)
        http = first.http
        provider.fault("discovery", "delay", seconds=1.0)
        in_flight = asyncio.create_task(first.metadata(provider.issuer, max_age=0))
        await asyncio.sleep(0.2)  # the request is out (a request not started yet would be fine too)
        del first  # only the request in flight holds the client now
        # Another TLS set: the only slot goes to it, the first HTTP client is retired but still carries the request.
        other = await clients.client_for(replace(base, tls=TLSOptions(insecure_skip_verify=True)))
        assert other.http is not http and clients.retired == 1 and not http.closed
        meta = await in_flight
        assert meta.issuer == provider.issuer  # the retired client finished its request
        del in_flight
        for _ in range(100):  # bounded: the finalizer hands the close to the loop, which runs it next
            if http.closed:
                break
            await asyncio.sleep(0.02)
        assert http.closed and clients.retired == 0
        # Bounded even when every retired client is still held: at most max_clients wait, the rest are closed.
        held = [await clients.client_for(replace(base, request_headers=(("X-N", str(n)),),
                                                 tls=TLSOptions(insecure_skip_verify=n % 2 == 0)))
                for n in range(6)]
        assert clients.retired <= 1
        for _ in range(100):  # bounded: the closes run as tasks on the loop
            if sum(not c.http.closed for c in held) <= 2:
                break
            await asyncio.sleep(0.02)
        assert sum(not c.http.closed for c in held) <= 2  # the current one and at most one retired
    finally:
        await clients.close()


# ---- kubectl end to end with the device flow --------------------------------------------------------------------

@needs_kubectl
def test_kubectl_with_device_code(provider: TestProvider, daemon: Daemon, tmp_path: Path) -> None:
    with start_apiserver(provider.issuer) as apiserver:
        exec_args = ["oidc-login", *login_args(provider.issuer, "--grant-type=device-code")]
        kubeconfig = write_kubeconfig(tmp_path / "kubeconfig", apiserver.url, apiserver.ca_file, exec_args)
        before = provider.counters()["token_grants"]["device_code"]
        first = run_kubectl(["auth", "whoami", "-o", "json"], kubeconfig, env=daemon.env, timeout=90)
        assert first.returncode == 0, first.stderr + daemon.log()
        user = json.loads(first.stdout)["status"]["userInfo"]
        assert user["username"] == f"{provider.issuer}#{provider.sub('alice')}"
        assert {"admins", "dev"} <= set(user["groups"])
        assert "enter the code" in first.stderr
        second = run_kubectl(["get", "nodes"], kubeconfig, env=daemon.env, timeout=30)
        assert second.returncode == 0 and "enter the code" not in second.stderr
        assert provider.counters()["token_grants"]["device_code"] == before + 1
