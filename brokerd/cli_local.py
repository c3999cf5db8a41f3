"""The ``brokerd`` commands that need no daemon to answer them: ``serve`` (runs the daemon: logging, uvloop),
``kubeconfig``, ``audit``, ``store migrate``, ``install-systemd``, ``version``.  cli.py parses and dispatches; the
commands that talk to a running daemon live there."""

from __future__ import annotations

import argparse
import asyncio
import codecs
import contextlib
import logging
import os
import sys
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

from brokerd import __version__, paths
from client_shim.protocol import for_terminal

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


def _run_loop(main: Callable[[], Any], event_loop: str = "asyncio") -> Any:
    """Run the daemon on asyncio's own event loop, or on uvloop when ``[daemon] event_loop = "uvloop"``."""
    loop_factory = None
    if event_loop == "uvloop":
        try:
            import uvloop

            loop_factory = uvloop.new_event_loop
        except ImportError:
            log.warning("[daemon] event_loop = \"uvloop\" but uvloop is not installed: using asyncio's event loop")
    with asyncio.Runner(loop_factory=loop_factory) as runner:
        return runner.run(main())


def cmd_serve(args: argparse.Namespace) -> int:
    from brokerd.config import Settings, load_settings
    from brokerd.daemon import AlreadyRunning, Daemon
    from brokerd.errors import StateDirBusy
    from brokerd.hardening import no_core_dumps
    from client_shim.protocol import STATE_DIR_BUSY_EXIT

    environ = os.environ
    # Absolute now, then out of the directory it was started in (a shim's autostart runs where kubectl ran): a
    # relative command (BROWSER, an empty PATH entry) must not be looked for there, nor may the daemon keep it busy.
    try:
        state = paths.state_dir(environ).absolute()
        socket_path, config_file = paths.socket_path(environ).absolute(), paths.config_file(environ).absolute()
    except OSError as exc:  # a relative BROKERD_* path in a directory that is gone
        print(f"brokerd: cannot resolve a relative path from the current directory: {exc.strerror}", file=sys.stderr)
        return 1
    os.chdir("/")
    _setup_logging(args.verbose, state / "brokerd.log" if args.autostarted else None)
    no_core_dumps()  # before anything reads the store's key or a token into memory
    settings = load_settings(Settings(socket_path=socket_path, state_dir=state, config_file=config_file))
    try:
        _run_loop(Daemon(settings).run, settings.event_loop)
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
    from brokerd.audit import format_entry, json_line, read_entries
    from brokerd.policy import parse_duration
    from client_shim.core import write_all  # waits on a non-blocking stdout (the text layer would drop data)

    since = time.time() - parse_duration(args.since, "--since") if args.since else None
    # Claims come from the provider: the text form escapes control characters as status does, and what the
    # terminal's encoding cannot show; the JSON form is strict (no NaN or Infinity, which an edited trail may hold)
    # and ASCII-only (control characters and every other non-printable one escaped).
    out = sys.stdout
    try:
        fd = out.fileno()
    except (AttributeError, ValueError, OSError):  # started with stdout closed
        print("brokerd: audit has no stdout to write to", file=sys.stderr)
        return 1
    # One incremental encoder for the whole output: an encoding with a byte-order mark writes it once, at the start.
    encode = codecs.getincrementalencoder(getattr(out, "encoding", None) or "utf-8")("backslashreplace").encode
    try:
        out.flush()
        chunk: list[bytes] = []
        for doc in read_entries(paths.state_dir(os.environ), since=since, session=args.session):
            try:
                text = json_line(doc, ascii_only=True) if args.json else for_terminal(format_entry(doc))
            except (ValueError, TypeError, RecursionError):
                continue  # an edited line we cannot show as a record: skipped, like a torn one
            chunk.append(encode(text + "\n"))
            if len(chunk) >= 256:
                write_all(fd, b"".join(chunk))
                chunk = []
        write_all(fd, b"".join(chunk))
    except BrokenPipeError:  # `brokerd audit | head`: the reader has what it wanted
        _quiet_stdout(out)
    except OSError as exc:  # a full disk, a descriptor not open for writing, a reader that stopped reading
        _quiet_stdout(out)
        print(f"brokerd: cannot write the audit trail to stdout: {exc.strerror or exc}", file=sys.stderr)
        return 1
    return 0


def _quiet_stdout(out: Any) -> None:
    """Point stdout at /dev/null, so that the interpreter's own flush at exit does not fail again."""
    with contextlib.suppress(OSError, ValueError, AttributeError):
        os.dup2(os.open(os.devnull, os.O_WRONLY), out.fileno())


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
