"""HTTP clients for talking to providers, one per TLS option set and request-header set.

kubelogin's --certificate-authority, --certificate-authority-data, --insecure-skip-tls-verify and
--oidc-request-header belong to one kubeconfig entry, not to the daemon: two sessions may need different trust
anchors.  ``ProviderClients`` keeps one ``aiohttp.ClientSession`` per distinct TLS set (keyed by a hash of the CA
*content*, so a renamed file shares and an edited file does not) and one ``OIDCClient`` per TLS set plus headers,
so discovery and JWKS caches are shared wherever that is safe.  Proxies come from HTTP(S)_PROXY/NO_PROXY in the
daemon's environment (``trust_env``).
"""

from __future__ import annotations

import hashlib
import os
import ssl
from dataclasses import dataclass

import aiohttp

from brokerd.clock import Clock
from brokerd.errors import UsageError
from brokerd.flags import decode_ca_data
from brokerd.models import ProviderSettings, TLSOptions, canonical_json
from brokerd.oidc import OIDCClient

# Bounded so that a stream of distinct (e.g. generated) CA bundles cannot grow the daemon without limit.
MAX_CLIENTS = 32


@dataclass(frozen=True)
class TrustMaterial:
    """The CA certificates of one TLS option set, read and checked; ``digest`` identifies the set."""

    pem: str
    insecure: bool
    digest: str


def read_trust(tls: TLSOptions) -> TrustMaterial:
    parts: list[str] = []
    for path in tls.ca_files:
        try:
            with open(os.path.expanduser(path), encoding="ascii", errors="replace") as fh:
                text = fh.read(4 * 1024 * 1024)
        except OSError as exc:
            raise UsageError(f"--certificate-authority: cannot read {path}: {exc.strerror or exc}") from exc
        if "-----BEGIN CERTIFICATE-----" not in text:
            raise UsageError(f"--certificate-authority: {path} holds no PEM certificate")
        parts.append(text)
    parts.extend(decode_ca_data(value) for value in tls.ca_data)
    pem = "\n".join(parts)
    digest = hashlib.sha256(canonical_json({"pem": pem, "insecure": tls.insecure_skip_verify}).encode()).hexdigest()
    return TrustMaterial(pem, tls.insecure_skip_verify, digest)


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


class ProviderClients:
    """Owns every provider-facing ClientSession; ``close`` closes them all (one cleanup for the daemon)."""

    def __init__(self, clock: Clock, *, request_timeout: float = 30.0) -> None:
        self._clock = clock
        self._timeout = request_timeout
        self._http: dict[str, aiohttp.ClientSession] = {}
        self._oidc: dict[str, OIDCClient] = {}
        self._retired: list[aiohttp.ClientSession] = []

    def __len__(self) -> int:
        return len(self._oidc)

    def for_options(self, settings: ProviderSettings) -> OIDCClient:
        """The OIDCClient for a session's TLS options and request headers (UsageError for unreadable CAs)."""
        trust = read_trust(settings.tls)
        key = hashlib.sha256(canonical_json({"tls": trust.digest,
                                             "headers": [list(h) for h in settings.request_headers]}).encode())
        oidc_key = key.hexdigest()
        found = self._oidc.get(oidc_key)
        if found is not None:
            return found
        http = self._http.get(trust.digest)
        if http is None:
            if len(self._http) >= MAX_CLIENTS:
                self._evict()
            connector = aiohttp.TCPConnector(ssl=ssl_context(trust))
            http = aiohttp.ClientSession(connector=connector, trust_env=True)
            self._http[trust.digest] = http
        if len(self._oidc) >= MAX_CLIENTS:
            self._oidc.pop(next(iter(self._oidc)))
        client = OIDCClient(http, self._clock, request_timeout=self._timeout,
                            request_headers=dict(settings.request_headers))
        self._oidc[oidc_key] = client
        return client

    def _evict(self) -> None:
        # The oldest TLS set goes; its session is closed at shutdown, since a request may still be using it.
        digest = next(iter(self._http))
        self._retired.append(self._http.pop(digest))
        http = self._retired[-1]
        for name, client in list(self._oidc.items()):
            if client.http is http:
                del self._oidc[name]

    async def close(self) -> None:
        sessions = [*self._http.values(), *self._retired]
        self._http.clear()
        self._oidc.clear()
        self._retired.clear()
        for http in sessions:
            await http.close()
