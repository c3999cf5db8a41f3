"""The login through the daemon with a real browser: headless Chromium, driven like a person over CDP."""

from __future__ import annotations

import json
import sys
from pathlib import Path

import pytest

from tests.support.daemon import ROOT, Daemon, login_args
from tests.support.provider import TestProvider

CHROMIUM = Path("/usr/bin/chromium")


@pytest.mark.skipif(not CHROMIUM.exists(),
                    reason="Debian's chromium is not installed (scripts/test installs it as root)")
def test_login_with_headless_chromium(provider: TestProvider, tmp_path: Path) -> None:
    shot = tmp_path / "callback.png"
    browser = f"{sys.executable} {ROOT / 'tests/support/chromium_login.py'} --screenshot {shot}"
    with Daemon(env={"BROWSER": browser}) as daemon:
        before = provider.counters()
        result = daemon.shim(login_args(provider.issuer, "--oidc-extra-scope=email"), timeout=90)
        assert result.returncode == 0, result.stderr + daemon.log()
        cred = json.loads(result.stdout)
        assert cred["status"]["token"].count(".") == 2
        after = provider.counters()
        assert after["token_grants"]["authorization_code"] == before["token_grants"]["authorization_code"] + 1
        status = json.loads(daemon.cli("status", "--json").stdout)
        assert any(s["email"] == "alice@example.com" for s in status["sessions"])
    assert shot.exists() and shot.stat().st_size > 0  # the success page as the person saw it
