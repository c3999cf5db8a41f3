"""Section 7: the installed ``kubectl-oidc_login`` as a new user gets it, per installer, against the bare interpreter.

Fresh installs into the temp dir, as a user would type them: ``pip install .`` and ``pip install -e .`` into a
venv, ``pipx install .`` and ``pipx install --editable .`` (pipx itself goes into a throwaway venv).  pip takes
the dependencies from its cache or index.  Each launcher asks the bench daemon for the same cached token; each
install's row is divided by ``python -I -S -c pass`` of the same interpreter, in the same interleaved rounds.  For
comparison, the wrapper pip writes for a console script (the previous release's entry point), in the pip venv.
"""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path

from bench.harness import BenchError, Table, Variant, check_output, median, ms, quantile, round_robin, verdict
from bench.rig import EXEC_INFO_V1BETA1, ROOT, Daemon, login_args

TARGET = 1.25
INSTALL_TIMEOUT = 900.0
PIP_WRAPPER = """#!{python}
# -*- coding: utf-8 -*-
import re
import sys
from client_shim.core import main
if __name__ == '__main__':
    sys.argv[0] = re.sub(r'(-script\\.pyw|\\.exe)?$', '', sys.argv[0])
    sys.exit(main())
"""


@dataclass(frozen=True)
class Install:
    name: str
    python: str  # the environment's interpreter (its bin/python), for the bare baseline
    launcher: str
    env: Mapping[str, str]
    shell: bool = False  # run as `/bin/sh <launcher>`: the shell part, whatever the first line says
    graded: bool = True  # against TARGET; else measured and shown only
    written: bool | None = True  # the first run writes the interpreter into the first line (None: not our launcher)


def interpreters() -> list[tuple[str, str]]:
    """Debian's /usr/bin/python3 when present, and the interpreter the bench venv was made from, when different."""
    found: list[tuple[str, str]] = []
    if Path("/usr/bin/python3").exists():
        found.append(("Debian /usr/bin/python3", "/usr/bin/python3"))
    base = os.path.realpath(getattr(sys, "_base_executable", sys.executable))
    if not found or os.path.realpath(found[0][1]) != base:
        found.append((f"this machine's python3 ({base})", base))
    return found


def _run(argv: list[str], env: Mapping[str, str] | None = None) -> None:
    try:
        done = subprocess.run(argv, capture_output=True, text=True, timeout=INSTALL_TIMEOUT,
                              env=dict(env or os.environ), stdin=subprocess.DEVNULL)
    except subprocess.TimeoutExpired:
        raise BenchError(f"{' '.join(argv[:4])}: no result within {INSTALL_TIMEOUT:.0f} s") from None
    if done.returncode != 0:
        raise BenchError(f"{' '.join(argv[:5])} exited {done.returncode}: {done.stderr.strip()[-1500:]}")


def _pipx(interpreter: str, workdir: Path, pip_env: Mapping[str, str]) -> str:
    """$BENCH_PIPX, else pipx on PATH, else pipx installed into a throwaway venv (needs PyPI or a local index that
    has it: inside `unshare -n`, provide one with BENCH_PIPX)."""
    found = os.environ.get("BENCH_PIPX") or shutil.which("pipx")
    if found:
        return found
    tool = workdir / "pipx-tool"
    _run([interpreter, "-m", "venv", str(tool)])
    _run([str(tool / "bin" / "python"), "-m", "pip", "install", "--quiet", "pipx"], pip_env)
    return str(tool / "bin" / "pipx")


def _pip_env() -> dict[str, str]:
    pip_env = dict(os.environ)
    pip_env["PIP_DISABLE_PIP_VERSION_CHECK"] = "1"
    pip_env.setdefault("PIP_RETRIES", "0")  # offline (unshare -n): fail over to the local index at once
    return pip_env


def pip_venv(interpreter: str, venv: Path, *, editable: bool = False, copies: bool = False) -> str:
    """A new venv of ``interpreter`` with brokerd installed as a user would (``pip install [-e] .``): its python."""
    _run([interpreter, "-m", "venv", *(["--copies"] if copies else []), str(venv)])
    _run([str(venv / "bin" / "python"), "-m", "pip", "install", "--quiet", *(["-e"] if editable else []),
          str(ROOT)], _pip_env())
    return str(venv / "bin" / "python")


def install_all(interpreter: str, workdir: Path, env: Mapping[str, str], pipx: bool) -> list[Install]:
    """pip and pip -e venvs (and pipx, pipx --editable when ``pipx``), each with the launcher it installed."""
    pip_env = _pip_env()
    out: list[Install] = []
    for editable in (False, True):
        venv = workdir / ("pip-e" if editable else "pip")
        pip_venv(interpreter, venv, editable=editable)
        out.append(Install(f"`pip install {'-e ' if editable else ''}.`", str(venv / "bin" / "python"),
                           str(venv / "bin" / "kubectl-oidc_login"), env))
    # The shell part as a first run takes it (with the check of the first line, already written here), and as every
    # run does where the launcher is never written (--copies; a read-only or another user's install alike): measured,
    # not graded.
    out.append(Install("`pip install .`, through /bin/sh (as the first run)",
                       str(workdir / "pip" / "bin" / "python"), str(workdir / "pip" / "bin" / "kubectl-oidc_login"),
                       env, shell=True, graded=False))
    if pipx:  # the first interpreter only
        pip_venv(interpreter, workdir / "pip-copies", copies=True)
        out.append(Install("`pip install .` into `venv --copies` (never written: the shell part on every run)",
                           str(workdir / "pip-copies" / "bin" / "python"),
                           str(workdir / "pip-copies" / "bin" / "kubectl-oidc_login"), env, graded=False,
                           written=False))
    wrapper = workdir / "pip" / "bin" / "kubectl-oidc_login-pip-wrapper"
    wrapper.write_text(PIP_WRAPPER.format(python=workdir / "pip" / "bin" / "python"))
    wrapper.chmod(0o755)
    out.append(Install("pip's console-script wrapper (previous release), `pip install .`",
                       str(workdir / "pip" / "bin" / "python"), str(wrapper), env, graded=False, written=None))
    if not pipx:
        return out
    pipx_cmd = _pipx(interpreter, workdir, pip_env)
    for editable in (False, True):
        home, bindir = workdir / f"pipx-home{'-e' if editable else ''}", workdir / f"pipx-bin{'-e' if editable else ''}"
        px_env = dict(pip_env, PIPX_HOME=str(home), PIPX_BIN_DIR=str(bindir), PIPX_MAN_DIR=str(workdir / "man"))
        _run([pipx_cmd, "install", "--python", interpreter, *(["--editable"] if editable else []),
              str(ROOT)], px_env)
        python = str(home / "venvs" / "brokerd" / "bin" / "python")
        launcher = str(bindir / "kubectl-oidc_login")  # pipx's symlink, as PATH finds it
        # After its first run the launcher finds pipx's venv through the link itself: PIPX_HOME (a home kubectl's
        # environment may not name) no longer matters.
        out.append(Install(f"`pipx install {'--editable ' if editable else ''}.`", python, launcher, env))
    return out


def installed_launchers(daemon: Daemon, issuer: str, workdir: Path, rounds: int) -> Table:
    env = dict(daemon.env)
    env["KUBERNETES_EXEC_INFO"] = EXEC_INFO_V1BETA1
    env.pop("PIPX_HOME", None)
    args = login_args(issuer)
    table = Table("7. The installed `kubectl-oidc_login get-token ...`, cached token, per installer",
                  ["interpreter", "install", "median wall", "p10 - p90", "median CPU", "x bare (wall)",
                   "x bare (CPU)", "target", ""])
    rounds_done = 0
    for i, (label, interpreter) in enumerate(interpreters()):
        installs = install_all(interpreter, workdir / f"py{i}", env, pipx=(i == 0))
        bare = Variant("bare", [installs[0].python, "-I", "-S", "-c", "pass"], env)
        variants = [bare] + [Variant(inst.name, [*(["/bin/sh"] if inst.shell else []), inst.launcher, *args],
                                     inst.env) for inst in installs]
        for v in variants[1:]:  # each launcher's first run: it writes its interpreter into its first line
            if '"ExecCredential"' not in check_output(v.argv, v.env):
                raise BenchError(f"{v.name}: printed no ExecCredential")
        for inst in installs:
            written = not Path(inst.launcher).read_bytes().startswith(b"#!/bin/sh\n")
            if inst.written is not None and written != inst.written:
                raise BenchError(f"{inst.name}: the first run {'wrote' if written else 'did not write'} the "
                                 "interpreter into the launcher")
        res = round_robin(variants, rounds, max_seconds=240)
        base = res["bare"]
        table.add(label, "`python -I -S -c pass`", ms(median(base.wall)),
                  f"{ms(quantile(base.wall, 0.1))} - {ms(quantile(base.wall, 0.9))}", ms(median(base.cpu)),
                  "1.00", "1.00", "", "")
        for v, inst in zip(variants[1:], installs, strict=True):
            s = res[v.name]
            ratio, cpu_ratio = median(s.wall) / median(base.wall), median(s.cpu) / median(base.cpu)
            graded = inst.graded
            table.add(label, v.name, ms(median(s.wall)), f"{ms(quantile(s.wall, 0.1))} - {ms(quantile(s.wall, 0.9))}",
                      ms(median(s.cpu)), f"{ratio:.2f}", f"{cpu_ratio:.2f}", f"<= {TARGET}" if graded else "",
                      verdict(ratio <= TARGET) if graded else "")
        rounds_done = len(base.wall)
    table.notes.append(f"{rounds_done} interleaved rounds per interpreter; every variant printed an ExecCredential "
                       "for the same cached session first (each launcher's first run, which wrote its interpreter "
                       "into its first line: the graded rows are every later run).  pipx installs are measured with "
                       "the first interpreter, through pipx's link in its bin directory, without PIPX_HOME.")
    return table
