"""What the daemon runs as a browser: [daemon] caller_browser = false keeps a caller (say, on a forwarded socket)
from choosing the program, and no URL from the provider ever becomes an option of the browser command."""

from __future__ import annotations

import asyncio
import json
import os
import shutil
import stat
import subprocess
import sys
from pathlib import Path

import pytest

from brokerd.browser import BrowserOpener
from brokerd.errors import LoginError
from tests.support.daemon import Daemon, login_args
from tests.support.provider import TestProvider
from tests.support.unix_relay import RELAY


def _evil(tmp_path: Path) -> tuple[Path, Path]:
    """A 'browser' that only leaves a mark: if it runs, the daemon ran a caller's program."""
    marker = tmp_path / "ran"
    script = tmp_path / "evil"
    script.write_text(f"#!/bin/sh\ntouch {marker}\n")
    script.chmod(script.stat().st_mode | stat.S_IXUSR)
    return script, marker


def test_callers_cannot_pick_the_browser_when_the_daemon_says_so(provider: TestProvider, tmp_path: Path) -> None:
    script, marker = _evil(tmp_path)
    with Daemon(config="[daemon]\ncaller_browser = false\n") as daemon:  # its own BROWSER: the stand-in
        result = daemon.shim(login_args(provider.issuer, "--oidc-extra-scope=email", f"--browser-command={script}"),
                             env={"BROWSER": str(script), "DISPLAY": ":99"})
        assert result.returncode == 0, result.stderr + daemon.log()
        assert json.loads(result.stdout)["kind"] == "ExecCredential"
        assert "--browser-command is ignored" in result.stderr
        assert daemon.browser_openings() == 1  # the daemon's own browser did the login ...
    assert not marker.exists()  # ... and the caller's program never ran


def test_by_default_the_callers_browser_is_used(provider: TestProvider, tmp_path: Path) -> None:
    script, marker = _evil(tmp_path)
    with Daemon() as daemon:
        result = daemon.shim(login_args(provider.issuer, "--oidc-extra-scope=profile",
                                        "--authentication-timeout-sec=2"), env={"BROWSER": str(script)})
        assert result.returncode != 0  # the 'browser' never logs in
        assert daemon.browser_openings() == 0
    assert marker.exists() and os.path.getsize(marker) == 0


# ---- what reaches the browser's command line ----------------------------------------------------------------------

def _recorder(tmp_path: Path) -> tuple[Path, Path]:
    """A 'browser' that writes each argument it got on its own line."""
    record = tmp_path / "argv"
    script = tmp_path / "record"
    script.write_text(f'#!/bin/sh\nfor a in "$@"; do printf "%s\\n" "$a" >> {record}; done\n')
    script.chmod(script.stat().st_mode | stat.S_IXUSR)
    return script, record


@pytest.mark.parametrize("field", ["verification_uri", "verification_uri_complete"])
def test_a_device_flow_uri_that_is_an_option_never_reaches_the_browser(provider: TestProvider, tmp_path: Path,
                                                                       field: str) -> None:
    script, record = _recorder(tmp_path)
    answer = {"device_code": "dc-1", "user_code": "ABCD-EFGH", "verification_uri": "http://127.0.0.1:1/device",
              "expires_in": 600, "interval": 1}
    answer[field] = f"--gpu-launcher={script} --"
    provider.fault("device_authorization", status=200, body=answer)
    with Daemon() as daemon:
        result = daemon.shim(login_args(provider.issuer, "--grant-type=device-code", f"--browser-command={script}",
                                        "--authentication-timeout-sec=5"))
    assert result.returncode != 0 and result.stdout == ""
    assert f"{field} from the provider is not an http(s) URL" in result.stderr, result.stderr
    assert len(result.stderr.strip().splitlines()) == 1 and "Traceback" not in result.stderr
    assert not record.exists()  # the browser command never ran


async def test_the_opener_hands_over_only_a_checked_url_as_one_argument(tmp_path: Path) -> None:
    script, record = _recorder(tmp_path)
    opener = BrowserOpener({"PATH": os.environ.get("PATH", "")})
    try:
        for bad in ("-x", "--gpu-launcher=/bin/sh", "file:///etc/passwd", "javascript:alert(1)", "http://",
                    "http://a b", "http://a\x1b[2Jb", " https://a"):
            with pytest.raises(LoginError, match="not an http\\(s\\) URL"):
                await opener.open(bad, command=str(script), caller_env={})
        assert await opener.open("https://idp.example/auth?a=1&b=2", command=str(script), caller_env={})
    finally:
        await opener.close()  # the recorder exits at once, so close reaps it
    for _ in range(200):  # bounded: the recorder is a shell script writing one line
        if record.exists() and record.read_text():
            break
        await asyncio.sleep(0.05)
    assert record.read_text().splitlines() == ["https://idp.example/auth?a=1&b=2"]


def test_forwarded_callers_never_pick_the_browser_by_default(provider: TestProvider, tmp_path: Path) -> None:
    """Issue 11.10: with the default config, a caller whose connection comes through ssh (here a relay process
    whose executable is named ssh, as `ssh -R` is) gets the daemon's own browser, whatever BROWSER or
    --browser-command it sends; a local caller still chooses (test_by_default_the_callers_browser_is_used)."""
    script, marker = _evil(tmp_path)
    ssh = tmp_path / "bin" / "ssh"
    ssh.parent.mkdir()
    shutil.copy(os.path.realpath(sys.executable), ssh)
    with Daemon() as daemon:
        forwarded = daemon.base / "forwarded.sock"  # in the daemon's 0700 directory, as the shim requires
        relay = subprocess.Popen([str(ssh), "-I", "-c", RELAY, str(forwarded), str(daemon.socket)],
                                 stdin=subprocess.DEVNULL, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
        try:
            assert relay.stdout is not None and relay.stdout.readline() == "ready\n", relay.stderr
            remote_env = {"BROKERD_SOCKET": str(forwarded), "BROWSER": str(script), "DISPLAY": ":99"}
            result = daemon.shim(login_args(provider.issuer, "--oidc-extra-scope=address",
                                            "--authentication-timeout-sec=20", f"--browser-command={script}"),
                                 env=remote_env)
            # setup logs in too: the same rule (a new session, so a new login)
            setup = daemon.cli("setup", *login_args(provider.issuer, "--oidc-extra-scope=phone",
                                                     "--authentication-timeout-sec=20",
                                                     f"--browser-command={script}")[1:], env=remote_env)
        finally:
            relay.kill()  # our own child, by PID
            relay.communicate(timeout=10)
        assert result.returncode == 0, result.stderr + daemon.log()
        assert "--browser-command is ignored: this daemon opens its own browser for forwarded callers" in result.stderr
        assert setup.returncode == 0 and "--browser-command is ignored" in setup.stderr, setup.stdout + setup.stderr
        assert daemon.browser_openings() == 2  # the daemon's own browser did both logins ...
    assert not marker.exists()  # ... and the remote caller's program never ran
