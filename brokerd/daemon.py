"""The composition root of ``brokerd serve``: builds the parts, owns the listening socket, runs until a signal.

Every resource is opened here and closed here, in reverse order, even when start-up fails half way.
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
from dataclasses import dataclass, field
from pathlib import Path
from typing import IO

from brokerd import systemd
from brokerd.browser import BrowserOpener
from brokerd.callback import CallbackServer
from brokerd.clock import SystemClock
from brokerd.config import load_config
from brokerd.errors import BrokerError, ConfigError
from brokerd.flows import LoginFlows
from brokerd.keyring import choose_key_source, in_keyring
from brokerd.keywait import WaitingStore, watch
from brokerd.paths import ensure_private_dir
from brokerd.server import Limits, Server
from brokerd.sessions import Policy, SessionManager
from brokerd.store import SessionStore
from brokerd.tls import ProviderClients

log = logging.getLogger("brokerd")

MAX_SOCKET_PATH = 107  # sun_path is 108 bytes including the NUL


class AlreadyRunning(BrokerError):
    pass


@dataclass(frozen=True)
class DaemonConfig:
    socket_path: Path
    state_dir: Path
    policy: Policy = field(default_factory=Policy)
    limits: Limits = field(default_factory=Limits)
    shutdown_grace: float = 5.0
    persist: bool = True
    config_file: Path | None = None
    profiles: dict[str, tuple[str, ...]] = field(default_factory=dict)
    caller_browser: bool = True
    store_key: str = "auto"


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
    def __init__(self, config: DaemonConfig) -> None:
        self.config = config
        self._stop = asyncio.Event()
        self._owned_socket: Path | None = None
        self._on_hup: Callable[[], None] = lambda: None

    def request_stop(self) -> None:
        self._stop.set()

    async def run(self, on_ready: Callable[[], None] | None = None) -> None:
        config = self.config
        notifier = systemd.Notifier.from_environ(unset_environment=True)
        activated = systemd.listen_fds(unset_environment=True)
        lock: IO[bytes] | None = None
        if activated:
            sock = activated[0]
            sock.setblocking(False)
        else:
            ensure_private_dir(config.socket_path.parent)
            lock = _lock_runtime_dir(config.socket_path)
            sock = bind_socket(config.socket_path)
            self._owned_socket = config.socket_path
        async with contextlib.AsyncExitStack() as stack:
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
                store = WaitingStore(SessionStore(config.state_dir, keys))
            sessions = SessionManager(clients.for_options, LoginFlows(callbacks, browser), store, clock, config.policy)
            sessions.keyring_backed = store is not None and in_keyring(store.inner.key_source)
            await sessions.start()
            stack.push_async_callback(sessions.close)
            if store is not None and store.waiting_reason is not None:
                sessions.store_notice = store.notice
                waiter = asyncio.create_task(watch(store, sessions))
                stack.push_async_callback(_cancel, waiter)
            api = Server(sessions, config.limits, config.profiles)
            api.caller_browser = config.caller_browser
            api.oidc_for = clients.for_options
            server = await asyncio.start_unix_server(api.handle, sock=sock, limit=config.limits.max_request)
            self._on_hup = lambda: self._reload(api, sessions, notifier)
            if notifier.enabled:
                status = asyncio.create_task(_report_status(notifier, sessions))
                stack.push_async_callback(_cancel, status)
            watchdog = systemd.watchdog_interval(unset_environment=True)
            if watchdog:
                task = asyncio.create_task(systemd.watchdog_task(notifier, watchdog))
                stack.push_async_callback(_cancel, task)
            log.info("serving on %s (%d session(s))", config.socket_path if not activated else "the systemd socket",
                     len(sessions))
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

    def _reload(self, api: Server, sessions: SessionManager, notifier: systemd.Notifier) -> None:
        """SIGHUP: read the config file again.  A broken file keeps the old config (and says why)."""
        if self.config.config_file is None:
            return
        _notify(notifier.reloading)
        try:
            config = load_config(self.config.config_file)
        except BrokerError as exc:
            log.error("config not reloaded, keeping the old one: %s", exc)
        else:
            api.profiles = config.profiles
            api.caller_browser = config.caller_browser
            sessions.policy = config.policy
            log.info("config reloaded from %s (%d profile(s))", self.config.config_file, len(config.profiles))
        _notify(notifier.ready, f"serving {len(sessions)} session(s)")

    def _remove_socket(self) -> None:
        # Only a socket we bound ourselves: one that systemd passed in belongs to the socket unit.
        if self._owned_socket is not None:
            with contextlib.suppress(FileNotFoundError):
                self._owned_socket.unlink()


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

