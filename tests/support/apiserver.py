"""A tiny HTTPS stand-in for kube-apiserver that authenticates bearer tokens like its OIDC authenticator.

Run it as its own process (tests start it through ``tests.support.kube.start_apiserver``)::

    python tests/support/apiserver.py --issuer URL --client-id kube_login --ca-file PATH [--port 0]

It prints exactly one line, ``https://127.0.0.1:PORT``, once it listens, and writes the PEM of its freshly made
self-signed CA to ``--ca-file``. Token rules follow kube-apiserver's ``--oidc-*`` authenticator (go-oidc): RS256
only, ``iss`` must equal ``--issuer`` exactly, ``aud`` must contain the client id, ``exp`` is checked with no leeway,
``nbf`` (and here ``iat``) may be at most 5 minutes in the future, the username claim gets the ``<issuer>#`` prefix
unless it is ``email``, groups come from the groups claim (none when absent), and every authenticated user is also
in ``system:authenticated``. The JWKS is refetched once when a token names an unknown ``kid``.

Test-only endpoints, without authentication: ``GET /__test/requests`` returns
``{"requests": [{"path", "method", "user", "groups", "token_sha256_prefix"}], "unauthorized": N,
"forbidden": N, "failures": [{"path", "reason", "token_sha256_prefix"}]}`` and ``POST /__test/reset`` clears it.
Token values are never logged or stored, only the first 12 hex digits of their SHA-256.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import datetime as dt
import hashlib
import hmac
import ipaddress
import os
import signal
import ssl
import sys
import tempfile
import time
from dataclasses import dataclass, field
from typing import Any

import aiohttp
from aiohttp import web
from aiohttp.typedefs import Handler
from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.x509.oid import NameOID
from joserfc import jws, jwt
from joserfc.errors import JoseError
from joserfc.jwk import KeySet, RSAKey

# go-oidc allows this much clock skew for nbf; exp gets none.
NBF_LEEWAY_S = 300
CA_NAME = "brokerd test apiserver CA"
PUBLIC_PATHS = frozenset({"/version", "/healthz", "/livez", "/readyz"})


class AuthError(Exception):
    """The token is not acceptable; the message is the reason recorded in the failure log (never the token)."""


@dataclass(frozen=True)
class Settings:
    issuer: str
    client_id: str
    username_claim: str
    username_prefix: str | None
    groups_claim: str
    groups_prefix: str
    static_token: str | None
    server_version: str


@dataclass(frozen=True)
class UserInfo:
    username: str
    groups: list[str]


@dataclass
class RequestLog:
    requests: list[dict[str, Any]] = field(default_factory=list)
    failures: list[dict[str, Any]] = field(default_factory=list)
    unauthorized: int = 0
    forbidden: int = 0

    def clear(self) -> None:
        self.requests.clear()
        self.failures.clear()
        self.unauthorized = self.forbidden = 0


class OidcAuthenticator:
    """Discovery and JWKS are fetched lazily (kube-apiserver also starts before its issuer is reachable)."""

    def __init__(self, settings: Settings, http: aiohttp.ClientSession) -> None:
        self._settings = settings
        self._http = http
        self._keys: dict[str, RSAKey] = {}
        self._jwks_uri: str | None = None
        self._lock = asyncio.Lock()

    async def _get_json(self, url: str) -> dict[str, Any]:
        async with self._http.get(url) as resp:
            if resp.status != 200:
                raise AuthError(f"GET {url} answered {resp.status}")
            body = await resp.json(content_type=None)
        if not isinstance(body, dict):
            raise AuthError(f"GET {url} did not return an object")
        return body

    async def _refresh_keys(self) -> None:
        if self._jwks_uri is None:
            disco = await self._get_json(self._settings.issuer.rstrip("/") + "/.well-known/openid-configuration")
            if disco.get("issuer") != self._settings.issuer:
                raise AuthError("discovery issuer does not match --issuer")
            self._jwks_uri = str(disco["jwks_uri"])
        key_set = KeySet.import_key_set(await self._get_json(self._jwks_uri))  # type: ignore[arg-type]
        self._keys = {
            str(k.kid or f"#{i}"): k for i, k in enumerate(key_set.keys) if isinstance(k, RSAKey)
        }

    async def _candidate_keys(self, kid: str | None) -> list[RSAKey]:
        async with self._lock:
            # One refetch per unknown kid, serialized so concurrent requests do not stampede the issuer.
            if not self._keys or (kid is not None and kid not in self._keys):
                try:
                    await self._refresh_keys()
                except (aiohttp.ClientError, TimeoutError, KeyError, ValueError, JoseError) as exc:
                    raise AuthError(f"cannot fetch issuer keys: {type(exc).__name__}") from exc
            if kid is None:
                return list(self._keys.values())
            key = self._keys.get(kid)
            if key is None:
                raise AuthError("unknown kid")
            return [key]

    async def authenticate(self, token: str) -> UserInfo:
        try:
            header = jws.extract_compact(token.encode()).headers()
        except (JoseError, ValueError) as exc:
            raise AuthError("malformed JWT") from exc
        if header.get("alg") != "RS256":
            raise AuthError(f"alg {header.get('alg')!r} not allowed")
        kid = header.get("kid")
        claims: dict[str, Any] | None = None
        for key in await self._candidate_keys(str(kid) if kid is not None else None):
            try:
                claims = dict(jwt.decode(token, key, algorithms=["RS256"]).claims)
                break
            except (JoseError, ValueError):
                continue
        if claims is None:
            raise AuthError("bad signature")
        return self._check_claims(claims)

    def _check_claims(self, claims: dict[str, Any]) -> UserInfo:
        s = self._settings
        if claims.get("iss") != s.issuer:
            raise AuthError("iss mismatch")
        aud = claims.get("aud")
        auds = [aud] if isinstance(aud, str) else aud if isinstance(aud, list) else []
        if s.client_id not in auds:
            raise AuthError("aud does not contain client id")
        now = time.time()
        exp = claims.get("exp")
        if not isinstance(exp, int | float):
            raise AuthError("exp missing")
        if now > exp:  # go-oidc: expired when exp is before now; no leeway at all.
            raise AuthError("token expired")
        for name in ("nbf", "iat"):
            value = claims.get(name)
            if value is not None and (not isinstance(value, int | float) or value > now + NBF_LEEWAY_S):
                raise AuthError(f"{name} in the future")
        raw_user = claims.get(s.username_claim)
        if not isinstance(raw_user, str) or not raw_user:
            raise AuthError(f"claim {s.username_claim!r} missing")
        if s.username_claim == "email" and claims.get("email_verified", True) is not True:
            raise AuthError("email not verified")
        prefix = s.username_prefix
        if prefix is None:
            prefix = "" if s.username_claim == "email" else f"{s.issuer}#"
        raw_groups = claims.get(s.groups_claim, [])
        if isinstance(raw_groups, str):
            raw_groups = [raw_groups]
        if not isinstance(raw_groups, list) or not all(isinstance(g, str) for g in raw_groups):
            raise AuthError(f"claim {s.groups_claim!r} is not a string list")
        return UserInfo(prefix + raw_user, [s.groups_prefix + g for g in raw_groups])


SETTINGS_KEY = web.AppKey("settings", Settings)
AUTHN_KEY = web.AppKey("authn", OidcAuthenticator)
LOG_KEY = web.AppKey("log", RequestLog)
USER_KEY = "user"


def status_body(code: int, reason: str, message: str) -> web.Response:
    body = {"kind": "Status", "apiVersion": "v1", "metadata": {}, "status": "Failure",
            "message": message, "reason": reason, "code": code}
    return web.json_response(body, status=code)


def token_digest(token: str) -> str:
    return hashlib.sha256(token.encode()).hexdigest()[:12]


@web.middleware
async def authn_middleware(request: web.Request, handler: Handler) -> web.StreamResponse:
    if request.path.startswith("/__test/"):
        return await handler(request)
    settings, log = request.app[SETTINGS_KEY], request.app[LOG_KEY]
    auth = request.headers.get("Authorization", "")
    scheme, _, token = auth.partition(" ")
    digest = token_digest(token) if token else None
    if scheme.lower() == "bearer" and token:
        if settings.static_token is not None and hmac.compare_digest(token, settings.static_token):
            user = UserInfo("static", [])
        else:
            try:
                user = await request.app[AUTHN_KEY].authenticate(token.strip())
            except AuthError as exc:
                log.unauthorized += 1
                log.failures.append({"path": request.path, "reason": str(exc), "token_sha256_prefix": digest})
                return status_body(401, "Unauthorized", "Unauthorized")
        user = UserInfo(user.username, [*user.groups, "system:authenticated"])
    elif auth:
        log.unauthorized += 1
        log.failures.append({"path": request.path, "reason": "unsupported scheme", "token_sha256_prefix": None})
        return status_body(401, "Unauthorized", "Unauthorized")
    elif request.path in PUBLIC_PATHS:
        user = UserInfo("system:anonymous", ["system:unauthenticated"])
    else:
        # kube-apiserver lets anonymous users authenticate, then RBAC forbids everything but public info.
        log.forbidden += 1
        return status_body(403, "Forbidden", f'forbidden: User "system:anonymous" cannot get path "{request.path}"')
    log.requests.append({"path": request.path, "method": request.method, "user": user.username,
                         "groups": user.groups, "token_sha256_prefix": digest})
    request[USER_KEY] = user
    return await handler(request)


async def version(request: web.Request) -> web.Response:
    ver = request.app[SETTINGS_KEY].server_version.lstrip("v")
    major, minor = ver.split(".")[:2]
    return web.json_response({
        "major": major, "minor": minor, "gitVersion": f"v{ver}", "gitCommit": "0" * 40,
        "gitTreeState": "clean", "buildDate": "2025-01-01T00:00:00Z", "goVersion": "go1.23.0",
        "compiler": "gc", "platform": "linux/amd64",
    })


def resource(name: str, kind: str, verbs: list[str], namespaced: bool = False) -> dict[str, Any]:
    return {"name": name, "singularName": kind.lower(), "namespaced": namespaced, "kind": kind, "verbs": verbs}


RESOURCES: dict[str, list[dict[str, Any]]] = {
    "v1": [resource("nodes", "Node", ["get", "list"])],
    "authentication.k8s.io/v1": [resource("selfsubjectreviews", "SelfSubjectReview", ["create"])],
}


async def api_versions(request: web.Request) -> web.Response:
    cidr = {"clientCIDR": "0.0.0.0/0", "serverAddress": request.host}
    return web.json_response({"kind": "APIVersions", "versions": ["v1"], "serverAddressByClientCIDRs": [cidr]})


async def api_groups(_: web.Request) -> web.Response:
    gv = {"groupVersion": "authentication.k8s.io/v1", "version": "v1"}
    return web.json_response({"kind": "APIGroupList", "apiVersion": "v1", "groups": [
        {"name": "authentication.k8s.io", "versions": [gv], "preferredVersion": gv}]})


async def resource_list(request: web.Request) -> web.Response:
    group = request.match_info.get("group")
    gv = f"{group}/{request.match_info['version']}" if group else request.match_info["version"]
    if gv not in RESOURCES:
        return status_body(404, "NotFound", "the server could not find the requested resource")
    return web.json_response({"kind": "APIResourceList", "apiVersion": "v1", "groupVersion": gv,
                              "resources": RESOURCES[gv]})


async def self_subject_review(request: web.Request) -> web.Response:
    user: UserInfo = request[USER_KEY]
    return web.json_response({
        "kind": "SelfSubjectReview", "apiVersion": "authentication.k8s.io/v1",
        "metadata": {"creationTimestamp": None},
        "status": {"userInfo": {"username": user.username, "groups": user.groups}},
    }, status=201)


async def list_nodes(_: web.Request) -> web.Response:
    return web.json_response({"kind": "NodeList", "apiVersion": "v1", "metadata": {"resourceVersion": "1"},
                              "items": []})


async def test_requests(request: web.Request) -> web.Response:
    log = request.app[LOG_KEY]
    return web.json_response({"requests": log.requests, "failures": log.failures,
                              "unauthorized": log.unauthorized, "forbidden": log.forbidden})


async def test_reset(request: web.Request) -> web.Response:
    request.app[LOG_KEY].clear()
    return web.json_response({})


def build_app(settings: Settings) -> web.Application:
    app = web.Application(middlewares=[authn_middleware])
    app[SETTINGS_KEY] = settings
    app[LOG_KEY] = RequestLog()

    async def http_client(app: web.Application) -> Any:
        timeout = aiohttp.ClientTimeout(total=5)
        # trust_env=False: a proxy from the environment must never see loopback test traffic.
        async with aiohttp.ClientSession(timeout=timeout, trust_env=False) as http:
            app[AUTHN_KEY] = OidcAuthenticator(settings, http)
            yield

    app.cleanup_ctx.append(http_client)
    app.router.add_get("/version", version)
    app.router.add_get("/api", api_versions)
    app.router.add_get("/apis", api_groups)
    app.router.add_get("/api/{version}", resource_list)
    app.router.add_get("/apis/{group}/{version}", resource_list)
    app.router.add_get("/api/v1/nodes", list_nodes)
    app.router.add_post("/apis/authentication.k8s.io/v1/selfsubjectreviews", self_subject_review)
    app.router.add_get("/__test/requests", test_requests)
    app.router.add_post("/__test/reset", test_reset)
    return app


def make_tls(ca_file: str) -> ssl.SSLContext:
    """A throwaway CA (written to ca_file) and a server cert for 127.0.0.1/localhost/::1, all in memory."""
    now = dt.datetime.now(dt.UTC)

    def name(cn: str) -> x509.Name:
        return x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, cn)])

    def build(subject: x509.Name, public: ec.EllipticCurvePublicKey, signer: ec.EllipticCurvePrivateKey,
              *extensions: tuple[x509.ExtensionType, bool]) -> x509.Certificate:
        builder = (x509.CertificateBuilder().subject_name(subject).issuer_name(name(CA_NAME)).public_key(public)
                   .serial_number(x509.random_serial_number()).not_valid_before(now - dt.timedelta(minutes=5))
                   .not_valid_after(now + dt.timedelta(days=2)))
        for ext, critical in extensions:
            builder = builder.add_extension(ext, critical=critical)
        return builder.sign(signer, hashes.SHA256())

    ca_key, key = ec.generate_private_key(ec.SECP256R1()), ec.generate_private_key(ec.SECP256R1())
    ca_usage = x509.KeyUsage(False, False, False, False, False, True, True, False, False)  # certSign, crlSign
    ca_cert = build(name(CA_NAME), ca_key.public_key(), ca_key,
                    (x509.BasicConstraints(ca=True, path_length=0), True), (ca_usage, True))
    san = x509.SubjectAlternativeName([x509.IPAddress(ipaddress.ip_address("127.0.0.1")),
                                       x509.IPAddress(ipaddress.ip_address("::1")), x509.DNSName("localhost")])
    server_auth = x509.ExtendedKeyUsage([x509.oid.ExtendedKeyUsageOID.SERVER_AUTH])
    cert = build(name("kube-apiserver"), key.public_key(), ca_key, (san, False), (server_auth, False))
    with open(ca_file, "wb") as fh:
        fh.write(ca_cert.public_bytes(serialization.Encoding.PEM))
    ctx = ssl.create_default_context(ssl.Purpose.CLIENT_AUTH)
    # ssl can only load a key from a file: keep it in a private temp dir just long enough to load it.
    with tempfile.TemporaryDirectory(prefix="apiserver-tls-") as tmp:
        pem = os.path.join(tmp, "server.pem")
        with os.fdopen(os.open(pem, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600), "wb") as fh:
            fh.write(key.private_bytes(serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8,
                                       serialization.NoEncryption()))
            fh.write(cert.public_bytes(serialization.Encoding.PEM))
        ctx.load_cert_chain(pem)
    return ctx


def parse_args(argv: list[str]) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--issuer", required=True)
    p.add_argument("--client-id", required=True)
    p.add_argument("--username-claim", default="sub")
    p.add_argument("--username-prefix", default=None,
                   help="like --oidc-username-prefix; '-' disables; default '<issuer>#' unless the claim is email")
    p.add_argument("--groups-claim", default="groups")
    p.add_argument("--groups-prefix", default="")
    p.add_argument("--static-token", default=None, help="accept this bearer token as user 'static'")
    p.add_argument("--static-token-file", default=None, help="same, read from a file (keeps it out of argv)")
    p.add_argument("--server-version", default="1.32.0",
                   help="what /version reports; /usr/bin/kubectl (a dispatcher) then runs kubectl.<major>.<minor>")
    p.add_argument("--host", default="127.0.0.1")
    p.add_argument("--port", type=int, default=0)
    p.add_argument("--ca-file", required=True)
    return p.parse_args(argv)


async def serve(args: argparse.Namespace) -> None:
    static = args.static_token
    if args.static_token_file:
        with open(args.static_token_file, encoding="utf-8") as fh:
            static = fh.read().strip()
    prefix = "" if args.username_prefix == "-" else args.username_prefix
    settings = Settings(args.issuer, args.client_id, args.username_claim, prefix, args.groups_claim,
                        args.groups_prefix, static or None, args.server_version)
    runner = web.AppRunner(build_app(settings), access_log=None, shutdown_timeout=1.0)
    await runner.setup()
    site = web.TCPSite(runner, args.host, args.port, ssl_context=make_tls(args.ca_file))
    await site.start()
    port = runner.addresses[0][1]
    print(f"https://{args.host}:{port}", flush=True)
    stop = asyncio.Event()
    loop = asyncio.get_running_loop()
    for sig in (signal.SIGTERM, signal.SIGINT):
        loop.add_signal_handler(sig, stop.set)
    parent = os.getppid()
    try:
        # Exit on our own if the test process that started us dies without stopping us.
        while not stop.is_set() and os.getppid() == parent:
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(stop.wait(), timeout=1.0)
    finally:
        await runner.cleanup()


def main(argv: list[str] | None = None) -> None:
    asyncio.run(serve(parse_args(sys.argv[1:] if argv is None else argv)))


if __name__ == "__main__":
    main()
