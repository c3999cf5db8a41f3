"""Sections 5 and 6: the daemon's memory with 0, 1 and 100 sessions; time to the first token after a restart."""

from __future__ import annotations

import os
import signal
import subprocess
import time
from collections.abc import Sequence
from pathlib import Path

from bench import installs
from bench.harness import BenchError, Table, median, ms, quantile, spawn_timed, verdict
from bench.rig import (
    EXEC_INFO_V1BETA1,
    PY,
    SHIM,
    Daemon,
    ask,
    build_request,
    login_args,
    login_with_browser,
    peer_pid,
    pss_kb,
    status_kb,
    wait_gone,
)
from tests.support.provider import TestProvider
from tests.support.wait import poll

RSS_TARGET_MB = 50.0
SERVE = [PY, "-m", "brokerd", "serve", "-v"]  # as tests/support/daemon.py starts it


def _mb(kb: int) -> str:
    return f"{kb / 1024:.1f} MB"


UVLOOP_CONFIG = '[daemon]\nevent_loop = "uvloop"\n'


def memory(provider: TestProvider, loaded: tuple[Daemon, int] | None, workdir: Path,
           sessions: int = 100) -> tuple[Table, Daemon]:
    """A fresh daemon: idle, after one browser login, after ``sessions`` sessions; then one login each on uvloop
    (``[daemon] event_loop``) and from a user's install (``pip install .`` into a new venv of Debian's python3
    when there is one).  Returns the first daemon (left running, with its sessions persisted) for the restart
    test.  ``loaded``: the section 1-3 daemon and how many requests it served, to show the RSS after load."""
    table = Table("5. Daemon memory (from /proc/PID/status)",
                  ["state", "VmRSS", "VmHWM (peak)", "RssAnon", "Pss", "threads", "target", ""])
    daemon = Daemon().start()
    assert daemon.proc is not None
    pid = daemon.proc.pid

    time.sleep(1.0)
    _row(table, pid, "idle after start, no sessions (bench venv)")
    login_with_browser(daemon, login_args(provider.issuer))  # the real path: loopback listener + browser + code grant
    time.sleep(0.5)
    _row(table, pid, "after one login (authorization code, browser stand-in; bench venv)", target=True)
    password = "bench-password"
    for i in range(1, sessions):
        name = f"bench{i:03d}"
        provider.set_user(name, password=password)
        args = login_args(provider.issuer, "--grant-type=password", f"--session-name={name}")
        kind, body = ask(daemon.socket, build_request(args, {}, tty=True), {"Password:": password})
        if kind != "O":
            raise BenchError(f"password login {i} failed: {body}")
    time.sleep(0.5)
    _row(table, pid, f"after {sessions} sessions (1 + {sessions - 1} password-grant logins, distinct users)")
    if loaded is not None and loaded[0].proc is not None:
        _row(table, loaded[0].proc.pid, f"1 session, after sections 1-3 ({loaded[1]:,} requests served)")
    _one_login(table, provider, Daemon(config=UVLOOP_CONFIG), 'after one login, `event_loop = "uvloop"` (bench venv)')
    label, interpreter = installs.interpreters()[0]
    python = installs.pip_venv(interpreter, workdir / "user-venv")
    _one_login(table, provider, Daemon(python=python), f"after one login, `pip install .` into a venv of {label}",
               target=True)
    table.notes.append(f"Bench venv: {PY} (`pip install -e .[test]`, as scripts/test makes it).  Import floor "
                       f"(`python -c 'import brokerd.daemon'`): {_import_floor(PY)} in the bench venv, "
                       f"{_import_floor(python)} in the user's venv.")
    return table, daemon


def _row(table: Table, pid: int, state: str, target: bool = False) -> None:
    kb = status_kb(pid)
    ok = verdict(kb["VmRSS"] <= RSS_TARGET_MB * 1024) if target else ""
    table.add(state, _mb(kb["VmRSS"]), _mb(kb["VmHWM"]), _mb(kb["RssAnon"]), _mb(pss_kb(pid)),
              str(len(os.listdir(f"/proc/{pid}/task"))), f"<= {RSS_TARGET_MB:g} MB" if target else "", ok)


def _one_login(table: Table, provider: TestProvider, daemon: Daemon, state: str, target: bool = False) -> None:
    daemon.start()
    try:
        assert daemon.proc is not None
        time.sleep(1.0)
        login_with_browser(daemon, login_args(provider.issuer))
        time.sleep(0.5)
        _row(table, daemon.proc.pid, state, target)
    finally:
        daemon.close()


def _import_floor(python: str) -> str:
    code = "import brokerd.daemon\nprint(open('/proc/self/status').read())"
    out = subprocess.run([python, "-c", code], capture_output=True, text=True, timeout=60, cwd="/").stdout
    for text in out.splitlines():
        if text.startswith("VmRSS:"):
            return _mb(int(text.split()[1]))
    return "?"


def _wait_listening(daemon: Daemon, proc: subprocess.Popen[bytes], timeout: float = 20.0) -> None:
    poll(lambda: proc.poll() is not None or daemon.alive(), timeout, interval=0.001)
    if proc.poll() is not None:
        raise BenchError(f"brokerd exited with {proc.returncode}:\n{daemon.log()[-2000:]}")
    if not daemon.alive():
        raise BenchError(f"brokerd did not listen within {timeout} s")


def _serve(daemon: Daemon) -> None:
    """Start `brokerd serve` for ``daemon`` (stopped) and wait until it listens."""
    with open(daemon.log_path, "ab") as log:
        proc = subprocess.Popen(SERVE, env=daemon.env, stdin=subprocess.DEVNULL, stdout=log, stderr=log,
                                cwd=daemon.base)
    daemon.proc = proc  # from now on daemon.stop()/close() end this process, by its PID
    _wait_listening(daemon, proc)


def _restart(daemon: Daemon, request: bytes) -> tuple[float, float]:
    """Stop (SIGTERM, sessions persisted), start again, and time (listening, first token served)."""
    daemon.stop()
    start = time.perf_counter()
    _serve(daemon)
    listening = time.perf_counter() - start
    kind, body = ask(daemon.socket, request)
    first = time.perf_counter() - start
    if kind != "O":
        raise BenchError(f"the restarted daemon did not serve the persisted session: {body}")
    return listening, first


def _autostart(daemon: Daemon, issuer: str) -> float:
    """The daemon is down; time a shim that starts it (its autostart path) and gets the persisted token."""
    daemon.stop()
    env = dict(daemon.env)
    env.pop("BROKERD_NO_AUTOSTART", None)
    env["BROKERD_DAEMON_COMMAND"] = f"{PY} -m brokerd serve"
    env["KUBERNETES_EXEC_INFO"] = EXEC_INFO_V1BETA1
    wall, _cpu, code = spawn_timed([PY, "-I", "-S", SHIM, *login_args(issuer)], env)
    if code != 0:
        raise BenchError(f"the autostarting shim exited {code}")
    pid = peer_pid(daemon.socket)  # the daemon the shim started (its own session, not our child)
    os.kill(pid, signal.SIGTERM)
    wait_gone(pid)
    return wall


def restart(provider: TestProvider, daemons: Sequence[tuple[str, Daemon]], rounds: int = 5) -> Table:
    """Section 6.  Each daemon holds valid persisted sessions; the provider must see no traffic at all."""
    table = Table("6. Time to the first served token after a daemon restart (persisted valid session)",
                  ["daemon", "median to listening", "median to first token", "p10 - p90 first token", "rounds",
                   "provider requests", "no provider traffic"])
    request = build_request(login_args(provider.issuer), {"KUBERNETES_EXEC_INFO": EXEC_INFO_V1BETA1})
    first_daemon = daemons[0][1]
    before = provider.counters()
    times: dict[str, list[tuple[float, float]]] = {label: [] for label, _ in daemons}
    auto: list[float] = []
    for r in range(rounds):
        order = [daemons[(r + i) % len(daemons)] for i in range(len(daemons))]
        for label, daemon in order:
            times[label].append(_restart(daemon, request))
        auto.append(_autostart(first_daemon, provider.issuer))
    after = provider.counters()
    _serve(first_daemon)  # serving again, as it was found: section 7 asks it next (the last autostart stopped it)
    traffic = sum(after[k] - before[k] for k in ("discovery", "jwks", "token_requests", "auth_requests"))
    ok = verdict(traffic == 0)
    for label, _ in daemons:
        firsts = [t[1] for t in times[label]]
        table.add(label, ms(median([t[0] for t in times[label]])), ms(median(firsts)),
                  f"{ms(quantile(firsts, 0.1))} - {ms(quantile(firsts, 0.9))}", len(firsts), traffic, ok)
    table.add("daemon down, `shim get-token` autostarts it (whole shim run)", "", ms(median(auto)),
              f"{ms(quantile(auto, 0.1))} - {ms(quantile(auto, 0.9))}", len(auto), traffic, ok)
    table.notes.append("Spawn of `python -m brokerd serve` to the reply on the socket (polled every 1 ms); "
                       "provider requests counts discovery, JWKS, token and authorization requests during all "
                       "restarts.")
    return table
