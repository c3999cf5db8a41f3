"""Shared fixtures: the test OIDC provider (tests/provider/server.mjs) as a real node process."""

from __future__ import annotations

from collections.abc import Iterator
from typing import Any

import pytest

from tests.support.provider import ProviderFactory, TestProvider, node_modules_missing, start_provider


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
