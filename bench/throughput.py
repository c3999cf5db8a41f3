"""Section 3: the daemon's socket throughput and latency, new connection per request, against an echo ceiling.

The load generator is bench/c/loadgen.c: one thread on epoll, so it takes at most one of the two cores and leaves
the other to the server; its CPU use per request is reported next to the server's so a reader can see which side
was the bottleneck.  The ceiling is bench/echo_server.py: the same asyncio streams on the same event loop, same backlog
and reply size, doing nothing else.  Daemon and echo runs alternate round by round.
"""

from __future__ import annotations

import json
import subprocess
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

from bench.harness import BenchError, Table, median, verdict
from bench.rig import EXEC_INFO_V1BETA1, Daemon, ask, build_request, cpu_seconds, echo_server, login_args

TARGET = 0.8  # daemon requests/s / echo requests/s


def _load(loadgen: str, path: Path, request: bytes, clients: int, seconds: float, pid: int) -> dict[str, Any]:
    cpu0 = cpu_seconds(pid)
    done = subprocess.run([loadgen, str(path), str(clients), str(seconds), "2000000"], input=request,
                          capture_output=True, timeout=seconds + 30)
    if done.returncode != 0:
        raise BenchError(f"loadgen failed: {done.stderr.decode(errors='replace')}")
    result: dict[str, Any] = json.loads(done.stdout)
    result["server_cpu_s"] = cpu_seconds(pid) - cpu0
    if result["errors"] or result["unfinished"]:
        raise BenchError(f"loadgen saw {result['errors']} errors, {result['unfinished']} unfinished: {result}")
    return result


def socket_throughput(daemons: Sequence[tuple[str, Daemon]], issuer: str, loadgen: str, workdir: Path,
                      concurrency: Sequence[int] = (1, 50, 200), rounds: int = 3,
                      seconds: float = 2.0) -> tuple[Table, int]:
    """``daemons``: (event loop, a daemon running on it with a cached session), each measured against an echo on
    the same loop.  Returns the table and how many requests the first daemon served."""
    request = build_request(login_args(issuer), {"KUBERNETES_EXEC_INFO": EXEC_INFO_V1BETA1})
    reply_bytes = 0
    for _loop, daemon in daemons:
        kind, body = ask(daemon.socket, request)
        if kind != "O":
            raise BenchError(f"the daemon did not serve a cached token: {body}")
        reply_bytes = len(body) + 2  # "O" + body + "\n"
    results: dict[tuple[str, str, int], list[dict[str, Any]]] = {}
    for loop, daemon in daemons:
        assert daemon.proc is not None
        echo_path = workdir / f"echo-{loop}.sock"
        with echo_server(echo_path, reply_bytes, loop) as echo:
            targets = {"daemon": (daemon.socket, daemon.proc.pid), "echo": (echo_path, echo.pid)}
            for clients in concurrency:
                for r in range(rounds + 1):  # round 0 warms up both servers and is not recorded
                    order = ["daemon", "echo"] if r % 2 else ["echo", "daemon"]
                    for name in order:
                        path, pid = targets[name]
                        res = _load(loadgen, path, request, clients, seconds if r else 0.5, pid)
                        if r and name == "echo" and res["reply_bytes"] != reply_bytes:
                            raise BenchError("the echo server's reply size differs from the daemon's")
                        if r:
                            results.setdefault((loop, name, clients), []).append(res)
    table = Table(f"3. Daemon socket throughput, new connection per request ({reply_bytes}-byte reply)",
                  ["clients", "server", "requests/s", "p50", "p99", "server CPU/req", "loadgen CPU/req",
                   "x echo (req/s)", "target", ""])
    for clients in concurrency:
        for loop, _daemon in daemons:
            echo_rps = _rps(results[(loop, "echo", clients)])
            for name in ("daemon", "echo"):
                runs = results[(loop, name, clients)]
                rps = _rps(runs)
                ratio = rps / echo_rps
                ok = verdict(ratio >= TARGET) if name == "daemon" else ""
                table.add(clients, f"brokerd daemon ({loop})" if name == "daemon" else f"{loop} echo (ceiling)",
                          f"{rps:,.0f}", _us(runs, "p50_us"), _us(runs, "p99_us"), _per_req(runs, "server_cpu_s"),
                          _per_req(runs, "cpu_s"), f"{ratio:.2f}", f">= {TARGET}" if name == "daemon" else "", ok)
    total = sum(r["requests"] for runs in results.values() for r in runs)
    first = daemons[0][0]
    served = sum(r["requests"] for (loop, name, _), runs in results.items() for r in runs
                 if name == "daemon" and loop == first)
    table.notes.append(f"{rounds} rounds of {seconds:g} s per server and client count, alternating; medians over "
                       f"rounds; {total:,} requests, 0 errors. CPU/req from /proc/PID/stat (server) and getrusage "
                       f"(loadgen). The daemon runs on asyncio's loop by default; `[daemon] event_loop = \"uvloop\"` "
                       f"is the other row.")
    return table, served


def _rps(runs: Sequence[Mapping[str, Any]]) -> float:
    return median([r["requests"] / r["elapsed"] for r in runs])


def _us(runs: Sequence[Mapping[str, Any]], key: str) -> str:
    value = median([r[key] for r in runs])
    return f"{value / 1000:.2f} ms"


def _per_req(runs: Sequence[Mapping[str, Any]], key: str) -> str:
    value = median([r[key] / max(1, r["requests"]) for r in runs])
    return f"{value * 1e6:.0f} us"
