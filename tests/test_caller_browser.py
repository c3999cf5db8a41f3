"""[daemon] caller_browser = false: a caller (say, on a forwarded socket) cannot choose what the daemon runs."""

from __future__ import annotations

import json
import os
import stat
from pathlib import Path

from tests.support.daemon import Daemon, login_args
from tests.support.provider import TestProvider


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
