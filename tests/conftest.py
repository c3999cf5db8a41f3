"""Shared fixtures: the test OIDC provider (tests/provider/server.mjs) as a real node process, a daemon per test,
an OIDC client."""

from __future__ import annotations

import os
import shutil
import tempfile
from collections.abc import AsyncIterator, Iterator
from pathlib import Path
from typing import Any

import aiohttp
import pytest

from brokerd.clock import SystemClock
from brokerd.oidc import OIDCClient
from tests.support.daemon import Daemon, stop_daemons_holding
from tests.support.provider import ProviderFactory, TestProvider, node_modules_missing, start_provider


def pytest_configure(config: pytest.Config) -> None:
    """Keep every test away from the user's own daemon, socket, sessions and config.

    A test that forgets to pass its own BROKERD_* variables to a shim or daemon lands in this private directory
    instead of the real `$XDG_RUNTIME_DIR/brokerd` and `~/.local/state/brokerd`.
    """
    base = Path(tempfile.mkdtemp(prefix="bkt", dir="/tmp"))
    os.environ["BROKERD_SOCKET"] = str(base / "run" / "brokerd.sock")
    os.environ["BROKERD_STATE_DIR"] = str(base / "state")
    os.environ["BROKERD_CONFIG"] = str(base / "config.toml")
    os.environ["BROKERD_NO_AUTOSTART"] = "1"
    config.add_cleanup(lambda: _stop_strays(base))


def _stop_strays(base: Path) -> None:
    stop_daemons_holding(base / "run" / "brokerd.sock.lock")
    shutil.rmtree(base, ignore_errors=True)


@pytest.fixture(scope="module")
def provider() -> Iterator[TestProvider]:
    """One provider with the default (Authelia-like) config per test module. Counters are shared across the
    module's tests: call provider.reset() first, or compare before/after."""
    problem = node_modules_missing()
    if problem:
        pytest.fail(problem)
    with start_provider() as p:
        yield p


@pytest.fixture(scope="module")
def provider_factory() -> Iterator[ProviderFactory]:
    """``provider_factory(config: dict | None = None, port: int = 0) -> TestProvider``; all started providers
    are stopped when the module ends."""
    problem = node_modules_missing()
    if problem:
        pytest.fail(problem)
    started: list[TestProvider] = []

    def make(config: dict[str, Any] | None = None, port: int = 0) -> TestProvider:
        p = start_provider(config, port)
        started.append(p)
        return p

    yield make
    for p in started:
        p.stop()


@pytest.fixture
def daemon() -> Iterator[Daemon]:
    """A daemon of its own for one test (modules that share one daemon define a module-scoped ``daemon``)."""
    with Daemon() as d:
        yield d


@pytest.fixture
async def oidc() -> AsyncIterator[OIDCClient]:
    """An OIDC client on its own aiohttp session, with a 5 s request limit."""
    async with aiohttp.ClientSession() as http:
        yield OIDCClient(http, SystemClock(), request_timeout=5)
