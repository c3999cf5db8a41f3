"""Sections 1 and 2: what one kubectl call pays for its credential, against a bare interpreter and a static token."""

from __future__ import annotations

import json
import os
import secrets
from collections.abc import Mapping, Sequence
from pathlib import Path

from bench.harness import BenchError, Samples, Table, Variant, check_output, median, ms, quantile, round_robin, verdict
from bench.rig import EXEC_INFO_V1BETA1, PY, SHIM, Daemon, login_args
from tests.support.kube import (
    kubectl_env,
    start_apiserver,
    versioned_kubectl,
    write_kubeconfig,
    write_static_token_kubeconfig,
)

SHIM_TARGET = 1.25  # shim / bare interpreter
KUBECTL_TARGET = 1.12  # kubectl with the direct form / kubectl with a static token


def _row(table: Table, name: str, s: Samples, base: Samples, target: float | None, target_text: str) -> None:
    ratio = median(s.wall) / median(base.wall)
    cpu_ratio = median(s.cpu) / median(base.cpu)
    ok = "" if target is None else verdict(ratio <= target)
    table.add(name, ms(median(s.wall)), f"{ms(quantile(s.wall, 0.1))} - {ms(quantile(s.wall, 0.9))}",
              ms(median(s.cpu)), f"{ratio:.2f}", f"{cpu_ratio:.2f}", target_text, ok)


def _token(stdout: str) -> str:
    doc = json.loads(stdout)
    if doc.get("kind") != "ExecCredential":
        raise BenchError(f"not an ExecCredential: {stdout[:200]!r}")
    return str(doc["status"]["token"])


def shim_start(daemon: Daemon, issuer: str, helpers: Mapping[str, str], rounds: int) -> Table:
    """Section 1: the shim with a cached token vs the bare interpreter (the target's base) vs a C client (floor)."""
    args = login_args(issuer)
    env = dict(daemon.env)
    env["KUBERNETES_EXEC_INFO"] = EXEC_INFO_V1BETA1  # what kubectl sets for a v1beta1 exec plugin
    console_script = str(Path(PY).parent / "kubectl-oidc_login")
    bare = Variant("`python -I -S -c pass` (same interpreter)", [PY, "-I", "-S", "-c", "pass"], env)
    shim = Variant("shim, direct form: `python -I -S shim.py get-token ...`", [PY, "-I", "-S", SHIM, *args], env)
    floor = Variant("C client of the same socket (floor)", [helpers["client"], *args], env)
    script = Variant("`kubectl-oidc_login get-token ...` (installed launcher, pip -e)", [console_script, *args], env)
    variants = [bare, shim, floor, script]
    tokens = {_token(check_output(v.argv, v.env)) for v in variants[1:]}
    if len(tokens) != 1:
        raise BenchError("the shim, the C client and the console script were served different tokens")
    res = round_robin(variants, rounds)
    table = Table("1. Shim end to end, cached token (one process per call)",
                  ["variant", "median wall", "p10 - p90", "median CPU", "x bare (wall)", "x bare (CPU)", "target",
                   ""])
    base = res[bare.name]
    for v in variants:
        target = SHIM_TARGET if v is shim else None
        _row(table, v.name, res[v.name], base, target, f"<= {SHIM_TARGET}" if target else "")
    over = median(res[shim.name].wall) - median(base.wall)
    table.notes.append(f"{len(base.wall)} interleaved rounds. The shim costs {over * 1000:.1f} ms over the bare "
                       f"interpreter; the C client shows what the socket round trip itself costs.")
    return table


def kubectl_call(daemon: Daemon, issuer: str, helpers: Mapping[str, str], workdir: Path, rounds: int) -> Table:
    """Section 2: a whole `kubectl get --raw /version`, credential from the shim (two forms) or a static token."""
    kubectl = versioned_kubectl("1.32")
    args = login_args(issuer)
    static_token = secrets.token_urlsafe(32)
    api_dir = workdir / "apiserver"
    api_dir.mkdir()
    with start_apiserver(issuer, static_token=static_token, workdir=api_dir) as api:
        dropin = write_kubeconfig(workdir / "kc-dropin", api.url, api.ca_file, ["oidc-login", *args],
                                  exec_command="kubectl", kubectl=kubectl)
        # The direct form as a user gets it: the seed (drop-in) kubeconfig, converted by `brokerd kubeconfig`.
        direct = workdir / "kc-direct"
        direct.write_text(dropin.read_text())
        check_output([PY, "-m", "brokerd", "kubeconfig", "convert", "--kubeconfig", str(direct)], daemon.env)
        if SHIM not in direct.read_text():
            raise BenchError("brokerd kubeconfig convert did not write the direct form")
        floor = write_kubeconfig(workdir / "kc-floor", api.url, api.ca_file, args, exec_command=helpers["client"],
                                 kubectl=kubectl)
        static = write_static_token_kubeconfig(workdir / "kc-static", api.url, api.ca_file, static_token,
                                               kubectl=kubectl)
        # `kubectl oidc-login` must find the same real kubectl (not /usr/bin's version dispatcher) and then the
        # venv's kubectl-oidc_login console script, as a user's PATH would.
        bindir = workdir / "bin"
        bindir.mkdir()
        (bindir / "kubectl").symlink_to(kubectl)
        base_env = dict(daemon.env)
        base_env["PATH"] = f"{bindir}{os.pathsep}{base_env['PATH']}"

        def variant(name: str, kubeconfig: Path) -> Variant:
            env = kubectl_env(kubeconfig, base_env, cache_dir=workdir / f"cache-{kubeconfig.name}")
            return Variant(name, [kubectl, "get", "--raw", "/version"], env)

        v_static = variant("static token in the kubeconfig", static)
        v_direct = variant("converted form (`brokerd kubeconfig convert`: /abs/python -I -S /abs/shim.py)", direct)
        v_dropin = variant("seed form (`kubectl oidc-login get-token`, installed launcher)", dropin)
        v_floor = variant("C client of the socket as the exec plugin (floor)", floor)
        variants = [v_static, v_direct, v_dropin, v_floor]
        api.reset()
        for v in variants:
            if '"gitVersion"' not in check_output(v.argv, v.env):
                raise BenchError(f"{v.name}: kubectl printed no version")
        _check_users(api.log(), ["static", *[f"{issuer}#"] * 3])
        api.reset()
        res = round_robin(variants, rounds, max_seconds=150)
        log = api.log()
        if log["unauthorized"]:
            raise BenchError(f"the API server refused {log['unauthorized']} token(s) during the run")
    table = Table(f"2. A whole `kubectl get --raw /version` ({Path(kubectl).name}, HTTPS, token checked)",
                  ["credential", "median wall", "p10 - p90", "median CPU", "x static (wall)", "x static (CPU)",
                   "target", ""])
    base = res[v_static.name]
    _row(table, v_static.name, base, base, None, "")
    _row(table, v_direct.name, res[v_direct.name], base, KUBECTL_TARGET, f"<= {KUBECTL_TARGET}")
    _row(table, v_dropin.name, res[v_dropin.name], base, None, "")
    _row(table, v_floor.name, res[v_floor.name], base, None, "")
    table.notes.append(f"{len(base.wall)} interleaved rounds; {len(log['requests'])} authenticated requests, "
                       f"0 refused. client-go caches exec credentials only inside one process, so every call runs "
                       f"the plugin.")
    return table


def _check_users(log: Mapping[str, object], expected_prefixes: Sequence[str]) -> None:
    requests = log["requests"]
    assert isinstance(requests, list)
    users = [str(r["user"]) for r in requests]
    if len(users) != len(expected_prefixes) or not all(
            u.startswith(p) for u, p in zip(users, expected_prefixes, strict=True)):
        raise BenchError(f"unexpected API server users {users} (expected {list(expected_prefixes)})")
