"""Drive the real kubectl against the test API server (tests/support/apiserver.py) in tests.

Facts this module is built around (checked on the dev machines):

- kubectl on PATH (/usr/bin/kubectl) is Google's kubectl *dispatcher*. Before running anything it GETs ``/version``
  (5 s timeout, ``Cache-Control: max-age=3600``) with the kubeconfig's credentials -- which runs the exec plugin --
  and then execve()s ``kubectl.<major>.<minor>`` beside it (same PID), or its built-in kubectl when that fails. The
  answer is kept in ``$KUBECACHEDIR/http`` for an hour, so only the first call per API server URL and cache dir pays
  for it (and runs the plugin one extra time). ``run_kubectl`` therefore always sets KUBECACHEDIR (never
  ~/.kube/cache); the API server's ``server_version`` picks which real kubectl the dispatcher runs.
- Kubeconfigs are written with a *versioned* binary (no dispatcher, so no server round trip), with an explicit
  ``--kubeconfig``, exactly as a user following the Authelia guide would type the commands.
- The dispatcher runs the exec plugin on *every* call, even when /version comes from its cache. When the server's
  minor version is the dispatcher's own (1.32: it is built from kubectl v1.32.4) it runs the command itself and
  reuses that credential: one plugin run per call. For any other version it execs kubectl.1.x, which runs the
  plugin again: two runs per call. kubectl.1.3x called directly runs it once.
- With ``--exec-command=kubectl --exec-arg=oidc-login`` (the Authelia guide's form) and no ``kubectl-oidc_login``
  on PATH, the dispatcher treats ``oidc-login`` as a command, GETs /version, which runs the plugin, which is
  kubectl again: an unbounded chain of processes. run_kubectl kills kubectl's process group when it grows past
  ``max_procs``.
- kubectl hands its whole environment to the exec plugin (client-go appends the kubeconfig's ``env`` to
  ``os.Environ()``), so ``--exec-env`` is never needed to pass PATH, HOME, BROKERD_* or BROWSER through.
"""

from __future__ import annotations

import contextlib
import json
import os
import selectors
import shutil
import signal
import ssl
import subprocess
import sys
import tempfile
import threading
import time
import urllib.request
from collections.abc import Mapping, Sequence
from pathlib import Path
from types import TracebackType
from typing import Any

import pytest

APISERVER_SCRIPT = Path(__file__).with_name("apiserver.py")
EXEC_V1BETA1 = "client.authentication.k8s.io/v1beta1"
EXEC_V1 = "client.authentication.k8s.io/v1"


def find_kubectl() -> str | None:
    """kubectl on PATH: on the dev machines Google's version dispatcher (/usr/bin/kubectl), elsewhere the
    distribution's kubectl or a Kubernetes release binary."""
    return shutil.which("kubectl")


needs_kubectl = pytest.mark.skipif(find_kubectl() is None, reason="kubectl is not on PATH")


def kubectl_on_path() -> str:
    found = find_kubectl()
    if found is None:
        raise FileNotFoundError("no kubectl on PATH")
    return found


def versioned_kubectl(version: str = "1.32") -> str:
    """A real (non-dispatching) kubectl: kubectl.<version> beside the dispatcher that kubectl on PATH resolves to
    (it lives beside kubectl.1.27 ... kubectl.1.33); elsewhere kubectl on PATH itself."""
    found = kubectl_on_path()
    candidate = Path(os.path.realpath(found)).parent / f"kubectl.{version}"
    if candidate.is_file() and os.access(candidate, os.X_OK):
        return str(candidate)
    return found


class ApiServer:
    """A running apiserver.py process. Use as a context manager or call stop()."""

    def __init__(self, process: subprocess.Popen[bytes], url: str, ca_file: Path, workdir: Path,
                 owns_workdir: bool) -> None:
        self.process = process
        self.pid = process.pid
        self.url = url
        self.ca_file = ca_file
        self._workdir = workdir
        self._owns_workdir = owns_workdir
        self._ssl = ssl.create_default_context(cafile=str(ca_file))

    def _call(self, method: str, path: str) -> Any:
        req = urllib.request.Request(self.url + path, method=method, data=b"" if method == "POST" else None)
        with urllib.request.urlopen(req, context=self._ssl, timeout=5) as resp:
            return json.load(resp)

    def log(self) -> dict[str, Any]:
        """{"requests": [...], "failures": [{"path", "reason", "token_sha256_prefix"}], "unauthorized": N,
        "forbidden": N}."""
        result: dict[str, Any] = self._call("GET", "/__test/requests")
        return result

    def requests(self) -> list[dict[str, Any]]:
        """Authenticated (or anonymous public) requests: {"path", "method", "user", "groups",
        "token_sha256_prefix"}; groups include system:authenticated like the real API server's."""
        result: list[dict[str, Any]] = self.log()["requests"]
        return result

    def unauthorized(self) -> int:
        """How many requests were answered 401."""
        return int(self.log()["unauthorized"])

    def reset(self) -> None:
        """Forget the request log (for a server shared by a test module)."""
        self._call("POST", "/__test/reset")

    def stop(self) -> None:
        if self.process.poll() is None:
            self.process.send_signal(signal.SIGTERM)
            try:
                self.process.wait(timeout=5)
            except subprocess.TimeoutExpired:
                self.process.kill()
                self.process.wait(timeout=5)
        if self.process.stdout is not None:
            self.process.stdout.close()
        if self._owns_workdir:
            shutil.rmtree(self._workdir, ignore_errors=True)

    def __enter__(self) -> ApiServer:
        return self

    def __exit__(self, exc_type: type[BaseException] | None, exc: BaseException | None,
                 tb: TracebackType | None) -> None:
        self.stop()


def start_apiserver(
    issuer: str,
    client_id: str = "kube_login",
    *,
    username_claim: str = "sub",
    groups_claim: str = "groups",
    static_token: str | None = None,
    server_version: str = "1.32.0",
    workdir: Path | None = None,
    startup_timeout: float = 15.0,
) -> ApiServer:
    """Start apiserver.py on 127.0.0.1 (random port) and wait, bounded, for its URL line.

    server_version is what /version reports; /usr/bin/kubectl then runs kubectl.<major>.<minor>.
    The static token is handed over in a 0600 file, never in argv.
    """
    owns = workdir is None
    wd = Path(tempfile.mkdtemp(prefix="apiserver-")) if workdir is None else workdir
    ca_file = wd / "apiserver-ca.pem"
    argv = [sys.executable, str(APISERVER_SCRIPT), "--issuer", issuer, "--client-id", client_id,
            "--username-claim", username_claim, "--groups-claim", groups_claim, "--port", "0",
            "--ca-file", str(ca_file), "--server-version", server_version]
    if static_token is not None:
        token_file = wd / "apiserver-static-token"
        fd = os.open(token_file, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
        with os.fdopen(fd, "w", encoding="utf-8") as fh:
            fh.write(static_token)
        argv += ["--static-token-file", str(token_file)]
    with open(wd / "apiserver.stderr", "wb") as err:
        proc = subprocess.Popen(argv, stdout=subprocess.PIPE, stderr=err, stdin=subprocess.DEVNULL)
    assert proc.stdout is not None
    line = b""
    deadline = time.monotonic() + startup_timeout
    with selectors.DefaultSelector() as sel:
        sel.register(proc.stdout, selectors.EVENT_READ)
        while not line.endswith(b"\n") and time.monotonic() < deadline and proc.poll() is None:
            if sel.select(timeout=max(0.0, deadline - time.monotonic())):
                chunk = os.read(proc.stdout.fileno(), 256)
                if not chunk:
                    break
                line += chunk
    if not line.startswith(b"https://") or not line.endswith(b"\n"):
        if proc.poll() is None:
            proc.kill()
        proc.wait(timeout=5)
        proc.stdout.close()
        stderr = (wd / "apiserver.stderr").read_text(errors="replace")[-2000:]
        if owns:
            shutil.rmtree(wd, ignore_errors=True)
        raise RuntimeError(f"apiserver did not start within {startup_timeout}s: {line!r}\n{stderr}")
    return ApiServer(proc, line.decode().strip(), ca_file, wd, owns)


def _config_env() -> dict[str, str]:
    env = dict(os.environ)
    env.pop("KUBECONFIG", None)  # --kubeconfig is explicit; never let a stray KUBECONFIG be edited instead
    return env


def _kubectl_config(kubectl: str, kubeconfig: Path, *args: str) -> None:
    subprocess.run([kubectl, "config", f"--kubeconfig={kubeconfig}", *args], check=True, capture_output=True,
                   timeout=30, env=_config_env(), stdin=subprocess.DEVNULL)


def _write_cluster_and_context(kubectl: str, path: Path, server_url: str, ca_file: Path | str, cluster: str,
                               user: str, context: str) -> None:
    _kubectl_config(kubectl, path, "set-cluster", cluster, f"--server={server_url}",
                    f"--certificate-authority={ca_file}", "--embed-certs=true")
    _kubectl_config(kubectl, path, "set-context", context, f"--cluster={cluster}", f"--user={user}")
    _kubectl_config(kubectl, path, "use-context", context)


def write_kubeconfig(
    path: Path | str,
    server_url: str,
    ca_file: Path | str,
    exec_args: Sequence[str],
    exec_command: str = "kubectl",
    api_version: str = EXEC_V1BETA1,
    interactive_mode: str | None = None,
    env: Mapping[str, str] | None = None,
    *,
    user: str = "authelia",
    cluster: str = "test",
    context: str = "test",
    kubectl: str | None = None,
) -> Path:
    """Write an exec-plugin kubeconfig with the real `kubectl config` commands a user would type.

    interactive_mode None leaves it out, as the user would; kubectl then insists on it for the v1 exec API
    ("interactiveMode must be specified"), so pass "IfAvailable" with EXEC_V1. env becomes --exec-env (not
    needed to pass the caller's environment through; see the module docstring).
    """
    kc = Path(path)
    binary = kubectl or versioned_kubectl()
    cred = ["set-credentials", user, f"--exec-api-version={api_version}", f"--exec-command={exec_command}"]
    cred += [f"--exec-arg={arg}" for arg in exec_args]
    if interactive_mode is not None:
        cred.append(f"--exec-interactive-mode={interactive_mode}")
    cred += [f"--exec-env={k}={v}" for k, v in (env or {}).items()]
    _kubectl_config(binary, kc, *cred)
    _write_cluster_and_context(binary, kc, server_url, ca_file, cluster, user, context)
    return kc


def write_static_token_kubeconfig(
    path: Path | str,
    server_url: str,
    ca_file: Path | str,
    token: str,
    *,
    user: str = "static",
    cluster: str = "test",
    context: str = "test",
    kubectl: str | None = None,
) -> Path:
    """A kubeconfig with an inline bearer token (users[].user.token), like `set-credentials --token`.

    The token is put in by rewriting the file as JSON (kubectl reads JSON kubeconfigs) so it never appears in
    a child's argv. The file stays 0600.
    """
    kc = Path(path)
    binary = kubectl or versioned_kubectl()
    _kubectl_config(binary, kc, "set-credentials", user)
    _write_cluster_and_context(binary, kc, server_url, ca_file, cluster, user, context)
    out = subprocess.run([binary, "config", "view", "--raw", "-o", "json", f"--kubeconfig={kc}"], check=True,
                         capture_output=True, timeout=30, env=_config_env(), stdin=subprocess.DEVNULL)
    config = json.loads(out.stdout)
    for entry in config["users"]:
        if entry["name"] == user:
            entry["user"] = {"token": token}
    tmp = kc.with_name(kc.name + ".tmp")
    fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
    with os.fdopen(fd, "w", encoding="utf-8") as fh:
        json.dump(config, fh, indent=2)
    tmp.replace(kc)
    return kc


def kubectl_env(kubeconfig: Path | str, env: Mapping[str, str] | None = None,
                cache_dir: Path | str | None = None) -> dict[str, str]:
    """The environment run_kubectl gives kubectl: ours, KUBECONFIG, a private KUBECACHEDIR, then env."""
    kc = Path(kubeconfig)
    result = dict(os.environ)
    result["KUBECONFIG"] = str(kc)
    # Default: a cache dir beside the kubeconfig, so each test's kubeconfig has its own discovery/version cache.
    result["KUBECACHEDIR"] = str(cache_dir if cache_dir is not None else kc.parent / f".{kc.name}.kubecache")
    result.update(env or {})
    return result


def _group_size(pgid: int) -> int:
    """How many live processes are in the process group (Linux /proc; 0 elsewhere)."""
    count = 0
    with contextlib.suppress(OSError), os.scandir("/proc") as entries:
        for entry in entries:
            if not entry.name.isdigit():
                continue
            try:
                with open(f"/proc/{entry.name}/stat", "rb") as fh:
                    data = fh.read()
            except OSError:
                continue
            fields = data[data.rfind(b")") + 2:].split()  # state, ppid, pgrp, ...
            if len(fields) > 2 and int(fields[2]) == pgid:
                count += 1
    return count


class ProcessChainError(RuntimeError):
    """kubectl's process group grew past max_procs and was killed (typically exec plugin recursion)."""


def _kill_group(pgid: int) -> None:
    with contextlib.suppress(ProcessLookupError, PermissionError):
        os.killpg(pgid, signal.SIGKILL)


def run_kubectl(
    args: Sequence[str],
    kubeconfig: Path | str,
    env: Mapping[str, str] | None = None,
    timeout: float = 30.0,
    kubectl: str | None = None,
    *,
    cache_dir: Path | str | None = None,
    input: str | None = None,
    max_procs: int = 40,
) -> subprocess.CompletedProcess[str]:
    """Run kubectl once, bounded by timeout; never raises on a non-zero exit (check .returncode).

    env is merged over os.environ (kubectl passes all of it to the exec plugin). kubectl runs in its own
    session, so on timeout, or when that group holds more than max_procs processes, kubectl and every plugin
    it started are killed together by its PID's group (TimeoutExpired / ProcessChainError). A daemon that a
    plugin starts must leave the group (setsid) to outlive the call.
    """
    full_env = kubectl_env(kubeconfig, env, cache_dir)
    proc = subprocess.Popen([kubectl or kubectl_on_path(), *args], env=full_env, text=True, start_new_session=True,
                            stdin=subprocess.PIPE if input is not None else subprocess.DEVNULL,
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE)
    done, tripped = threading.Event(), threading.Event()

    def watch() -> None:
        while not done.wait(0.1):
            if _group_size(proc.pid) > max_procs:
                tripped.set()
                _kill_group(proc.pid)
                return

    watcher = threading.Thread(target=watch, name=f"kubectl-{proc.pid}-watch", daemon=True)
    watcher.start()
    try:
        stdout, stderr = proc.communicate(input, timeout=timeout)
    except subprocess.TimeoutExpired:
        _kill_group(proc.pid)
        stdout, stderr = proc.communicate(timeout=5)
        raise subprocess.TimeoutExpired(proc.args, timeout, stdout, stderr) from None
    finally:
        done.set()
        watcher.join(timeout=5)
    if tripped.is_set():
        raise ProcessChainError(f"kubectl {list(args)} grew past {max_procs} processes; killed. {stderr[-500:]}")
    return subprocess.CompletedProcess(proc.args, proc.returncode, stdout, stderr)
