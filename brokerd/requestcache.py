"""What the server remembers of its requests: kubectl sends the same bytes and argv on every call from one
kubeconfig, so each is parsed once, and the same credential goes to every caller until it is renewed, so each is
rendered once.  Every cache is bounded; a ``--password`` never sits in one (it lives as long as its request); a
reload of the settings empties the flag cache (a profile may mean other flags now); logout empties them all (no
token or client secret of a logged-out session stays here)."""

from __future__ import annotations

from collections.abc import Callable, Mapping, Sequence

from brokerd import execcred
from brokerd.config import Settings
from brokerd.errors import ProtocolError, UsageError
from brokerd.flags import FLAGS, Kind, ParsedFlags, parse_flags, request_from_flags
from brokerd.models import LoginOptions, ProviderSettings
from client_shim import protocol
from client_shim.protocol import Request

PARSE_CACHE_SIZE = 256
RENDER_CACHE_SIZE = 16

RequestSettings = tuple[ProviderSettings, LoginOptions, tuple[str, ...]]


def parse_request(data: bytes) -> Request:
    try:
        return protocol.decode_request(data)
    except protocol.ProtocolViolation as exc:
        raise ProtocolError(str(exc)) from None


def _carries_password(argv: Sequence[str]) -> bool:
    return any(arg == "--password" or arg.startswith("--password=") for arg in argv)


def request_profile(request: Request) -> str | None:
    """The profile a request names (``--profile`` or BROKERD_PROFILE): its policy table applies to the session."""
    args = request.argv
    for i, arg in enumerate(args):
        if arg.startswith("--profile="):
            return arg.partition("=")[2]
        if arg == "--profile" and i + 1 < len(args):
            return args[i + 1]
    return request.env.get("BROKERD_PROFILE")


class RequestCache:
    def __init__(self, settings: Callable[[], Settings]) -> None:
        """``settings`` reads the daemon's current settings (profiles): SIGHUP swaps them whole."""
        self._settings = settings
        self._parsed_for = settings()  # the settings the flag cache below was filled under
        self._requests: dict[bytes, tuple[Request, execcred.ExecInfo]] = {}
        self._parsed: dict[tuple[str | None, tuple[str, ...]], RequestSettings] = {}
        # Holds tokens, so it is small and emptied by every logout.
        self._rendered: dict[tuple[str, str, float], str] = {}

    def parse(self, data: bytes) -> tuple[Request, execcred.ExecInfo]:
        cached = self._requests.get(data)
        if cached is None:
            request = parse_request(data)
            info = execcred.parse_exec_info(request.env.get("KUBERNETES_EXEC_INFO"), stdin_is_tty=request.stdin_tty)
            cached = (request, info)
            if _carries_password(request.argv):
                return cached  # a --password never sits in a cache: it lives as long as this request only
            if len(self._requests) >= PARSE_CACHE_SIZE:
                self._requests.clear()
            self._requests[data] = cached
        return cached

    def flags(self, args: Sequence[str], env: Mapping[str, str], known: Mapping[str, Kind] = FLAGS) -> ParsedFlags:
        """The request's flags over its profile's (``--profile`` or BROKERD_PROFILE): the command line wins."""
        flags = parse_flags(args, known)
        profile = flags.str_("profile") or env.get("BROKERD_PROFILE")
        if not profile:
            return flags
        profiles = self._settings().profiles
        if profile not in profiles:
            known_profiles = ", ".join(sorted(profiles)) or "none configured"
            raise UsageError(f"unknown profile {profile!r} (profiles: {known_profiles})")
        return parse_flags([*profiles[profile], *args], known)

    def request_settings(self, args: tuple[str, ...], env: Mapping[str, str]) -> RequestSettings:
        current = self._settings()
        if current is not self._parsed_for:  # reloaded: a profile may mean other flags now
            self._parsed.clear()
            self._parsed_for = current
        cache_key = (env.get("BROKERD_PROFILE"), args)
        cached = self._parsed.get(cache_key)
        if cached is None:
            flags = self.flags(args, env)
            cached = request_from_flags(flags)
            if cached[1].password is not None:
                return cached  # from the command line or a profile: never cached (see parse)
            if len(self._parsed) >= PARSE_CACHE_SIZE:
                self._parsed.clear()
            self._parsed[cache_key] = cached
        return cached

    def rendered(self, api_version: str, token: str, expiry: float) -> str:
        """The ExecCredential for this token."""
        key = (api_version, token, expiry)
        rendered = self._rendered.get(key)
        if rendered is None:
            if len(self._rendered) >= RENDER_CACHE_SIZE:
                self._rendered.clear()
            rendered = self._rendered[key] = execcred.render(*key)
        return rendered

    def forget_tokens(self) -> None:
        self._rendered.clear()

    def clear(self) -> None:
        """After a logout: no token of a logged-out session stays in memory here, nor its client secret in a
        parsed request."""
        self._rendered.clear()
        self._requests.clear()
        self._parsed.clear()
