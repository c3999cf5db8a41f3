"""No secret outside the encrypted store: a full login + refresh through a daemon at -v, with the real values
(ID/access/refresh tokens, code, PKCE verifier, client secret) collected from the wire by a recording proxy, then
searched for in the daemon's log, the browser's log, every file under the daemon's directories and the argv of the
daemon's children."""

from __future__ import annotations

import json
import os
import threading
import time
from collections.abc import Iterator
from pathlib import Path

import pytest

from tests.support.daemon import Daemon, login_args
from tests.support.hostile import Proxy, proxy_env
from tests.support.net import free_port
from tests.support.provider import ProviderFactory, TestProvider

SECRET = "s3cret-Client+Secret/with=odd&chars"


def _children_cmdlines(pid: int) -> list[bytes]:
    found = []
    for entry in os.listdir("/proc"):
        if not entry.isdigit():
            continue
        try:
            stat = Path(f"/proc/{entry}/stat").read_text()
            ppid = int(stat.rpartition(")")[2].split()[1])
            if ppid == pid:
                found.append(Path(f"/proc/{entry}/cmdline").read_bytes())
        except (OSError, ValueError, IndexError):
            continue  # gone meanwhile
    return found


class ArgvWatcher:
    """Samples the argv of every child of ``pid`` until stopped (the browser lives only for a second or two)."""

    def __init__(self, pid: int) -> None:
        self.pid = pid
        self.seen: set[bytes] = set()
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, daemon=True)

    def _run(self) -> None:
        deadline = time.monotonic() + 60
        while not self._stop.is_set() and time.monotonic() < deadline:
            self.seen.update(_children_cmdlines(self.pid))
            time.sleep(0.01)

    def __enter__(self) -> ArgvWatcher:
        self._thread.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self._stop.set()
        self._thread.join(5)


@pytest.fixture(scope="module")
def idp(provider_factory: ProviderFactory) -> TestProvider:
    port = free_port()
    return provider_factory({
        "default_client": {"redirect_uris": [f"http://localhost:{port}"], "client_secret": SECRET},
        "id_token_ttl": 20, "access_token_ttl": 20,
    })


@pytest.fixture
def proxy() -> Iterator[Proxy]:
    with Proxy() as p:
        yield p


def test_no_secret_in_logs_files_or_child_argv(idp: TestProvider, proxy: Proxy) -> None:
    port = idp.config["default_client"]["redirect_uris"][0].rsplit(":", 1)[1]
    args = login_args(idp.issuer, f"--listen-address=127.0.0.1:{port}", "--oidc-extra-scope=offline_access",
                      "--oidc-extra-scope=email", secret=SECRET)
    with Daemon(env=proxy_env(proxy)) as d:
        assert d.proc is not None
        slow = f"{d.env['BROWSER']} --delay 1"  # keeps the browser alive long enough to read its argv
        with ArgvWatcher(d.proc.pid) as watcher:
            login = d.shim(args, env={"BROWSER": slow})
            assert login.returncode == 0, login.stderr
            time.sleep(1.1)  # a new iat second, so the refreshed ID token differs from the first
            refreshed = d.shim([*args, "--force-refresh"])
            assert refreshed.returncode == 0, refreshed.stderr
        d.stop()
        first = json.loads(login.stdout)["status"]["token"]
        second = json.loads(refreshed.stdout)["status"]["token"]
        assert first != second  # a real refresh happened
        secrets = proxy.recorder.secrets()
        for name in ("id_token", "access_token", "refresh_token", "code", "code_verifier", "client_secret"):
            assert secrets.get(name), f"no {name} seen on the wire; the test would prove nothing"
        assert secrets["client_secret"] == {SECRET}
        assert {first, second} <= secrets["id_token"]
        assert len(secrets["refresh_token"]) >= 2  # the rotated one too
        assert watcher.seen, "no child process of the daemon was seen"

        places: dict[str, bytes] = {"daemon log": d.log().encode(), "browser log": d.browser_log.read_bytes()}
        for path in d.base.rglob("*"):
            if path.is_file():
                places[str(path.relative_to(d.base))] = path.read_bytes()
        for i, argv in enumerate(sorted(watcher.seen)):
            places[f"child argv {i}: {argv[:80]!r}"] = argv
        assert any(name.startswith("state/") for name in places), sorted(places)
        leaks = [(name, kind) for name, data in places.items() for kind, values in secrets.items()
                 for value in values if value.encode() in data]
        assert leaks == [], leaks
        # What the daemon made (its state and runtime dirs; the log is the test harness's) is private to the user.
        for path in [*d.state_dir.rglob("*"), *d.socket.parent.rglob("*"), d.state_dir, d.socket.parent]:
            if path.exists():
                assert path.stat().st_mode & 0o077 == 0, (path, oct(path.stat().st_mode))
