"""Issue 15 end to end: real kubectl or the shim -> the daemon -> the real provider, with a real session bus and
notification server (dbus-daemon + dunst under Xvfb, tests/support/notifications.py) where a desktop is involved.
A person's clicks are dunstctl's; the browser is tests/support/browser.py (it completes the login when run)."""

from __future__ import annotations

import json
import re
import select
import signal
import subprocess
import threading
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import pytest

from tests.support.daemon import Daemon, exec_token, jwt_claims, login_args
from tests.support.kube import ApiServer, needs_kubectl, run_kubectl, start_apiserver, write_kubeconfig
from tests.support.notifications import NotificationDesktop, missing_tools, start_notification_desktop
from tests.support.provider import TestProvider
from tests.support.wait import wait_until
from tests.test_grants import PtyRun

desktop_only = pytest.mark.skipif(bool(missing_tools()), reason=f"needs the Debian packages "
                                  f"{', '.join(missing_tools())} (scripts/test installs them as root)")


@pytest.fixture
def clear() -> Iterator[NotificationDesktop]:
    """A desktop of its own for each test, so its notification history is this test's alone."""
    if missing_tools():
        pytest.skip(f"needs the Debian packages {', '.join(missing_tools())}")
    with start_notification_desktop() as d:
        yield d


class Background:
    """A command run in a thread (its own process), so the test can click while it waits."""

    def __init__(self, run: Callable[[], subprocess.CompletedProcess[str]]) -> None:
        self.result: subprocess.CompletedProcess[str] | None = None
        self._thread = threading.Thread(target=self._run, args=(run,), daemon=True)
        self._thread.start()

    def _run(self, run: Callable[[], subprocess.CompletedProcess[str]]) -> None:
        self.result = run()

    def wait(self, timeout: float = 90.0) -> subprocess.CompletedProcess[str]:
        self._thread.join(timeout)
        assert self.result is not None, "the command did not finish"
        return self.result


def _audit(daemon: Daemon) -> list[dict[str, Any]]:
    wait_until(lambda: (daemon.state_dir / "audit.jsonl").exists(), "the audit file is written")
    done = daemon.cli("audit", "--json")
    assert done.returncode == 0, done.stderr
    return [json.loads(line) for line in done.stdout.splitlines()]


def _status(daemon: Daemon) -> list[dict[str, Any]]:
    done = daemon.cli("status", "--json")
    assert done.returncode == 0, done.stderr
    sessions: list[dict[str, Any]] = json.loads(done.stdout)["sessions"]
    return sessions


# -- notifications instead of surprise tabs -------------------------------------------------------------------


@pytest.fixture(scope="module")
def apiserver(provider: TestProvider) -> Iterator[ApiServer]:
    with start_apiserver(provider.issuer) as server:
        yield server


@desktop_only
@needs_kubectl
def test_background_kubectl_gets_a_notification_and_its_token_after_the_click(
        tmp_path: Path, provider: TestProvider, apiserver: ApiServer, clear: NotificationDesktop) -> None:
    desktop = clear
    exec_args = ["oidc-login", *login_args(provider.issuer)]
    kubeconfig = write_kubeconfig(tmp_path / "kubeconfig", apiserver.url, apiserver.ca_file, exec_args)
    with Daemon() as daemon:
        before = provider.counters()
        env = {**daemon.env, "DBUS_SESSION_BUS_ADDRESS": desktop.bus_address}
        kubectl = Background(lambda: run_kubectl(["auth", "whoami", "-o", "json"], kubeconfig, env=env, timeout=90))
        desktop.wait_displayed(1)
        assert daemon.browser_openings() == 0  # no surprise tab: the person decides when
        desktop.screenshot(tmp_path / "notice.png")
        desktop.invoke_default()
        done = kubectl.wait()
        assert done.returncode == 0, done.stderr + daemon.log()
        user = json.loads(done.stdout)["status"]["userInfo"]
        assert user["username"] == f"{provider.issuer}#{provider.sub('alice')}"
        desktop.wait_displayed(0)  # withdrawn once the login ended
        assert daemon.browser_openings() == 1
        shown = [n for n in desktop.history() if n.get("appname") == "brokerd"]
        assert [n["summary"] for n in shown] == ["kubectl needs a login"]
        assert provider.counters()["auth_requests"] - before["auth_requests"] == 1

        # The audit trail has this call, with kubectl as the caller's parent (the plugin's process is the shim's).
        records = _audit(daemon)
        assert [r["how"] for r in records] == ["login"]
        assert Path(records[0]["caller"]["parent_exe"]).name.startswith("kubectl")
        assert records[0]["issuer"] == provider.issuer
        sessions = _status(daemon)
        assert sessions[0]["counters"]["tokens_served"] == 1 and sessions[0]["counters"]["logins"] == 1
        assert "kubectl" in sessions[0]["counters"]["last_caller"]
        text = daemon.cli("status").stdout
        assert "tokens served: 1 (refreshes 0, logins 1), last by" in text and "policy:        none" in text


def _read_until(proc: subprocess.Popen[str], text: str, timeout: float = 30.0) -> None:
    """Read the shim's stderr until ``text`` appears (bounded in time)."""
    assert proc.stderr is not None
    deadline = time.monotonic() + timeout
    seen = ""
    while text not in seen:
        left = deadline - time.monotonic()
        ready, _, _ = select.select([proc.stderr], [], [], max(0.0, min(left, 0.2)))
        if left <= 0:
            raise AssertionError(f"{text!r} not seen on stderr within {timeout} s: {seen!r}")
        if ready:
            line = proc.stderr.readline()
            if not line:
                raise AssertionError(f"stderr closed before {text!r}: {seen!r}")
            seen += line


@desktop_only
def test_joining_callers_share_one_notification_and_one_login(provider: TestProvider,
                                                              clear: NotificationDesktop) -> None:
    desktop = clear
    with Daemon() as daemon:
        before = provider.counters()
        env = {"DBUS_SESSION_BUS_ADDRESS": desktop.bus_address}
        first = daemon.shim_async(login_args(provider.issuer), env=env)
        second = daemon.shim_async(login_args(provider.issuer), env=env)
        try:
            for proc in (first, second):
                _read_until(proc, "Open this URL to log in")  # both wait on the one pending login
            desktop.wait_displayed(1)
            assert desktop.displayed() == 1  # replaced, not stacked
            desktop.invoke_default()
            one, two = first.communicate(timeout=60), second.communicate(timeout=60)
        finally:
            for proc in (first, second):
                if proc.poll() is None:
                    proc.kill()
                    proc.wait()
        assert first.returncode == 0 and second.returncode == 0, one[1] + two[1] + daemon.log()
        assert json.loads(one[0])["status"]["token"] == json.loads(two[0])["status"]["token"]
        assert provider.counters()["auth_requests"] - before["auth_requests"] == 1
        desktop.wait_displayed(0)
        assert len([n for n in desktop.history() if n.get("appname") == "brokerd"]) == 1


@desktop_only
def test_a_terminal_caller_joining_a_notified_login_opens_the_browser_at_once(
        provider: TestProvider, clear: NotificationDesktop) -> None:
    desktop = clear
    with Daemon() as daemon:
        env = {"DBUS_SESSION_BUS_ADDRESS": desktop.bus_address}
        background = daemon.shim_async(login_args(provider.issuer), env=env)
        try:
            desktop.wait_displayed(1)
            assert daemon.browser_openings() == 0
            run = PtyRun(daemon.shim_argv(login_args(provider.issuer)), {**daemon.env, **env})
            out, _ = run.proc.communicate(timeout=60)  # no click: the person at the terminal gets the browser
            assert run.proc.returncode == 0, run.seen + daemon.log()
            bg_out, bg_err = background.communicate(timeout=60)
        finally:
            if background.poll() is None:
                background.kill()
                background.wait()
        assert background.returncode == 0, bg_err
        assert json.loads(out)["status"]["token"] == json.loads(bg_out)["status"]["token"]
        assert daemon.browser_openings() == 1
        desktop.wait_displayed(0)


@desktop_only
def test_a_closed_notification_refuses_with_one_line_and_is_not_shown_again_at_once(
        provider: TestProvider, clear: NotificationDesktop) -> None:
    desktop = clear
    with Daemon() as daemon:
        env = {"DBUS_SESSION_BUS_ADDRESS": desktop.bus_address}
        call = Background(lambda: daemon.shim(login_args(provider.issuer), env=env, timeout=90))
        desktop.wait_displayed(1)
        desktop.dunstctl("close")
        done = call.wait()
        assert done.returncode != 0 and done.stdout == ""
        last = done.stderr.strip().splitlines()[-1]
        assert "the login notification was closed" in last and "brokerd login" in last
        again = daemon.shim(login_args(provider.issuer), env=env, timeout=30)
        assert again.returncode != 0 and "not opening the browser again" in again.stderr
        assert len([n for n in desktop.history() if n.get("appname") == "brokerd"]) == 1
        assert daemon.browser_openings() == 0


def test_without_a_notification_server_the_browser_opens_as_before(provider: TestProvider, tmp_path: Path) -> None:
    # A bus address where nothing answers: today's behaviour, the browser at once.
    with Daemon() as daemon:
        env = {"DBUS_SESSION_BUS_ADDRESS": f"unix:path={tmp_path}/no-bus"}
        done = daemon.shim(login_args(provider.issuer), env=env)
        assert done.returncode == 0, done.stderr + daemon.log()
        assert daemon.browser_openings() == 1
        assert jwt_claims(exec_token(done))["sub"] == provider.sub("alice")


@desktop_only
def test_background_login_refuse_says_what_to_do(provider: TestProvider, clear: NotificationDesktop) -> None:
    desktop = clear
    with Daemon(config='[daemon]\nbackground_login = "refuse"\n') as daemon:
        env = {"DBUS_SESSION_BUS_ADDRESS": desktop.bus_address}
        done = daemon.shim(login_args(provider.issuer), env=env)
        assert done.returncode == 1 and done.stdout == ""
        assert "brokerd login" in done.stderr.strip().splitlines()[-1]
        assert daemon.browser_openings() == 0 and desktop.displayed() == 0
        # From a terminal instead: `brokerd login` with the same flags logs in (the browser at once).
        login = daemon.cli("login", *login_args(provider.issuer)[1:])
        assert login.returncode == 0, login.stderr + daemon.log()
        assert "logged in to" in login.stdout and daemon.browser_openings() == 1
        served = daemon.shim(login_args(provider.issuer), env=env)
        assert served.returncode == 0, served.stderr


@desktop_only
def test_a_background_device_login_shows_the_user_code_and_opens_the_page_on_the_click(
        provider: TestProvider, clear: NotificationDesktop) -> None:
    desktop = clear
    args = login_args(provider.issuer, "--grant-type=device-code")
    with Daemon() as daemon:
        before = provider.counters()
        env = {"DBUS_SESSION_BUS_ADDRESS": desktop.bus_address}
        shim = Background(lambda: daemon.shim(args, env=env, timeout=90))
        desktop.wait_displayed(1)
        assert daemon.browser_openings() == 0  # the device flow too: no tab before the person asks for one
        desktop.invoke_default()
        done = shim.wait()
        assert done.returncode == 0, done.stderr + daemon.log()
        assert jwt_claims(exec_token(done))["sub"] == provider.sub("alice")
        desktop.wait_displayed(0)  # withdrawn once the login ended
        (opened,) = daemon.browser_log.read_text().splitlines()
        assert "/device" in opened  # the verification page, opened by the click
        said = re.search(r"enter the code (\S+)", done.stderr)
        assert said is not None, done.stderr
        shown = [n for n in desktop.history() if n.get("appname") == "brokerd"]
        assert len(shown) == 1 and str(shown[0]["summary"]).endswith("needs a login")
        assert f"The code to confirm there: {said.group(1)}" in str(shown[0]["body"])
        assert provider.counters()["device_authorization"] - before["device_authorization"] == 1


@desktop_only
def test_a_background_device_login_refused_by_policy_is_one_line(provider: TestProvider,
                                                                  clear: NotificationDesktop) -> None:
    desktop = clear
    with Daemon(config='[daemon]\nbackground_login = "refuse"\n') as daemon:
        before = provider.counters()
        env = {"DBUS_SESSION_BUS_ADDRESS": desktop.bus_address}
        done = daemon.shim(login_args(provider.issuer, "--grant-type=device-code"), env=env)
        assert done.returncode == 1 and done.stdout == ""
        lines = done.stderr.strip().splitlines()
        assert len(lines) == 1 and "brokerd login" in lines[0], done.stderr
        assert daemon.browser_openings() == 0 and desktop.displayed() == 0
        assert provider.counters()["device_authorization"] == before["device_authorization"]  # nothing started


@desktop_only
def test_a_forwarded_socket_caller_never_reaches_the_desktop_bus(provider: TestProvider,
                                                                 clear: NotificationDesktop) -> None:
    desktop = clear
    # BROKERD_REMOTE=1 is the remote shim: it does not send desktop variables, the bus address among them.
    from client_shim import protocol

    sent = protocol.forwarded_env({b"DBUS_SESSION_BUS_ADDRESS": b"unix:path=/x", b"BROKERD_PROFILE": b"p"},
                                  remote=True)
    assert sent == {b"BROKERD_PROFILE": b"p"}
    # A daemon whose socket is forwarded (caller_browser = false) drops the bus a caller sends: no notification
    # on this desktop; the login goes the old way, with the daemon's own browser.
    with Daemon(config="[daemon]\ncaller_browser = false\n") as daemon:
        done = daemon.shim(login_args(provider.issuer), env={"DBUS_SESSION_BUS_ADDRESS": desktop.bus_address})
        assert done.returncode == 0, done.stderr + daemon.log()
        assert daemon.browser_openings() == 1
        assert [n for n in desktop.history() if n.get("appname") == "brokerd"] == [] and desktop.displayed() == 0


# -- confirmation ----------------------------------------------------------------------------------------------


def _offline(provider: TestProvider) -> list[str]:
    """get-token flags that ask for a refresh token (offline_access), so ending a session has one to revoke."""
    return login_args(provider.issuer, scopes=("groups", "offline_access"))


def _confirm_config(issuer: str) -> str:
    return f'[daemon]\nlogin_retry_interval = 30\n\n[policy."{issuer}"]\nconfirm = true\nconfirm_ttl = "1h"\n'


@desktop_only
def test_confirm_on_the_desktop_deny_then_held_then_allowed_from_a_terminal(
        provider: TestProvider, clear: NotificationDesktop) -> None:
    desktop = clear
    with Daemon(config=_confirm_config(provider.issuer)) as daemon:
        env = {"DBUS_SESSION_BUS_ADDRESS": desktop.bus_address}
        call = Background(lambda: daemon.shim(login_args(provider.issuer), env=env, timeout=90))
        desktop.wait_displayed(1)
        desktop.choose("Deny")
        denied = call.wait()
        assert denied.returncode == 1 and denied.stdout == ""
        assert "was not allowed a token" in denied.stderr and "run it again" in denied.stderr
        assert daemon.browser_openings() == 0
        held = daemon.shim(login_args(provider.issuer), env=env)
        assert held.returncode == 1 and "was refused a token" in held.stderr
        assert len([n for n in desktop.history() if n.get("appname") == "brokerd"]) == 1  # no second question

        # At a terminal: the y/N prompt through the shim.  An empty answer is no; y is yes.
        for answer, allowed in (("\n", False), ("y\n", True)):
            run = PtyRun(daemon.shim_argv(login_args(provider.issuer)), daemon.env)
            run.expect(r"\[y/N\] ")
            run.send(answer)
            out, _ = run.proc.communicate(timeout=60)
            assert (run.proc.returncode == 0) is allowed, run.seen + daemon.log()
            if allowed:
                assert jwt_claims(json.loads(out)["status"]["token"])["sub"] == provider.sub("alice")
        records = _audit(daemon)
        assert [r["how"] for r in records] == ["login"]  # refusals hand out nothing


@desktop_only
def test_confirm_allowed_on_the_desktop_holds_for_confirm_ttl(provider: TestProvider,
                                                              clear: NotificationDesktop) -> None:
    desktop = clear
    with Daemon(config=_confirm_config(provider.issuer)) as daemon:
        env = {"DBUS_SESSION_BUS_ADDRESS": desktop.bus_address}
        call = Background(lambda: daemon.shim(login_args(provider.issuer), env=env, timeout=90))
        desktop.wait_displayed(1)
        desktop.choose("Allow")
        # Then the login: a background caller with a desktop gets the login notice once the question is gone.
        wait_until(lambda: any(str(n.get("summary")).startswith("Allow") for n in desktop.history()),
              "the question withdrawn")
        desktop.wait_displayed(1)
        desktop.invoke_default()
        done = call.wait()
        assert done.returncode == 0, done.stderr + daemon.log()
        again = daemon.shim(login_args(provider.issuer), env=env)
        assert again.returncode == 0, again.stderr
        assert len([n for n in desktop.history() if "Allow a cluster token" in str(n.get("summary"))]) == 1


# -- session age and disuse ------------------------------------------------------------------------------------


def test_max_session_age_ends_the_session_and_caps_the_served_expiry(provider: TestProvider) -> None:
    config = f'[policy."{provider.issuer}"]\nmax_session_age = "6s"\n'
    with Daemon(config=config) as daemon:
        before = provider.counters()
        started = time.time()
        done = daemon.shim(_offline(provider))
        assert done.returncode == 0, done.stderr + daemon.log()
        expiry = json.loads(done.stdout)["status"]["expirationTimestamp"]
        served_until = time.mktime(time.strptime(expiry, "%Y-%m-%dT%H:%M:%SZ")) - time.timezone
        assert served_until <= started + 6 + 1  # the provider's token lives an hour; the session 6 s
        assert _status(daemon)[0]["policy"]["max_session_age"] == 6
        assert "policy:        max age 6s" in daemon.cli("status").stdout
        # The watch ends it at its age: revoked, forgotten, and no refresh was made.
        wait_until(lambda: _status(daemon) == [], "the session ended by age")
        # The session leaves the table before its revocation is sent (a caller arriving now starts afresh): wait
        # for the revocation itself, then check it was the only one.
        wait_until(lambda: provider.counters()["revocations"] > before["revocations"],
                   lambda: f"the revocation; daemon log:\n{daemon.log()[-3000:]}")
        after = provider.counters()
        assert after["revocations"] - before["revocations"] == 1
        assert after["token_grants"]["refresh_token"] == before["token_grants"]["refresh_token"]
        assert "reached max_session_age" in daemon.log()
        again = daemon.shim(_offline(provider))
        assert again.returncode == 0, again.stderr
        assert provider.counters()["auth_requests"] - before["auth_requests"] == 2  # the next call logged in


def test_a_restart_keeps_counting_the_session_age_from_its_login(provider: TestProvider) -> None:
    config = f'[policy."{provider.issuer}"]\nmax_session_age = "1h"\nidle_logout = "1h"\n'
    with Daemon(config=config) as daemon:
        assert daemon.shim(_offline(provider)).returncode == 0, daemon.log()
        before = _status(daemon)[0]
        daemon.stop()
        daemon.start()
        after = _status(daemon)[0]
        assert after["session_ends_at"] == before["session_ends_at"]
        assert after["idle_logout_at"] == before["idle_logout_at"]


def test_sighup_applies_a_new_policy_to_a_live_session(provider: TestProvider) -> None:
    with Daemon(config="") as daemon:
        assert daemon.shim(_offline(provider)).returncode == 0, daemon.log()
        assert _status(daemon)[0]["policy"] == {}
        daemon.config_path.write_text(f'[policy."{provider.issuer}"]\nidle_logout = "2h"\nconfirm = true\n')
        assert daemon.proc is not None
        daemon.proc.send_signal(signal.SIGHUP)
        wait_until(lambda: _status(daemon)[0]["policy"].get("idle_logout") == 7200, "the reloaded policy")
        assert _status(daemon)[0]["policy"]["confirm"] is True


def test_idle_logout_revokes_an_unused_session(provider: TestProvider) -> None:
    config = f'[policy."{provider.issuer}"]\nidle_logout = "3s"\n'
    with Daemon(config=config) as daemon:
        before = provider.counters()
        done = daemon.shim(_offline(provider))
        assert done.returncode == 0, done.stderr + daemon.log()
        wait_until(lambda: _status(daemon) == [], "the idle session logged out")
        assert provider.counters()["revocations"] - before["revocations"] == 1, daemon.log()
        assert "without use (idle_logout)" in daemon.log()


@desktop_only
def test_warn_before_shows_one_warning_ahead_of_the_needed_login(provider: TestProvider,
                                                                 clear: NotificationDesktop) -> None:
    desktop = clear
    config = (f'[daemon]\nwarn_before = "20s"\nbackground_login = "browser"\n\n'
              f'[policy."{provider.issuer}"]\nmax_session_age = "30s"\n')
    with Daemon(config=config) as daemon:
        env = {"DBUS_SESSION_BUS_ADDRESS": desktop.bus_address}
        done = daemon.shim(login_args(provider.issuer), env=env)
        assert done.returncode == 0, done.stderr + daemon.log()
        desktop.wait_displayed(1, timeout=30)
        # Served again meanwhile: the watch looks again, and warns no second time for the same end.
        assert daemon.shim(login_args(provider.issuer), env=env).returncode == 0
        assert desktop.displayed() == 1
        before = provider.counters()
        desktop.invoke_default()  # "log in now": the browser opens, a new session begins
        wait_until(lambda: daemon.browser_openings() == 2, "the login started from the warning")
        wait_until(lambda: bool(_status(daemon)) and (_status(daemon)[0]["counters"] or {}).get("logins") == 1,
              "the new login")
        summaries = [str(n.get("summary")) for n in desktop.history() if n.get("appname") == "brokerd"]
        assert len(summaries) == 1 and summaries[0].startswith(f"Login to {provider.issuer} needed in")
        assert provider.counters()["auth_requests"] - before["auth_requests"] == 1


@desktop_only
@pytest.mark.parametrize("field", ["refresh_expires_in", "refresh_token_expires_in"])
def test_warn_before_uses_the_refresh_tokens_own_expiry_from_the_provider(
        provider_factory: Callable[..., TestProvider], clear: NotificationDesktop, field: str) -> None:
    # Keycloak says how long its refresh token lives; no refresh_token_lifetime and no max age are set, and the ID
    # token lives an hour: only the provider's word can make this warning.
    desktop = clear
    short = provider_factory({"refresh_expires_field": field, "refresh_token_ttl": 40})
    config = '[daemon]\nwarn_before = "35s"\nbackground_login = "browser"\n'
    with Daemon(config=config) as daemon:
        env = {"DBUS_SESSION_BUS_ADDRESS": desktop.bus_address}
        done = daemon.shim(_offline(short), env=env)
        assert done.returncode == 0, done.stderr + daemon.log()
        (session,) = _status(daemon)
        until = session.get("refresh_token_expires_at")
        assert isinstance(until, float) and 0 < until - time.time() <= 40
        desktop.wait_displayed(1, timeout=30)
        assert daemon.shim(_offline(short), env=env).returncode == 0  # served again: no second warning
        assert desktop.displayed() == 1 and daemon.log().count("; notifying") == 1  # (dunst stacks duplicates)
        desktop.dunstctl("close")  # dismissed, not clicked: into dunst's history, where its text can be read
        desktop.wait_displayed(0)
        assert daemon.shim(_offline(short), env=env).returncode == 0
        summaries = [str(n.get("summary")) for n in desktop.history() if n.get("appname") == "brokerd"]
        assert len(summaries) == 1 and summaries[0].startswith(f"Login to {short.issuer} needed in")
        shown = daemon.cli("status")
        assert shown.returncode == 0 and "refresh token: yes, expires " in shown.stdout, shown.stdout + shown.stderr


@desktop_only
def test_a_sliding_refresh_token_expiry_warns_once_not_at_every_refresh(
        provider_factory: Callable[..., TestProvider], clear: NotificationDesktop) -> None:
    # Keycloak's refresh_expires_in is its idle time, renewed at each refresh: with warn_before longer than it, each
    # background refresh brings a new expiry inside the warning window.  One warning, not one a refresh.
    desktop = clear
    sliding = provider_factory({"refresh_expires_field": "refresh_expires_in", "refresh_token_ttl": 20,
                                "id_token_ttl": 4, "access_token_ttl": 4})
    with Daemon(config='[daemon]\nwarn_before = "40s"\nbackground_login = "browser"\n') as daemon:
        env = {"DBUS_SESSION_BUS_ADDRESS": desktop.bus_address}
        done = daemon.shim(_offline(sliding), env=env)
        assert done.returncode == 0, done.stderr + daemon.log()
        desktop.wait_displayed(1, timeout=30)
        first = sliding.counters()["token_requests"]
        wait_until(lambda: sliding.counters()["token_requests"] - first >= 3, "three background refreshes")
        assert _status(daemon)[0]["counters"]["refreshes"] >= 3
        # dunst stacks identical notifications into one, so the daemon's own record is what counts the warnings.
        assert daemon.log().count("; notifying") == 1, daemon.log()
        assert desktop.displayed() == 1


@needs_kubectl
def test_audit_of_a_kubectl_call_names_its_cluster_and_holds_no_token(
        tmp_path: Path, provider: TestProvider, apiserver: ApiServer) -> None:
    exec_args = ["oidc-login", *login_args(provider.issuer, scopes=("groups", "offline_access"))]
    kubeconfig = write_kubeconfig(tmp_path / "kubeconfig", apiserver.url, apiserver.ca_file, exec_args)
    text = kubeconfig.read_text()
    assert "provideClusterInfo: false" in text  # as `kubectl config set-credentials` writes it
    kubeconfig.write_text(text.replace("provideClusterInfo: false", "provideClusterInfo: true"))
    with Daemon() as daemon:
        done = run_kubectl(["get", "nodes"], kubeconfig, env=daemon.env, timeout=60)
        assert done.returncode == 0, done.stderr + daemon.log()
        served = daemon.shim(login_args(provider.issuer, scopes=("groups", "offline_access")))
        assert served.returncode == 0, served.stderr
        wait_until(lambda: len(_audit(daemon)) == 2, "both records written")
        first, second = _audit(daemon)
        assert first["cluster"] == apiserver.url and first["how"] == "login"
        assert Path(first["caller"]["parent_exe"]).name.startswith("kubectl")
        assert "cluster" not in second and second["how"] == "cache"
        trail = "".join(p.read_text() for p in daemon.state_dir.glob("audit.jsonl*"))
        assert exec_token(served) not in trail and "insecure_secret" not in trail
        assert "BEGIN CERTIFICATE" not in trail and "certificate-authority-data" not in trail
