"""Issue 4: many terminals, many tools, many clusters -- with real kubectl, shims, daemons and the test provider.

Nothing here measures time.  Where a test needs callers to be *waiting* at the same moment, the browser is gated:
a wrapper logs the opening, then holds the real browser stand-in until the test creates a gate file, and the test
creates it only once every caller has shown the login URL on its stderr (that is, joined the login).
"""

from __future__ import annotations

import contextlib
import functools
import json
import os
import pty
import selectors
import signal
import socket
import subprocess
import sys
import time
from collections.abc import Iterator, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any
from urllib.parse import parse_qs, urlsplit

import pytest

from brokerd.models import ProviderSettings
from tests.support.daemon import BROWSER, SHIM, Daemon, exec_token, jwt_claims, login_args
from tests.support.kube import (
    ApiServer,
    find_kubectl,
    kubectl_env,
    needs_kubectl,
    start_apiserver,
    versioned_kubectl,
    write_kubeconfig,
)
from tests.support.provider import ProviderFactory, TestProvider
from tests.support.unix_relay import RELAY
from tests.support.wait import wait_until

PY = sys.executable

# Logs one line per opening, waits (bounded) for the gate file, then runs the real browser stand-in.
GATE_BROWSER = """\
import os, sys, time
log, gate = sys.argv[1], sys.argv[2]
with open(log, "a") as f:
    f.write("open\\n")
deadline = time.monotonic() + 90
while not os.path.exists(gate) and time.monotonic() < deadline:
    time.sleep(0.02)
os.execv(sys.argv[3], sys.argv[3:])
"""

# Counts daemon starts (one PID per line; exec keeps the PID) and becomes the daemon.
DAEMON_WRAPPER = """\
import os, sys
with open(sys.argv[1], "a") as f:
    f.write(f"{os.getpid()}\\n")
os.execv(sys.executable, [sys.executable, "-m", "brokerd", "serve", *sys.argv[2:]])
"""


@dataclass
class Gate:
    """A browser that opens only when the test says so."""

    base: Path
    opened_log: Path = field(init=False)
    gate: Path = field(init=False)
    script: Path = field(init=False)

    def __post_init__(self) -> None:
        self.opened_log = self.base / "gate-openings.log"
        self.gate = self.base / "gate-open"
        self.script = self.base / "gate_browser.py"
        self.script.write_text(GATE_BROWSER)

    def browser(self, *browser_args: str) -> str:
        """The BROWSER command: the gate, then the stand-in (which logs to ``browser.log`` once let through)."""
        stand_in = f"{PY} {BROWSER} --log {self.base / 'browser.log'} {' '.join(browser_args)}".strip()
        return f"{PY} {self.script} {self.opened_log} {self.gate} {stand_in}"

    def openings(self) -> int:
        """Tabs opened (counted by the gate) and tabs that went on to the provider (counted by the stand-in)."""
        return _lines(self.opened_log)

    def logins(self) -> int:
        return _lines(self.base / "browser.log")

    def open(self) -> None:
        self.gate.touch()


def _lines(path: Path) -> int:
    return len(path.read_text().splitlines()) if path.exists() else 0


@dataclass
class Running:
    proc: subprocess.Popen[bytes]
    err: bytes = b""
    out: bytes = b""

    @property
    def stderr(self) -> str:
        return self.err.decode(errors="replace")


def _spawn(argv: Sequence[str], env: dict[str, str], cwd: Path | None = None) -> Running:
    proc = subprocess.Popen(list(argv), env=env, cwd=cwd, stdin=subprocess.DEVNULL, stdout=subprocess.PIPE,
                            stderr=subprocess.PIPE, start_new_session=True)
    return Running(proc)


def _read_stderr_until(procs: Sequence[Running], text: str, timeout: float = 90.0) -> bool:
    """Collect stderr until every process has printed ``text`` (True) or the bound is reached (False)."""
    deadline = time.monotonic() + timeout
    with selectors.DefaultSelector() as sel:
        for r in procs:
            assert r.proc.stderr is not None
            sel.register(r.proc.stderr, selectors.EVENT_READ, r)
        while not all(text in r.stderr for r in procs) and time.monotonic() < deadline:
            for key, _ in sel.select(0.2):
                chunk = os.read(key.fd, 65536)
                if chunk:
                    key.data.err += chunk
                else:
                    sel.unregister(key.fileobj)
            if not sel.get_map() or any(r.proc.poll() is not None and text not in r.stderr for r in procs):
                break
    return all(text in r.stderr for r in procs)


def _finish(procs: Sequence[Running], timeout: float = 90.0) -> None:
    deadline = time.monotonic() + timeout
    for r in procs:
        try:
            out, err = r.proc.communicate(timeout=max(1.0, deadline - time.monotonic()))
        except subprocess.TimeoutExpired:
            _kill(procs)
            out, err = r.proc.communicate(timeout=5)
        r.out += out
        r.err += err


def _kill(procs: Sequence[Running]) -> None:
    for r in procs:
        if r.proc.poll() is None:
            with contextlib.suppress(ProcessLookupError):
                os.killpg(r.proc.pid, signal.SIGKILL)






def _grants(provider: TestProvider) -> tuple[int, int]:
    c = provider.counters()
    return int(c["auth_requests"]), int(c["token_grants"]["authorization_code"])


def _status(daemon: Daemon) -> list[dict[str, Any]]:
    result = daemon.cli("status", "--json")
    assert result.returncode == 0, result.stderr
    sessions: list[dict[str, Any]] = json.loads(result.stdout)["sessions"]
    return sessions


@pytest.fixture(scope="module")
def apiserver(provider: TestProvider) -> Iterator[ApiServer]:
    if find_kubectl() is None:
        pytest.skip("kubectl is not on PATH")
    with start_apiserver(provider.issuer) as server:
        yield server


@pytest.fixture
def gate(tmp_path: Path) -> Gate:
    return Gate(tmp_path)


# -- one login for many callers --------------------------------------------------------------------------------------

@needs_kubectl
def test_twenty_kubectl_processes_share_one_login(tmp_path: Path, provider: TestProvider, apiserver: ApiServer,
                                                  gate: Gate) -> None:
    n = 20
    kubeconfig = write_kubeconfig(tmp_path / "kubeconfig", apiserver.url, apiserver.ca_file,
                                  ["-I", "-S", str(SHIM), *login_args(provider.issuer, "--oidc-extra-scope=email")],
                                  exec_command=PY)
    # The versioned kubectl: /usr/bin/kubectl's dispatcher would first ask /version with a 5 s timeout, which a
    # login held at the gate outlasts (and it would run the plugin once more per process).
    kubectl = versioned_kubectl()
    with Daemon(env={"BROWSER": gate.browser()}) as daemon:
        env = kubectl_env(kubeconfig, daemon.env, cache_dir=tmp_path / "kubecache")
        before = _grants(provider)
        procs: list[Running] = []
        try:
            for i in range(n):
                cwd = tmp_path / f"terminal-{i}"
                cwd.mkdir()
                shell = "bash" if i % 2 else "sh"  # different shells, different working directories
                procs.append(_spawn([shell, "-c", 'exec "$0" "$@"', kubectl, "auth", "whoami", "-o", "json"],
                                    env, cwd))
            joined = _read_stderr_until(procs, "Open this URL to log in: ")
            assert joined, "not every kubectl joined the login:\n" + "\n".join(r.stderr for r in procs)
            gate.open()
            _finish(procs)
        finally:
            _kill(procs)
        failures = [r.stderr for r in procs if r.proc.returncode != 0]
        assert not failures, failures[0] + daemon.log()
        users = {json.loads(r.out)["status"]["userInfo"]["username"] for r in procs}
        assert users == {f"{provider.issuer}#{provider.sub('alice')}"}
        after = _grants(provider)
        assert (after[0] - before[0], after[1] - before[1]) == (1, 1)
        assert gate.openings() == gate.logins() == 1  # one tab for twenty waiting callers


def test_callers_that_cannot_wait_are_told_a_login_is_pending(provider: TestProvider, gate: Gate) -> None:
    args = login_args(provider.issuer, "--oidc-extra-scope=profile")
    with Daemon(env={"BROWSER": gate.browser()}) as daemon:
        before = _grants(provider)
        owner = _spawn(daemon.shim_argv(args), daemon.env)
        try:
            assert _read_stderr_until([owner], "Open this URL to log in: "), owner.stderr
            impatient = [daemon.shim([*args, "--authentication-timeout-sec=1"]) for _ in range(3)]
            gate.open()
            _finish([owner])
        finally:
            _kill([owner])
        for result in impatient:
            assert result.returncode != 0 and result.stdout == ""
            assert "Open this URL to log in: " in result.stderr  # they saw the same URL ...
            assert "still waiting in your browser" in result.stderr.splitlines()[-1]  # ... and why they stopped
        assert owner.proc.returncode == 0, owner.stderr + daemon.log()
        assert gate.openings() == gate.logins() == 1
        after = _grants(provider)
        assert (after[0] - before[0], after[1] - before[1]) == (1, 1)
        # Once the login finished, the impatient callers are served from the session.
        assert exec_token(daemon.shim([*args, "--authentication-timeout-sec=1"]))
        assert _grants(provider) == after


@pytest.mark.parametrize("failure", ["timeout", "denied"])
def test_background_poller_gets_no_new_tab_until_the_retry_interval_allows(
        provider: TestProvider, failure: str) -> None:
    scope = "--oidc-extra-scope=offline_access"  # consent screen, so the stand-in can deny
    args = login_args(provider.issuer, scope, "--authentication-timeout-sec=2")
    with Daemon(config="[daemon]\nlogin_retry_interval = 3600\n") as daemon:
        bad = {"BROWSER": daemon.env["BROWSER"] + (" --no-follow-callback" if failure == "timeout" else " --deny")}
        before = _grants(provider)
        first = daemon.shim(args, env=bad)
        assert first.returncode != 0 and first.stdout == ""
        # The first login may outlive its caller by a moment (the caller's wait and the login's are separate).
        wait_until(lambda: not any(s["login_pending"] for s in _status(daemon)), "the failed login to end", 60)
        for _ in range(4):  # a poller, calling again and again while nobody is at the screen
            again = daemon.shim(args, env=bad)
            assert again.returncode != 0 and again.stdout == ""
            last = again.stderr.strip().splitlines()[-1]
            assert "not opening the browser again" in last and "login attempt failed" in last, again.stderr
        assert daemon.browser_openings() == 1
        assert _grants(provider)[0] - before[0] == 1

        # A person at a terminal (stdin is a tty) is not held back: they asked, so the browser opens again now.
        at_terminal = _shim_on_a_terminal(daemon, args, bad)
        assert at_terminal.returncode != 0 and "not opening the browser again" not in at_terminal.stderr
        assert daemon.browser_openings() == 2
        wait_until(lambda: not any(s["login_pending"] for s in _status(daemon)), "the second login to end", 60)
        assert "not opening the browser again" in daemon.shim(args, env=bad).stderr
        assert daemon.browser_openings() == 2

        # The interval is configuration: drop it to zero (SIGHUP reload) and the next call may log in again.
        daemon.config_path.write_text("[daemon]\nlogin_retry_interval = 0\n")
        assert daemon.proc is not None
        daemon.proc.send_signal(signal.SIGHUP)
        wait_until(lambda: "config reloaded" in daemon.log(), "the config reload", 60)
        result = daemon.shim(login_args(provider.issuer, scope))
        assert exec_token(result)
        assert daemon.browser_openings() == 3
        after = _grants(provider)
        assert after[0] - before[0] == 3 and after[1] - before[1] == 1


def _shim_on_a_terminal(daemon: Daemon, args: list[str], env: dict[str, str]) -> subprocess.CompletedProcess[str]:
    primary, secondary = pty.openpty()
    try:
        return subprocess.run(daemon.shim_argv(args), env={**daemon.env, **env}, stdin=secondary,
                              capture_output=True, text=True, timeout=60)
    finally:
        os.close(secondary)
        os.close(primary)


# -- several sessions side by side -----------------------------------------------------------------------------------

OTHER_CLIENT = {
    "client_id": "kube_other", "client_secret": "other_secret", "token_endpoint_auth_method": "client_secret_basic",
    "redirect_uris": ["http://localhost:8000", "http://localhost:18000"],
    "grant_types": ["authorization_code", "refresh_token"], "response_types": ["code"],
    "scope": "openid groups email profile offline_access",
}


def test_sessions_for_issuers_clients_and_accounts_live_side_by_side(
        provider: TestProvider, provider_factory: ProviderFactory) -> None:
    second = provider_factory({"clients": [OTHER_CLIENT]})
    daemon = Daemon()
    bob = {"BROWSER": daemon.env["BROWSER"] + " --user bob --password bob-password"}
    cases: list[tuple[str, list[str], dict[str, str], TestProvider, ProviderSettings, str, str]] = [
        ("issuer one", login_args(provider.issuer), {}, provider,
         ProviderSettings(provider.issuer, "kube_login", "insecure_secret", ("groups",)), "alice", "kube_login"),
        ("issuer two", login_args(second.issuer), {}, second,
         ProviderSettings(second.issuer, "kube_login", "insecure_secret", ("groups",)), "alice", "kube_login"),
        ("other client", login_args(second.issuer, client_id="kube_other", secret="other_secret"), {}, second,
         ProviderSettings(second.issuer, "kube_other", "other_secret", ("groups",)), "alice", "kube_other"),
        ("account alice", login_args(second.issuer, "--session-name=alice"), {}, second,
         ProviderSettings(second.issuer, "kube_login", "insecure_secret", ("groups",), username="alice"), "alice",
         "kube_login"),
        ("account bob", login_args(second.issuer, "--session-name=bob"), bob, second,
         ProviderSettings(second.issuer, "kube_login", "insecure_secret", ("groups",), username="bob"), "bob",
         "kube_login"),
    ]
    try:
        daemon.start()
        tokens = {}
        for name, args, env, idp, _settings, user, client in cases:
            before = _grants(idp)
            claims = jwt_claims(exec_token(daemon.shim(args, env=env)))
            assert claims["iss"] == idp.issuer and claims["sub"] == idp.sub(user), name
            assert client in ([claims["aud"]] if isinstance(claims["aud"], str) else claims["aud"]), name
            after = _grants(idp)
            assert (after[0] - before[0], after[1] - before[1]) == (1, 1), name
            if "--session-name=bob" in args:
                assert second.last_auth()["login_hint"] == "bob"
            tokens[name] = claims
        assert daemon.browser_openings() == len(cases)
        # The session name travels as login_hint, and it is the only thing keeping the two accounts apart.
        assert tokens["account alice"]["sub"] != tokens["account bob"]["sub"]
        keys = {s["session"] for s in _status(daemon)}
        assert keys == {settings.key.short() for *_, settings, _user, _client in cases}

        # A restart keeps every session under the same key: no login, no provider traffic, the same subjects.
        assert daemon.stop() == 0
        daemon.start()
        counters = (provider.counters(), second.counters())
        assert {s["session"] for s in _status(daemon)} == keys
        for name, args, env, _idp, *_ in cases:
            again = jwt_claims(exec_token(daemon.shim(args, env=env)))
            assert again["sub"] == tokens[name]["sub"], name
        # Flags in another order, a scope repeated: the same canonical key (kubelogin #1638).
        shuffled = ["get-token", "--oidc-extra-scope=groups", "--oidc-client-secret=insecure_secret",
                    "--oidc-extra-scope=groups", "--oidc-client-id=kube_login", f"--oidc-issuer-url={second.issuer}",
                    "--session-name=bob"]
        assert jwt_claims(exec_token(daemon.shim(shuffled)))["sub"] == second.sub("bob")
        assert (provider.counters()["token_requests"], second.counters()["token_requests"]) == (
            counters[0]["token_requests"], counters[1]["token_requests"])
        assert second.counters()["auth_requests"] == counters[1]["auth_requests"]
        assert daemon.browser_openings() == len(cases)
    finally:
        daemon.close()


def test_two_sessions_logging_in_at_once_share_the_loopback_port(provider: TestProvider, gate: Gate) -> None:
    with Daemon(env={"BROWSER": gate.browser()}) as daemon:
        before = _grants(provider)
        procs = [_spawn(daemon.shim_argv(login_args(provider.issuer, f"--oidc-extra-scope={scope}")), daemon.env)
                 for scope in ("email", "profile")]
        try:
            assert _read_stderr_until(procs, "Open this URL to log in: "), [r.stderr for r in procs]
            redirects = set()
            for r in procs:
                url = r.stderr.split("Open this URL to log in: ", 1)[1].split()[0]
                redirects.add(parse_qs(urlsplit(url).query)["redirect_uri"][0])
            # Both logins are pending at this moment, on one listener.
            assert len(redirects) == 1 and redirects <= {"http://localhost:8000", "http://localhost:18000"}
            gate.open()
            _finish(procs)
        finally:
            _kill(procs)
        for r in procs:
            assert r.proc.returncode == 0, r.stderr + daemon.log()
        after = _grants(provider)
        assert (after[0] - before[0], after[1] - before[1]) == (2, 2)
        assert gate.openings() == gate.logins() == 2
        log = daemon.log()
        assert "already in use" not in log and "cannot listen" not in log
        assert log.count("listening for the login redirect on port") == 1


# -- one daemon --------------------------------------------------------------------------------------------------------

@pytest.mark.parametrize("stale", [False, True], ids=["no-socket", "stale-socket"])
def test_shims_racing_to_autostart_start_exactly_one_daemon(tmp_path: Path, stale: bool) -> None:
    wrapper = tmp_path / "daemon_wrapper.py"
    wrapper.write_text(DAEMON_WRAPPER)
    started = tmp_path / "started.log"
    d = Daemon(env={"BROKERD_NO_AUTOSTART": "", "BROKERD_DAEMON_COMMAND": f"{PY} {wrapper} {started}"})
    pids: list[int] = []
    try:
        if stale:
            # What a crashed daemon leaves: a socket file nobody listens on.
            d.socket.parent.mkdir(mode=0o700, parents=True)
            dead = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
            dead.bind(str(d.socket))
            dead.close()
            assert d.socket.exists() and not d.alive()
        # `status`, not `version`: the shim answers version itself and never starts a daemon for it (issue 14).
        shims = [_spawn(d.shim_argv(["status"]), d.env) for _ in range(8)]
        try:
            _finish(shims)
        finally:
            _kill(shims)
        if started.exists():
            pids = [int(line) for line in started.read_text().split()]
        for r in shims:
            assert r.proc.returncode == 0, r.stderr
            assert r.out.startswith(b'{"sessions"')
        assert len(pids) == 1, f"{len(pids)} daemons were started"
        assert d.alive()
    finally:
        for pid in pids:
            try:
                os.kill(pid, signal.SIGTERM)
            except ProcessLookupError:
                continue
            wait_until(functools.partial(_stopped, pid), f"daemon {pid} to exit", timeout=20)
        d.close()


def _stopped(pid: int) -> bool:
    return not _running(pid)


def _running(pid: int) -> bool:
    try:
        state = Path(f"/proc/{pid}/status").read_text().split("State:", 1)[1].split("\n", 1)[0]
    except (OSError, IndexError):
        return False
    return "zombie" not in state


def test_stale_socket_is_replaced_when_the_daemon_starts(provider: TestProvider) -> None:
    d = Daemon()
    try:
        d.socket.parent.mkdir(mode=0o700, parents=True)
        dead = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        dead.bind(str(d.socket))
        dead.close()
        d.start()
        assert exec_token(d.shim(login_args(provider.issuer)))
        assert "stale socket" in d.log()
    finally:
        d.close()


# -- remote use through a forwarded socket ---------------------------------------------------------------------------

def test_a_shim_on_a_forwarded_socket_logs_in_and_sees_the_url(tmp_path: Path, provider: TestProvider) -> None:
    relay_script = tmp_path / "relay.py"
    relay_script.write_text(RELAY)
    with Daemon() as daemon:
        remote = Path(daemon.base) / "remote.sock"  # stands for /remote/brokerd.sock on the other host
        relay = subprocess.Popen([PY, str(relay_script), str(remote), str(daemon.socket)], stdout=subprocess.PIPE,
                                 stderr=subprocess.PIPE, stdin=subprocess.DEVNULL)
        try:
            assert relay.stdout is not None
            with selectors.DefaultSelector() as sel:
                sel.register(relay.stdout, selectors.EVENT_READ)
                assert sel.select(30), "the relay did not start"
            assert relay.stdout.readline() == b"ready\n"
            # The remote side knows the forwarded path only; its desktop variables mean nothing on this machine
            # (BROKERD_REMOTE keeps them home), and it must never start a daemon of its own.
            remote_env = {"BROKERD_SOCKET": str(remote), "BROKERD_REMOTE": "1", "BROKERD_NO_AUTOSTART": "",
                          "XDG_RUNTIME_DIR": str(tmp_path / "elsewhere"), "DISPLAY": "remote-host:10.0",
                          "BROWSER": "/nonexistent/remote-browser"}
            args = login_args(provider.issuer, "--oidc-extra-scope=email", "--authentication-timeout-sec=30")
            before = _grants(provider)
            first = daemon.shim(args, env=remote_env)
            assert exec_token(first)
            assert f"Open this URL to log in: {provider.issuer}/auth?" in first.stderr  # on the remote terminal
            assert daemon.browser_openings() == 1  # the daemon's own browser, on this desktop
            second = daemon.shim(args, env=remote_env)
            assert exec_token(second) == exec_token(first) and "Open this URL" not in second.stderr
            after = _grants(provider)
            assert (after[0] - before[0], after[1] - before[1]) == (1, 1)

            relay.kill()  # the ssh connection goes away; its socket file stays behind
            relay.wait(timeout=10)
            gone = daemon.shim(args, env=remote_env)
            assert gone.returncode == 3 and "forwarded socket" in gone.stderr, gone.stderr
            assert not _connectable(remote)  # no daemon was started on the "remote" side
        finally:
            relay.kill()
            relay.wait(timeout=10)
            for stream in (relay.stdout, relay.stderr):
                if stream is not None:
                    stream.close()


def _connectable(path: Path) -> bool:
    with socket.socket(socket.AF_UNIX, socket.SOCK_STREAM) as probe:
        try:
            probe.connect(str(path))
        except OSError:
            return False
    return True
