"""A private desktop session for keyring tests: a real dbus-daemon and a real gnome-keyring-daemon.

Each ``Desktop`` has its own session bus (a Unix socket in its own directory, its own bus config with no service
activation, so nothing else can start on it) and its own keyring files (XDG_DATA_HOME).  The bus address goes only
into the environments of the children we start (``desktop.env``): the machine's own session bus is never touched,
and only the PIDs started here are ever signalled.
"""

from __future__ import annotations

import contextlib
import os
import select
import shutil
import signal
import subprocess
import time
from collections.abc import Iterator
from pathlib import Path

PASSWORD = "brokerd-test-keyring-password"
START_TIMEOUT = 10.0

BUS_CONFIG = """<!DOCTYPE busconfig PUBLIC "-//freedesktop//DTD D-Bus Bus Configuration 1.0//EN"
 "http://www.freedesktop.org/standards/dbus/1.0/busconfig.dtd">
<busconfig>
  <type>session</type>
  <listen>unix:path={socket}</listen>
  <auth>EXTERNAL</auth>
  <policy context="default">
    <allow send_destination="*" eavesdrop="true"/>
    <allow eavesdrop="true"/>
    <allow own="*"/>
  </policy>
</busconfig>
"""


def missing() -> str | None:
    """Why the desktop tests cannot run here, or None (scripts/test installs both Debian packages)."""
    absent = [name for name in ("dbus-daemon", "gnome-keyring-daemon") if shutil.which(name) is None]
    if absent:
        return f"{' and '.join(absent)} not installed (Debian packages dbus-daemon, gnome-keyring; scripts/test)"
    return None


class Desktop:
    def __init__(self, base: Path) -> None:
        self.base = base
        self.base.mkdir(mode=0o700, parents=True, exist_ok=True)
        self.data = base / "data"
        self.runtime = base / "xdg-run"
        for d in (self.data, self.runtime):
            d.mkdir(mode=0o700, exist_ok=True)
        self.bus: subprocess.Popen[bytes] | None = None
        self.keyring: subprocess.Popen[bytes] | None = None
        self.address = ""

    @property
    def env(self) -> dict[str, str]:
        """What a child needs to find this desktop's session bus."""
        return {"DBUS_SESSION_BUS_ADDRESS": self.address}

    def start_bus(self) -> None:
        config = self.base / "bus.conf"
        config.write_text(BUS_CONFIG.format(socket=self.base / "bus"))
        self.bus = subprocess.Popen(["dbus-daemon", f"--config-file={config}", "--print-address", "--nofork"],
                                    stdout=subprocess.PIPE, stderr=subprocess.DEVNULL, stdin=subprocess.DEVNULL,
                                    env={"PATH": os.environ.get("PATH", "/usr/bin:/bin")})
        assert self.bus.stdout is not None
        ready, _, _ = select.select([self.bus.stdout], [], [], START_TIMEOUT)
        line = self.bus.stdout.readline().decode().strip() if ready else ""
        if not line.startswith("unix:"):
            raise RuntimeError(f"dbus-daemon printed no address within {START_TIMEOUT} s")
        self.address = line

    def start_keyring(self) -> None:
        """gnome-keyring-daemon, its login keyring created (first time) or unlocked with PASSWORD from stdin."""
        assert self.address, "start the bus first"
        env = {"PATH": os.environ.get("PATH", "/usr/bin:/bin"), "HOME": str(self.base),
               "XDG_DATA_HOME": str(self.data), "XDG_RUNTIME_DIR": str(self.runtime), **self.env}
        self.keyring = subprocess.Popen(
            ["gnome-keyring-daemon", "--unlock", "--components=secrets", "--foreground"],
            stdin=subprocess.PIPE, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, env=env)
        assert self.keyring.stdin is not None
        self.keyring.stdin.write(PASSWORD.encode())
        self.keyring.stdin.close()
        deadline = time.monotonic() + START_TIMEOUT
        while time.monotonic() < deadline:
            if self.keyring.poll() is not None:
                raise RuntimeError(f"gnome-keyring-daemon exited with {self.keyring.returncode}")
            if self._service_up():
                return
            time.sleep(0.1)
        raise RuntimeError(f"gnome-keyring-daemon did not appear on the bus within {START_TIMEOUT} s")

    def stop_keyring(self) -> None:
        """The keyring goes away (as after logging out of the desktop); its files stay, locked."""
        if self.keyring is not None:
            _stop(self.keyring)
            self.keyring = None

    def lock(self) -> None:
        """Lock the default collection, as the screen locker or `seahorse` would."""
        import secretstorage

        with self._connection() as conn:
            secretstorage.Collection(conn).lock()

    def items(self, attributes: dict[str, str]) -> list[bytes | None]:
        """The secrets of the matching items (None for a locked one)."""
        import secretstorage

        with self._connection() as conn:
            return [None if item.is_locked() else item.get_secret()
                    for item in secretstorage.search_items(conn, attributes)]

    def close(self) -> None:
        self.stop_keyring()
        if self.bus is not None:
            _stop(self.bus)
            self.bus = None

    @contextlib.contextmanager
    def _connection(self) -> Iterator[object]:
        from jeepney.io.blocking import open_dbus_connection

        conn = open_dbus_connection(bus=self.address)
        try:
            yield conn
        finally:
            conn.close()

    def _service_up(self) -> bool:
        import secretstorage

        with self._connection() as conn:
            return bool(secretstorage.check_service_availability(conn))


def _stop(proc: subprocess.Popen[bytes]) -> None:
    if proc.poll() is None:
        proc.send_signal(signal.SIGTERM)
    try:
        proc.wait(timeout=10)
    except subprocess.TimeoutExpired:
        proc.kill()
        proc.wait(timeout=5)
    for pipe in (proc.stdin, proc.stdout):
        if pipe is not None:
            pipe.close()


@contextlib.contextmanager
def desktop(base: Path, keyring: bool = True) -> Iterator[Desktop]:
    d = Desktop(base)
    try:
        d.start_bus()
        if keyring:
            d.start_keyring()
        yield d
    finally:
        d.close()
