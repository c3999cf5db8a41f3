"""The HTTP layer between brokerd and a provider: proxies (HTTP(S)_PROXY/NO_PROXY, credentials as
Proxy-Authorization), the body limit, network failures as one line, and which failures may have reached the provider
(a rotating refresh token is then spent).  oidc.py and setup.py send through it."""

from __future__ import annotations

import os
from collections.abc import Mapping
from typing import Any

import aiohttp
import yarl

from .errors import ProviderError
from .oidc_wire import origin, proxy_for, safe_text

MAX_BODY = 1024 * 1024


def network_reason(exc: BaseException, timeout: float) -> str:
    if isinstance(exc, TimeoutError):
        return f"no answer within {timeout:g} s"
    if isinstance(exc, aiohttp.ClientConnectorCertificateError):
        # Checked before ClientConnectorError: its errno (1) would read as "operation not permitted".
        cert_error = exc.certificate_error
        detail = getattr(cert_error, "verify_message", "") or type(cert_error).__name__
        return (f"TLS certificate verification failed ({safe_text(str(detail), 80)}); trust its CA with "
                "--certificate-authority or --certificate-authority-data")
    if isinstance(exc, aiohttp.ClientConnectorError) and exc.os_error.errno:
        return os.strerror(exc.os_error.errno).lower()  # "connection refused", not asyncio's wording
    return safe_text(str(exc).splitlines()[0] if str(exc) else type(exc).__name__, 120)


def proxy_options(url: str) -> dict[str, Any]:
    """aiohttp's ``proxy``/``proxy_auth`` for ``url`` (HTTP(S)_PROXY/NO_PROXY; credentials in the proxy URL go
    to the proxy as Proxy-Authorization, as trust_env did)."""
    proxy = proxy_for(url)
    if proxy is None:
        return {}
    parsed = yarl.URL(proxy)
    if parsed.user is None:
        return {"proxy": proxy}
    return {"proxy": str(parsed.with_user(None)), "proxy_auth": aiohttp.BasicAuth.from_url(parsed)}


async def send(http: aiohttp.ClientSession, method: str, url: str, *, time_limit: float,
               data: Mapping[str, str] | None = None,
               headers: Mapping[str, str] | None = None) -> tuple[int, str, bytes]:
    """One request to a provider: status, content type and body (at most MAX_BODY bytes).  A failure is one
    ``ProviderError`` line; its ``maybe_delivered`` says whether the provider may have seen the request."""
    hdrs = {"Accept": "application/json", **(headers or {})}
    try:
        async with http.request(
            method, url, data=data, headers=hdrs, allow_redirects=method == "GET", **proxy_options(url),
            # sock_connect: a connect that times out is reported as such (ConnectionTimeoutError), not sent.
            timeout=aiohttp.ClientTimeout(total=time_limit, sock_connect=time_limit / 2),
        ) as resp:
            body = bytearray()
            async for chunk in resp.content.iter_chunked(65536):
                body += chunk
                if len(body) > MAX_BODY:
                    raise ProviderError(f"{origin(url)} sent more than {MAX_BODY} bytes")
            return resp.status, resp.headers.get("Content-Type", ""), bytes(body)
    except (TimeoutError, aiohttp.ClientError, OSError) as exc:
        err = ProviderError(f"cannot reach {origin(url)}: {network_reason(exc, time_limit)}")
        # Only a connection never made proves the request unsent; a timeout or a dropped connection after
        # sending may have reached the provider (a rotating refresh token is then spent).
        err.maybe_delivered = not isinstance(exc, aiohttp.ClientConnectorError | aiohttp.ConnectionTimeoutError)
        raise err from exc
    except ValueError as exc:  # aiohttp refusing a request it was given (conflicting headers ...): one line
        raise ProviderError(f"cannot send the request to {origin(url)} ({type(exc).__name__})") from exc
