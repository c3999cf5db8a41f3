"""The commands that talk to the daemon (`brokerd status|logout|clean`, the shim) as a person sees them: real daemon,
real shim, real test provider.  What reaches the terminal cannot drive it, and `clean` never deletes the store of a
daemon that is running."""

from __future__ import annotations

import fcntl
import json

import pytest

from tests.support.daemon import Daemon, login_args
from tests.support.provider import ProviderFactory, TestProvider

ESC = "\x1b"
HOSTILE = f"{ESC}]0;owned{ESC}\\{ESC}[2J\u202e"  # set the window title, clear the screen, flip the text
SHOWN = HOSTILE.replace(ESC, "\\x1b").replace("\u202e", "\\u202e")  # what a person sees instead


@pytest.fixture(scope="module")
def idp(provider_factory: ProviderFactory) -> TestProvider:
    users = {"eve": {"password": "eve-password", "email": f"eve{HOSTILE}@example.com", "name": f"Eve{HOSTILE}",
                     "groups": [f"dev{HOSTILE}"]}}
    return provider_factory({"users": users, "groups_in_id_token": True})


def password_args(idp: TestProvider) -> list[str]:
    return login_args(idp.issuer, "--grant-type=password", "--username=eve", "--password=eve-password",
                      scopes=("groups", "email", "profile"))


def test_status_shows_provider_text_without_control_characters(idp: TestProvider, daemon: Daemon) -> None:
    """Issue 11.7: claim values come from the provider; `brokerd status` shows them escaped."""
    assert daemon.shim(password_args(idp)).returncode == 0
    text = daemon.cli("status")
    assert text.returncode == 0, text.stderr
    assert ESC not in text.stdout and "\u202e" not in text.stdout, text.stdout
    assert f"eve{SHOWN}@example.com" in text.stdout and f"dev{SHOWN}" in text.stdout, text.stdout  # not dropped
    doc = daemon.cli("status", "--json")  # JSON escapes them itself, and keeps the values exact
    assert json.loads(doc.stdout)["sessions"][0]["email"] == f"eve{HOSTILE}@example.com"


def test_shim_escapes_control_characters_in_what_the_daemon_says(daemon: Daemon) -> None:
    """Issue 11.7: whatever an X or M line carries (here the daemon quoting a flag back), the shim prints no ESC."""
    done = daemon.shim(["logout", f"--{HOSTILE}"])
    assert done.returncode == 2
    assert done.stderr == f"brokerd: logout: unknown flag --{SHOWN}\n"


def test_login_url_reaches_the_person_intact(daemon: Daemon, idp: TestProvider) -> None:
    """The escaping leaves a printable line alone: the login URL can still be copied."""
    done = daemon.shim([*login_args(idp.issuer, "--skip-open-browser", "--authentication-timeout-sec=1",
                                    "--listen-address=127.0.0.1:0")])
    line = next(x for x in done.stderr.splitlines() if "http" in x)
    url = line.split()[-1]
    assert url.startswith(f"{idp.issuer}/") and "state=" in url and "\\" not in url, done.stderr


# ---- brokerd clean -----------------------------------------------------------------------------------------------

def test_clean_goes_through_a_running_daemon(idp: TestProvider, daemon: Daemon) -> None:
    assert daemon.shim(password_args(idp)).returncode == 0
    done = daemon.cli("clean")
    assert (done.returncode, done.stdout) == (0, "logged out of 1 session(s)\n"), done.stderr
    assert json.loads(daemon.cli("status", "--json").stdout) == {"sessions": []}


def test_clean_without_a_daemon_removes_the_store(idp: TestProvider, daemon: Daemon) -> None:
    assert daemon.shim(password_args(idp)).returncode == 0
    assert daemon.stop() == 0
    store = daemon.state_dir / "sessions.bin"
    assert store.exists()
    done = daemon.cli("clean")
    assert (done.returncode, done.stdout) == (0, "removed all stored sessions (the daemon is not running)\n")
    assert not store.exists()


def test_clean_never_deletes_the_store_of_a_daemon_that_holds_its_lock(idp: TestProvider, daemon: Daemon) -> None:
    """Issue 12.3: the socket file is gone (a cleaner of /tmp, a second daemon's start-up that failed half way) but
    the daemon still runs and holds its lock and its sessions.  `clean` used to read "cannot connect" as "no
    daemon" and delete the store behind it; the daemon would then lose every session at its next restart."""
    assert daemon.shim(password_args(idp)).returncode == 0
    store = daemon.state_dir / "sessions.bin"
    before = store.read_bytes()
    daemon.socket.unlink()
    lock = daemon.socket.parent / (daemon.socket.name + ".lock")
    with lock.open("rb") as held, pytest.raises(BlockingIOError):  # the daemon holds it: we cannot take it
        fcntl.flock(held, fcntl.LOCK_SH | fcntl.LOCK_NB)
    done = daemon.cli("clean")
    assert done.returncode == 3, done
    assert done.stderr.splitlines()[-1] == ("brokerd: a daemon is running, so its store was left alone; stop it or "
                                            "try again")
    assert store.read_bytes() == before
