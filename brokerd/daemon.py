"""The composition root of ``brokerd serve``: builds the parts, owns the listening socket, runs until a signal.

Every resource is opened here and closed here, in reverse order, even when start-up fails half way.  Each part gets
what it needs in its constructor; the ones that follow the config file get a way to read the current
``config.Settings`` (``Daemon._current``), never a copy.

SIGHUP re-reads the config file and swaps ``Daemon.settings`` as a whole, in one assignment: profiles, the
[daemon] refresh policy (the next timer and the next serve decision use it), ``caller_browser`` and
``listen_non_loopback`` change for every request from then on.  A broken file changes nothing (its error is
logged).  [store] (where the data key lives, whether sessions are written) is read at start only: a reload
keeps the running values and logs that a change needs a restart.  The socket, the state directory, sessions,
logins in progress and HTTP clients are kept: a reload never drops a session or interrupts a request.
"""

from __future__ import annotations

import asyncio
import contextlib
import fcntl
import logging
import os
import signal
import socket
from collections.abc import Callable
from dataclasses import replace
from pathlib import Path
from typing import IO

from brokerd import statelock, systemd
from brokerd.audit import AuditLog
from brokerd.browser import BrowserOpener
from brokerd.callback import CallbackServer
from brokerd.clock import SystemClock
from brokerd.config import Settings, load_settings
from brokerd.errors import BrokerError, ConfigError
from brokerd.flows import LoginFlows
from brokerd.keyring import choose_key_source, in_keyring
from brokerd.keywait import WaitingStore, Watcher
from brokerd.paths import ensure_socket_dir
from brokerd.server import Limits, Server
from brokerd.sessions import SessionManager
from brokerd.store import SessionStore
from brokerd.tls import ProviderClients
from client_shim.protocol import peer_check_available

log = logging.getLogger("brokerd")

MAX_SOCKET_PATH = 107  # sun_path is 108 bytes including the NUL


class AlreadyRunning(BrokerError):
    pass


def _lock_runtime_dir(path: Path) -> IO[bytes]:
    """One daemon per socket: a lock file beside the socket, held for the daemon's life."""
    lock = open(path.parent / (path.name + ".lock"), "ab")  # noqa: SIM115 - held open on purpose
    try:
        fcntl.flock(lock, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except BlockingIOError:
        lock.close()
        raise AlreadyRunning(f"another brokerd is already serving {path}") from None
    os.chmod(lock.name, 0o600)
    return lock


def _socket_alive(path: Path) -> bool:
    probe = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    probe.settimeout(1.0)
    try:
        probe.connect(str(path))
    except OSError:
        return False
    finally:
        probe.close()
    return True


def bind_socket(path: Path) -> socket.socket:
    if len(os.fsencode(path)) > MAX_SOCKET_PATH:
        raise ConfigError(f"socket path is too long for a Unix socket ({len(os.fsencode(path))} bytes): {path}")
    if path.exists() or path.is_symlink():
        if _socket_alive(path):
            raise AlreadyRunning(f"another brokerd is already serving {path}")
        log.info("removing stale socket %s left by a daemon that is gone", path)
        path.unlink()
    sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    old_umask = os.umask(0o177)  # the socket is born 0600: no window where another user could connect
    try:
        sock.bind(str(path))
    finally:
        os.umask(old_umask)
    os.chmod(path, 0o600)
    sock.listen(512)
    sock.setblocking(False)
    return sock


class Daemon:
    def __init__(self, settings: Settings, limits: Limits | None = None) -> None:
        self.settings = settings  # swapped whole by SIGHUP; parts read it through ``self._current``
        self._limits = limits or Limits()
        self._stop = asyncio.Event()
        self._owned_socket: Path | None = None
        # A SIGHUP before the parts exist (the socket already accepts connections) is kept and applied once they
        # do, instead of being dropped: the caller who sent it sees the socket and cannot tell the daemon is starting.
        self._hup_pending = False
        self._on_hup: Callable[[], None] = self._hup_early

    def request_stop(self) -> None:
        self._stop.set()

    def _hup_early(self) -> None:
        self._hup_pending = True

    def _current(self) -> Settings:
        return self.settings

    async def run(self, on_ready: Callable[[], None] | None = None) -> None:
        config = self.settings  # where to live: fixed for the daemon's life, whatever a reload says
        notifier = systemd.Notifier.from_environ(unset_environment=True)
        activated = systemd.listen_fds(unset_environment=True)
        lock: IO[bytes] | None = None
        if not peer_check_available():
            # Without it any local user could ask this daemon for tokens: refuse to serve rather than skip the check.
            raise ConfigError("this platform cannot tell who connects to a Unix socket (no SO_PEERCRED or "
                              "LOCAL_PEERCRED); brokerd will not serve without that check")
        # The socket's lock first (a daemon on the same socket is AlreadyRunning: an autostart race, quiet), then
        # the state directory's, before binding: a second daemon on the same store (another socket path) must not
        # bind, or shims would talk to it.
        state_lock: statelock.StateLock | None = None
        try:
            if activated:
                sock = activated[0]
                sock.setblocking(False)
            else:
                ensure_socket_dir(config.socket_path.parent)
                lock = _lock_runtime_dir(config.socket_path)
            if config.persist:
                where = "the systemd socket" if activated else f"socket {config.socket_path}"
                state_lock = statelock.hold(config.state_dir, where)
            if not activated:
                sock = bind_socket(config.socket_path)
                self._owned_socket = config.socket_path
        except BaseException:
            if state_lock is not None:
                state_lock.close()
            if lock is not None:
                lock.close()
            raise
        async with contextlib.AsyncExitStack() as stack:
            if state_lock is not None:
                stack.callback(state_lock.close)  # pushed first, so released last: after the final save
            stack.callback(notifier.close)
            if lock is not None:
                stack.callback(lock.close)
            stack.callback(self._remove_socket)
            stack.callback(sock.close)
            # Signal handlers go first so they are removed last: a second SIGTERM while sessions are being saved
            # must not kill the daemon half way.
            loop = asyncio.get_running_loop()
            for sig in (signal.SIGTERM, signal.SIGINT):
                loop.add_signal_handler(sig, self.request_stop)
                stack.callback(loop.remove_signal_handler, sig)
            loop.add_signal_handler(signal.SIGHUP, lambda: self._on_hup())
            stack.callback(loop.remove_signal_handler, signal.SIGHUP)
            clock = SystemClock()
            clients = ProviderClients(clock)  # one HTTP client per TLS option set (--certificate-authority ...)
            stack.push_async_callback(clients.close)
            callbacks = CallbackServer()
            stack.push_async_callback(callbacks.close)
            browser = BrowserOpener(os.environ)
            stack.push_async_callback(browser.close)
            store: WaitingStore | None = None
            if config.persist:
                keys = await asyncio.to_thread(choose_key_source, config.store_key, config.state_dir)
                owned = state_lock.holds if state_lock is not None else None
                store = WaitingStore(SessionStore(config.state_dir, keys, owned))
            # The watchdog pings until the sessions are closed (its cancel is pushed first, so it runs last):
            # closing may wait for a refresh in flight for as long as a provider request takes.
            watchdog = systemd.watchdog_interval(unset_environment=True)
            if watchdog:
                task = asyncio.create_task(systemd.watchdog_task(notifier, watchdog))
                stack.push_async_callback(_cancel, task)

            flows = LoginFlows(callbacks, browser, listen_non_loopback=lambda: self.settings.listen_non_loopback)
            sessions = SessionManager(clients.client_for, flows, store, clock, lambda: self.settings.policy,
                                      lambda: self.settings.policies, self._limits.answer_timeout)
            sessions.keyring_backed = store is not None and in_keyring(store.inner.key_source)
            # The audit trail closes after the sessions (pushed first): it writes what they handed out last.
            trail = AuditLog(config.state_dir)
            trail.start()
            stack.push_async_callback(trail.close)
            await sessions.start()
            stack.push_async_callback(sessions.close)
            if store is not None:
                # Pushed after sessions.close, so it is cancelled first: no adoption races the final save.
                watcher = Watcher(store, sessions)
                stack.push_async_callback(watcher.close)
                sessions.on_store_waiting = watcher.ensure
                watcher.ensure()
            sessions.watch()
            api = Server(sessions, clients.client_for, self._current, self._limits, trail)
            server = await asyncio.start_unix_server(api.handle, sock=sock, limit=self._limits.max_request)
            self._on_hup = lambda: self._reload(sessions, notifier)
            if self._hup_pending:
                self._on_hup()
            if notifier.enabled:
                status = asyncio.create_task(_report_status(notifier, sessions))
                stack.push_async_callback(_cancel, status)
            log.info("serving on %s (%d session(s); event loop: %s)",
                     config.socket_path if not activated else "the systemd socket", len(sessions), _loop_name())
            _notify(notifier.ready, f"serving {len(sessions)} session(s)")
            if on_ready is not None:
                on_ready()
            await self._stop.wait()
            log.info("stopping")
            _notify(notifier.stopping)
            server.close()  # stop accepting; requests in flight go on
            sessions.interrupt_logins()  # their callers are told now, instead of waiting for a browser
            await _wait_idle(api, config.shutdown_grace)
            # the exit stack now fails pending logins (their callers are told), persists, closes

    def _reload(self, sessions: SessionManager, notifier: systemd.Notifier) -> None:
        """SIGHUP: read the config file again and swap the settings whole.  A broken file keeps the old ones."""
        if self.settings.config_file is None:
            return
        _notify(notifier.reloading)
        try:
            settings = load_settings(self.settings)
        except BrokerError as exc:
            log.error("config not reloaded, keeping the old one: %s", exc)
        else:
            running = (self.settings.store_key, self.settings.persist)
            if (settings.store_key, settings.persist) != running:
                log.warning("[store] is read at start only: the change takes effect when brokerd restarts")
            if settings.event_loop != self.settings.event_loop:
                log.warning("[daemon] event_loop is read at start only: the change takes effect when brokerd "
                            "restarts")
            # The store was opened once with these, and the loop runs: keep them, so Settings says what the daemon
            # does.
            self.settings = replace(settings, store_key=running[0], persist=running[1],
                                    event_loop=self.settings.event_loop)
            sessions.reload()  # each session's policy from the new tables
            log.info("config reloaded from %s (%d profile(s))", settings.config_file, len(settings.profiles))
        _notify(notifier.ready, f"serving {len(sessions)} session(s)")

    def _remove_socket(self) -> None:
        # Only a socket we bound ourselves: one that systemd passed in belongs to the socket unit.
        if self._owned_socket is not None:
            with contextlib.suppress(FileNotFoundError):
                self._owned_socket.unlink()


def _loop_name() -> str:
    """The event loop this daemon runs on, as [daemon] event_loop names it (uvloop may be missing: then asyncio)."""
    return "uvloop" if type(asyncio.get_running_loop()).__module__.startswith("uvloop") else "asyncio"


def _notify(fn: Callable[..., bool], *args: str) -> None:
    try:
        fn(*args)
    except OSError as exc:
        log.warning("could not notify systemd: %s", exc.strerror or exc)


async def _cancel(task: asyncio.Task[None]) -> None:
    task.cancel()
    with contextlib.suppress(asyncio.CancelledError):
        await task


async def _report_status(notifier: systemd.Notifier, sessions: SessionManager, every: float = 5.0) -> None:
    """Keep systemd's STATUS= (shown by `systemctl --user status brokerd`) in step with the session count."""
    last: tuple[int, bool] | None = None
    while True:
        count = len(sessions), sessions.store_notice is not None
        if count != last:
            waiting = "; the stored sessions wait for the keyring to unlock" if count[1] else ""
            _notify(notifier.status, f"serving {count[0]} session(s){waiting}")
            last = count
        await asyncio.sleep(every)


async def _wait_idle(api: Server, grace: float) -> None:
    loop = asyncio.get_running_loop()
    deadline = loop.time() + grace
    while api.active and loop.time() < deadline:  # noqa: ASYNC110 - a bounded poll at shutdown only
        await asyncio.sleep(0.05)

