"""Measuring whole processes side by side, and printing the results.

Why our own harness instead of hyperfine: hyperfine runs one command's rounds, then the next command's, so a burst
of load from another process on this shared 2-core machine lands on one variant only.  Here every round runs each
variant once, in a rotating order, so noise hits all variants alike, and the ratios compare neighbours in time.
Each run is posix_spawn + wait4 (no shell): wall time from spawn to reaped exit, plus the CPU time the child and
its waited-for children used (wait4's rusage), which is far less sensitive to other load than wall time.
"""

from __future__ import annotations

import os
import platform
import random
import statistics
import subprocess
import time
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field


class BenchError(Exception):
    """A measured command failed or the setup did not come up; the message says which."""


@dataclass(frozen=True)
class Variant:
    name: str
    argv: Sequence[str]
    env: Mapping[str, str]


@dataclass
class Samples:
    wall: list[float] = field(default_factory=list)  # seconds
    cpu: list[float] = field(default_factory=list)  # seconds, user + system of the child and its children


def spawn_timed(argv: Sequence[str], env: Mapping[str, str]) -> tuple[float, float, int]:
    """Run argv once with stdout/stderr on /dev/null; returns (wall s, cpu s, exit status)."""
    null = os.open(os.devnull, os.O_RDWR)
    try:
        actions = [(os.POSIX_SPAWN_DUP2, null, 0), (os.POSIX_SPAWN_DUP2, null, 1), (os.POSIX_SPAWN_DUP2, null, 2)]
        start = time.perf_counter()
        pid = os.posix_spawn(argv[0], list(argv), dict(env), file_actions=actions)
        _, status, usage = os.wait4(pid, 0)
        wall = time.perf_counter() - start
    finally:
        os.close(null)
    return wall, usage.ru_utime + usage.ru_stime, os.waitstatus_to_exitcode(status)


def check_output(argv: Sequence[str], env: Mapping[str, str], timeout: float = 60.0) -> str:
    """Run once, capturing stdout; BenchError with stderr when it fails (used to validate before timing)."""
    done = subprocess.run(list(argv), env=dict(env), capture_output=True, text=True, timeout=timeout,
                          stdin=subprocess.DEVNULL)
    if done.returncode != 0:
        raise BenchError(f"{argv[0]} exited {done.returncode}: {done.stderr.strip()[-2000:]}")
    return done.stdout


def round_robin(variants: Sequence[Variant], rounds: int, warmup: int = 3,
                max_seconds: float = 120.0) -> dict[str, Samples]:
    """``warmup`` unrecorded rounds, then up to ``rounds`` recorded ones, each in its own shuffled order (seeded, so
    a run can be repeated).  Not a rotation: that keeps every variant behind the same neighbour, and a variant run
    right after a heavy one (pip's console-script wrapper touches twice the memory and files) is measurably slower,
    which a rotation charges to one variant every round.  Stops early (with what it has) after max_seconds so a
    slow machine cannot run away."""
    results = {v.name: Samples() for v in variants}
    deadline = time.monotonic() + max_seconds
    shuffle = random.Random(len(variants)).shuffle
    for r in range(warmup + rounds):
        if r >= warmup + 5 and time.monotonic() > deadline:
            break
        order = list(variants)
        shuffle(order)
        for v in order:
            wall, cpu, code = spawn_timed(v.argv, v.env)
            if code != 0:
                raise BenchError(f"{v.name}: exited {code} in round {r}")
            if r >= warmup:
                results[v.name].wall.append(wall)
                results[v.name].cpu.append(cpu)
    return results


def median(xs: Sequence[float]) -> float:
    return statistics.median(xs) if xs else float("nan")


def quantile(xs: Sequence[float], q: float) -> float:
    if not xs:
        return float("nan")
    s = sorted(xs)
    return s[min(len(s) - 1, int(q * len(s)))]


def ms(seconds: float) -> str:
    return f"{seconds * 1000:.1f} ms" if seconds < 10 else f"{seconds:.1f} s"


def verdict(ok: bool) -> str:
    return "met" if ok else "**MISSED**"


@dataclass
class Table:
    title: str
    columns: Sequence[str]
    rows: list[Sequence[str]] = field(default_factory=list)
    notes: list[str] = field(default_factory=list)

    def add(self, *cells: object) -> None:
        self.rows.append([str(c) for c in cells])

    def render(self) -> str:
        """A Markdown table (so it pastes into the README as is), aligned for the terminal too."""
        widths = [max(len(c), *(len(r[i]) for r in self.rows)) if self.rows else len(c)
                  for i, c in enumerate(self.columns)]
        def line(cells: Sequence[str]) -> str:
            return "| " + " | ".join(c.ljust(w) for c, w in zip(cells, widths, strict=True)) + " |"
        out = [f"### {self.title}", "", line(self.columns), "|" + "|".join("-" * (w + 2) for w in widths) + "|"]
        out += [line(r) for r in self.rows]
        if self.notes:
            out.append("")
            out += [f"{n}" for n in self.notes]
        return "\n".join(out) + "\n"


def machine() -> dict[str, str]:
    model = "unknown"
    try:
        with open("/proc/cpuinfo") as f:
            for text in f:
                if text.startswith("model name"):
                    model = text.split(":", 1)[1].strip()
                    break
    except OSError:
        pass
    try:
        load = " ".join(f"{x:.2f}" for x in os.getloadavg())
    except OSError:
        load = "?"
    return {"nproc": str(len(os.sched_getaffinity(0))), "cpu": model, "kernel": platform.release(),
            "python": platform.python_version(), "load": load}
