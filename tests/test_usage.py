"""Issue 14 item 3: real --help for the shim, `kubectl oidc-login` and `brokerd`; help and version without a daemon."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest

from brokerd.cli import build_parser
from brokerd.flags import FLAGS, SETUP_FLAGS
from client_shim.usage import GET_TOKEN_FLAGS, SETUP_ONLY_FLAGS
from tests.support.daemon import BIN, SHIM

KUBECTL = Path("/usr/bin/kubectl")


def test_every_parsed_flag_has_help_text_and_no_help_names_an_unknown_flag() -> None:
    assert [name for name, _, _ in GET_TOKEN_FLAGS] == list(FLAGS)
    assert [name for name, _, _ in SETUP_ONLY_FLAGS] == list(SETUP_FLAGS)
    assert all(text for _, _, text in (*GET_TOKEN_FLAGS, *SETUP_ONLY_FLAGS))


@pytest.fixture
def nowhere(tmp_path: Path) -> dict[str, str]:
    """An environment whose socket has no daemon and that *would* autostart one: help must not."""
    env = dict(os.environ)
    env["BROKERD_SOCKET"] = str(tmp_path / "run" / "brokerd.sock")
    env["BROKERD_STATE_DIR"] = str(tmp_path / "state")
    env.pop("BROKERD_NO_AUTOSTART", None)
    env["PATH"] = f"{BIN}{os.pathsep}{env.get('PATH', '')}"
    return env


def _run(argv: list[str], env: dict[str, str]) -> subprocess.CompletedProcess[str]:
    return subprocess.run(argv, env=env, capture_output=True, text=True, timeout=60, stdin=subprocess.DEVNULL)


def _no_daemon_started(tmp_path: Path) -> None:
    # An autostart would have created the socket's directory (and its lock) and the state dir.
    assert not (tmp_path / "run").exists() and not (tmp_path / "state").exists()


@pytest.mark.parametrize("form", ["launcher", "direct", "brokerd"])
@pytest.mark.parametrize("flag", ["--help", "-h"])
def test_get_token_and_setup_help_list_every_flag(tmp_path: Path, nowhere: dict[str, str], form: str,
                                                  flag: str) -> None:
    prefix = {"launcher": [str(BIN / "kubectl-oidc_login")], "direct": [sys.executable, "-I", "-S", str(SHIM)],
              "brokerd": [str(BIN / "brokerd")]}[form]
    token = _run([*prefix, "get-token", flag], nowhere)
    assert token.returncode == 0, token.stderr
    assert token.stderr == ""
    for name in FLAGS:
        assert f"--{name}" in token.stdout, name
    setup = _run([*prefix, "setup", "--oidc-issuer-url=https://x.example", flag], nowhere)
    assert setup.returncode == 0, setup.stderr
    for name in (*FLAGS, *SETUP_FLAGS):
        assert f"--{name}" in setup.stdout, name
    _no_daemon_started(tmp_path)


def test_root_help_version_and_unknown_command(tmp_path: Path, nowhere: dict[str, str]) -> None:
    shim = str(BIN / "kubectl-oidc_login")
    root = _run([shim, "--help"], nowhere)
    assert root.returncode == 0 and "Usage: kubectl oidc-login COMMAND" in root.stdout
    assert all(c in root.stdout for c in ("get-token", "setup", "clean", "version"))
    version = _run([shim, "version"], nowhere)
    assert version.returncode == 0 and version.stdout.startswith("brokerd 0.")
    direct_version = _run([sys.executable, "-I", "-S", str(SHIM), "version"], nowhere)
    assert direct_version.stdout == version.stdout
    unknown = _run([shim, "bogus", "--help"], nowhere)
    assert unknown.returncode == 2 and unknown.stderr.startswith("unknown command 'bogus'")
    _no_daemon_started(tmp_path)


@pytest.mark.skipif(not KUBECTL.exists(), reason="kubectl is not installed")
def test_kubectl_plugin_dispatch_passes_help_through(tmp_path: Path, nowhere: dict[str, str]) -> None:
    nowhere["KUBECONFIG"] = str(tmp_path / "no-config")  # no server: the dispatcher must not need one for a plugin
    root = _run([str(KUBECTL), "oidc-login", "--help"], nowhere)
    assert root.returncode == 0, root.stderr
    assert "Usage: kubectl oidc-login COMMAND" in root.stdout
    token = _run([str(KUBECTL), "oidc-login", "get-token", "--help"], nowhere)
    assert token.returncode == 0, token.stderr
    assert all(f"--{name}" in token.stdout for name in FLAGS)
    _no_daemon_started(tmp_path)


def test_every_brokerd_command_has_help_with_every_option(tmp_path: Path, nowhere: dict[str, str]) -> None:
    parser = build_parser()
    sub = next(a for a in parser._actions if a.dest == "command")
    commands = dict(sub.choices.items())  # type: ignore[union-attr]
    assert {"serve", "status", "logout", "kubeconfig", "clean", "version", "install-systemd"} <= set(commands)
    for name, p in commands.items():
        result = _run([str(BIN / "brokerd"), name, "--help"], nowhere)
        assert result.returncode == 0, (name, result.stderr)
        for action in p._actions:
            for option in action.option_strings:
                if action.help != "==SUPPRESS==":
                    assert option in result.stdout, (name, option)
                    assert action.help, (name, option)  # every flag says what it does
    _no_daemon_started(tmp_path)
