"""The config file (TOML): daemon tuning and named profiles.  Parsed once by cli.py (and again on SIGHUP).

    [daemon]
    login_retry_interval = 30     # s; non-interactive callers wait this long after a failed login
    refresh_ratio = 0.8           # refresh when this share of the ID token's life has passed
    refresh_lead = 60             # ... and at the latest this many seconds before it expires
    serve_margin = 10             # tell kubectl the token expires this much early
    caller_browser = true         # false: ignore a caller's BROWSER/DISPLAY/--browser-command (forwarded sockets)

    [store]                       # read at start only (not on SIGHUP)
    key = "auto"                  # where the store's data key lives: "keyring" (Secret Service), "file", or "auto"
    persist = true                # false: sessions live in memory only, nothing is written to the state dir

    [profiles.work]               # `--profile work` on the shim, or BROKERD_PROFILE=work
    oidc-issuer-url = "https://auth.example.com"
    oidc-client-id = "kube_login"
    oidc-client-secret = "..."    # keeps the secret out of kubeconfig files
    oidc-extra-scope = ["groups", "offline_access"]
"""

from __future__ import annotations

import tomllib
from dataclasses import dataclass, field, fields, replace
from pathlib import Path

from brokerd.errors import ConfigError
from brokerd.flags import FLAGS
from brokerd.sessions import Policy


@dataclass(frozen=True)
class Config:
    policy: Policy = field(default_factory=Policy)
    profiles: dict[str, tuple[str, ...]] = field(default_factory=dict)
    # Whether a caller may choose the browser the daemon runs (BROWSER, DISPLAY, --browser-command).  Turn it off
    # when the socket is forwarded to other hosts (docs/remote.md): whoever reaches the socket there could
    # otherwise have the daemon run a program of their choice on this desktop.
    caller_browser: bool = True
    store_key: str = "auto"  # brokerd.keyring.choose_key_source
    persist: bool = True


def _store_section(path: Path, table: object) -> tuple[str, bool]:
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
    return store_key, persist


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


def load_config(path: Path) -> Config:
    """Read the config file; a missing file is an empty config, a broken one a ConfigError naming the problem."""
    try:
        raw = path.read_bytes()
    except FileNotFoundError:
        return Config()
    except OSError as exc:
        raise ConfigError(f"cannot read {path}: {exc.strerror}") from exc
    try:
        doc = tomllib.loads(raw.decode("utf-8"))
    except (UnicodeDecodeError, tomllib.TOMLDecodeError) as exc:
        raise ConfigError(f"{path}: {exc}") from exc
    unknown = set(doc) - {"daemon", "profiles", "store"}
    if unknown:
        raise ConfigError(f"{path}: unknown section(s) {', '.join(sorted(unknown))}")
    policy = Policy()
    daemon = doc.get("daemon", {})
    if not isinstance(daemon, dict):
        raise ConfigError(f"{path}: [daemon] must be a table")
    known = {f.name for f in fields(Policy)} | {"caller_browser"}
    caller_browser = True
    for key, value in daemon.items():
        if key == "caller_browser":
            if not isinstance(value, bool):
                raise ConfigError(f"{path}: [daemon] caller_browser must be true or false")
            caller_browser = value
            continue
        if key not in known:
            raise ConfigError(f"{path}: [daemon] unknown setting {key!r} (known: {', '.join(sorted(known))})")
        if not isinstance(value, (int, float)) or isinstance(value, bool) or value < 0:
            raise ConfigError(f"{path}: [daemon] {key} must be a non-negative number")
        policy = replace(policy, **{key: float(value)})
    profiles_doc = doc.get("profiles", {})
    if not isinstance(profiles_doc, dict):
        raise ConfigError(f"{path}: [profiles] must be a table of tables")
    profiles = {name: _profile_args(name, table) for name, table in profiles_doc.items()}
    store_key, persist = _store_section(path, doc.get("store", {}))
    return Config(policy=policy, profiles=profiles, caller_browser=caller_browser, store_key=store_key,
                  persist=persist)
