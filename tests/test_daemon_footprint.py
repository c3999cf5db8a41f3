"""Issue 14.5: what the daemon loads and runs on, so that its memory after a login stays within 50 MB.

The figures are measured by bench/run section 5 (never in a test: the machine is shared); these tests pin down the
choices that keep them there: optional libraries (D-Bus, Secret Service, uvloop, aiohttp's application framework,
authlib) stay out of a daemon that does not use them, and the event loop is the one the config names.
"""

from __future__ import annotations

import json
import signal
import subprocess
import sys
from pathlib import Path

import pytest

from brokerd.config import Settings, load_settings
from brokerd.errors import ConfigError
from tests.support.daemon import ROOT, Daemon, login_args
from tests.support.provider import TestProvider
from tests.support.wait import poll

# Loaded only by a daemon that uses them: a session bus that answers, `event_loop = "uvloop"`.  aiohttp.web and
# authlib are not used at all (callback.py runs aiohttp's low-level server; brokerd/pkce.py has the helpers).
OPTIONAL = ("jeepney", "secretstorage", "uvloop", "authlib", "aiohttp.web", "brokerd.notify")

PROBE = r"""
import asyncio, json, sys
from pathlib import Path
import brokerd.daemon
at_import = sorted(sys.modules)
from brokerd.clock import SystemClock
from brokerd.keyring import choose_key_source, in_keyring
from brokerd.probecache import ProbeCache
state = Path(sys.argv[1])
source = choose_key_source("auto", state)  # no key file, no store: asks the keyring first
probed = asyncio.run(ProbeCache(SystemClock())(sys.argv[2]))  # a caller's desktop bus: any notification server?
print(json.dumps({"at_import": at_import, "after": sorted(sys.modules), "keyring": in_keyring(source),
                  "probed": probed is not None}))
"""


def _loaded(names: list[str]) -> list[str]:
    return [n for n in names if any(n == o or n.startswith(o + ".") for o in OPTIONAL)]


def test_no_optional_library_at_start_nor_for_a_session_bus_that_is_gone(tmp_path: Path) -> None:
    dead = f"unix:path={tmp_path}/bus-of-a-session-that-ended"
    env = {"PATH": "/usr/bin:/bin", "HOME": str(tmp_path), "DBUS_SESSION_BUS_ADDRESS": dead}
    done = subprocess.run([sys.executable, "-c", PROBE, str(tmp_path), dead], env=env, cwd=ROOT,
                          capture_output=True, text=True, timeout=60)
    assert done.returncode == 0, done.stderr
    doc = json.loads(done.stdout)
    assert _loaded(doc["at_import"]) == []
    # The keyring and notification probes saw a dead address and loaded nothing to find that out.
    assert (doc["keyring"], doc["probed"]) == (False, False)
    assert _loaded(doc["after"]) == []


def test_event_loop_setting(tmp_path: Path) -> None:
    config = tmp_path / "config.toml"
    base = Settings(socket_path=tmp_path / "s", state_dir=tmp_path, config_file=config)
    assert load_settings(base).event_loop == "asyncio"
    config.write_text('[daemon]\nevent_loop = "uvloop"\n')
    assert load_settings(base).event_loop == "uvloop"
    config.write_text('[daemon]\nevent_loop = "trio"\n')
    with pytest.raises(ConfigError, match='event_loop must be "asyncio" or "uvloop"'):
        load_settings(base)


@pytest.mark.parametrize("config, loop", [("", "asyncio"), ('[daemon]\nevent_loop = "uvloop"\n', "uvloop")])
def test_the_daemon_runs_on_the_configured_loop_and_a_reload_does_not_switch(
        provider: TestProvider, config: str, loop: str) -> None:
    with Daemon(config=config) as d:
        assert poll(lambda: f"event loop: {loop})" in d.log(), 10), d.log()[-2000:]
        token = d.shim(login_args(provider.issuer, "--username=alice", "--password=alice-password"))
        assert token.returncode == 0, token.stderr + d.log()[-2000:]
        other = "uvloop" if loop == "asyncio" else "asyncio"
        d.config_path.write_text(f'[daemon]\nevent_loop = "{other}"\n')
        assert d.proc is not None
        d.proc.send_signal(signal.SIGHUP)
        assert poll(lambda: "event_loop is read at start only" in d.log(), 10), d.log()[-2000:]
        assert d.shim(login_args(provider.issuer, "--username=alice", "--password=alice-password")).returncode == 0
