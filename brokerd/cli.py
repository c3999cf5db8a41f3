"""``brokerd``: the daemon (``serve``) and the commands that talk to it.  The only module that exits."""

from __future__ import annotations

import argparse
import asyncio
import json
import logging
import os
import sys
import time
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

from brokerd import __version__, paths
from brokerd.errors import BrokerError

log = logging.getLogger("brokerd")

LOG_FORMAT = "%(levelname)s %(name)s: %(message)s"
MAX_LOG_BYTES = 1 << 20


def _setup_logging(verbose: int, log_file: Path | None) -> None:
    from brokerd import callerlog

    level = logging.DEBUG if verbose else logging.INFO
    handler: logging.Handler
    if log_file is not None:
        paths.ensure_private_dir(log_file.parent)
        if log_file.exists() and log_file.stat().st_size > MAX_LOG_BYTES:
            log_file.replace(log_file.with_suffix(".log.1"))
        fd = os.open(log_file, os.O_WRONLY | os.O_APPEND | os.O_CREAT, 0o600)
        handler = logging.StreamHandler(os.fdopen(fd, "a", buffering=1))
        handler.setFormatter(logging.Formatter("%(asctime)s " + LOG_FORMAT))
    else:
        handler = logging.StreamHandler(sys.stderr)
        handler.setFormatter(logging.Formatter(LOG_FORMAT))
    handler.setLevel(level)  # brokerd makes debug records for callers with -v; the daemon log keeps its level
    root = logging.getLogger()
    root.handlers[:] = [handler]
    root.setLevel(level)
    callerlog.install()
    # aiohttp's access log would print request lines of the loopback listener, query strings (codes) included.
    logging.getLogger("aiohttp.access").setLevel(logging.WARNING)
    # Junk sent to the loopback listener by any local process would otherwise log a traceback per request.
    logging.getLogger("aiohttp.server").setLevel(logging.CRITICAL)


def _run_loop(main: Callable[[], Any]) -> Any:
    try:
        import uvloop

        loop_factory = uvloop.new_event_loop
    except ImportError:  # pragma: no cover - uvloop is a dependency, but keep the daemon usable without it
        loop_factory = None
    with asyncio.Runner(loop_factory=loop_factory) as runner:
        return runner.run(main())


def cmd_serve(args: argparse.Namespace) -> int:
    from brokerd.config import Settings, load_settings
    from brokerd.daemon import AlreadyRunning, Daemon

    environ = os.environ
    state = paths.state_dir(environ)
    _setup_logging(args.verbose, state / "brokerd.log" if args.autostarted else None)
    settings = load_settings(Settings(socket_path=paths.socket_path(environ), state_dir=state,
                                      config_file=paths.config_file(environ)))
    try:
        _run_loop(Daemon(settings).run)
    except AlreadyRunning as exc:
        if args.autostarted:
            return 0  # lost the start race to another shim's daemon: that one serves
        print(f"brokerd: {exc}", file=sys.stderr)
        return 1
    return 0


def _call_daemon(argv: list[str], *, autostart: bool = False) -> bytes:
    """The one way this CLI talks to the daemon: the shim's request (client_shim/core.py) on the daemon's socket.
    Returns the result line's bytes; a failure raises the shim's ShimError (exit code and one line)."""
    from client_shim import core as shim

    env = dict(os.environb)
    env[b"BROKERD_SOCKET"] = os.fsencode(paths.socket_path(os.environ))
    return shim.request(argv, env, "brokerd", autostart=autostart)


def _ask_daemon(argv: list[str]) -> Any:
    """An admin command (no autostart): its JSON answer."""
    return json.loads(_call_daemon(argv))


def _daemon_running(socket_path: Path) -> bool:
    """Something answers on the socket, or holds the daemon's lock file beside it (a daemon that is starting or
    stopping still owns its store)."""
    import fcntl
    import socket

    probe = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    probe.settimeout(1.0)
    try:
        probe.connect(str(socket_path))
        return True
    except OSError:
        pass
    finally:
        probe.close()
    try:
        lock = open(socket_path.parent / (socket_path.name + ".lock"), "rb")  # noqa: SIM115 - closed below
    except FileNotFoundError:
        return False
    except OSError:
        return True  # cannot tell: assume it runs, since deleting a live daemon's store loses sessions
    with lock:
        try:
            fcntl.flock(lock, fcntl.LOCK_SH | fcntl.LOCK_NB)
        except BlockingIOError:
            return True
        except OSError:
            return True
    return False


def _shown(value: Any) -> str:
    """A value from the daemon (claims come from the provider) as text that cannot drive the terminal."""
    from client_shim.protocol import for_terminal

    return for_terminal(str(value))


def _when(epoch: float | None, now: float) -> str:
    if epoch is None:
        return "-"
    delta = int(epoch - now)
    rel = f"in {_span(delta)}" if delta >= 0 else f"{_span(-delta)} ago"
    return f"{time.strftime('%Y-%m-%d %H:%M:%S', time.localtime(epoch))} ({rel})"


def _span(seconds: int) -> str:
    if seconds < 120:
        return f"{seconds}s"
    if seconds < 7200:
        return f"{seconds // 60}m"
    return f"{seconds // 3600}h{(seconds % 3600) // 60:02d}m"


def cmd_status(args: argparse.Namespace) -> int:
    doc = _ask_daemon(["status"])
    if args.json:
        print(json.dumps(doc, indent=2))
        return 0
    sessions = doc.get("sessions", [])
    if not sessions:
        print("no sessions")
        return 0
    now = time.time()
    for s in sessions:
        name = f" ({_shown(s['session_name'])})" if s.get("session_name") else ""
        print(f"session {_shown(s['session'])}{name}")
        print(f"  issuer:        {_shown(s['issuer'])}")
        print(f"  client id:     {_shown(s['client_id'])}")
        print(f"  user:          {_shown(s.get('username') or '-')}"
              + (f"  <{_shown(s['email'])}>" if s.get("email") else ""))
        print(f"  groups:        {_shown(', '.join(map(str, s.get('groups') or [])) or '-')}")
        print(f"  expires:       {_when(s.get('expires_at'), now)}")
        print(f"  refresh token: {'yes' if s.get('refresh_token') else 'no'}")
        retry = "  (retrying after a failed refresh)" if s.get("refresh_retrying") else ""
        print(f"  next refresh:  {_when(s.get('next_refresh_at'), now)}{retry}")
        if s.get("login_pending"):
            print("  login:         pending in the browser")
        tally = s.get("counters")
        if tally:
            print(f"  tokens served: {tally['tokens_served']} (refreshes {tally['refreshes']}, logins "
                  f"{tally['logins']})" + (f", last by {_shown(tally['last_caller'])}" if tally.get("last_caller")
                                           else ""))
        print(f"  policy:        {_policy_line(s.get('policy') or {})}")
        for label, field in (("session ends", "session_ends_at"), ("idle logout", "idle_logout_at")):
            if s.get(field):
                print(f"  {label + ':':<15}{_when(s[field], now)}")
    return 0


def _policy_line(policy: dict[str, object]) -> str:
    """``confirm (1h), max age 12h, idle logout 8h``, or ``none``."""
    def span(key: str) -> str:
        value = policy.get(key)
        return _span(int(value)) if isinstance(value, (int, float)) else "?"

    parts = []
    if policy.get("confirm"):
        parts.append(f"confirm ({span('confirm_ttl')})")
    for key, label in (("max_session_age", "max age"), ("idle_logout", "idle logout"), ("warn_before", "warn"),
                       ("refresh_token_lifetime", "refresh token lifetime")):
        if key in policy:
            parts.append(f"{label} {span(key)}")
    if policy.get("background_login"):
        parts.append(f"background login: {_shown(str(policy['background_login']))}")
    return ", ".join(parts) or "none"


def cmd_logout(args: argparse.Namespace) -> int:
    if not (args.all or args.issuer or args.client_id):
        print("brokerd: say which sessions to end: --all, --issuer URL and/or --client-id ID", file=sys.stderr)
        return 2
    argv = ["logout"]
    if args.issuer:
        argv += ["--issuer", args.issuer]
    if args.client_id:
        argv += ["--client-id", args.client_id]
    doc = _ask_daemon(argv)
    ended = doc.get("logged_out", [])
    if not ended:
        print("no matching sessions")
    for s in ended:
        print(f"logged out of {_shown(s['issuer'])} (client {_shown(s['client_id'])}, session {_shown(s['session'])}):"
              f" {_shown(s['result'])}")
    return 0


def cmd_clean(args: argparse.Namespace) -> int:
    """Forget every session: through the daemon when it runs (it also revokes), else straight in the store.
    Never behind a running daemon's back: it holds the store and would write its sessions back."""
    from client_shim.core import ShimError

    try:
        doc = _ask_daemon(["logout"])
    except ShimError as exc:
        if exc.answered or _daemon_running(paths.socket_path(os.environ)):
            print(exc.text, file=sys.stderr)
            print("brokerd: a daemon is running, so its store was left alone; stop it or try again",
                  file=sys.stderr)
            return exc.code
        from brokerd.store import SessionStore

        SessionStore(paths.state_dir(os.environ)).clear()
        print("removed all stored sessions (the daemon is not running)")
        return 0
    print(f"logged out of {len(doc.get('logged_out', []))} session(s)")
    return 0


def cmd_audit(args: argparse.Namespace) -> int:
    """Print the audit trail from the files in the state dir (no daemon needed)."""
    from brokerd.audit import format_entry, read_entries
    from brokerd.policy import parse_duration

    since = time.time() - parse_duration(args.since, "--since") if args.since else None
    for doc in read_entries(paths.state_dir(os.environ), since=since, session=args.session):
        print(json.dumps(doc, separators=(",", ":")) if args.json else format_entry(doc))
    return 0


def cmd_version(args: argparse.Namespace) -> int:
    print(f"brokerd {__version__}")
    return 0


def cmd_install_systemd(args: argparse.Namespace) -> int:
    from brokerd import install

    unit_dir = Path(args.unit_dir) if args.unit_dir else install.default_unit_dir()
    if args.uninstall:
        print(f"first stop the service: {install.DISABLE_COMMAND}")
        removed = install.uninstall_units(unit_dir)
        for path in removed:
            print(f"removed {path}")
        print("then run: systemctl --user daemon-reload")
        return 0
    written = install.install_units(unit_dir, install.default_exec_start())
    for path in written:
        print(f"wrote {path}")
    print(f"enable with: {install.ENABLE_COMMAND}")
    return 0


def _passthrough(argv: list[str]) -> int:
    """``brokerd get-token ...``: the same request the shim sends, from the full CLI."""
    data = _call_daemon(argv, autostart=True) + b"\n"
    sys.stdout.buffer.write(data)
    sys.stdout.flush()
    return 0


def _login(argv: list[str]) -> int:
    """``brokerd login [--profile NAME | get-token flags]``: a new login now, from this terminal."""
    doc = json.loads(_call_daemon(argv, autostart=True))
    print(f"logged in to {_shown(doc['issuer'])} (client {_shown(doc['client_id'])}, session "
          f"{_shown(doc['session'])}); token valid until {_when(doc.get('expires_at'), time.time())}")
    return 0


def _setup(argv: list[str]) -> int:
    """``brokerd setup`` / ``kubectl oidc-login setup``: the daemon logs in and checks; the report is rendered here,
    where the interpreter and shim paths for the direct kubeconfig form are known."""
    from brokerd.setup import render_report
    from client_shim import core as shim

    doc = json.loads(_call_daemon(argv, autostart=True))
    # The launcher beside core.py: the file kubectl should run (it imports core from cached bytecode).
    shim_path = os.path.join(os.path.dirname(os.path.abspath(shim.__file__ or ".")), "shim.py")
    report = render_report(doc, doc.get("kubeconfig_args", []), os.path.abspath(sys.executable), shim_path)
    print("\n".join(_shown(line) for line in report.split("\n")))  # claims and provider text: no control chars
    return 0 if doc.get("logged_in") else 1


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="brokerd", description="Local OIDC token broker for kubectl.")
    parser.add_argument("--version", action="version", version=f"brokerd {__version__}")
    sub = parser.add_subparsers(dest="command", required=True)
    p = sub.add_parser("serve", help="run the daemon in the foreground, logging to stderr")
    p.add_argument("-v", "--verbose", action="count", default=0)
    p.add_argument("--autostarted", action="store_true", help=argparse.SUPPRESS)
    p.set_defaults(fn=cmd_serve)
    p = sub.add_parser("status", help="show the sessions the daemon holds")
    p.add_argument("--json", action="store_true")
    p.set_defaults(fn=cmd_status)
    p = sub.add_parser("logout", help="end sessions and revoke their refresh tokens")
    p.add_argument("--all", action="store_true")
    p.add_argument("--issuer")
    p.add_argument("--client-id")
    p.set_defaults(fn=cmd_logout)
    p = sub.add_parser("clean", help="forget all sessions (works without the daemon)")
    p.set_defaults(fn=cmd_clean)
    p = sub.add_parser("audit", help="show which processes got tokens (works without the daemon)")
    p.add_argument("--json", action="store_true", help="one JSON record a line")
    p.add_argument("--since", metavar="DURATION", help="only the last DURATION, e.g. 1h, 30m, 2d")
    p.add_argument("--session", metavar="KEY", help="only this session (its key or a prefix, as status shows)")
    p.set_defaults(fn=cmd_audit)
    p = sub.add_parser("version", help="print the version")
    p.set_defaults(fn=cmd_version)
    p = sub.add_parser("install-systemd", help="install the systemd user units")
    p.add_argument("--uninstall", action="store_true")
    p.add_argument("--unit-dir")
    p.set_defaults(fn=cmd_install_systemd)
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    from client_shim.core import ShimError

    args_list = list(sys.argv[1:] if argv is None else argv)
    try:
        if args_list[:1] == ["get-token"]:
            return _passthrough(args_list)
        if args_list[:1] == ["setup"]:
            return _setup(args_list)
        if args_list[:1] == ["login"]:
            return _login(args_list)
        args = build_parser().parse_args(args_list)
        return int(args.fn(args))
    except ShimError as exc:
        print(exc.text, file=sys.stderr)
        return exc.code
    except BrokerError as exc:
        print(f"brokerd: {exc}", file=sys.stderr)
        return exc.exit_code
    except KeyboardInterrupt:
        return 130
