"""A private desktop for notification tests: dbus-daemon + Xvfb + dunst, all started here and stopped by PID.

Nothing touches the machine's own session bus or display: the bus listens on a path in a temp dir (its config has
no service directories, so nothing is D-Bus-activated), Xvfb picks a free display itself (``-displayfd``), and dunst
and dunstctl get only these two addresses.  A person's clicks are played by dunstctl: ``action`` invokes a
notification's default action (the "default" key, or its only action); ``context`` opens dunst's context menu,
which runs the configured ``dmenu`` program: here a script that picks the line naming the label the test chose,
as a person picking from the menu would.
"""

from __future__ import annotations

import contextlib
import json
import os
import select
import shutil
import signal
import subprocess
import tempfile
import time
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from tests.support.desktop import BUS_CONFIG  # a private session bus, as the keyring tests use

TOOLS = {"dbus-daemon": "dbus-daemon", "Xvfb": "xvfb", "dunst": "dunst", "dunstctl": "dunst",
         "dbus-send": "dbus-bin", "xwd": "x11-apps"}

DUNSTRC = """[global]
    font = DejaVu Sans 11
    width = 520
    height = 200
    origin = top-right
    offset = 16x16
    frame_width = 2
    frame_color = "#3c78c8"
    format = "<b>%s</b>\\n%b"
    show_indicators = yes
    dmenu = {dmenu}
    sticky_history = yes
    history_length = 50
[urgency_low]
    background = "#202830"
    foreground = "#f0f0f0"
    timeout = 0
[urgency_normal]
    background = "#202830"
    foreground = "#f0f0f0"
    timeout = 0
[urgency_critical]
    background = "#402020"
    foreground = "#ffffff"
    timeout = 0
"""

# dunst writes one line per action to the menu program's stdin, "#<label> (<summary>) [<id>,<key>]"; the script
# answers with the line for the label in the choice file (none: the person dismissed the menu).
DMENU = """#!/bin/sh
choice=$(cat "{choice}" 2>/dev/null)
[ -n "$choice" ] || exit 1
exec awk -v want="#$choice (" 'index($0, want) == 1 {{ print; exit }}'
"""


def missing_tools() -> list[str]:
    """Debian packages whose programs are missing (scripts/test installs them when it can)."""
    missing = {pkg for tool, pkg in TOOLS.items() if shutil.which(tool) is None}
    if not os.path.exists("/usr/bin/convert"):  # ImageMagick's; a `convert` elsewhere on PATH may be another tool
        missing.add("imagemagick")
    return sorted(missing)


def _read_line(proc: subprocess.Popen[bytes], fd: int, what: str, timeout: float = 30.0) -> str:
    """One line from ``fd`` within ``timeout`` s (select: a process that never writes must not hang the test)."""
    buf = b""
    deadline = time.monotonic() + timeout
    while b"\n" not in buf:
        left = deadline - time.monotonic()
        if left <= 0 or proc.poll() is not None:
            raise RuntimeError(f"{what} did not start (exit status {proc.poll()}, output so far {buf!r})")
        ready, _, _ = select.select([fd], [], [], min(left, 0.5))
        if ready:
            chunk = os.read(fd, 4096)
            if not chunk:
                raise RuntimeError(f"{what} closed its output without an address (status {proc.poll()})")
            buf += chunk
    return buf.split(b"\n", 1)[0].decode().strip()


@dataclass
class NotificationDesktop:
    base: Path
    bus_address: str
    display: str
    procs: list[subprocess.Popen[bytes]] = field(default_factory=list)

    @property
    def env(self) -> dict[str, str]:
        """An environment for programs on this desktop only (never the machine's own bus or display)."""
        return {"PATH": os.environ.get("PATH", "/usr/bin:/bin"), "HOME": str(self.base),
                "DBUS_SESSION_BUS_ADDRESS": self.bus_address, "DISPLAY": self.display,
                "XDG_RUNTIME_DIR": str(self.base)}

    def dunstctl(self, *args: str) -> str:
        done = subprocess.run(["dunstctl", *args], env=self.env, capture_output=True, text=True, timeout=20,
                              check=False)
        if done.returncode != 0:
            raise RuntimeError(f"dunstctl {' '.join(args)} failed: {done.stderr.strip()}")
        return done.stdout

    def history(self) -> list[dict[str, Any]]:
        """Notifications dunst has closed, newest first (``dunstctl history``), as plain dicts."""
        doc = json.loads(self.dunstctl("history"))
        items: list[dict[str, Any]] = []
        for raw in doc.get("data", [[]])[0]:
            items.append({name: value.get("data") for name, value in raw.items()})
        return items

    def displayed(self) -> int:
        return int(self.dunstctl("count", "displayed").strip())

    def invoke_default(self) -> None:
        """A click on the newest notification: dunst invokes its "default" action (or its only action)."""
        self.dunstctl("action", "0")

    def choose(self, label: str) -> None:
        """Pick the action named ``label`` from dunst's context menu, as a person would."""
        # dunst runs the menu after dunstctl returns: the choice stays in place until the next one.
        (self.base / "choice").write_text(label)
        self.dunstctl("context")

    def wait_displayed(self, count: int, timeout: float = 20.0) -> None:
        """Wait until dunst shows exactly ``count`` notifications (it draws them asynchronously)."""
        deadline = time.monotonic() + timeout
        while self.displayed() != count:
            if time.monotonic() > deadline:
                raise AssertionError(f"dunst shows {self.displayed()} notification(s), expected {count}")
            time.sleep(0.05)

    def screenshot(self, path: Path) -> None:
        """A PNG of the whole X screen (xwd, then ImageMagick's convert)."""
        xwd = self.base / "screen.xwd"
        subprocess.run(["xwd", "-root", "-silent", "-out", str(xwd)], env=self.env, check=True, timeout=30)
        subprocess.run(["/usr/bin/convert", str(xwd), str(path)], check=True, timeout=60)

    def stop_dunst(self) -> None:
        """End only the notification server (the bus and display stay): "nothing answers" on a live bus."""
        _stop(self.procs[-1])


def _stop(proc: subprocess.Popen[bytes]) -> None:
    if proc.poll() is None:
        with contextlib.suppress(ProcessLookupError):
            os.kill(proc.pid, signal.SIGTERM)
        try:
            proc.wait(10)
        except subprocess.TimeoutExpired:
            os.kill(proc.pid, signal.SIGKILL)
            proc.wait(10)
    if proc.stdout is not None:
        proc.stdout.close()


@contextlib.contextmanager
def start_bus(base: Path) -> Iterator[tuple[str, subprocess.Popen[bytes]]]:
    """A private dbus-daemon; yields (address, process)."""
    config = base / "bus.conf"
    config.write_text(BUS_CONFIG.format(socket=base / "bus"))
    proc = subprocess.Popen(["dbus-daemon", f"--config-file={config}", "--nofork", "--print-address"],
                            stdout=subprocess.PIPE, stderr=subprocess.DEVNULL, env={"PATH": os.environ["PATH"]})
    try:
        assert proc.stdout is not None
        address = _read_line(proc, proc.stdout.fileno(), "dbus-daemon")
        yield address, proc
    finally:
        _stop(proc)


@contextlib.contextmanager
def start_notification_desktop(with_dunst: bool = True) -> Iterator[NotificationDesktop]:
    """dbus-daemon, Xvfb on a display it picks, and dunst on both; everything stopped (by PID) on exit."""
    base = Path(tempfile.mkdtemp(prefix="bkn", dir="/tmp"))
    base.chmod(0o700)
    procs: list[subprocess.Popen[bytes]] = []
    try:
        with start_bus(base) as (address, bus):
            procs.append(bus)
            read_fd, write_fd = os.pipe()
            try:
                xvfb = subprocess.Popen(["Xvfb", "-displayfd", str(write_fd), "-screen", "0", "600x150x24",
                                         "-nolisten", "tcp", "-auth", "/dev/null"], pass_fds=(write_fd,),
                                        stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
                procs.append(xvfb)
                os.close(write_fd)
                write_fd = -1
                display = ":" + _read_line(xvfb, read_fd, "Xvfb")
            finally:
                os.close(read_fd)
                if write_fd >= 0:
                    os.close(write_fd)
            desktop = NotificationDesktop(base=base, bus_address=address, display=display, procs=procs)
            if with_dunst:
                dmenu = base / "dmenu.sh"
                dmenu.write_text(DMENU.format(choice=base / "choice"))
                dmenu.chmod(0o700)
                (base / "dunstrc").write_text(DUNSTRC.format(dmenu=dmenu))
                with open(base / "dunst.log", "wb") as log:
                    dunst = subprocess.Popen(["dunst", "-config", str(base / "dunstrc")], env=desktop.env,
                                             stdout=subprocess.DEVNULL, stderr=log)
                procs.append(dunst)
                _wait_for_name(desktop, "org.freedesktop.Notifications", dunst)
            yield desktop
    finally:
        for proc in reversed(procs):
            _stop(proc)
        shutil.rmtree(base, ignore_errors=True)


def _wait_for_name(desktop: NotificationDesktop, name: str, proc: subprocess.Popen[bytes],
                   timeout: float = 30.0) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if proc.poll() is not None:
            log = (desktop.base / "dunst.log").read_text(errors="replace")[-2000:]
            raise RuntimeError(f"dunst exited at start (status {proc.returncode}): {log}")
        done = subprocess.run(["dbus-send", "--print-reply", "--dest=org.freedesktop.DBus", "/org/freedesktop/DBus",
                               "org.freedesktop.DBus.NameHasOwner", f"string:{name}"],
                              env=desktop.env, capture_output=True, text=True, timeout=10, check=False)
        if "boolean true" in done.stdout:
            return
        time.sleep(0.05)
    raise RuntimeError(f"nothing took {name} on the test bus within {timeout:.0f} s")
