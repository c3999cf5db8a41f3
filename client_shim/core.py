"""kubectl's exec credential plugin: ask the brokerd daemon for a token and print the ExecCredential.

(client_shim/shim.py is the file kubectl runs; it imports this module so that its bytecode is cached.)

This runs on every kubectl call, so it imports almost nothing: ``posix`` and ``_socket`` are built in and already
loaded, ``os``/``json``/``subprocess`` are not (each costs milliseconds).  Run it as
``/abs/python3 -I -S /abs/path/shim.py get-token ...`` for the fastest start.  The daemon does all the work,
including parsing the flags and building the ExecCredential; the shim relays bytes.  stdout carries only the
ExecCredential; everything for the person goes to stderr.  Protocol: client_shim/protocol.py.
"""

import _socket
import posix
import sys

from client_shim import protocol

CONNECT_WAIT = 10.0  # seconds to wait for an autostarted daemon's socket
REPLY_TIMEOUT = 3600.0  # the daemon bounds every login itself; this only guards against a wedged daemon
WRITE_WAIT = 30.0  # seconds a full, non-blocking stdout or stderr may take nothing before the shim gives up


class ShimError(Exception):
    """Why a request to the daemon failed: the exit code and the one line for the person (printed by whoever
    catches it: the shim's main or brokerd's CLI).  ``answered``: the daemon itself said so (it is running)."""

    def __init__(self, code: int, text: str, *, answered: bool = False) -> None:
        super().__init__(text)
        self.code = code
        self.text = text
        self.answered = answered


_stuck: "list[tuple[int, int]]" = []  # (st_dev, st_ino) of what took nothing for WRITE_WAIT s: not waited on again


def write_all(fd: int, data: bytes) -> None:
    """All of ``data`` to ``fd``; a descriptor left non-blocking (a terminal another program set so, a pipe) is
    waited on, up to WRITE_WAIT s of taking nothing, once per file: stdout and stderr may be one pipe (2>&1), and
    what did not drain for WRITE_WAIT s is not waited on again.  OSError when it cannot be written."""
    while data:
        try:
            data = data[posix.write(fd, data):]
        except BlockingIOError:
            import select  # only for a non-blocking descriptor: not on kubectl's usual path

            st = posix.fstat(fd)
            if (st.st_dev, st.st_ino) in _stuck or not select.select([], [fd], [], WRITE_WAIT)[1]:
                _stuck.append((st.st_dev, st.st_ino))
                raise TimeoutError(0, f"nothing could be written for {WRITE_WAIT:g} s") from None


def _err(text: str) -> None:
    """A line for the person on stderr.  Never raises: with stderr gone there is nobody left to tell."""
    try:  # noqa: SIM105 - contextlib would cost an import on kubectl's hot path
        write_all(2, (text + "\n").encode("utf-8", "replace"))
    except OSError:
        pass


S_IFMT = 0o170000
S_IFDIR = 0o040000
S_IFLNK = 0o120000


def _dir_ok(path: bytes, uid: int) -> bool:
    """An ancestor platformdirs accepts: owned by root or us, a directory, not writable by others unless sticky."""
    try:
        st = posix.lstat(path)
        if st.st_mode & S_IFMT == S_IFLNK:
            if st.st_uid not in (0, uid):
                return False
            st = posix.stat(path)
    except FileNotFoundError:
        return True  # a missing ancestor is created private later; nobody else can have planted anything below it
    except OSError:
        return False
    return st.st_uid in (0, uid) and st.st_mode & S_IFMT == S_IFDIR and not (
        st.st_mode & 0o022 and not st.st_mode & 0o1000)


def _runtime_dir_ok(path: bytes, missing_ok: bool) -> bool:
    """platformdirs' test of a runtime dir: ours, mode 0700, not a symlink, below ancestors nobody else controls.

    The daemon takes its socket path from platformdirs, which falls back elsewhere when XDG_RUNTIME_DIR fails this
    test; the shim must come to the same answer or it would knock on a door nobody opens.
    """
    uid = posix.geteuid()
    prefix = b""
    for part in path.split(b"/")[1:-1]:
        if part:
            prefix += b"/" + part
            if not _dir_ok(prefix, uid):
                return False
    try:
        st = posix.lstat(path)
    except FileNotFoundError:
        return missing_ok
    except OSError:
        return False
    return st.st_mode & S_IFMT == S_IFDIR and st.st_uid == uid and st.st_mode & 0o777 == 0o700


def _clean(path: bytes, resolve_dotdot: bool = False) -> bytes:
    """pathlib's spelling of a path (no empty or "." parts), which is what the daemon binds; with
    ``resolve_dotdot`` also os.path.normpath's (tempfile.gettempdir() normalizes its answer that way)."""
    parts: list[bytes] = []
    for part in path.split(b"/"):
        if part in (b"", b"."):
            continue
        if part == b".." and resolve_dotdot:
            if parts:
                parts.pop()
            continue
        parts.append(part)
    joined = b"/".join(parts)
    if path.startswith(b"/"):
        return b"/" + joined
    return joined or b"."


def _tempdir(env: "dict[bytes, bytes]") -> bytes:
    """tempfile.gettempdir() as platformdirs uses it: the first usable of $TMPDIR, $TEMP, $TMP, /tmp, /var/tmp."""
    candidates = [env.get(name, b"") for name in (b"TMPDIR", b"TEMP", b"TMP")]
    for candidate in [*candidates, b"/tmp", b"/var/tmp", b"/usr/tmp"]:
        if candidate.startswith(b"/"):
            candidate = _clean(candidate, resolve_dotdot=True)
            try:
                if posix.stat(candidate).st_mode & S_IFMT == S_IFDIR and posix.access(candidate, posix.W_OK):
                    return candidate
            except OSError:
                continue
    return _clean(posix.getcwdb(), resolve_dotdot=True)


def socket_path(env: "dict[bytes, bytes]") -> bytes:
    """brokerd.paths.socket_path without platformdirs (tests/test_paths.py checks they agree).

    $BROKERD_SOCKET; else brokerd/brokerd.sock in $XDG_RUNTIME_DIR if that is absolute and private; else in
    /run/user/<uid> if that exists and is private; else in <tempdir>/runtime-<uid>.
    """
    explicit = env.get(b"BROKERD_SOCKET")
    if explicit:
        return _clean(explicit)
    runtime = _clean(env.get(b"XDG_RUNTIME_DIR", b""))
    if runtime.startswith(b"/") and runtime != b"/" and _runtime_dir_ok(runtime, missing_ok=True):
        return runtime + b"/brokerd/brokerd.sock"
    uid = posix.geteuid()
    base = b"/run/user/%d" % uid
    if not _runtime_dir_ok(base, missing_ok=False):
        base = _tempdir(env) + b"/runtime-%d" % uid
    return base + b"/brokerd/brokerd.sock"


def _remote(env: "dict[bytes, bytes]") -> bool:
    """BROKERD_REMOTE=1: this shim talks to a daemon on another host through a forwarded socket (docs/remote.md)."""
    return env.get(b"BROKERD_REMOTE", b"") not in (b"", b"0")


def build_request(argv: "list[str]", env: "dict[bytes, bytes]", program: str) -> bytes:
    return protocol.encode_request(argv, protocol.forwarded_env(env, _remote(env)), tty=posix.isatty(0),
                                   program=program)


def _check_dir(directory: bytes) -> bool:
    """False when the directory is missing; ShimError when it is not the user's own 0700 directory."""
    try:
        st = posix.stat(directory)
    except FileNotFoundError:
        return False
    except OSError as exc:
        raise ShimError(3, f"brokerd: cannot use the socket directory {_show(directory)}: {exc.strerror}") from None
    problem = protocol.private_dir_problem(_show(directory), st.st_uid, st.st_mode, posix.geteuid())
    if problem:
        raise ShimError(3, "brokerd: " + problem)
    return True


def _show(path: bytes) -> str:
    return protocol.for_terminal(path.decode("utf-8", "replace"))


def _connect(path: bytes) -> "_socket.socket":
    """Connect, then make sure the listener is our own uid before a byte is sent (SO_PEERCRED)."""
    sock = _socket.socket(_socket.AF_UNIX, _socket.SOCK_STREAM)
    try:
        sock.connect(path)
        try:
            _pid, uid = protocol.peer_credentials(sock)
        except OSError as exc:
            raise ShimError(3, f"brokerd: cannot check who serves {_show(path)}: {exc.strerror or exc}") from None
        if uid != posix.geteuid():
            raise ShimError(3, "brokerd: " + protocol.FOREIGN_LISTENER.format(path=_show(path), uid=uid))
    except BaseException:
        sock.close()
        raise
    return sock


# How the shim starts a Python brokerd (the daemon, or the CLI for clean/setup/install-systemd).  kubectl runs us
# wherever the user is: `-m` puts the current directory first on sys.path (-P), and so does an empty PYTHONPATH entry
# (`export PYTHONPATH=$PYTHONPATH:/x` with it unset: -E).  The user site stays (a `pip install --user` brokerd).
PYTHON_FLAGS = (b"-E", b"-P")


def child_env(env: "dict[bytes, bytes]") -> "dict[bytes, bytes]":
    """``env`` for a Python brokerd starts, without a relative PYTHONUSERBASE or HOME: site.py reads them itself,
    -E or not, and a relative one would put a directory below the current one on sys.path (a quoted
    ``"~/.pyuser"``).  Without HOME, Python asks the password database."""
    return {k: v for k, v in env.items() if k not in (b"PYTHONUSERBASE", b"HOME") or v.startswith(b"/")}


def _autostart(path: bytes, env: "dict[bytes, bytes]") -> "_socket.socket":
    # Cold path: a daemon must be started.  Heavier imports are fine here.
    import fcntl
    import os
    import time

    directory = os.path.dirname(path) or b"."  # BROKERD_SOCKET=x.sock: beside it, as connect() checked
    missing = []
    parent = directory
    while parent not in (b"", b"/") and not os.path.isdir(parent):
        missing.append(parent)
        parent = os.path.dirname(parent)
    for level in reversed(missing):  # every level private, not just the last (os.makedirs applies mode to the leaf)
        try:
            os.mkdir(level, 0o700)
        except FileExistsError:
            continue  # another shim won the race to create it (or someone else did: checked below)
    _check_dir(directory)
    # One starter at a time: shims that lose the race wait here, then find the winner's socket.
    lock = os.open(directory + b"/autostart.lock", os.O_RDWR | os.O_CREAT | os.O_CLOEXEC, 0o600)
    try:
        fcntl.flock(lock, fcntl.LOCK_EX)
        try:
            return _connect(path)
        except OSError:
            pass
        # BROKERD_DAEMON_COMMAND: a test hook (a wrapper that records its start), not a setting.
        command = env.get(b"BROKERD_DAEMON_COMMAND")
        if command:
            argv = command.split()
            if not argv or not argv[0].startswith(b"/"):
                raise ShimError(3, "brokerd: BROKERD_DAEMON_COMMAND must start with an absolute path (it would run "
                                   "from the current directory)")
        elif sys.executable.startswith("/"):
            if not os.access(sys.executable, os.X_OK):
                raise ShimError(3, f"brokerd: no python at {_show(os.fsencode(sys.executable))} to start the daemon "
                                   "with; reinstall brokerd")
            argv = [os.fsencode(sys.executable), *PYTHON_FLAGS, b"-m", b"brokerd", b"serve"]
        else:
            raise ShimError(3, "brokerd: cannot tell which python runs this shim, so it cannot start the daemon; run "
                               "`brokerd serve`")
        argv.append(b"--autostarted")
        null = os.open(os.devnull, os.O_RDWR)
        try:
            # Own session, stdio on /dev/null: kubectl waits for our stdout to close, so the daemon must not hold it.
            pid = os.posix_spawn(argv[0], argv, child_env(env), file_actions=[
                (os.POSIX_SPAWN_DUP2, null, 0), (os.POSIX_SPAWN_DUP2, null, 1), (os.POSIX_SPAWN_DUP2, null, 2),
            ], setsid=True)
        finally:
            os.close(null)
        deadline = time.monotonic() + CONNECT_WAIT
        while time.monotonic() < deadline:
            try:
                return _connect(path)
            except OSError:
                pass
            done, status = os.waitpid(pid, os.WNOHANG)
            if done and os.waitstatus_to_exitcode(status) == protocol.STATE_DIR_BUSY_EXIT:
                raise ShimError(3, "brokerd: " + _state_dir_busy(env))
            if done:
                raise ShimError(3, "brokerd: the daemon exited at start (status "
                                   f"{os.waitstatus_to_exitcode(status)}); run `brokerd serve` to see why")
            time.sleep(0.02)
        raise ShimError(3, f"brokerd: started the daemon but it did not answer within {CONNECT_WAIT:.0f} s")
    finally:
        os.close(lock)


def _state_dir_busy(env: "dict[bytes, bytes]") -> str:
    """The line for an autostarted daemon that found its state directory held by another daemon (whose socket
    path differs from ours): who holds it, as the lock file says (brokerd.paths.state_dir without platformdirs)."""
    import os

    state = env.get(b"BROKERD_STATE_DIR", b"")
    if not state:
        xdg = env.get(b"XDG_STATE_HOME", b"")
        base = xdg if xdg.startswith(b"/") else os.path.expanduser(b"~/.local/state")
        state = base + b"/brokerd"
    state = _clean(state)
    holder = ""
    try:
        # Non-blocking and regular files only: a FIFO planted there must not hang the message that explains it.
        fd = os.open(os.path.join(state, protocol.STATE_LOCK_NAME.encode()),
                     os.O_RDONLY | os.O_NONBLOCK | os.O_NOFOLLOW | os.O_CLOEXEC)
        try:
            if os.fstat(fd).st_mode & S_IFMT == 0o100000:
                holder = os.read(fd, 512).decode("utf-8", "replace").strip()
        finally:
            os.close(fd)
    except OSError:
        pass
    return protocol.STATE_DIR_BUSY.format(holder=protocol.for_terminal(holder) or "unknown", path=_show(state))


def connect(env: "dict[bytes, bytes]", *, autostart: bool = True) -> "_socket.socket":
    path = socket_path(env)
    try:
        if _check_dir(path.rpartition(b"/")[0] or b"."):
            return _connect(path)
    except (FileNotFoundError, ConnectionRefusedError):
        pass  # nothing listens: the cases below
    except OSError as exc:
        raise ShimError(3, f"brokerd: cannot connect to {_show(path)}: {exc.strerror or exc}") from None
    if _remote(env):
        # Never start a daemon on the remote host: the one that can open the browser is at the other end.
        raise ShimError(3, f"brokerd: nothing answers on the forwarded socket {_show(path)}; is the ssh "
                           "connection with -R up? (docs/remote.md)")
    if not autostart or env.get(b"BROKERD_NO_AUTOSTART", b"") not in (b"", b"0"):
        raise ShimError(3, f"brokerd: no daemon is listening on {_show(path)} (start it with `brokerd serve`, "
                           "or unset BROKERD_NO_AUTOSTART)")
    return _autostart(path, env)


def _ask(sock: "_socket.socket", prompt: str, secret: bool) -> None:
    try:
        tty = open("/dev/tty", "r+b", buffering=0)  # noqa: SIM115 - closed below
    except OSError:
        sock.sendall(protocol.answer_field(b""))
        return
    prompt = protocol.for_terminal(prompt)
    with tty:
        if not secret:
            tty.write(prompt.encode())
            line = tty.readline()
        else:
            import termios

            fd = tty.fileno()
            old = termios.tcgetattr(fd)
            new = termios.tcgetattr(fd)
            new[3] &= ~termios.ECHO
            # Echo goes off before the prompt shows, and now rather than after a flush: what the person types as
            # soon as they see the prompt is neither echoed nor thrown away.
            termios.tcsetattr(fd, termios.TCSANOW, new)
            try:
                tty.write(prompt.encode())
                line = tty.readline()
            finally:
                termios.tcsetattr(fd, termios.TCSANOW, old)
                tty.write(b"\n")
    sock.sendall(protocol.answer_field(line.rstrip(b"\r\n")))


def converse(sock: "_socket.socket", request: bytes) -> bytes:
    """Send the request, show the daemon's messages and prompts to the person, return the result's bytes.
    ShimError when the daemon answers with an error or not at all."""
    sock.settimeout(REPLY_TIMEOUT)
    try:  # noqa: SIM105 - contextlib would cost an import on kubectl's hot path
        sock.sendall(request)
    except (BrokenPipeError, ConnectionResetError):
        pass  # the daemon refused us before reading it all (a peer or load check): its answer says why
    buf = b""
    while True:
        nl = buf.find(b"\n")
        if nl < 0:
            chunk = sock.recv(65536)
            if not chunk:
                raise ShimError(3, "brokerd: the daemon closed the connection without an answer (see its log)")
            buf += chunk
            continue
        line, buf = buf[:nl], buf[nl + 1:]
        kind, body = line[:1], line[1:]
        if kind == protocol.RESULT:
            return body
        if kind == protocol.MESSAGE:
            _err(protocol.for_terminal(body.decode("utf-8", "replace")))
        elif kind == protocol.ERROR:
            code, text = protocol.parse_error(body)
            raise ShimError(code, protocol.for_terminal(text), answered=True)
        elif kind in (protocol.ASK, protocol.ASK_SECRET):
            _ask(sock, body.decode("utf-8", "replace"), kind == protocol.ASK_SECRET)
        else:
            raise ShimError(3, "brokerd: unexpected reply from the daemon (are the shim and daemon the same version?)")


def request(argv: "list[str]", env: "dict[bytes, bytes]", program: str, *, autostart: bool = True) -> bytes:
    """One request to the daemon (connect, maybe autostart, converse): the result's bytes, or ShimError."""
    try:
        sock = connect(env, autostart=autostart)
        try:
            return converse(sock, build_request(argv, env, program))
        finally:
            sock.close()
    except TimeoutError:
        raise ShimError(3, "brokerd: the daemon did not answer in time") from None
    except OSError as exc:
        raise ShimError(3, f"brokerd: lost the connection to the daemon: {exc.strerror or exc}") from None


def main(argv: "list[str] | None" = None) -> int:
    args = sys.argv[1:] if argv is None else argv
    program = sys.argv[0].rpartition("/")[2] if sys.argv and sys.argv[0] else "brokerd-shim"
    if not args or args[0] in ("help", "version", "--version") or "--help" in args or "-h" in args:
        from client_shim.usage import main as usage  # help and version never reach (or start) a daemon

        return usage(args, program)
    if args[:1] in (["clean"], ["setup"], ["install-systemd"]):
        # Not on kubectl's hot path: these run in the full CLI (clean must work without a daemon).
        import os

        if not sys.executable.startswith("/"):
            _err(f"brokerd: cannot tell which python runs this shim; run `brokerd {args[0]}`")
            return 3
        try:
            os.execve(sys.executable, [sys.executable, *(f.decode() for f in PYTHON_FLAGS), "-m", "brokerd", *args],
                      child_env(posix.environ))
        except OSError as exc:
            _err(f"brokerd: cannot run {_show(os.fsencode(sys.executable))}: {exc.strerror or exc}; reinstall brokerd")
            return 3
    try:
        data = request(args, posix.environ, program) + b"\n"
    except ShimError as exc:
        _err(exc.text)
        return exc.code
    except KeyboardInterrupt:
        return 130
    try:
        write_all(1, data)
    except OSError as exc:  # kubectl closed our stdout (it gave up waiting), or stdout is not writable
        _err(f"brokerd: cannot write the credential to stdout: {exc.strerror or exc}")
        return 3
    return 0


def run(pin: bool = False) -> None:
    """main(), then end the process without the interpreter's teardown.

    kubectl waits for the plugin to exit, and tearing down an interpreter (freeing every module and object)
    costs more than all the shim's own work: about 1.3 ms of a bare `python -I -S -c pass`'s 8 ms here
    (bench/run section 1).  Nothing is lost: the token and every message went out with posix.write, nothing is
    registered with atexit, and the text streams (help and version use them) are flushed first.

    ``pin``: the installed launcher ran through its shell part; once everything is out, it writes its interpreter
    into its first line (client_shim/pin.py), quietly and without changing the exit code (one line on stderr only
    when a line gone stale cannot be rewritten: each run then starts Python twice).
    """
    code = main()
    for stream in (sys.stdout, sys.stderr):
        try:
            if stream is not None:
                stream.flush()
        except (OSError, ValueError):
            code = code or 1  # what the interpreter's own exit would report as a failed flush
    if pin and sys.argv and sys.argv[0]:
        try:
            from client_shim import pin as first_line

            try:
                first_line.pin(sys.argv[0], sys.executable)
            except first_line.StaleLine as exc:
                _err(f"brokerd: {protocol.for_terminal(str(exc))}")
        except BaseException:  # noqa: S110 - anything, even ^C: the launcher stays as it was; the answer is out
            pass
    posix._exit(code)


if __name__ == "__main__":
    run()
