"""Section 4: single flight at scale, counted by the provider.

Many connections are opened first and each sends its whole request but the last byte; the last bytes are then
released on a schedule (all at once, or spread across the token's expiry instant), so the requests really are in
flight together.  The client is asyncio on uvloop in this process; the daemon and provider are their own processes.
"""

from __future__ import annotations

import asyncio
import json
import math
import time
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import Any

import uvloop

from bench.harness import BenchError, Table, verdict
from bench.rig import Daemon, build_request, login_args
from tests.support.daemon import jwt_claims
from tests.support.provider import USERS, TestProvider, start_provider

TTL = 10  # ID token life at the provider, seconds
MARGIN = 0.5  # serve_margin and refresh_lead: the token stops being served, and the timer fires, at exp - 0.5 s
# refresh_ratio 1.0 and refresh_lead == serve_margin put the refresh-ahead timer exactly on the instant the token
# stops being servable, so on-demand callers and the timer race for the one refresh: the hardest case.
DAEMON_CONFIG = f"[daemon]\nrefresh_ratio = 1.0\nrefresh_lead = {MARGIN}\nserve_margin = {MARGIN}\n"
PROVIDER_CONFIG = {"id_token_ttl": TTL, "access_token_ttl": TTL, "refresh_tokens": "always"}


@dataclass(frozen=True)
class Outcome:
    released: float
    answered: float
    kind: str
    body: str


async def _open(path: str, prefix: bytes) -> tuple[asyncio.StreamReader, asyncio.StreamWriter]:
    for _ in range(100):
        try:
            reader, writer = await asyncio.open_unix_connection(path, limit=1 << 20)
        except OSError:  # listen backlog momentarily full
            await asyncio.sleep(0.01)
            continue
        writer.write(prefix)
        await writer.drain()
        return reader, writer
    raise BenchError("could not connect to the daemon")


async def _finish(reader: asyncio.StreamReader, writer: asyncio.StreamWriter, last: bytes, at: float,
                  answers: Mapping[str, str]) -> Outcome:
    await asyncio.sleep(max(0.0, at - time.time()))
    released = time.time()
    writer.write(last)
    try:
        for _ in range(100):  # bounded: a reply is a few message lines and one terminal line
            line = (await reader.readline()).decode()
            kind, body = line[:1], line[1:].rstrip("\n")
            if kind in ("Q", "S"):
                writer.write(b"R" + answers.get(body.strip(), "").encode() + b"\0")
            elif kind in ("O", "X", ""):
                return Outcome(released, time.time(), kind or "EOF", body)
        return Outcome(released, time.time(), "EOF", "too many lines")
    finally:
        writer.close()


async def _swarm(path: str, request: bytes, release_at: Sequence[float], answers: Mapping[str, str],
                 timeout: float) -> list[Outcome]:
    prefix, last = request[:-1], request[-1:]
    conns: list[tuple[asyncio.StreamReader, asyncio.StreamWriter]] = []
    for i in range(0, len(release_at), 100):  # batches: the daemon's listen backlog is 512
        conns += await asyncio.gather(*(_open(path, prefix) for _ in release_at[i:i + 100]))
    return await asyncio.wait_for(
        asyncio.gather(*(_finish(r, w, last, at, answers) for (r, w), at in zip(conns, release_at, strict=True))),
        timeout)


def swarm(daemon: Daemon, request: bytes, release_at: Sequence[float], answers: Mapping[str, str],
          timeout: float = 60.0) -> list[Outcome]:
    return uvloop.run(_swarm(str(daemon.socket), request, release_at, answers, timeout))


def max_in_flight(outcomes: Sequence[Outcome]) -> int:
    events = sorted([(o.released, 1) for o in outcomes] + [(o.answered, -1) for o in outcomes])
    peak = level = 0
    for _, step in events:
        level += step
        peak = max(peak, level)
    return peak


def _token(o: Outcome) -> str:
    return str(json.loads(o.body)["status"]["token"])


def _delta(before: Mapping[str, Any], after: Mapping[str, Any]) -> dict[str, int]:
    grants_b, grants_a = before["token_grants"], after["token_grants"]
    return {"password": grants_a["password"] - grants_b["password"],
            "refresh": grants_a["refresh_token"] - grants_b["refresh_token"],
            "code": grants_a["authorization_code"] - grants_b["authorization_code"],
            "token_requests": after["token_requests"] - before["token_requests"],
            "reuse": after["refresh_reuse_detected"] - before["refresh_reuse_detected"]}


def single_flight(cold_clients: int = 200, expiry_clients: int = 1000) -> Table:
    table = Table("4. Single flight at scale (counts from the test provider)",
                  ["scenario", "requests", "served", "in flight (max)", "logins", "refreshes", "token requests",
                   "refresh reuse", "stale tokens served", "expected", ""])
    with start_provider(PROVIDER_CONFIG) as provider, Daemon(config=DAEMON_CONFIG) as daemon:
        _cold(table, provider, daemon, cold_clients)
        _expiry(table, provider, daemon, expiry_clients)
    table.notes.append(f"Provider: ID tokens live {TTL} s, refresh tokens rotate with reuse detection; login by the "
                       f"password grant (the password answered on the socket's prompt, never in argv). Daemon: "
                       f"refresh_ratio 1.0, refresh_lead = serve_margin = {MARGIN} s, so its refresh-ahead timer and "
                       f"the on-demand callers meet at the same instant. Cold: the provider's token endpoint is "
                       f"delayed 1 s (fault injection) so every request arrives while the login runs.")
    return table


def _args(issuer: str) -> list[str]:
    return login_args(issuer, "--grant-type=password", "--username=alice")


def _cold(table: Table, provider: TestProvider, daemon: Daemon, n: int) -> None:
    request = build_request(_args(provider.issuer), {}, tty=True)  # a terminal: the daemon may ask for the password
    provider.fault("token", "delay", seconds=1.0, count=1)
    before = provider.counters()
    start = time.time() + 0.2
    outcomes = swarm(daemon, request, [start] * n, {"Password:": str(USERS["alice"]["password"])})
    delta = _delta(before, provider.counters())
    served = [o for o in outcomes if o.kind == "O"]
    tokens = {_token(o) for o in served}
    ok = len(served) == n and len(tokens) == 1 and delta["password"] == 1 and delta["token_requests"] == 1
    table.add(f"{n} concurrent cold requests, one session", n, len(served), max_in_flight(outcomes),
              delta["password"], delta["refresh"], delta["token_requests"], delta["reuse"], 0, "1 login",
              verdict(ok))
    if not served:
        raise BenchError(f"no cold request was served: {outcomes[0]}")


def _serve_until(outcome: Outcome) -> float:
    """When the daemon stops serving this token: exp - margin, in whole seconds (brokerd.refresh.serve_until)."""
    return float(math.floor(float(jwt_claims(_token(outcome))["exp"]) - MARGIN))


def _expiry(table: Table, provider: TestProvider, daemon: Daemon, n: int) -> None:
    request = build_request(_args(provider.issuer), {})
    first = swarm(daemon, request, [time.time()], {})[0]
    if first.kind != "O":
        raise BenchError(f"no token for the expiry test: {first}")
    instant = _serve_until(first)
    if instant - time.time() < 3.0:
        raise BenchError("the session is too close to its expiry to set up the test")
    time.sleep(instant - 2.5 - time.time())
    provider.fault("token", "delay", seconds=0.3, count=1)  # a slow refresh: late callers pile onto it
    before = provider.counters()
    spread = 0.5
    release = [instant - spread / 2 + spread * i / (n - 1) for i in range(n)]
    outcomes = swarm(daemon, request, release, {})
    delta = _delta(before, provider.counters())
    served = [o for o in outcomes if o.kind == "O"]
    stale = sum(1 for o in served if _serve_until(o) <= o.released)
    tokens = {_token(o) for o in served}
    ok = (len(served) == n and stale == 0 and delta["refresh"] == 1 and delta["token_requests"] == 1
          and delta["reuse"] == 0 and len(tokens) == 2)
    table.add(f"{n} requests across the expiry instant (+-{spread / 2:g} s)", n, len(served),
              max_in_flight(outcomes), delta["password"] + delta["code"], delta["refresh"], delta["token_requests"],
              delta["reuse"], stale, "1 refresh", verdict(ok))
    before_instant = sum(1 for o in outcomes if o.released < instant)
    table.notes.append(f"Expiry run: {before_instant} requests released before the instant, {n - before_instant} "
                       f"after; {len(tokens)} distinct tokens served (old, then the refreshed one).")
