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
    from brokerd.errors import StateDirBusy
    from brokerd.hardening import no_core_dumps
    from client_shim.protocol import STATE_DIR_BUSY_EXIT

    environ = os.environ
    state = paths.state_dir(environ)
    _setup_logging(args.verbose, state / "brokerd.log" if args.autostarted else None)
    no_core_dumps()  # before anything reads the store's key or a token into memory
    settings = load_settings(Settings(socket_path=paths.socket_path(environ), state_dir=state,
                                      config_file=paths.config_file(environ)))
    try:
        _run_loop(Daemon(settings).run)
    except AlreadyRunning as exc:
        if args.autostarted:
            return 0  # lost the start race to another shim's daemon: that one serves
        print(f"brokerd: {exc}", file=sys.stderr)
        return 1
    except StateDirBusy as exc:
        log.error("%s", exc)
        if args.autostarted:
            return STATE_DIR_BUSY_EXIT  # the shim that started us says which daemon holds the state dir
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
    if doc.get("store"):
        print(doc["store"].removeprefix("note: "))
    if doc.get("store_problem"):
        print(f"warning: {_shown(doc['store_problem'])}; sessions are kept in memory only")
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
        rt_until = s.get("refresh_token_expires_at")  # when the provider said when it expires
        print(f"  refresh token: {'yes' if s.get('refresh_token') else 'no'}"
              + (f", expires {_when(rt_until, now)}" if s.get("refresh_token") and rt_until else ""))
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
        return _logout_bare()
    argv = ["logout"]
    if args.issuer:
        argv += ["--issuer", args.issuer]
    if args.client_id:
        argv += ["--client-id", args.client_id]
    return _end_sessions(argv)


def _end_sessions(argv: list[str]) -> int:
    doc = _ask_daemon(argv)
    ended = doc.get("logged_out", [])
    if not ended:
        print("no matching sessions")
    for s in ended:
        print(f"logged out of {_shown(s['issuer'])} (client {_shown(s['client_id'])}, session {_shown(s['session'])}):"
              f" {_shown(s['result'])}")
    return 0


def _logout_bare() -> int:
    """One session: end it (as `gh auth logout` does).  Several: ask at a terminal, else name the choices.

    The daemon ends sessions by issuer and client id, so a choice is one such pair (with every session under it).
    """
    groups: dict[tuple[str, str], list[dict[str, Any]]] = {}
    for s in _ask_daemon(["status"]).get("sessions", []):
        groups.setdefault((s["issuer"], s["client_id"]), []).append(s)
    if not groups:
        print("no sessions")
        return 0
    choices = list(groups.items())
    if len(choices) > 1:
        if not (sys.stdin.isatty() and sys.stderr.isatty()):
            print(f"brokerd: {len(choices)} sessions; say which to end (or --all):", file=sys.stderr)
            for (issuer, client_id), members in choices:
                print(f"  brokerd logout --issuer {issuer} --client-id {client_id}    # {_who(members)}",
                      file=sys.stderr)
            return 2
        for n, ((issuer, client_id), members) in enumerate(choices, 1):
            print(f"  {n}) {issuer}  client {client_id}  {_who(members)}", file=sys.stderr)
        try:
            answer = input(f"end which? [1-{len(choices)}, all] ").strip()
        except EOFError:
            print(file=sys.stderr)
            return 1
        if answer == "all":
            return _end_sessions(["logout"])
        if not (answer.isdigit() and 1 <= int(answer) <= len(choices)):
            print(f"brokerd: expected a number from 1 to {len(choices)} or `all`, got {answer!r}", file=sys.stderr)
            return 2
        choices = [choices[int(answer) - 1]]
    (issuer, client_id), _ = choices[0]
    return _end_sessions(["logout", "--issuer", issuer, "--client-id", client_id])


def _who(members: list[dict[str, Any]]) -> str:
    names = [m.get("session_name") or m.get("email") or m.get("username") or m["session"] for m in members]
    return ", ".join(str(n) for n in names)


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
        from brokerd import statelock
        from brokerd.errors import StateDirBusy
        from brokerd.store import SessionStore

        state = paths.state_dir(os.environ)
        try:
            # Held while clearing: a daemon on this store (any socket path) would write its sessions back.
            lock = statelock.hold(state, "brokerd clean")
        except StateDirBusy as busy:
            print(f"brokerd: {busy}", file=sys.stderr)
            return 1
        with lock:
            SessionStore(state).clear()
        print("removed all stored sessions (the daemon is not running)")
        return 0
    print(f"logged out of {len(doc.get('logged_out', []))} session(s)")
    return 0


def cmd_store_migrate(args: argparse.Namespace) -> int:
    from brokerd.config import Settings, load_settings
    from brokerd.migrate import migrate_key

    environ = os.environ
    settings = load_settings(Settings(socket_path=paths.socket_path(environ), state_dir=paths.state_dir(environ),
                                      config_file=paths.config_file(environ)))
    migrate_key(settings.state_dir, args.to, settings.socket_path, settings.store_key)
    return 0


def cmd_audit(args: argparse.Namespace) -> int:
    """Print the audit trail from the files in the state dir (no daemon needed)."""
    from brokerd.audit import format_entry, read_entries
    from brokerd.policy import parse_duration

    since = time.time() - parse_duration(args.since, "--since") if args.since else None
    for doc in read_entries(paths.state_dir(os.environ), since=since, session=args.session):
        # Claims come from the provider: the text form escapes control characters as status does; the JSON form
        # is ASCII-only (json.dumps escapes them, and ensure_ascii every other non-printable one).
        print(json.dumps(doc, separators=(",", ":")) if args.json else _shown(format_entry(doc)))
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


def shim_target() -> tuple[str, str]:
    """The interpreter and shim file of the direct kubeconfig form: this interpreter (its path, not resolved: a
    venv's python is a symlink whose path selects the venv) and the launcher beside client_shim/core.py (it
    imports core from cached bytecode)."""
    from client_shim import core as shim

    return (os.path.abspath(sys.executable),
            os.path.join(os.path.dirname(os.path.abspath(shim.__file__ or ".")), "shim.py"))


def cmd_kubeconfig(args: argparse.Namespace) -> int:
    from brokerd import kubeconfig

    revert = args.action == "revert"
    files = kubeconfig.kubeconfig_files(args.kubeconfig, os.environ)
    changes = kubeconfig.plan(files, args.user or [], kubeconfig.Target(*shim_target()), revert=revert)
    if not changes:
        done = "in the kubelogin form" if revert else "in the direct form"
        print(f"nothing to do: every matching user is already {done} ({', '.join(map(str, files))})",
              file=sys.stderr)
        return 0
    for change in changes:
        sys.stdout.write(change.diff())
    if args.dry_run:
        return 0
    for change in changes:
        try:
            backup = kubeconfig.write(change)
        except OSError as exc:
            print(f"brokerd: cannot write {change.path}: {exc.strerror or exc}", file=sys.stderr)
            return 1
        verb = "reverted" if revert else "converted"
        print(f"{verb} {', '.join(change.users)} in {change.path} (previous text in {backup})", file=sys.stderr)
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

    doc = json.loads(_call_daemon(argv, autostart=True))
    report = render_report(doc, doc.get("kubeconfig_args", []), *shim_target())
    print("\n".join(_shown(line) for line in report.split("\n")))  # claims and provider text: no control chars
    return 0 if doc.get("logged_in") else 1


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="brokerd", description="Local OIDC token broker for kubectl.",
        epilog="Also `brokerd get-token ...` and `brokerd setup ...`, the same as `kubectl oidc-login get-token|setup "
               "...`: see `brokerd get-token --help` and `brokerd setup --help`.")
    parser.add_argument("--version", action="version", version=f"brokerd {__version__}")
    sub = parser.add_subparsers(dest="command", required=True)
    p = sub.add_parser("serve", help="run the daemon in the foreground, logging to stderr")
    p.add_argument("-v", "--verbose", action="count", default=0, help="log every step (never a token)")
    p.add_argument("--autostarted", action="store_true", help=argparse.SUPPRESS)
    p.set_defaults(fn=cmd_serve)
    p = sub.add_parser("status", help="show the sessions the daemon holds")
    p.add_argument("--json", action="store_true", help="print the daemon's answer as JSON")
    p.set_defaults(fn=cmd_status)
    p = sub.add_parser("logout", help="end sessions and revoke their refresh tokens",
                       description="Without flags: ends the only session; with several, asks which at a terminal, "
                                   "else names them and the flags to choose.")
    p.add_argument("--all", action="store_true", help="end every session")
    p.add_argument("--issuer", metavar="URL", help="end the sessions of this issuer")
    p.add_argument("--client-id", metavar="ID", help="end the sessions of this client id (with --issuer: both)")
    p.set_defaults(fn=cmd_logout)
    p = sub.add_parser("clean", help="forget all sessions (works without the daemon)")
    p.set_defaults(fn=cmd_clean)
    p = sub.add_parser("kubeconfig", help="rewrite kubelogin users into brokerd's direct form, or back",
                       description="convert: every user whose exec runs kubelogin (kubectl oidc-login get-token, "
                                   "kubelogin get-token, kubectl-oidc_login get-token) gets the direct form "
                                   "(this interpreter with -I -S and the shim file; every flag kept). revert: back "
                                   "to `kubectl oidc-login get-token`. Prints a unified diff; keeps a backup.")
    p.add_argument("action", choices=["convert", "revert"])
    p.add_argument("--kubeconfig", metavar="PATH", help="the file to edit (default: $KUBECONFIG's files, else "
                                                        "~/.kube/config; a user is edited where it is defined)")
    p.add_argument("--user", action="append", metavar="NAME", help="only this user (repeatable; default: all)")
    p.add_argument("--dry-run", action="store_true", help="print the diff only, write nothing")
    p.set_defaults(fn=cmd_kubeconfig)
    p = sub.add_parser("store", help="manage the session store")
    store_sub = p.add_subparsers(dest="store_command", required=True)
    p = store_sub.add_parser("migrate", help="move the store's data key between the keyring and the key file")
    p.add_argument("--to", choices=["keyring", "file"], required=True)
    p.set_defaults(fn=cmd_store_migrate)
    p = sub.add_parser("audit", help="show which processes got tokens (works without the daemon)")
    p.add_argument("--json", action="store_true", help="one JSON record a line")
    p.add_argument("--since", metavar="DURATION", help="only the last DURATION, e.g. 1h, 30m, 2d")
    p.add_argument("--session", metavar="KEY", help="only this session (its key or a prefix, as status shows)")
    p.set_defaults(fn=cmd_audit)
    p = sub.add_parser("version", help="print the version")
    p.set_defaults(fn=cmd_version)
    p = sub.add_parser("install-systemd", help="install the systemd user units")
    p.add_argument("--uninstall", action="store_true", help="remove the units instead")
    p.add_argument("--unit-dir", metavar="DIR", help="where the units go (default: systemd's user unit dir)")
    p.set_defaults(fn=cmd_install_systemd)
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    from client_shim.core import ShimError

    args_list = list(sys.argv[1:] if argv is None else argv)
    if args_list[:1] in (["get-token"], ["setup"]) and ("--help" in args_list or "-h" in args_list):
        from client_shim.usage import main as usage  # these flags are the shim's; argparse does not know them

        return usage(args_list, "brokerd")
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
