"""``bench/run``: every benchmark section in one run, printed as Markdown tables (see docs/benchmarks.md).

    bench/run [--quick] [--sections 1,2,3,4,5,6,7]
"""

from __future__ import annotations

import argparse
import os
import shlex
import sys
import tempfile
import time
from collections.abc import Callable
from pathlib import Path

from bench import installs, memory, scale, startup, throughput
from bench.harness import BenchError, Table, machine
from bench.rig import Daemon, compile_helpers, login_args, login_with_browser
from tests.support.provider import node_modules_missing, start_provider


def _say(text: str) -> None:
    print(f"[bench {time.strftime('%H:%M:%S')}] {text}", file=sys.stderr, flush=True)


def _show(table: Table) -> None:
    print(table.render(), flush=True)


def run(sections: set[int], quick: bool, workdir: Path) -> None:
    rounds1, rounds2, rounds3, restarts = (40, 12, 2, 3) if quick else (150, 40, 3, 5)
    # A subdirectory: kubectl writes exec commands under the kubeconfig's directory as relative paths, and a bare
    # name ("client") would then be looked up on PATH.
    (workdir / "cbin").mkdir()
    helpers = compile_helpers(workdir / "cbin")
    served = 0
    with start_provider() as provider:
        main = Daemon().start()
        extra: Daemon | None = None
        try:
            _say("logging in once through the browser stand-in")
            login_with_browser(main, login_args(provider.issuer))
            steps: list[tuple[int, str, Callable[[], Table]]] = [
                (1, "shim start", lambda: startup.shim_start(main, provider.issuer, helpers, rounds1)),
                (2, "kubectl calls", lambda: startup.kubectl_call(main, provider.issuer, helpers, workdir, rounds2)),
            ]
            for number, label, step in steps:
                if number in sections:
                    _say(f"section {number}: {label}")
                    _show(step())
            if 3 in sections:
                _say("section 3: socket throughput")
                with Daemon(config=memory.UVLOOP_CONFIG) as on_uvloop:
                    login_with_browser(on_uvloop, login_args(provider.issuer))
                    table, served = throughput.socket_throughput([("asyncio", main), ("uvloop", on_uvloop)],
                                                                 provider.issuer, helpers["loadgen"], workdir,
                                                                 rounds=rounds3)
                _show(table)
            if 4 in sections:
                _say("section 4: single flight at scale")
                _show(scale.single_flight())
            if 5 in sections or 6 in sections:
                _say("section 5: memory")
                table, extra = memory.memory(provider, (main, served) if served else None, workdir)
                if 5 in sections:
                    _show(table)
            if 6 in sections:
                assert extra is not None
                _say("section 6: restart")
                _show(memory.restart(provider, [("1 session", main), ("100 sessions", extra)], restarts))
            if 7 in sections:
                _say("section 7: installed launchers (fresh pip and pipx installs into the temp dir)")
                (workdir / "installs").mkdir()
                _show(installs.installed_launchers(main, provider.issuer, workdir / "installs", rounds1))
        finally:
            main.close()
            if extra is not None:
                extra.close()


def main() -> int:
    parser = argparse.ArgumentParser(prog="bench/run", description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true", help="fewer rounds (about a minute); for a smoke test")
    parser.add_argument("--sections", default="1,2,3,4,5,6,7", help="comma-separated section numbers")
    args = parser.parse_args()
    sections = {int(s) for s in args.sections.split(",") if s.strip()}
    problem = node_modules_missing()
    if problem:
        print(f"bench: {problem}", file=sys.stderr)
        return 2
    info = machine()
    command = "bench/run" + "".join(f" {shlex.quote(a)}" for a in sys.argv[1:])
    print(f"## brokerd benchmarks\n\n`{command}` on {time.strftime('%Y-%m-%d %H:%M %Z')}: {info['nproc']} cores "
          f"({info['cpu']}), Linux {info['kernel']}, Python {info['python']}; load average at start "
          f"{info['load']}\n", flush=True)
    print(f"Interpreter of sections 1-6: {sys.executable} -> {os.path.realpath(sys.executable)}; section 7 also "
          f"uses {', '.join(label for label, _ in installs.interpreters())}.\n", flush=True)
    start = time.monotonic()
    try:
        with tempfile.TemporaryDirectory(prefix="bkbench", dir="/tmp") as tmp:
            run(sections, args.quick, Path(tmp))
    except BenchError as exc:
        print(f"bench: {exc}", file=sys.stderr)
        return 1
    print(f"Total {time.monotonic() - start:.0f} s; load average at end {machine()['load']}.")
    return 0


if __name__ == "__main__":
    sys.exit(main())
