"""Hostile clients for the security, fault and fuzz tests: a raw socket client that speaks (or mangles) the daemon
protocol, hypothesis strategies for bad requests, the checks every answer must pass, and a recording and
tampering HTTP forward proxy that the daemon is pointed at with HTTP_PROXY.

Stdlib + hypothesis only, so bench/fuzz_protocol.py can use it too.
"""

from __future__ import annotations

import base64
import http.client
import http.server
import itertools
import json
import re
import socket
import threading
import time
import urllib.parse
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

from hypothesis import strategies as st

from client_shim import protocol
from client_shim.protocol import LINE_KINDS, MAGIC, TERMINAL
from tests.support.net import free_port

INTERNAL_ERROR = b"brokerd: internal error in brokerd (details in its log)"
LOGGED_INTERNAL_ERRORS = ("internal error while serving a request", "internal error on a client connection")


def dead_issuer() -> str:
    """An http://127.0.0.1 URL where nothing listens (connection refused, no DNS, no waiting)."""
    return f"http://127.0.0.1:{free_port()}"


def exchange(path: Path | str, data: bytes, *, timeout: float = 10.0, half_close: bool = True) -> bytes:
    """Send ``data``, half-close (so the daemon sees the end of it), and return everything until the daemon
    closes.  Raises TimeoutError when the daemon neither answers nor closes within ``timeout``."""
    sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    sock.settimeout(timeout)
    deadline = time.monotonic() + timeout
    try:
        while True:  # a momentarily full listen backlog answers EAGAIN: wait for the daemon to accept
            try:
                sock.connect(str(path))
                break
            except BlockingIOError:
                if time.monotonic() >= deadline:
                    raise TimeoutError(f"could not connect to {path} within {timeout} s") from None
                time.sleep(0.005)
        try:
            sock.sendall(data)
            if half_close:
                sock.shutdown(socket.SHUT_WR)
        except (BrokenPipeError, ConnectionResetError):
            pass  # the daemon refused a huge request before reading it all: its answer may still be there
        out = bytearray()
        while time.monotonic() < deadline:
            try:
                chunk = sock.recv(65536)
            except ConnectionResetError:
                return bytes(out)  # the daemon closed with our unread bytes still queued: what it said is here
            if not chunk:
                return bytes(out)
            out += chunk
        raise TimeoutError(f"no end of answer within {timeout} s (got {bytes(out)[:200]!r})")
    finally:
        sock.close()


def request(*argv: str, env: dict[str, str] | None = None, tty: bool = False) -> bytes:
    """A request as a shim would send it, with any environment (the daemon must drop what it does not forward)."""
    raw_env = {k.encode(): v.encode() for k, v in (env or {}).items()}
    return protocol.encode_request(argv, raw_env, tty=tty, program="brokerd-test")


@dataclass
class Answer:
    lines: list[bytes]

    @property
    def terminal(self) -> bytes | None:
        return self.lines[-1] if self.lines and self.lines[-1][:1] in TERMINAL else None


def check_answer(data: bytes, raw: bytes, *, max_request: int = protocol.MAX_REQUEST) -> Answer:
    """The protocol invariants for any request: well-formed lines, at most one terminal line and only at the end,
    exit codes that are numbers, and an answer to every complete request of allowed size."""
    assert raw == b"" or raw.endswith(b"\n"), f"answer does not end in a newline: {raw[-200:]!r}"
    lines = raw.split(b"\n")[:-1] if raw else []
    for i, line in enumerate(lines):
        assert line[:1] in LINE_KINDS, f"bad answer line {line[:200]!r}"
        line.decode("utf-8")  # the daemon only ever writes UTF-8
        if line[:1] in TERMINAL:
            assert i == len(lines) - 1, f"terminal line before the end: {lines!r}"
        if line[:1] == b"X":
            code, _, text = line[1:].partition(b" ")
            assert code.isdigit() and int(code) > 0 and text.startswith(b"brokerd: "), line
            assert text != INTERNAL_ERROR, f"request {data[:300]!r} caused {line!r}"
    answer = Answer(lines)
    end = data.find(b"\0\0")
    complete = end >= 0 and end + 2 <= max_request
    if complete or len(data) > max_request:
        assert answer.terminal is not None, f"no terminal answer to {data[:300]!r}: {raw[:300]!r}"
    return answer


# ---- hypothesis strategies -------------------------------------------------------------------------------------

COMMANDS = ["get-token", "get-token", "get-token", "get-token", "version", "status", "logout", "setup", "clean", "",
            "GET-TOKEN", "get-token\udcff"]
FLAGS = [
    "--oidc-client-id", "--oidc-client-secret", "--oidc-extra-scope", "--oidc-use-access-token", "--oidc-redirect-url",
    "--oidc-auth-request-extra-params", "--oidc-pkce-method", "--grant-type", "--username", "--listen-address",
    "--skip-open-browser", "--authentication-timeout-sec", "--force-refresh", "--token-cache-storage", "-v",
    "--profile", "--issuer", "--client-id", "--certificate-authority-data", "--insecure-skip-tls-verify", "--bogus",
]
ENV_NAMES = ["KUBERNETES_EXEC_INFO", "BROWSER", "DISPLAY", "WAYLAND_DISPLAY", "BROKERD_PROFILE", "PATH", ""]
_text = st.text(max_size=40)
_bytes = st.binary(max_size=40)
# Numbers that broke float(), int() or the stack: 400 digits, floats out of range, digits int() does not take.
HUGE_NUMBERS = ["9" * 400, "-" + "9" * 400, "1e999", "inf", "nan", "\u00b2", "\u0663", "0x10", "1_000"]
# Values with a port in them (--oidc-redirect-url, --listen-address) whose port is out of range or not ASCII digits.
BAD_PORTS = [f"{prefix}{port}" for prefix in ("http://localhost:", "127.0.0.1:", "http://[::1")
             for port in ("99999", "9" * 400, "\u00b2", "-1", "")]
# KUBERNETES_EXEC_INFO nested deeper than the interpreter's stack (json recurses).
DEEP_JSON = ["[" * 30_000 + "]" * 30_000, '{"a":' * 20_000 + "1" + "}" * 20_000,
             '{"apiVersion":"client.authentication.k8s.io/v1","spec":{"interactive":' + "[" * 30_000 + "]" * 30_000
             + "}}"]


def _encoded(value: str | bytes) -> bytes:
    return value if isinstance(value, bytes) else value.encode("utf-8", "surrogateescape")


@st.composite
def flag_field(draw: st.DrawFn, issuer: str) -> bytes:
    mangled = _bytes.map(lambda b: "--oidc-" + b.decode("utf-8", "surrogateescape"))
    name = draw(st.one_of(st.sampled_from(FLAGS), mangled))
    value = draw(st.one_of(_text, _bytes, st.sampled_from(["1", "-1", "0", "x", "auto", "password", "no"]),
                           st.sampled_from(HUGE_NUMBERS), st.sampled_from(BAD_PORTS)))
    form = draw(st.sampled_from(["eq", "bare", "split"]))
    if form == "eq":
        return b"A" + _encoded(name) + b"=" + _encoded(value)
    if form == "bare":
        return b"A" + _encoded(name)
    return b"A" + _encoded(name) + b"\0A" + _encoded(value).replace(b"\0", b"")


@st.composite
def structured_request(draw: st.DrawFn, issuer: str) -> bytes:
    """Mostly-valid requests with one or more things wrong: tags, types, encodings, framing."""
    magic = draw(st.sampled_from([MAGIC, MAGIC, MAGIC, MAGIC[:-1] + b"2", b"", MAGIC.upper(), MAGIC + b"\xff"]))
    fields = [magic]
    command = draw(st.one_of(st.sampled_from(COMMANDS), _text))
    fields.append(b"A" + _encoded(command))
    if command == "get-token" and draw(st.booleans()):
        fields.append(b"A--oidc-issuer-url=" + issuer.encode())  # never a real provider, never DNS
    for _ in range(draw(st.integers(0, 6))):
        kind = draw(st.sampled_from(["flag", "flag", "flag", "env", "tty", "name", "junk_tag", "raw"]))
        if kind == "flag":
            fields.append(draw(flag_field(issuer)))
        elif kind == "env":
            name = draw(st.sampled_from(ENV_NAMES))
            value = draw(st.one_of(_text, _bytes, st.just('{"apiVersion":"client.authentication.k8s.io/v1",'
                                                          '"spec":{"interactive":true}}'), st.just("{}"),
                                  st.sampled_from(DEEP_JSON)))
            sep = draw(st.sampled_from([b"=", b"", b"=="]))
            fields.append(b"E" + name.encode() + sep + _encoded(value))
        elif kind == "tty":
            fields.append(b"T" + _encoded(draw(st.sampled_from(["1", "0", "", "2", "yes"]))))
        elif kind == "name":
            fields.append(b"N" + _encoded(draw(st.one_of(_text, _bytes))))
        elif kind == "junk_tag":
            fields.append(draw(st.sampled_from([b"X", b"Z", b"\xff", b"R", b"O", b"a", b"\x80"])) + draw(_bytes))
        else:
            fields.append(draw(_bytes).replace(b"\0", b""))
    end = draw(st.sampled_from([b"\0\0", b"\0\0", b"\0\0", b"\0", b"", b"\0\0\0\0garbage"]))
    return b"\0".join(fields) + end


def bad_requests(issuer: str) -> st.SearchStrategy[bytes]:
    return st.one_of(
        structured_request(issuer),
        st.binary(max_size=300),
        st.binary(max_size=200).map(lambda b: MAGIC + b"\0" + b + b"\0\0"),
        st.builds(lambda n, b: MAGIC + b"\0A" + b * n + b"\0\0", st.integers(60_000, 70_000), st.sampled_from(
            [b"x", b"\xff", b"\0"])),
    )


# ---- a forward proxy for the daemon's HTTP ---------------------------------------------------------------------

@dataclass
class Exchange:
    method: str
    url: str
    request_headers: dict[str, str]
    request_body: bytes
    status: int
    response_body: bytes


Tamper = Callable[[str, bytes], bytes | None]  # (url, response body) -> replacement body, or None to pass it on


@dataclass
class Recorder:
    """Everything that went through the proxy, to collect the real secret values of a run."""
    exchanges: list[Exchange] = field(default_factory=list)
    tamper: Tamper | None = None
    lock: threading.Lock = field(default_factory=threading.Lock)

    def secrets(self) -> dict[str, set[str]]:
        """name -> the values seen on the wire: id_token, access_token, refresh_token, code, code_verifier,
        client_secret (from client_secret_basic or _post)."""
        found: dict[str, set[str]] = {}

        def add(name: str, value: object) -> None:
            if isinstance(value, str) and value:
                found.setdefault(name, set()).add(value)

        with self.lock:
            seen = list(self.exchanges)
        for ex in seen:
            form = dict(urllib.parse.parse_qsl(ex.request_body.decode("utf-8", "replace")))
            for name in ("code", "code_verifier", "refresh_token", "client_secret", "password"):
                add(name, form.get(name))
            auth = ex.request_headers.get("Authorization", "")
            if auth.lower().startswith("basic "):
                pair = base64.b64decode(auth[6:]).decode()
                add("client_secret", urllib.parse.unquote_plus(pair.partition(":")[2]))
            try:
                doc = json.loads(ex.response_body)
            except ValueError:
                continue
            if isinstance(doc, dict):
                for name in ("id_token", "access_token", "refresh_token"):
                    add(name, doc.get(name))
        return found


class _ProxyHandler(http.server.BaseHTTPRequestHandler):
    server: _ProxyServer
    protocol_version = "HTTP/1.1"

    def log_message(self, format: str, *args: object) -> None:  # the base class's signature
        pass  # quiet: the tests read the recorder, not a log

    def _relay(self) -> None:
        url = urllib.parse.urlsplit(self.path)  # a forward proxy gets absolute URLs
        if url.hostname not in ("127.0.0.1", "::1", "localhost"):
            self.send_error(403, "loopback only")
            return
        length = int(self.headers.get("Content-Length") or 0)
        body = self.rfile.read(length) if length else b""
        headers = {k: v for k, v in self.headers.items() if k.lower() not in ("proxy-connection", "connection")}
        conn = http.client.HTTPConnection(url.hostname, url.port or 80, timeout=30)
        try:
            target = url.path + (f"?{url.query}" if url.query else "")
            conn.request(self.command, target, body=body or None, headers=headers)
            resp = conn.getresponse()
            data = resp.read()
            status, rheaders = resp.status, resp.getheaders()
        finally:
            conn.close()
        recorder = self.server.recorder
        if recorder.tamper is not None:
            replaced = recorder.tamper(self.path, data)
            data = replaced if replaced is not None else data
        with recorder.lock:
            recorder.exchanges.append(Exchange(self.command, self.path, dict(self.headers.items()), body, status,
                                               data))
        self.send_response(status)
        for name, value in rheaders:
            if name.lower() not in ("content-length", "transfer-encoding", "connection"):
                self.send_header(name, value)
        self.send_header("Content-Length", str(len(data)))
        self.end_headers()
        self.wfile.write(data)

    do_GET = do_POST = _relay  # http.server's naming


class _ProxyServer(http.server.ThreadingHTTPServer):
    daemon_threads = True

    def __init__(self, recorder: Recorder) -> None:
        super().__init__(("127.0.0.1", 0), _ProxyHandler)
        self.recorder = recorder


class Proxy:
    """``with Proxy() as proxy:`` then give the daemon ``HTTP_PROXY=proxy.url``."""

    def __init__(self, tamper: Tamper | None = None) -> None:
        self.recorder = Recorder(tamper=tamper)
        self._server = _ProxyServer(self.recorder)
        self._thread = threading.Thread(target=self._server.serve_forever, kwargs={"poll_interval": 0.1},
                                        daemon=True)

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self._server.server_address[1]}"

    def __enter__(self) -> Proxy:
        self._thread.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self._server.shutdown()
        self._server.server_close()
        self._thread.join(timeout=5)


def proxy_env(proxy: Proxy) -> dict[str, str]:
    """Environment for a daemon that sends all its HTTP (loopback included) through ``proxy``."""
    return {"HTTP_PROXY": proxy.url, "http_proxy": proxy.url, "NO_PROXY": "", "no_proxy": ""}


_RECORD = re.compile(r"^(?:\S+ \S+ )?(DEBUG|INFO|WARNING|ERROR|CRITICAL) (\S+): ", re.MULTILINE)


def tracebacks(log: str, *, allow: tuple[str, ...] = ("aiohttp.server",)) -> list[str]:
    """Log records (LEVEL logger: message + continuation lines) with a traceback, except from ``allow``ed loggers.
    aiohttp.server logs each malformed HTTP request to the callback port with a traceback; that is aiohttp's
    doing, not a brokerd failure (see docs/threat-model.md, log flooding)."""
    starts = [m.start() for m in _RECORD.finditer(log)] + [len(log)]
    found = []
    for begin, end in itertools.pairwise(starts):
        record = log[begin:end]
        match = _RECORD.match(record)
        if "Traceback" in record and not (match and match.group(2) in allow):
            found.append(record)
    return found
