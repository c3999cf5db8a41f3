"""The daemon's settings: one inert, frozen ``Settings`` object, built by cli_local.py and rebuilt whole on SIGHUP.

Where the daemon lives (socket, state directory, config file) comes from the environment (``paths``); how it
behaves comes from the config file (TOML):

    [daemon]
    login_retry_interval = 30     # s; non-interactive callers wait this long after a failed login
    refresh_ratio = 0.8           # refresh when this share of the ID token's life has passed
    refresh_lead = 60             # ... and at the latest this many seconds before it expires
    serve_margin = 10             # tell kubectl the token expires this much early
    caller_browser = true         # false: ignore a caller's BROWSER/DISPLAY/--browser-command (forwarded sockets)
    listen_non_loopback = false   # true: a login may listen for its redirect on a non-loopback address
    background_login = "notify"   # a login for a caller without a terminal: notify | browser | refuse
    warn_before = "10m"           # notify once this long before a session will need a login
    event_loop = "asyncio"        # or "uvloop": more requests per second under heavy load, about 2.4 MB more
                                  # memory and four more threads (read at start only)

    [policy."https://auth.example.com"]   # per issuer: confirm, confirm_ttl, max_session_age, idle_logout
    confirm = true                # (docs/agent.md; the same keys may go in a profile)

    [store]                       # read at start only (not on SIGHUP)
    key = "auto"                  # where the store's data key lives: "keyring" (Secret Service), "file", or "auto"
    persist = true                # false: sessions live in memory only (the audit trail is still written)

    [profiles.work]               # `--profile work` on the shim, or BROKERD_PROFILE=work
    oidc-issuer-url = "https://auth.example.com"
    oidc-client-id = "kube_login"
    oidc-client-secret = "..."    # keeps the secret out of kubeconfig files
    oidc-extra-scope = ["groups", "offline_access"]

Nothing here does anything: the parts of the daemon are given the settings (or a way to read the current ones) in
their constructors.  ``load_settings`` is the only I/O, and it never runs at import.
"""

from __future__ import annotations

import tomllib
from collections.abc import Mapping
from dataclasses import dataclass, field, fields, replace
from pathlib import Path
from types import MappingProxyType

from brokerd.errors import ConfigError
from brokerd.flags import FLAGS
from brokerd.policy import DAEMON_KEYS, PolicyBook, flag_keys, load_policy_book
from brokerd.refresh import Policy

_SWITCHES = {"caller_browser": True, "listen_non_loopback": False}  # [daemon] booleans and their defaults
EVENT_LOOPS = ("asyncio", "uvloop")


@dataclass(frozen=True)
class Settings:
    socket_path: Path
    state_dir: Path
    config_file: Path | None = None
    persist: bool = True  # [store] persist; False: sessions live in memory only, nothing is written
    shutdown_grace: float = 5.0  # s a stopping daemon lets requests in flight finish
    policy: Policy = field(default_factory=Policy)
    profiles: Mapping[str, tuple[str, ...]] = field(default_factory=lambda: MappingProxyType({}))
    # Whether a caller may choose the browser the daemon runs (BROWSER, DISPLAY, --browser-command).  Turn it off
    # when the socket is forwarded to other hosts (docs/remote.md): whoever reaches the socket there could
    # otherwise have the daemon run a program of their choice on this desktop.
    caller_browser: bool = True
    # The redirect listener binds loopback addresses only (a code sent to 0.0.0.0:8000 reaches anyone on the
    # network who gets there first).  The daemon's owner may allow other addresses here; a caller never can.
    listen_non_loopback: bool = False
    # [store]: where the data key lives (brokerd.keyring.choose_key_source).  It and ``persist`` are read at start
    # only: a reload keeps the running daemon's values (Daemon._reload), since the store is opened once.
    store_key: str = "auto"
    # [daemon] event_loop, read at start only.  asyncio by default: a kubectl call sees the same latency on either
    # (the daemon is idle between calls), and uvloop costs about 2.4 MB and four threads (issue 14.5; README).
    event_loop: str = "asyncio"

    # The agent's per-session policy tables (policy.py: [daemon] agent keys, [policy."<issuer>"], profile keys).
    policies: PolicyBook = field(default_factory=PolicyBook)


def _store_table(path: Path, table: object, base: Settings) -> Settings:
    if not isinstance(table, dict):
        raise ConfigError(f"{path}: [store] must be a table")
    store_key, persist = "auto", True
    for key, value in table.items():
        if key == "key":
            if value not in ("auto", "keyring", "file"):
                raise ConfigError(f"{path}: [store] key must be \"auto\", \"keyring\" or \"file\"")
            store_key = value
        elif key == "persist":
            if not isinstance(value, bool):
                raise ConfigError(f"{path}: [store] persist must be true or false")
            persist = value
        else:
            raise ConfigError(f"{path}: [store] unknown setting {key!r} (known: key, persist)")
    return replace(base, store_key=store_key, persist=persist)


def _profile_args(name: str, table: object) -> tuple[str, ...]:
    if not isinstance(table, dict):
        raise ConfigError(f"profile {name!r} must be a table")
    args: list[str] = []
    for key, value in table.items():
        kind = FLAGS.get(key)
        if kind is None or key == "profile":
            raise ConfigError(f"profile {name!r}: unknown setting {key!r} (use get-token flag names)")
        values = value if isinstance(value, list) else [value]
        for item in values:
            if isinstance(item, bool):
                args.append(f"--{key}={'true' if item else 'false'}")
            elif isinstance(item, (str, int)):
                args.append(f"--{key}={item}")
            else:
                raise ConfigError(f"profile {name!r}: {key} must be a string, number, boolean or list of them")
    return tuple(args)


def _daemon_table(path: Path, daemon: object, base: Settings) -> Settings:
    if not isinstance(daemon, dict):
        raise ConfigError(f"{path}: [daemon] must be a table")
    numbers = {f.name for f in fields(Policy)}
    known = numbers | set(_SWITCHES) | DAEMON_KEYS | {"event_loop"}
    policy = Policy()
    switches = dict(_SWITCHES)
    event_loop = "asyncio"
    for key, value in daemon.items():
        if key in DAEMON_KEYS:
            continue  # not numbers: load_policy_book checks them
        if key == "event_loop":
            if value not in EVENT_LOOPS:
                raise ConfigError(f"{path}: [daemon] event_loop must be \"asyncio\" or \"uvloop\"")
            event_loop = value
            continue
        if key in _SWITCHES:
            if not isinstance(value, bool):
                raise ConfigError(f"{path}: [daemon] {key} must be true or false")
            switches[key] = value
            continue
        if key not in known:
            raise ConfigError(f"{path}: [daemon] unknown setting {key!r} (known: {', '.join(sorted(known))})")
        if not isinstance(value, (int, float)) or isinstance(value, bool) or not 0 <= value < 1e9:
            raise ConfigError(f"{path}: [daemon] {key} must be a non-negative number")
        policy = replace(policy, **{key: float(value)})
    return replace(base, policy=policy, caller_browser=switches["caller_browser"],
                   listen_non_loopback=switches["listen_non_loopback"], event_loop=event_loop)


def load_settings(base: Settings) -> Settings:
    """``base`` with everything its config file says, and the defaults for what it does not say (so a setting
    removed from the file is reset on reload).  A missing file is an empty one; a broken one a ConfigError naming
    the problem, and nothing of it is used."""
    path = base.config_file
    if path is None:
        return base
    try:
        raw = path.read_bytes()
    except FileNotFoundError:
        raw = b""
    except OSError as exc:
        raise ConfigError(f"cannot read {path}: {exc.strerror}") from exc
    try:
        doc = tomllib.loads(raw.decode("utf-8"))
    except (UnicodeDecodeError, tomllib.TOMLDecodeError) as exc:
        raise ConfigError(f"{path}: {exc}") from exc
    unknown = set(doc) - {"daemon", "profiles", "store", "policy"}
    if unknown:
        raise ConfigError(f"{path}: unknown section(s) {', '.join(sorted(unknown))}")
    settings = _daemon_table(path, doc.get("daemon", {}), base)
    profiles_doc = doc.get("profiles", {})
    if not isinstance(profiles_doc, dict):
        raise ConfigError(f"{path}: [profiles] must be a table of tables")
    book = load_policy_book(doc, str(path))
    profiles = {name: _profile_args(name, flag_keys(table) if isinstance(table, dict) else table)
                for name, table in profiles_doc.items()}
    settings = _store_table(path, doc.get("store", {}), settings)
    return replace(settings, profiles=MappingProxyType(profiles), policies=book)
