"""Per-session policy: what the person set in config.toml, and the decisions that follow from it.  Pure: no I/O,
and every decision takes the time (``now``) from the caller's injected Clock.

    [daemon]
    background_login = "notify"       # notify | browser | refuse; unset: notify when a notification server answers
    warn_before = "10m"               # notify once this long before the session will need a login

    [policy."https://auth.example.com"]   # every session with this issuer
    confirm = true                    # a process gets a token only after the person allows it ...
    confirm_ttl = "1h"                # ... and that answer holds this long for that executable and its parent
    max_session_age = "12h"           # no token served and no refresh past this age, counted from the login
    idle_logout = "8h"                # a session that served no token this long is logged out (refresh revoked)

    [profiles.prod]                   # the same keys in a profile apply to the sessions used through it
    oidc-issuer-url = "https://auth.example.com"
    max_session_age = "10h"
    refresh_token_lifetime = "90m"    # when the provider does not say (no refresh_expires_in)

When several tables apply (the daemon's, the issuer's, the profile's), the strictest setting wins: confirm if any
says so, the shortest ages and confirm_ttl, the earliest warning, and refuse > notify > browser.  Nothing a person
set to be careful can be loosened by another table.
"""

from __future__ import annotations

import re
from collections import OrderedDict
from collections.abc import Mapping
from dataclasses import asdict, dataclass, field, fields
from typing import Any, Literal

from brokerd.errors import ConfigError

BackgroundLogin = Literal["notify", "browser", "refuse"]
BACKGROUND_MODES: tuple[BackgroundLogin, ...] = ("browser", "notify", "refuse")  # least to most strict
DEFAULT_CONFIRM_TTL = 3600.0
MAX_APPROVALS = 256  # remembered (executable, parent) answers per session

_UNITS = {"s": 1, "m": 60, "h": 3600, "d": 86400}
_DURATION = re.compile(r"(\d+(?:\.\d+)?)([smhd])")


def parse_duration(value: object, what: str) -> float:
    """``"12h"``, ``"10m"``, ``"1h30m"``, ``"45s"``, ``"2d"`` or a number of seconds; ConfigError otherwise."""
    if isinstance(value, bool):
        raise ConfigError(f"{what}: expected a duration such as \"12h\", \"10m\" or \"90s\", got {value!r}")
    if isinstance(value, (int, float)):
        if value < 0:
            raise ConfigError(f"{what}: a duration cannot be negative ({value})")
        return float(value)
    text = value.strip().lower() if isinstance(value, str) else ""
    pos, total = 0, 0.0
    for match in _DURATION.finditer(text):
        if match.start() != pos:
            break
        total += float(match.group(1)) * _UNITS[match.group(2)]
        pos = match.end()
    if not text or pos != len(text):
        raise ConfigError(f"{what}: expected a duration such as \"12h\", \"10m\" or \"90s\", got {value!r}")
    return total


@dataclass(frozen=True)
class SessionPolicy:
    """The policy in force for one session; None means "not set" (no limit, or the automatic choice)."""

    confirm: bool = False
    confirm_ttl: float | None = None
    max_session_age: float | None = None
    idle_logout: float | None = None
    warn_before: float | None = None
    background_login: BackgroundLogin | None = None
    refresh_token_lifetime: float | None = None

    def tighten(self, other: SessionPolicy) -> SessionPolicy:
        """The stricter of the two, setting by setting."""
        def low(a: float | None, b: float | None) -> float | None:
            return b if a is None else a if b is None else min(a, b)

        def high(a: float | None, b: float | None) -> float | None:
            return b if a is None else a if b is None else max(a, b)

        modes = [m for m in (self.background_login, other.background_login) if m is not None]
        return SessionPolicy(
            confirm=self.confirm or other.confirm,
            confirm_ttl=low(self.confirm_ttl, other.confirm_ttl),
            max_session_age=low(self.max_session_age, other.max_session_age),
            idle_logout=low(self.idle_logout, other.idle_logout),
            warn_before=high(self.warn_before, other.warn_before),
            background_login=max(modes, key=BACKGROUND_MODES.index) if modes else None,
            refresh_token_lifetime=low(self.refresh_token_lifetime, other.refresh_token_lifetime),
        )

    def describe(self) -> dict[str, Any]:
        """For ``brokerd status``: the settings that are set."""
        doc = {k: v for k, v in asdict(self).items() if v is not None and v is not False}
        if self.confirm:
            doc["confirm_ttl"] = self.confirm_ttl if self.confirm_ttl is not None else DEFAULT_CONFIRM_TTL
        return doc


POLICY_KEYS = frozenset(f.name for f in fields(SessionPolicy))
DAEMON_KEYS = frozenset({"warn_before", "background_login"})
_DURATION_KEYS = frozenset({"confirm_ttl", "max_session_age", "idle_logout", "warn_before", "refresh_token_lifetime"})
_POSITIVE_KEYS = frozenset({"max_session_age", "idle_logout", "refresh_token_lifetime"})  # confirm_ttl 0: ask always


def policy_from_table(table: Mapping[str, object], where: str, allowed: frozenset[str] = POLICY_KEYS
                      ) -> SessionPolicy:
    """A SessionPolicy from the policy keys of one TOML table (other keys are the caller's to check)."""
    values: dict[str, Any] = {}
    for key, value in table.items():
        if key not in allowed:
            continue
        if key == "confirm":
            if not isinstance(value, bool):
                raise ConfigError(f"{where}: confirm must be true or false")
            values[key] = value
        elif key == "background_login":
            if value not in BACKGROUND_MODES:
                raise ConfigError(f"{where}: background_login must be \"notify\", \"browser\" or \"refuse\", "
                                  f"got {value!r}")
            values[key] = value
        elif key in _DURATION_KEYS:
            seconds = parse_duration(value, f"{where} {key}")
            if seconds == 0 and key in _POSITIVE_KEYS:
                # 0 would end every session at once; leaving the key out is how to say "no limit".
                raise ConfigError(f"{where} {key}: must be longer than 0 (leave it out for no limit)")
            values[key] = seconds
    return SessionPolicy(**values)


def _issuer(url: str) -> str:
    return url.rstrip("/")


@dataclass(frozen=True)
class PolicyBook:
    """Every policy table of the config file; ``for_session`` finds the ones that apply."""

    daemon: SessionPolicy = field(default_factory=SessionPolicy)
    issuers: Mapping[str, SessionPolicy] = field(default_factory=dict)
    profiles: Mapping[str, SessionPolicy] = field(default_factory=dict)

    def for_session(self, issuer: str, profile: str | None = None) -> SessionPolicy:
        policy = self.daemon
        by_issuer = self.issuers.get(_issuer(issuer))
        if by_issuer is not None:
            policy = policy.tighten(by_issuer)
        if profile is not None and profile in self.profiles:
            policy = policy.tighten(self.profiles[profile])
        return policy


def load_policy_book(doc: Mapping[str, Any], where: str) -> PolicyBook:
    """The policy parts of a parsed config.toml: ``[daemon]`` agent keys, ``[policy."<issuer>"]`` tables, and the
    policy keys of ``[profiles.*]`` (config.py hands the remaining profile keys to the get-token flag parser)."""
    daemon_table = doc.get("daemon", {})
    daemon = policy_from_table(daemon_table, f"{where}: [daemon]", DAEMON_KEYS) if isinstance(
        daemon_table, dict) else SessionPolicy()
    issuers: dict[str, SessionPolicy] = {}
    tables = doc.get("policy", {})
    if not isinstance(tables, dict):
        raise ConfigError(f"{where}: [policy] must hold one table per issuer, e.g. [policy.\"https://auth.example\"]")
    for issuer, table in tables.items():
        label = f"{where}: [policy.\"{issuer}\"]"
        if not isinstance(table, dict):
            raise ConfigError(f"{label} must be a table")
        unknown = set(table) - POLICY_KEYS
        if unknown:
            raise ConfigError(f"{label}: unknown setting(s) {', '.join(sorted(unknown))} "
                              f"(known: {', '.join(sorted(POLICY_KEYS))})")
        issuers[_issuer(issuer)] = policy_from_table(table, label)
    profiles: dict[str, SessionPolicy] = {}
    profile_tables = doc.get("profiles", {})
    if isinstance(profile_tables, dict):
        for name, table in profile_tables.items():
            if isinstance(table, dict) and POLICY_KEYS & set(table):
                profiles[name] = policy_from_table(table, f"{where}: [profiles.{name}]")
    return PolicyBook(daemon=daemon, issuers=issuers, profiles=profiles)


def flag_keys(table: Mapping[str, object]) -> dict[str, object]:
    """A profile table without its policy keys: what config.py turns into get-token flags."""
    return {k: v for k, v in table.items() if k not in POLICY_KEYS}


# -- decisions ------------------------------------------------------------------------------------------------------


def session_end(policy: SessionPolicy, logged_in_at: float | None) -> float | None:
    """When the session ends by age (``max_session_age`` after its login), or None."""
    if policy.max_session_age is None or logged_in_at is None:
        return None
    return logged_in_at + policy.max_session_age


def past_max_age(policy: SessionPolicy, logged_in_at: float | None, now: float) -> bool:
    """No token is served and no refresh is made once this is true; the next caller logs in."""
    end = session_end(policy, logged_in_at)
    return end is not None and now >= end


def serve_limit(policy: SessionPolicy, logged_in_at: float | None, token_expiry: float) -> float:
    """The expiry to serve (and to tell kubectl): the token's own, but never past the session's end."""
    end = session_end(policy, logged_in_at)
    return token_expiry if end is None else min(token_expiry, end)


def may_refresh(policy: SessionPolicy, logged_in_at: float | None, now: float) -> bool:
    return not past_max_age(policy, logged_in_at, now)


def idle_deadline(policy: SessionPolicy, last_served_at: float | None) -> float | None:
    """When an unused session is logged out (its refresh token revoked), or None."""
    if policy.idle_logout is None or last_served_at is None:
        return None
    return last_served_at + policy.idle_logout


def idle_expired(policy: SessionPolicy, last_served_at: float | None, now: float) -> bool:
    deadline = idle_deadline(policy, last_served_at)
    return deadline is not None and now >= deadline


def refresh_token_expiry(policy: SessionPolicy, *, has_refresh_token: bool, refreshed_at: float,
                         refresh_expires_at: float | None) -> float | None:
    """When the refresh token stops working: the provider's ``refresh_expires_in`` when it said so, else the
    profile's ``refresh_token_lifetime`` from the last grant; None when unknown (or there is none)."""
    if not has_refresh_token:
        return None
    if refresh_expires_at is not None:
        return refresh_expires_at
    if policy.refresh_token_lifetime is not None:
        return refreshed_at + policy.refresh_token_lifetime
    return None


def login_needed_at(policy: SessionPolicy, *, logged_in_at: float | None, token_expiry: float,
                    has_refresh_token: bool, refreshed_at: float, refresh_expires_at: float | None) -> float | None:
    """When this session will next need a person to log in, as far as can be known: the session's end by age, the
    refresh token's expiry, or, without a refresh token, the served token's expiry.  None: not foreseeable."""
    candidates = [session_end(policy, logged_in_at)]
    if has_refresh_token:
        candidates.append(refresh_token_expiry(policy, has_refresh_token=True, refreshed_at=refreshed_at,
                                               refresh_expires_at=refresh_expires_at))
    else:
        candidates.append(token_expiry)
    known = [c for c in candidates if c is not None]
    return min(known) if known else None


def warn_at(policy: SessionPolicy, login_at: float | None, last_warned_at: float | None = None) -> float | None:
    """When to notify (once) that a login will be needed at ``login_at``; None when no warning is set, or none is
    due for it.  At most one warning per ``warn_before``: a refresh token whose expiry slides with each refresh
    (Keycloak's idle time) would otherwise bring a new warning at every background refresh."""
    if policy.warn_before is None or login_at is None:
        return None
    at = login_at - policy.warn_before
    if last_warned_at is not None and last_warned_at + policy.warn_before > at:
        later = last_warned_at + policy.warn_before
        return later if later < login_at else None  # warned about a login this close already
    return at


def background_mode(policy: SessionPolicy, notifications_answer: bool) -> BackgroundLogin:
    """What a login for a caller without a terminal does: the setting, else notify when a notification server
    (with actions) answers on the caller's bus, else the browser as before."""
    if policy.background_login is not None:
        if policy.background_login == "notify" and not notifications_answer:
            # Set to notify but nothing can show it: refusing is the careful reading (no surprise tab).
            return "refuse"
        return policy.background_login
    return "notify" if notifications_answer else "browser"


@dataclass(frozen=True, order=True)
class CallerIdentity:
    """Who asks, for confirmation purposes: the caller's executable and its parent's (None when unreadable)."""

    exe: str | None
    parent_exe: str | None


class Approvals:
    """The person's answers to "may this program get a token?", per (executable, parent), each for confirm_ttl.

    A caller whose executable cannot be read is asked every time: an unknown program cannot be recognised later.
    A "no" is remembered briefly too (``deny``), so a tool that retries every few seconds does not put the same
    question on the screen again and again.  Bounded: the oldest answer is forgotten first.
    """

    def __init__(self, limit: int = MAX_APPROVALS) -> None:
        self._until: OrderedDict[CallerIdentity, float] = OrderedDict()
        self._denied: OrderedDict[CallerIdentity, float] = OrderedDict()
        self._limit = limit

    def needs_confirm(self, policy: SessionPolicy, who: CallerIdentity, now: float) -> bool:
        if not policy.confirm:
            return False
        if who.exe is None:
            return True
        until = self._until.get(who)
        return until is None or now >= until

    def denied_until(self, who: CallerIdentity, now: float) -> float | None:
        """When a recent "no" for this caller stops applying (refuse without asking until then), or None."""
        until = self._denied.get(who)
        return until if until is not None and now < until else None

    def deny(self, who: CallerIdentity, now: float, hold: float) -> None:
        self._until.pop(who, None)
        self._denied[who] = now + hold
        self._denied.move_to_end(who)
        while len(self._denied) > self._limit:
            self._denied.popitem(last=False)

    def allow(self, policy: SessionPolicy, who: CallerIdentity, now: float) -> None:
        if who.exe is None:
            return
        ttl = policy.confirm_ttl if policy.confirm_ttl is not None else DEFAULT_CONFIRM_TTL
        self._denied.pop(who, None)
        self._until[who] = now + ttl
        self._until.move_to_end(who)
        while len(self._until) > self._limit:
            self._until.popitem(last=False)

    def forget(self) -> None:
        """Logout: a new session asks again."""
        self._until.clear()
        self._denied.clear()
