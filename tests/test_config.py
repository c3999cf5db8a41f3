"""The TOML config: [daemon] tuning and [profiles.NAME] (get-token flags by name), used through the real daemon."""

from __future__ import annotations

import json
import signal
import socket
import time
from collections.abc import Callable
from pathlib import Path

import pytest

from brokerd.config import Settings, load_settings
from brokerd.errors import ConfigError
from brokerd.flags import parse_flags, request_from_flags
from brokerd.store import SessionStore
from tests.support.daemon import Daemon, exec_token, login_args
from tests.support.provider import KUBE_LOGIN_CLIENT_SECRET, ProviderFactory, TestProvider


def load_config(path: Path) -> Settings:
    return load_settings(Settings(socket_path=path.parent / "s", state_dir=path.parent, config_file=path))


def test_missing_file_is_an_empty_config(tmp_path: Path) -> None:
    config = load_config(tmp_path / "none.toml")
    assert config.profiles == {} and config.policy == Settings(tmp_path, tmp_path).policy


def test_profiles_become_flags(tmp_path: Path) -> None:
    path = tmp_path / "c.toml"
    path.write_text('[daemon]\nrefresh_ratio = 0.5\n[profiles.work]\noidc-issuer-url = "https://a"\n'
                    'oidc-client-id = "k"\noidc-extra-scope = ["groups", "email"]\nskip-open-browser = true\n'
                    "authentication-timeout-sec = 20\n")
    config = load_config(path)
    assert config.policy.refresh_ratio == 0.5
    args = config.profiles["work"]
    settings, options, _ = request_from_flags(parse_flags(args))
    assert settings.issuer == "https://a" and "email" in settings.scopes
    assert options.skip_open_browser and options.authentication_timeout == 20


def test_agent_policy_tables_and_profile_policy_keys(tmp_path: Path) -> None:
    path = tmp_path / "c.toml"
    path.write_text('[daemon]\nbackground_login = "refuse"\nwarn_before = "10m"\n'
                    '[policy."https://a/"]\nconfirm = true\nidle_logout = "8h"\n'
                    '[profiles.prod]\noidc-issuer-url = "https://a"\noidc-client-id = "k"\nmax_session_age = "12h"\n')
    config = load_config(path)
    policy = config.policies.for_session("https://a", "prod")
    assert policy.confirm and policy.idle_logout == 8 * 3600 and policy.max_session_age == 12 * 3600
    assert policy.background_login == "refuse" and policy.warn_before == 600
    assert not any("max_session_age" in arg for arg in config.profiles["prod"])  # a policy key is no flag


@pytest.mark.parametrize(("text", "expect"), [
    ("[nope]\n", "unknown section"),
    ('[policy."https://a"]\nconfirm = "yes"\n', "confirm must be true or false"),
    ('[policy."https://a"]\nmax_session_age = "soon"\n', "expected a duration"),
    ('[policy."https://a"]\nbogus = 1\n', "unknown setting"),
    ('[daemon]\nbackground_login = "popup"\n', "background_login must be"),
    ("[daemon]\nrefresh_ratio = 'x'\n", "non-negative number"),
    ("[daemon]\nbogus = 1\n", "unknown setting 'bogus'"),
    ("[profiles.a]\noidc-bogus = 1\n", "unknown setting 'oidc-bogus'"),
    ("[profiles.a]\nprofile = 'b'\n", "unknown setting 'profile'"),
    ("[profiles.a]\noidc-extra-scope = [{x = 1}]\n", "must be a string"),
    ("[profiles]\na = 1\n", "must be a table"),
    ("not toml =", "c.toml"),
    ("[store]\nkey = 'vault'\n", "key must be"),
    ("[store]\npersist = 'no'\n", "persist must be true or false"),
    ("[store]\nbogus = 1\n", "unknown setting 'bogus'"),
])
def test_broken_config_names_the_problem(tmp_path: Path, text: str, expect: str) -> None:
    path = tmp_path / "c.toml"
    path.write_text(text)
    with pytest.raises(ConfigError, match=expect):
        load_config(path)


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def test_store_section(tmp_path: Path) -> None:
    path = tmp_path / "c.toml"
    path.write_text('[store]\nkey = "keyring"\npersist = false\n')
    config = load_config(path)
    assert (config.store_key, config.persist) == ("keyring", False)
    assert (load_config(tmp_path / "none.toml").store_key, load_config(tmp_path / "none.toml").persist) == (
        "auto", True)


def _profile_config(issuer: str) -> str:
    return (f'[profiles.work]\noidc-issuer-url = "{issuer}"\noidc-client-id = "kube_login"\n'
            f'oidc-client-secret = "{KUBE_LOGIN_CLIENT_SECRET}"\noidc-extra-scope = ["groups"]\n')


def test_profile_by_flag_and_by_environment_share_one_session(provider: TestProvider) -> None:
    with Daemon(config=_profile_config(provider.issuer)) as d:
        by_flag = d.shim(["get-token", "--profile=work"])
        assert by_flag.returncode == 0, by_flag.stderr + d.log()
        by_env = d.shim(["get-token"], env={"BROKERD_PROFILE": "work"})
        assert by_env.returncode == 0, by_env.stderr
        assert json.loads(by_env.stdout)["status"]["token"] == json.loads(by_flag.stdout)["status"]["token"]
        assert d.browser_openings() == 1
        # The command line overrides the profile: another scope set is another session.
        other = d.shim(["get-token", "--profile=work", "--oidc-extra-scope=email"])
        assert other.returncode == 0 and d.browser_openings() == 2
        assert KUBE_LOGIN_CLIENT_SECRET not in d.log()

        unknown = d.shim(["get-token", "--profile=home"])
        assert unknown.returncode == 2 and unknown.stderr.count("\n") == 1
        assert "unknown profile 'home'" in unknown.stderr and "work" in unknown.stderr


def test_profiles_reload_on_sighup(provider: TestProvider) -> None:
    with Daemon(config="") as d:
        assert d.shim(["get-token", "--profile=work"]).returncode == 2
        d.config_path.write_text(_profile_config(provider.issuer))
        assert d.proc is not None
        d.proc.send_signal(signal.SIGHUP)
        deadline = time.monotonic() + 10
        result = d.shim(["get-token", "--profile=work"])
        while result.returncode == 2 and time.monotonic() < deadline:
            time.sleep(0.1)
            result = d.shim(["get-token", "--profile=work"])
        assert result.returncode == 0, result.stderr + d.log()


def _reload(d: Daemon, text: str, until: Callable[[], bool]) -> None:
    d.config_path.write_text(text)
    assert d.proc is not None
    d.proc.send_signal(signal.SIGHUP)
    deadline = time.monotonic() + 10
    while not until():
        assert time.monotonic() < deadline, d.log()
        time.sleep(0.1)


def test_sighup_swaps_the_settings_whole_and_a_broken_file_changes_nothing(provider_factory: ProviderFactory) -> None:
    port = _free_port()
    idp = provider_factory({"default_client": {"redirect_uris": [f"http://localhost:{port}"]}})
    anywhere = [f"--listen-address=0.0.0.0:{port}"]

    def profile_works() -> bool:
        return d.shim(["get-token", "--profile=work", "--grant-type=client-credentials"]).returncode == 0

    with Daemon(config="") as d:
        refused = d.shim(login_args(idp.issuer, *anywhere))
        assert refused.returncode == 2 and "loopback addresses only" in refused.stderr
        # One reload changes the profiles and the [daemon] switches together.
        _reload(d, _profile_config(idp.issuer).replace('oidc-extra-scope = ["groups"]\n', "")
                + "[daemon]\nlisten_non_loopback = true\n", profile_works)
        ok = d.shim(login_args(idp.issuer, "--session-name=after-reload", *anywhere))
        assert ok.returncode == 0, ok.stderr + d.log()
        # A broken file keeps all of the old settings.
        reloads = d.log().count("config reloaded")
        _reload(d, "[daemon]\nlisten_non_loopback = maybe\n", lambda: "config not reloaded" in d.log())
        assert d.log().count("config reloaded") == reloads and profile_works()
        # A setting taken out of the file goes back to its default: the settings are replaced, not patched.
        _reload(d, "", lambda: not profile_works())
        again = d.shim(login_args(idp.issuer, "--session-name=reset", *anywhere))
        assert again.returncode == 2 and "loopback addresses only" in again.stderr


def test_store_settings_are_read_at_start_only(provider: TestProvider) -> None:
    """[store] is opened once: a reload that changes it keeps the running values and says a restart is needed."""
    with Daemon(config='[store]\nkey = "file"\n') as d:
        assert d.cli("status").returncode == 0  # serving (the socket accepts connections a little earlier)
        _reload(d, '[store]\nkey = "file"\npersist = false\n',
                lambda: "[store] is read at start only" in d.log())
        token = exec_token(d.shim(login_args(provider.issuer, "--username=alice", "--password=alice-password")))
        d.stop()
        assert [s.tokens.id_token for s in SessionStore(d.state_dir).load().values()] == [token]  # still persisted
