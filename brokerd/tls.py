"""HTTP clients for talking to providers, one per TLS option set and request-header set.

kubelogin's --certificate-authority, --certificate-authority-data, --insecure-skip-tls-verify and
--oidc-request-header belong to one kubeconfig entry, not to the daemon: two sessions may need different trust
anchors.  ``ProviderClients`` keeps one ``aiohttp.ClientSession`` per distinct TLS set (keyed by a hash of the CA
*content*, so a renamed file shares and an edited file does not) and one ``OIDCClient`` per TLS set plus headers,
so discovery and JWKS caches are shared wherever that is safe.  Proxies come from HTTP(S)_PROXY/NO_PROXY in the
daemon's environment (``oidc_wire.proxy_for``; not aiohttp's ``trust_env``, which also reads ~/.netrc).

Files are the caller's to name, so they are read off the event loop with a time limit, and only regular files: a
FIFO or a hung network mount fails that caller's request with one line while every other caller is served.
Evicted HTTP clients are closed as soon as nothing holds an OIDCClient on them (a request in flight holds one).
"""

from __future__ import annotations

import asyncio
import contextlib
import hashlib
import logging
import os
import ssl
import stat
import weakref
from collections.abc import Callable
from dataclasses import dataclass
from typing import TypeVar

import aiohttp

from brokerd.clock import Clock
from brokerd.errors import UsageError
from brokerd.flags import decode_ca_data
from brokerd.models import ProviderSettings, TLSOptions, canonical_json
from brokerd.oidc import OIDCClient

log = logging.getLogger("brokerd.tls")

# Bounded so that a stream of distinct (e.g. generated) CA bundles cannot grow the daemon without limit.
MAX_CLIENTS = 32
MAX_FILE_BYTES = 4 * 1024 * 1024
FILE_READ_TIMEOUT = 10.0  # s; a local file is read in microseconds, a hung NFS mount never

T = TypeVar("T")


@dataclass(frozen=True)
class TrustMaterial:
    """The CA certificates of one TLS option set, read and checked; ``digest`` identifies the set."""

    pem: str
    insecure: bool
    digest: str


def check_regular_file(path: str, flag: str) -> None:
    """Blocking: UsageError naming ``flag`` unless ``path`` is a regular file (stat does not open, so never waits
    for a FIFO's writer)."""
    try:
        mode = os.stat(os.path.expanduser(path)).st_mode
    except OSError as exc:
        raise UsageError(f"--{flag}: cannot read {path}: {exc.strerror or exc}") from exc
    if not stat.S_ISREG(mode):
        raise UsageError(f"--{flag}: {path} is not a regular file")


def read_regular_file(path: str, flag: str) -> bytes:
    """Blocking (run it in a thread): the bytes of a regular file, UsageError naming ``flag`` otherwise."""
    try:
        # O_NONBLOCK: opening a FIFO for reading would wait for a writer; this way it opens and is refused below.
        fd = os.open(os.path.expanduser(path), os.O_RDONLY | os.O_NONBLOCK | os.O_NOCTTY | os.O_CLOEXEC)
    except OSError as exc:
        raise UsageError(f"--{flag}: cannot read {path}: {exc.strerror or exc}") from exc
    with os.fdopen(fd, "rb") as fh:
        if not stat.S_ISREG(os.fstat(fd).st_mode):
            raise UsageError(f"--{flag}: {path} is not a regular file")
        try:
            data = fh.read(MAX_FILE_BYTES + 1)
        except OSError as exc:
            raise UsageError(f"--{flag}: cannot read {path}: {exc.strerror or exc}") from exc
    if len(data) > MAX_FILE_BYTES:
        raise UsageError(f"--{flag}: {path} is larger than {MAX_FILE_BYTES // (1024 * 1024)} MiB")
    return data


async def off_loop(what: str, fn: Callable[..., T], *args: object, limit: float = FILE_READ_TIMEOUT) -> T:
    """Run blocking file work in a thread, giving up after ``limit`` seconds (the thread is left to finish alone)."""
    try:
        return await asyncio.wait_for(asyncio.to_thread(fn, *args), limit)
    except TimeoutError:
        raise UsageError(f"{what} took longer than {limit:g} s (a hung network file system?)") from None


def _read_trust(tls: TLSOptions) -> tuple[TrustMaterial, ssl.SSLContext | bool]:
    """Blocking: read the CA files and build the SSL context (the system store is read from disk, too)."""
    parts: list[str] = []
    for path in tls.ca_files:
        text = read_regular_file(path, "certificate-authority").decode("ascii", "replace")
        if "-----BEGIN CERTIFICATE-----" not in text:
            raise UsageError(f"--certificate-authority: {path} holds no PEM certificate")
        parts.append(text)
    parts.extend(decode_ca_data(value) for value in tls.ca_data)
    pem = "\n".join(parts)
    digest = hashlib.sha256(canonical_json({"pem": pem, "insecure": tls.insecure_skip_verify}).encode()).hexdigest()
    trust = TrustMaterial(pem, tls.insecure_skip_verify, digest)
    return trust, ssl_context(trust)


async def read_trust(tls: TLSOptions) -> tuple[TrustMaterial, ssl.SSLContext | bool]:
    if not tls.ca_files and not tls.ca_data and not tls.insecure_skip_verify:
        return _read_trust(tls)  # nothing to read: aiohttp's default context, no file I/O
    return await off_loop("reading --certificate-authority", _read_trust, tls)


def ssl_context(trust: TrustMaterial) -> ssl.SSLContext | bool:
    """What aiohttp's ``ssl=`` takes: False skips verification, True is the system default."""
    if trust.insecure:
        return False
    if not trust.pem:
        return True
    # kubelogin (Go) adds the given CAs to the system pool; do the same so a corporate CA does not unseat the rest.
    context = ssl.create_default_context()
    try:
        context.load_verify_locations(cadata=trust.pem)
    except ssl.SSLError as exc:
        raise UsageError(f"the certificate authority data is not valid PEM: {exc.reason or exc}") from exc
    return context


def _describe(tls: TLSOptions) -> str:
    if tls.insecure_skip_verify:
        return "TLS certificates not verified (--insecure-skip-tls-verify)"
    extra = len(tls.ca_files) + len(tls.ca_data)
    return f"system CAs plus {extra} given" if extra else "system CAs"


class _Retired:
    """An evicted HTTP client and the OIDCClients that may still use it (held by a renewal or a request)."""

    def __init__(self, http: aiohttp.ClientSession, clients: list[OIDCClient]) -> None:
        self.http = http
        self.users: weakref.WeakSet[OIDCClient] = weakref.WeakSet(clients)


class ProviderClients:
    """Owns every provider-facing ClientSession; ``close`` closes them all (one cleanup for the daemon)."""

    def __init__(self, clock: Clock, *, request_timeout: float = 30.0, max_clients: int = MAX_CLIENTS) -> None:
        self._clock = clock
        self._timeout = request_timeout
        self._max = max_clients
        self._http: dict[str, aiohttp.ClientSession] = {}
        self._oidc: dict[str, OIDCClient] = {}
        self._retired: list[_Retired] = []
        self._closing: set[asyncio.Task[None]] = set()
        self._loop: asyncio.AbstractEventLoop | None = None

    def __len__(self) -> int:
        return len(self._oidc)

    @property
    def retired(self) -> int:
        """Evicted HTTP clients not closed yet (something still holds one of their OIDCClients)."""
        return len(self._retired)

    async def client_for(self, settings: ProviderSettings) -> OIDCClient:
        """The OIDCClient for a session's TLS options and request headers (UsageError for unreadable CAs)."""
        self._loop = asyncio.get_running_loop()
        self._close_unused()
        trust, context = await read_trust(settings.tls)
        key = hashlib.sha256(canonical_json({"tls": trust.digest,
                                             "headers": [list(h) for h in settings.request_headers]}).encode())
        oidc_key = key.hexdigest()
        found = self._oidc.get(oidc_key)
        if found is not None:
            return found
        log.debug("new provider client: %s, %d request header(s)", _describe(settings.tls),
                  len(settings.request_headers))
        http = self._http.get(trust.digest)
        if http is None:
            if len(self._http) >= self._max:
                self._evict()
            # force_close: a fresh connection per request.  A pooled keep-alive connection the provider has just
            # closed (node's default idle limit is 5 s) fails a POST half way ("cannot write request body"): a
            # revocation then never arrives, and a refresh would count as maybe delivered and cost a login.
            # brokerd sends a few requests an hour; the extra handshakes cost nothing that matters.
            connector = aiohttp.TCPConnector(ssl=context, force_close=True)
            # trust_env=False: it would also read ~/.netrc; proxies come from oidc_wire.proxy_for per request.
            http = aiohttp.ClientSession(connector=connector, trust_env=False)
            self._http[trust.digest] = http
        if len(self._oidc) >= self._max:
            self._oidc.pop(next(iter(self._oidc)))
        client = OIDCClient(http, self._clock, request_timeout=self._timeout,
                            request_headers=dict(settings.request_headers))
        self._oidc[oidc_key] = client
        return client

    def _evict(self) -> None:
        # The oldest TLS set goes.  Its session may still serve a request (a renewal holds its OIDCClient), so it
        # is closed once no OIDCClient of it is left, or when too many retired ones pile up.
        digest = next(iter(self._http))
        http = self._http.pop(digest)
        users = [client for client in self._oidc.values() if client.http is http]
        self._oidc = {name: client for name, client in self._oidc.items() if client.http is not http}
        self._retired.append(_Retired(http, users))
        for client in users:
            # The last holder letting go (a renewal ending) closes the session soon after, not at the next eviction.
            weakref.finalize(client, self._sweep_soon)
        del users
        self._close_unused()

    def _sweep_soon(self) -> None:
        # A finalizer may run on any thread (wherever the garbage collector does): hand the sweep to the loop.
        if self._loop is not None and not self._loop.is_closed():
            with contextlib.suppress(RuntimeError):
                self._loop.call_soon_threadsafe(self._close_unused)

    def _close_unused(self) -> None:
        keep = []
        for retired in self._retired:
            if len(retired.users) == 0:
                self._close_later(retired.http)
            else:
                keep.append(retired)
        while len(keep) > self._max:  # the bound: a client held for ever does not keep sessions for ever
            oldest = keep.pop(0)
            log.warning("closing a retired provider HTTP client that is still held (too many retired clients)")
            self._close_later(oldest.http)
        self._retired = keep

    def _close_later(self, http: aiohttp.ClientSession) -> None:
        task = asyncio.get_running_loop().create_task(http.close())
        self._closing.add(task)
        task.add_done_callback(self._closing.discard)

    async def close(self) -> None:
        sessions = [*self._http.values(), *(r.http for r in self._retired)]
        self._http.clear()
        self._oidc.clear()
        self._retired.clear()
        for http in sessions:
            await http.close()
        for task in list(self._closing):
            with contextlib.suppress(Exception):
                await task
