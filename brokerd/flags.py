"""kubelogin's ``get-token`` flags, parsed (``parse_flags``) and turned into ProviderSettings and LoginOptions by
small pure steps (``provider_settings``, ``login_options``, ``ignored_flag_notes``; ``request_from_flags`` does all).

pflag rules apply: ``--flag=value`` or ``--flag value``; booleans take ``--flag`` or ``--flag=true|false``;
slice flags repeat and also split on commas.  Every error is a one-line UsageError naming the flag.
"""

from __future__ import annotations

import base64
import binascii
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from typing import Literal
from urllib.parse import urlsplit

from brokerd.errors import UsageError
from brokerd.models import DEFAULT_LISTEN, LoginOptions, ProviderSettings, TLSOptions
from brokerd.registration import FLAG_NAMES as REGISTRATION_FLAGS
from brokerd.registration import absolute_path, parse_registration

Kind = Literal["str", "bool", "int", "list", "kv", "array"]

FLAGS: dict[str, Kind] = {
    "oidc-issuer-url": "str",
    "oidc-client-id": "str",
    "oidc-client-secret": "str",
    "oidc-extra-scope": "list",
    "oidc-use-access-token": "bool",
    "oidc-redirect-url": "str",
    "oidc-auth-request-extra-params": "kv",
    "oidc-pkce-method": "str",
    "oidc-request-header": "kv",
    "grant-type": "str",
    "username": "str",
    "password": "str",
    "session-name": "str",
    "profile": "str",
    "listen-address": "list",
    "listen-port": "list",
    "skip-open-browser": "bool",
    "browser-command": "str",
    "authentication-timeout-sec": "int",
    "open-url-after-authentication": "str",
    "local-server-cert": "str",
    "local-server-key": "str",
    "token-cache-dir": "str",
    "token-cache-storage": "str",
    "force-refresh": "bool",
    "certificate-authority": "array",
    "certificate-authority-data": "array",
    "insecure-skip-tls-verify": "bool",
    "v": "int",
    # How the client is registered (brokerd/registration.py): client authentication, PAR, response mode, JWE.
    **dict.fromkeys(REGISTRATION_FLAGS, "str"),
}
# Flags of `setup` only: what the API server is configured with, to show the user it will see.
SETUP_FLAGS: dict[str, Kind] = {
    "oidc-username-claim": "str",
    "oidc-username-prefix": "str",
    "oidc-groups-claim": "str",
    "oidc-groups-prefix": "str",
}
ALIASES = {"-v": "v"}
MAX_INT_DIGITS = 9
MAX_AUTHENTICATION_TIMEOUT = 3600  # a login that waits longer holds a caller's connection slot for nothing
GRANT_TYPES = ("auto", "authcode", "authcode-keyboard", "password", "device-code", "client-credentials")
PKCE_METHODS = ("auto", "no", "S256")
CACHE_STORAGES = ("disk", "keyring", "none")

Value = str | bool | int | list[str] | list[tuple[str, str]]


@dataclass
class ParsedFlags:
    """Flag name -> value, as given (filled by ``parse_flags``, read-only after)."""

    values: dict[str, Value] = field(default_factory=dict)

    def str_(self, name: str) -> str | None:
        v = self.values.get(name)
        return v if isinstance(v, str) else None

    def bool_(self, name: str) -> bool:
        return self.values.get(name) is True

    def list_(self, name: str) -> list[str]:
        v = self.values.get(name)
        return [x for x in v if isinstance(x, str)] if isinstance(v, list) else []

    def kv(self, name: str) -> list[tuple[str, str]]:
        v = self.values.get(name)
        return [x for x in v if isinstance(x, tuple)] if isinstance(v, list) else []


def _bool(flag: str, text: str) -> bool:
    low = text.lower()
    if low in ("true", "1", "t", "yes"):
        return True
    if low in ("false", "0", "f", "no"):
        return False
    raise UsageError(f"--{flag}: expected true or false, got {text!r}")


def _split_kv(flag: str, text: str) -> list[tuple[str, str]]:
    # A JSON value (the `claims` parameter) keeps its commas; otherwise pflag's k=v,k2=v2 form applies.
    pieces = [text] if "={" in text or "=[" in text else text.split(",")
    out = []
    for piece in pieces:
        k, sep, v = piece.partition("=")
        if not sep or not k:
            raise UsageError(f"--{flag}: expected KEY=VALUE, got {piece!r}")
        out.append((k.strip(), v))
    return out


def decode_ca_data(value: str) -> str:
    """--certificate-authority-data: base64 of PEM, as in kubeconfig (raw PEM is accepted too)."""
    if "-----BEGIN" in value:
        return value
    try:
        text = base64.b64decode(value.strip(), validate=True).decode("ascii")
    except (binascii.Error, UnicodeDecodeError, ValueError):
        raise UsageError("--certificate-authority-data: not base64-encoded PEM") from None
    if "-----BEGIN CERTIFICATE-----" not in text:
        raise UsageError("--certificate-authority-data: the decoded data holds no PEM certificate")
    return text


def parse_flags(args: Sequence[str], known: Mapping[str, Kind] = FLAGS) -> ParsedFlags:
    """Parse get-token flags; ``known`` widens the table (``setup`` adds SETUP_FLAGS)."""
    parsed = ParsedFlags()
    i = 0
    while i < len(args):
        arg = args[i]
        i += 1
        if arg in ALIASES:
            name, value = ALIASES[arg], None
        elif arg.startswith("-v") and arg[2:].lstrip("=").isdigit():
            name, value = "v", arg[2:].lstrip("=")
        elif arg.startswith("--"):
            name, sep, rest = arg[2:].partition("=")
            value = rest if sep else None
        else:
            raise UsageError(f"unexpected argument {arg!r} (flags start with --)")
        kind = known.get(name)
        if kind is None:
            raise UsageError(f"unknown flag --{name} (see `kubectl oidc-login get-token --help`)")
        if kind == "bool":
            parsed.values[name] = True if value is None else _bool(name, value)
            continue
        if value is None:
            if i >= len(args):
                raise UsageError(f"flag --{name} needs a value")
            value = args[i]
            i += 1
        if kind == "str":
            parsed.values[name] = value
        elif kind == "int":
            number = value.strip()
            # A bound on digits first: int() of a huge string is slow, and a huge number breaks float() later.
            if not (number.lstrip("+-").isdigit() and number.isascii() and len(number) <= MAX_INT_DIGITS):
                raise UsageError(f"--{name}: expected a whole number of at most {MAX_INT_DIGITS} digits, "
                                 f"got {value[:40]!r}")
            parsed.values[name] = int(number)
        elif kind == "list":
            old = parsed.values.setdefault(name, [])
            assert isinstance(old, list)
            old.extend(v for v in value.split(",") if v)  # type: ignore[misc]
        elif kind == "array":
            old = parsed.values.setdefault(name, [])
            assert isinstance(old, list)
            old.append(value)  # type: ignore[arg-type]
        else:
            old = parsed.values.setdefault(name, [])
            assert isinstance(old, list)
            old.extend(_split_kv(name, value))  # type: ignore[arg-type]
    return parsed


def listen_addresses(flags: ParsedFlags) -> tuple[str, ...]:
    """--listen-address (and kubelogin's deprecated --listen-port) as HOST:PORT strings, or the defaults."""
    addresses = flags.list_("listen-address")
    for port in flags.list_("listen-port"):  # kubelogin's deprecated form
        if not port.isdigit():
            raise UsageError(f"--listen-port: expected a port number, got {port!r}")
        addresses.append(f"127.0.0.1:{port}")
    for address in addresses:
        host, sep, port = address.rpartition(":")
        if not sep or not host or not (port.isascii() and port.isdigit()) or not 0 <= int(port) <= 65535:
            raise UsageError(f"--listen-address: expected HOST:PORT, got {address!r}")
    return tuple(addresses) or DEFAULT_LISTEN


def _http_url(flags: ParsedFlags, name: str) -> str | None:
    value = flags.str_(name)
    if value is not None and not value.startswith(("http://", "https://")):
        raise UsageError(f"--{name} must be an http(s) URL, got {value!r}")
    if value is not None:
        try:  # a login binds the redirect URL's port: a bad one must fail here, as one line
            urlsplit(value).port  # noqa: B018 - parsed for its ValueError
        except ValueError:
            raise UsageError(f"--{name} has no valid port or host: {value[:80]!r}") from None
    return value


def _one_of(flags: ParsedFlags, name: str, allowed: Sequence[str], default: str | None) -> str | None:
    value = flags.str_(name) or default
    if value is not None and value not in allowed:
        raise UsageError(f"--{name} must be one of {', '.join(allowed)}; got {value!r}")
    return value


def grant_type(flags: ParsedFlags) -> str:
    """--grant-type, with kubelogin's inference (auto means the password grant when --username or --password is
    given), checked against the flags that only some grants use."""
    grant = _one_of(flags, "grant-type", GRANT_TYPES, "auto")
    assert grant is not None
    password, username = flags.str_("password"), flags.str_("username")
    if grant == "auto" and (username is not None or password is not None):
        grant = "password"
    if password is not None and grant not in ("auto", "password"):
        raise UsageError(f"--password is only used by --grant-type=password, not --grant-type={grant}")
    if username is not None and grant == "client-credentials":
        raise UsageError("--username makes no sense with --grant-type=client-credentials (the client logs in as "
                         "itself; use --session-name to keep sessions apart)")
    return grant


def tls_options(flags: ParsedFlags) -> TLSOptions:
    """How to trust the provider: --certificate-authority(-data), --insecure-skip-tls-verify (files not read)."""
    ca_files = tuple(p for p in (absolute_path("certificate-authority", f)
                                 for f in flags.list_("certificate-authority")) if p)
    ca_data = tuple(flags.list_("certificate-authority-data"))
    for value in ca_data:
        decode_ca_data(value)
    insecure = flags.bool_("insecure-skip-tls-verify")
    if insecure and (ca_files or ca_data):
        # kubectl refuses this pair too: trusting a CA and trusting anything cannot both be meant.
        raise UsageError("--insecure-skip-tls-verify cannot be combined with --certificate-authority(-data)")
    return TLSOptions(ca_files=ca_files, ca_data=ca_data, insecure_skip_verify=insecure)


def provider_settings(flags: ParsedFlags) -> ProviderSettings:
    """The settings that pick the session: issuer, client, scopes, ... and how to reach the provider."""
    if not flags.str_("oidc-issuer-url"):
        raise UsageError("--oidc-issuer-url is required")
    issuer = _http_url(flags, "oidc-issuer-url")
    assert issuer is not None
    client_id = flags.str_("oidc-client-id")
    if not client_id:
        raise UsageError("--oidc-client-id is required")
    return ProviderSettings(
        issuer=issuer,
        client_id=client_id,
        client_secret=flags.str_("oidc-client-secret"),
        scopes=tuple(flags.list_("oidc-extra-scope")),
        extra_params=tuple(flags.kv("oidc-auth-request-extra-params")),
        use_access_token=flags.bool_("oidc-use-access-token"),
        redirect_url=_http_url(flags, "oidc-redirect-url"),
        username=flags.str_("session-name") or flags.str_("username"),
        tls=tls_options(flags),
        request_headers=tuple(flags.kv("oidc-request-header")),
        registration=parse_registration(flags.str_, has_secret=flags.str_("oidc-client-secret") is not None),
    )


def login_options(flags: ParsedFlags) -> LoginOptions:
    """How this caller wants a login done when one is needed (never part of the session)."""
    timeout = flags.values.get("authentication-timeout-sec", 180)
    assert isinstance(timeout, int)
    if not 0 < timeout <= MAX_AUTHENTICATION_TIMEOUT:
        raise UsageError(f"--authentication-timeout-sec must be between 1 and {MAX_AUTHENTICATION_TIMEOUT} (one hour)")
    cert = absolute_path("local-server-cert", flags.str_("local-server-cert"))
    key = absolute_path("local-server-key", flags.str_("local-server-key"))
    if (cert is None) != (key is None):
        raise UsageError("--local-server-cert and --local-server-key go together")
    verbosity = flags.values.get("v", 0)
    assert isinstance(verbosity, int)
    pkce = _one_of(flags, "oidc-pkce-method", PKCE_METHODS, "auto")
    assert pkce is not None
    return LoginOptions(
        grant_type=grant_type(flags),
        listen_addresses=listen_addresses(flags),
        browser_command=flags.str_("browser-command"),
        skip_open_browser=flags.bool_("skip-open-browser"),
        authentication_timeout=float(timeout),
        pkce_method=pkce,
        open_url_after_authentication=flags.str_("open-url-after-authentication"),
        password=flags.str_("password"),
        force_refresh=flags.bool_("force-refresh"),
        local_server_cert=cert,
        local_server_key=key,
        verbosity=verbosity,
        cache_storage=_one_of(flags, "token-cache-storage", CACHE_STORAGES, None),
    )


def ignored_flag_notes(flags: ParsedFlags) -> tuple[str, ...]:
    """Lines for the caller about kubelogin flags that brokerd accepts but does not need."""
    if flags.str_("token-cache-dir") is not None:
        return ("note: --token-cache-dir is accepted, not used; brokerd keeps sessions in its encrypted store "
                "(--token-cache-storage=none keeps a session in memory only)",)
    return ()


def request_from_flags(flags: ParsedFlags) -> tuple[ProviderSettings, LoginOptions, tuple[str, ...]]:
    """A get-token request's flags as (session settings, login options, notes for the caller); ``flags`` is only
    read.  Every error is one UsageError naming the flag."""
    return provider_settings(flags), login_options(flags), ignored_flag_notes(flags)
