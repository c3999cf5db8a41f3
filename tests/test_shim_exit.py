"""Issue 14.1: the shim ends its process without the interpreter's teardown (about 1.3 ms of a kubectl call),
and loses nothing by it: what help and version print through sys.stdout is flushed, exit codes stay."""

from __future__ import annotations

import os
import subprocess
import sys

from tests.support.daemon import ROOT

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
        assert "run()" in code and "sys.exit(main())" not in code, path
