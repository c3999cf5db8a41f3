"""Issue 14.1: the shim ends its process without the interpreter's teardown (about 1.3 ms of a kubectl call),
and loses nothing by it: what help and version print through sys.stdout is flushed, exit codes stay."""

from __future__ import annotations

import json
import os
import select
import subprocess
import sys
import time

from tests.support.daemon import ROOT, Daemon, login_args
from tests.support.pipes import full_nonblocking_pipe, read_until_exit
from tests.support.provider import TestProvider

# An atexit handler stands in for the teardown: it runs only if the interpreter finalizes.
CHILD = r"""
import atexit, os, sys
sys.path.insert(0, sys.argv[1])
atexit.register(lambda: os.write(2, b"teardown ran\n"))
sys.argv = ["kubectl-oidc_login", *sys.argv[2:]]
from client_shim.core import run
run()
"""


def _child(*args: str) -> subprocess.CompletedProcess[str]:
    env = dict(os.environ, BROKERD_SOCKET="/nonexistent/brokerd.sock", BROKERD_NO_AUTOSTART="1")
    return subprocess.run([sys.executable, "-c", CHILD, str(ROOT), *args], env=env, capture_output=True, text=True,
                          timeout=60)


def test_run_skips_the_teardown_and_flushes_what_was_printed() -> None:
    version = _child("version")
    assert (version.returncode, version.stdout.startswith("brokerd ")) == (0, True), version
    assert "teardown ran" not in version.stderr
    helped = _child("get-token", "--help")
    assert helped.returncode == 0 and "--oidc-issuer-url" in helped.stdout and "teardown ran" not in helped.stderr


def test_run_keeps_the_exit_code_and_the_line_of_a_failure() -> None:
    failed = _child("get-token", "--oidc-issuer-url=https://example.invalid", "--oidc-client-id=x")
    assert failed.returncode == 3, failed
    assert "no daemon is listening" in failed.stderr and "teardown ran" not in failed.stderr


def test_every_entry_point_kubectl_runs_ends_through_run() -> None:
    """shim.py (the direct form) and the installed launchers call run(), not sys.exit(main())."""
    for path in (ROOT / "client_shim" / "shim.py", *sorted((ROOT / "launchers").iterdir())):
        code = path.read_text()
        assert ("run()" in code or "\nrun(pin=" in code) and "sys.exit(main())" not in code, path


def test_a_full_non_blocking_stdout_gets_the_whole_credential(provider: TestProvider) -> None:
    """kubectl's end of the pipe may hand us a non-blocking stdout: a full pipe then raises EAGAIN, and the shim
    must wait for room rather than give kubectl half a credential."""
    with Daemon() as d:
        args = login_args(provider.issuer, "--username=alice", "--password=alice-password")
        whole = d.shim(args)
        assert whole.returncode == 0, whole.stderr
        read, write = full_nonblocking_pipe()
        try:
            proc = subprocess.Popen(d.shim_argv(args), env=d.env, stdout=write, stderr=subprocess.PIPE,
                                    stdin=subprocess.DEVNULL)
            time.sleep(0.5)  # the shim meets the full pipe
            got = read_until_exit(read, proc, poll=0.2, stop=lambda got: b"}" in got)
            code = proc.wait(timeout=20)
            assert proc.stderr is not None
            errors = proc.stderr.read().decode()
            proc.stderr.close()
            assert code == 0, errors
        finally:
            os.close(write)
        got += os.read(read, 1 << 20) if select.select([read], [], [], 0.5)[0] else b""
        os.close(read)
    credential = got.lstrip(b"x")
    assert json.loads(credential)["status"]["token"] == json.loads(whole.stdout)["status"]["token"]
