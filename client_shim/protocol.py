"""The socket protocol between the shim and the daemon: the one definition (docs/architecture.md describes it).

The daemon (brokerd/server.py), the shim (client_shim/core.py), the CLI, the tests and the benchmarks all use this
module; nothing else spells the magic, the field tags, the reply kinds or the forwarded environment.  It is on
kubectl's hot path, so it imports only what the shim has already loaded (``_socket``, ``posix``, ``sys``) and
builds nothing costly at import.

Request, client -> daemon: NUL-separated fields ended by an empty field (``\\0\\0``): the magic, then ``N<program>``,
``A<arg>`` per argv element, ``E<NAME>=<value>`` per forwarded variable, ``T1``/``T0`` (stdin is a terminal).
Reply, daemon -> client: ``\\n``-ended UTF-8 lines whose first byte is their kind (``M``, ``O``, ``X``, ``Q``,
``S``); the client answers a ``Q``/``S`` prompt with ``R<answer>\\0``.
"""

import _socket
import sys

MAGIC = b"brokerd1"
END = b"\0\0"  # a request ends with an empty field
MAX_REQUEST = 64 * 1024

ARG, ENV, PROGRAM, TTY = "A", "E", "N", "T"

# Reply line kinds.
MESSAGE = b"M"  # text for the person (stderr); may repeat
RESULT = b"O"  # the result (stdout); terminal
ERROR = b"X"  # "<exit code> <text>" (stderr, exit code); terminal
ASK = b"Q"  # a prompt the person answers, echoed
ASK_SECRET = b"S"  # a prompt the person answers, not echoed (passwords)
ANSWER = b"R"  # client -> daemon: the answer to a prompt, ended by NUL
TERMINAL = (RESULT, ERROR)
LINE_KINDS = (MESSAGE, RESULT, ERROR, ASK, ASK_SECRET)

# The caller's environment the daemon may see.  DESKTOP_ENV says where a browser would open and where a
# notification would show (the session bus): a remote shim (BROKERD_REMOTE=1, docs/remote.md) does not send it,
# since its desktop is elsewhere, and the daemon drops it for forwarded callers.
FORWARDED_ENV = ("KUBERNETES_EXEC_INFO", "BROWSER", "DISPLAY", "WAYLAND_DISPLAY", "DBUS_SESSION_BUS_ADDRESS",
                 "BROKERD_PROFILE")
DESKTOP_ENV = ("BROWSER", "DISPLAY", "WAYLAND_DISPLAY", "DBUS_SESSION_BUS_ADDRESS")
_FORWARDED_B = tuple(name.encode() for name in FORWARDED_ENV)
_DESKTOP_B = tuple(name.encode() for name in DESKTOP_ENV)

# One daemon per state directory (brokerd/statelock.py): the lock file in it names its holder.  An autostarted
# daemon that finds it held exits with STATE_DIR_BUSY_EXIT, and the shim then prints STATE_DIR_BUSY as well.
STATE_LOCK_NAME = "daemon.lock"
STATE_DIR_BUSY_EXIT = 75
STATE_DIR_BUSY = ("another brokerd ({holder}) already uses the state directory {path}; use that daemon (set "
                  "BROKERD_SOCKET to its socket) or stop it first")


# The one line either side prints when the socket's directory or listener is not the user's own (issue 11.5).
FOREIGN_LISTENER = "refusing the socket {path}: it is served by uid {uid}, not by you"


class ProtocolViolation(ValueError):
    """Bytes that are not a request of this protocol version (the daemon turns it into its ProtocolError)."""


class Request:
    """A decoded request.  Not a dataclass: importing dataclasses costs the shim milliseconds."""

    __slots__ = ("argv", "env", "program", "stdin_tty")

    def __init__(self, argv: "tuple[str, ...]", env: "dict[str, str]", stdin_tty: bool, program: str) -> None:
        self.argv = argv
        self.env = env
        self.stdin_tty = stdin_tty
        self.program = program

    def __repr__(self) -> str:
        return f"Request(argv={self.argv!r}, env={self.env!r}, stdin_tty={self.stdin_tty}, program={self.program!r})"


def forwarded_env(environ: "dict[bytes, bytes]", remote: bool) -> "dict[bytes, bytes]":
    """The part of ``environ`` a shim sends: FORWARDED_ENV, without DESKTOP_ENV when the daemon is remote."""
    return {name: environ[name] for name in _FORWARDED_B
            if name in environ and not (remote and name in _DESKTOP_B)}


def encode_request(argv: "list[str] | tuple[str, ...]", env: "dict[bytes, bytes]", *, tty: bool,
                   program: str) -> bytes:
    """The request bytes.  ``env`` is sent as given (shims pass ``forwarded_env``; tests may send anything)."""
    fields = [MAGIC, b"N" + program.encode("utf-8", "surrogateescape")]
    fields += [b"A" + a.encode("utf-8", "surrogateescape") for a in argv]
    fields += [b"E" + name + b"=" + value for name, value in env.items()]
    fields.append(b"T1" if tty else b"T0")
    return b"\0".join(fields) + END


def decode_request(data: bytes) -> Request:
    """Parse one request, with or without its final ``\\0\\0``.  Only FORWARDED_ENV is kept of the environment.

    Bytes that are not UTF-8 are kept as surrogates (``surrogateescape``) so argv round-trips; everything that
    writes them back out must use an error handler.
    """
    if data.endswith(END):
        data = data[:-2]
    fields = data.split(b"\0")
    if fields[0] != MAGIC:
        raise ProtocolViolation("not a brokerd request (protocol version mismatch? upgrade the shim and the daemon)")
    argv: list[str] = []
    env: dict[str, str] = {}
    tty = False
    program = ""
    for raw in fields[1:]:
        if not raw:
            continue
        text = raw.decode("utf-8", "surrogateescape")
        tag, value = text[0], text[1:]
        if tag == ARG:
            argv.append(value)
        elif tag == ENV:
            name, sep, val = value.partition("=")
            if sep and name in FORWARDED_ENV:
                env[name] = val
        elif tag == TTY:
            tty = value == "1"
        elif tag == PROGRAM:
            program = value
        else:
            raise ProtocolViolation(f"unknown request field tag {tag!r}")
    return Request(tuple(argv), env, tty, program)


# ---- reply lines ---------------------------------------------------------------------------------------------

def _line(kind: bytes, text: str) -> bytes:
    # One line whatever the text holds; a client's own bytes (surrogate-escaped argv) may be quoted back.
    return kind + text.encode("utf-8", "backslashreplace") + b"\n"


def message_line(text: str) -> bytes:
    return b"".join(_line(MESSAGE, line) for line in text.splitlines() or [""])


def result_line(text: str) -> bytes:
    return _line(RESULT, text)


def error_line(code: int, text: str) -> bytes:
    return _line(ERROR, f"{code} {' '.join(text.splitlines())}")


def prompt_line(prompt: str, *, secret: bool) -> bytes:
    return _line(ASK_SECRET if secret else ASK, " ".join(prompt.splitlines()))


def answer_field(answer: bytes) -> bytes:
    return ANSWER + answer.replace(b"\0", b"") + b"\0"


def parse_error(body: bytes) -> "tuple[int, str]":
    """An ``X`` line's body -> (exit code, text); a code that is not a positive number becomes 1."""
    code, _, text = body.partition(b" ")
    return (int(code) if code.isdigit() and 0 < len(code) < 4 and int(code) > 0 else 1), text.decode("utf-8", "replace")


def for_terminal(text: str) -> str:
    """``text`` safe to show a person: control and other non-printable characters (ESC sequences that would rewrite
    the terminal or its title, bidi overrides) become visible escapes.  A plain line costs one C-level scan."""
    if text.isprintable():
        return text
    return "".join(c if c.isprintable() else repr(c)[1:-1] for c in text)


# ---- who is at the other end ---------------------------------------------------------------------------------

def peer_credentials(sock: "_socket.socket") -> "tuple[int | None, int]":
    """(pid or None, uid) of the process at the other end of a connected Unix socket.

    Linux: SO_PEERCRED's ``struct ucred`` (pid_t, uid_t, gid_t; the uid is unsigned: uids of 2**31 and above
    exist).  macOS and the BSDs: LOCAL_PEERCRED's ``struct xucred`` (u_int version, uid_t uid, ...).  Elsewhere
    OSError: a caller must refuse rather than skip the check.
    """
    peercred = getattr(_socket, "SO_PEERCRED", None)
    if peercred is not None:
        creds = sock.getsockopt(_socket.SOL_SOCKET, peercred, 12)
        return int.from_bytes(creds[0:4], sys.byteorder, signed=True), int.from_bytes(creds[4:8], sys.byteorder)
    local = getattr(_socket, "LOCAL_PEERCRED", None)
    if local is not None:
        creds = sock.getsockopt(getattr(_socket, "SOL_LOCAL", 0), local, 76)
        return None, int.from_bytes(creds[4:8], sys.byteorder)
    raise OSError("this platform has neither SO_PEERCRED nor LOCAL_PEERCRED: cannot tell who is on the socket")


def private_dir_problem(path: str, st_uid: int, st_mode: int, uid: int) -> "str | None":
    """The line both sides print (after ``brokerd: ``) when a socket's directory is not the user's own private
    directory, or None.

    Whoever owns the directory (or may write it) can put their own listener there and read what the shim sends:
    kubectl's arguments, a client secret, a password typed at a prompt.
    """
    if st_mode & 0o170000 != 0o040000:
        why = "it is not a directory"
    elif st_uid != uid:
        why = f"it is owned by uid {st_uid}"
    elif st_mode & 0o777 != 0o700:
        why = f"its mode is {st_mode & 0o777:04o}"
    else:
        return None
    return f"refusing the directory {path}: {why} (it must be yours with mode 0700)"


def peer_check_available() -> bool:
    return hasattr(_socket, "SO_PEERCRED") or hasattr(_socket, "LOCAL_PEERCRED")
