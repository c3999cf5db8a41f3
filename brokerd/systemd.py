"""systemd adapters: socket activation (``LISTEN_FDS``), ``sd_notify`` and the service watchdog.

Stdlib only, and nothing reads the environment at import: every function takes an optional ``environ`` mapping
(``os.environ`` when omitted) so tests can hand in their own.  All of this is a no-op outside systemd, so
``brokerd serve`` can call it unconditionally.

The wire formats follow sd_listen_fds(3), sd_notify(3) and sd_watchdog_enabled(3).
"""

from __future__ import annotations

import asyncio
import os
import socket
import time
from collections.abc import Mapping, MutableMapping, Sequence
from types import TracebackType

from brokerd.errors import ConfigError

SD_LISTEN_FDS_START = 3
_LISTEN_VARS = ("LISTEN_PID", "LISTEN_FDS", "LISTEN_FDNAMES")
_WATCHDOG_VARS = ("WATCHDOG_USEC", "WATCHDOG_PID")


def _env(environ: MutableMapping[str, str] | None) -> MutableMapping[str, str]:
    return os.environ if environ is None else environ


def _pid_matches(value: str | None) -> bool:
    if value is None:
        return False
    try:
        return int(value) == os.getpid()
    except ValueError:
        return False


def listen_fds_with_names(
    unset_environment: bool = True, *, environ: MutableMapping[str, str] | None = None
) -> list[tuple[socket.socket, str]]:
    """The sockets systemd passed to this process, each with its ``FileDescriptorName=`` (sd_listen_fds_with_names).

    Returns ``[]`` when ``LISTEN_PID`` is unset or names another process: the variables were inherited from a
    parent and the descriptors are not ours.  Each descriptor gets ``FD_CLOEXEC`` so children (a browser) do not
    keep the listening socket alive.  With ``unset_environment`` the ``LISTEN_*`` variables are removed whatever
    the outcome, so a child never mistakes them for its own.  Raises ``ConfigError`` when ``LISTEN_FDS`` is not a
    count or a descriptor is not a socket.
    """
    env = _env(environ)
    pid, count, names = (env.get(name) for name in _LISTEN_VARS)
    if unset_environment:
        for name in _LISTEN_VARS:
            env.pop(name, None)
    if count is None or not _pid_matches(pid):
        return []
    try:
        n = int(count)
    except ValueError:
        raise ConfigError(f"LISTEN_FDS is not a number: {count!r}") from None
    if n < 0:
        raise ConfigError(f"LISTEN_FDS is negative: {n}")
    # systemd only sets LISTEN_FDNAMES when it has names; "unknown" is what libsystemd reports otherwise.
    labels = names.split(":") if names else []
    if len(labels) != n:
        labels = ["unknown"] * n
    result: list[tuple[socket.socket, str]] = []
    for fd in range(SD_LISTEN_FDS_START, SD_LISTEN_FDS_START + n):
        try:
            os.set_inheritable(fd, False)
            # fileno= makes Python ask the kernel for family, type and protocol.
            sock = socket.socket(fileno=fd)
        except OSError as exc:
            for made, _ in result:
                made.detach()
            raise ConfigError(f"systemd passed descriptor {fd}, which is not a usable socket: {exc}") from exc
        result.append((sock, labels[fd - SD_LISTEN_FDS_START]))
    return result


def listen_fds(
    unset_environment: bool = True, *, environ: MutableMapping[str, str] | None = None
) -> list[socket.socket]:
    """The sockets systemd passed to this process, in order (sd_listen_fds); see ``listen_fds_with_names``."""
    return [sock for sock, _ in listen_fds_with_names(unset_environment, environ=environ)]


def watchdog_interval(
    unset_environment: bool = False, *, environ: MutableMapping[str, str] | None = None
) -> float | None:
    """The watchdog interval in seconds (``WatchdogSec=``), or None when no watchdog watches this process.

    Ping at half of it, as sd_watchdog_enabled(3) advises; ``watchdog_task`` does.  ``WATCHDOG_PID``, when set,
    must be this process: otherwise the variables were inherited and the pings would go unheard.
    """
    env = _env(environ)
    usec, pid = (env.get(name) for name in _WATCHDOG_VARS)
    if unset_environment:
        for name in _WATCHDOG_VARS:
            env.pop(name, None)
    if usec is None or (pid is not None and not _pid_matches(pid)):
        return None
    try:
        value = int(usec)
    except ValueError:
        return None
    return value / 1_000_000 if value > 0 else None


def _clean(text: str) -> str:
    # A newline would start a new assignment: a status text must not be able to send READY=1 or STOPPING=1.
    return " ".join(text.splitlines())


class Notifier:
    """Sends sd_notify(3) datagrams to the service manager; every method is a no-op without ``NOTIFY_SOCKET``.

    Methods return True when a datagram was sent and False when there is nowhere to send it; a send that fails
    raises ``OSError`` (the caller logs it; the manager's start timeout or watchdog then takes over).
    """

    def __init__(self, address: str | None) -> None:
        self._address = self._parse(address)
        self._sock: socket.socket | None = None

    @classmethod
    def from_environ(
        cls, environ: MutableMapping[str, str] | None = None, *, unset_environment: bool = False
    ) -> Notifier:
        env = _env(environ)
        address = env.pop("NOTIFY_SOCKET", None) if unset_environment else env.get("NOTIFY_SOCKET")
        return cls(address)

    @staticmethod
    def _parse(address: str | None) -> str | bytes | None:
        if not address:
            return None
        if address.startswith("@"):
            # Abstract namespace: the leading NUL is the real first byte of the name.
            return b"\0" + address[1:].encode()
        if address.startswith("/"):
            return address
        # Relative paths and newer schemes (vsock:...) are not for a per-user daemon; libsystemd rejects the
        # former too.
        return None

    @property
    def enabled(self) -> bool:
        return self._address is not None

    def notify(self, *assignments: str) -> bool:
        """Send ``NAME=value`` assignments in one datagram."""
        if self._address is None:
            return False
        if self._sock is None:
            self._sock = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM | socket.SOCK_CLOEXEC)
        self._sock.sendto("\n".join(assignments).encode(), self._address)
        return True

    def ready(self, status: str | None = None) -> bool:
        """The daemon accepts requests (Type=notify waits for this)."""
        return self.notify("READY=1", *([f"STATUS={_clean(status)}"] if status else []))

    def status(self, text: str) -> bool:
        """One line for ``systemctl --user status brokerd``.  Never put secrets here: it is world-visible."""
        return self.notify(f"STATUS={_clean(text)}")

    def stopping(self) -> bool:
        return self.notify("STOPPING=1")

    def reloading(self) -> bool:
        # systemd 253+ (Type=notify-reload) wants the CLOCK_MONOTONIC time of the reload request with it; older
        # managers ignore the extra field.  time.monotonic_ns() is CLOCK_MONOTONIC on Linux.
        return self.notify("RELOADING=1", f"MONOTONIC_USEC={time.monotonic_ns() // 1000}")

    def watchdog_ping(self) -> bool:
        return self.notify("WATCHDOG=1")

    def close(self) -> None:
        if self._sock is not None:
            self._sock.close()
            self._sock = None

    def __enter__(self) -> Notifier:
        return self

    def __exit__(
        self, exc_type: type[BaseException] | None, exc: BaseException | None, tb: TracebackType | None
    ) -> None:
        self.close()


async def watchdog_task(notifier: Notifier, interval: float) -> None:
    """Ping every ``interval / 2`` seconds (``interval`` from ``watchdog_interval``) until cancelled.

    Run it as a task on the daemon's own event loop: a ping then also proves the loop is not stuck, which is
    what the watchdog is for.  The caller owns the task (keeps a reference, cancels and awaits it).
    """
    if interval <= 0:
        raise ValueError("watchdog interval must be positive")
    while True:
        notifier.watchdog_ping()
        await asyncio.sleep(interval / 2)


def under_service_manager(environ: Mapping[str, str] | None = None) -> bool:
    """True when this process was started by systemd as (part of) a unit (it sets ``INVOCATION_ID``)."""
    return bool((os.environ if environ is None else environ).get("INVOCATION_ID"))


def outside_unit_argv(
    argv: Sequence[str],
    env: Mapping[str, str],
    *,
    environ: Mapping[str, str] | None = None,
    systemd_run: str = "systemd-run",
) -> list[str]:
    """``argv`` rewritten so the user manager starts it as its own transient service, when we run under systemd.

    A browser started straight from brokerd.service would live in the service's cgroup, so stopping or restarting
    the daemon would kill it, and it would inherit the unit's sandbox.  ``systemd-run --user`` has the manager
    fork it instead.  ``env`` (DISPLAY, WAYLAND_DISPLAY, BROWSER, ...) is passed with ``--setenv``: never put a
    secret in it, it ends up in argv.  Outside systemd ``argv`` comes back unchanged.
    """
    if not under_service_manager(environ):
        return list(argv)
    wrapped = [systemd_run, "--user", "--collect", "--quiet", "--no-block"]
    wrapped += [f"--setenv={name}={value}" for name, value in sorted(env.items())]
    return [*wrapped, "--", *argv]
