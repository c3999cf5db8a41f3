"""The installed launcher's first run writes its interpreter into its first line (issue 14 item 1).

pip installs launchers/kubectl-oidc_login as it is: ``#!/bin/sh``, a shell part that finds the python beside the
file (so a moved venv keeps working), then Python.  The shell is a process more on every kubectl call (0.8 ms, a
tenth of the interpreter's start) and only the first run needs it.  That run (the shell passes ``-X
brokerd.portable``) comes here once the answer is out, and replaces the first line with ``#!<interpreter> -IS``:
the kernel then starts Python itself.  The interpreter named is the first path outside the venv that the venv's
``bin/python`` links to (``/usr/bin/python3``, pyenv's ``.../versions/3.11.7/bin/python3.11``): the same file the
venv runs, now and after the venv moves, and after an upgrade of what that path names, as the venv's own python.

Nothing else changes: the rest of the file is byte for byte the same (``sh`` on it still runs the shell part), the
new file takes the old one's place by rename(2) (a concurrent kubectl reads the old or the new, never half), and
nothing is written unless everything below holds.  It runs in the shim's process, after the token was written,
and never changes the exit code: any failure leaves the launcher as it was, to try again next time.
"""

from __future__ import annotations

import posix
import sys

PORTABLE = b"#!/bin/sh\n"  # the launcher's first line as installed
MARK = b"\n''':'\n# The installed kubectl-oidc_login / brokerd-shim: "  # and what follows it
MAX_SIZE = 64 * 1024
# An older kernel (before 5.1) reads 128 bytes of a script's start for the "#!" line and cuts the rest off.
MAX_LINE = 127
HOPS = 40
S_IFMT, S_IFREG = 0o170000, 0o100000
# Only posix (loaded with the interpreter): where a launcher cannot be written (a venv made with --copies, a
# read-only or another user's install), every run comes here, and `import os` alone would cost it a millisecond.


def _resolve(path: str) -> str:
    """``path`` absolute, with its last component's symlinks followed (as the launcher finds its own directory)."""
    for _ in range(HOPS):
        try:
            target = posix.readlink(path)
        except OSError:
            break
        path = target if target.startswith("/") else (path.rpartition("/")[0] or ".") + "/" + target
    return path if path.startswith("/") else posix.getcwd() + "/" + path


def interpreter(bin_dir: str) -> str | None:
    """The first absolute path outside the venv that ``bin_dir/python`` links to, or None: not a link (``venv
    --copies``), dangling, or a link that is neither a name in bin/ nor absolute (a moved venv would lose it)."""
    root = bin_dir.rpartition("/")[0] + "/"
    path = bin_dir + "/python"
    for _ in range(HOPS):
        try:
            target = posix.readlink(path)
        except OSError:
            return None
        if target.startswith("/"):
            if not target.startswith(root):
                return target
            path = target
        elif "/" in target or target in ("", ".", ".."):
            return None
        else:
            path = path.rpartition("/")[0] + "/" + target
    return None


def first_line(target: str) -> bytes | None:
    """``#!<target> -IS`` as the kernel reads it, or None when the kernel would not: a space or a control character
    ends or breaks the path, and the whole line must fit in MAX_LINE bytes."""
    if not target.isprintable() or any(c.isspace() for c in target):
        return None
    line = b"#!" + target.encode("utf-8", "surrogateescape") + b" -IS\n"
    return line if len(line) <= MAX_LINE else None


def _same_binary(target: str, running: str) -> bool:
    """``target`` is the file ``running`` is, and not a "#!" script (the kernel would start yet another
    interpreter for it; macOS refuses to)."""
    a, b = posix.stat(target), posix.stat(running)
    if (a.st_dev, a.st_ino) != (b.st_dev, b.st_ino):
        return False
    fd = posix.open(target, posix.O_RDONLY | posix.O_CLOEXEC)
    try:
        return posix.read(fd, 2) != b"#!"
    finally:
        posix.close(fd)


def _write_all(fd: int, data: bytes) -> None:
    while data:
        data = data[posix.write(fd, data):]


def pin(launcher: str, running: str) -> str | None:
    """Write the interpreter into ``launcher``'s first line.  ``launcher``: the path the shell part was given (its
    $0); ``running``: the interpreter it started (the python it found beside the launcher).  None when written,
    else why not (for the tests; the shim says nothing).  OSError when something failed on the way."""
    if sys.implementation.name != "cpython":
        return "only CPython's option parser is known to take -IS as the kernel passes it"
    path = _resolve(launcher)
    fd = posix.open(path, posix.O_RDONLY | posix.O_NOFOLLOW | posix.O_NONBLOCK | posix.O_CLOEXEC)
    try:
        st = posix.fstat(fd)
        if (st.st_mode & S_IFMT != S_IFREG or st.st_uid != posix.geteuid() or st.st_nlink != 1
                or st.st_size > MAX_SIZE):
            return "the launcher is not a regular file of this user's"
        text = posix.read(fd, MAX_SIZE + 1)
    finally:
        posix.close(fd)
    if not text.startswith(PORTABLE) or not text[len(PORTABLE) - 1:].startswith(MARK):
        return "not the launcher as installed (already written, or another file)"
    bin_dir = path.rpartition("/")[0]
    target = interpreter(bin_dir)
    if target is None:
        return "the venv's python does not link outside the venv by an absolute path"
    line = first_line(target)
    if line is None:
        return "the interpreter's path cannot be written into a #! line"
    if not _same_binary(target, running):
        return "the interpreter named is not the one running, or not a binary"
    temp = f"{bin_dir}/.{path.rpartition('/')[2]}.{posix.getpid()}.tmp"
    out = posix.open(temp, posix.O_WRONLY | posix.O_CREAT | posix.O_EXCL | posix.O_NOFOLLOW | posix.O_CLOEXEC, 0o600)
    try:
        try:
            _write_all(out, line + text[len(PORTABLE):])
            posix.fchmod(out, st.st_mode & 0o777)
            posix.fsync(out)  # the rename must not leave a launcher the disk holds empty after a crash
        finally:
            posix.close(out)
        now = posix.lstat(path)
        if (now.st_dev, now.st_ino, now.st_size, now.st_mtime_ns) != (st.st_dev, st.st_ino, st.st_size,
                                                                       st.st_mtime_ns):
            posix.unlink(temp)  # pip reinstalled it meanwhile: leave the new one to its own first run
            return "the launcher changed while it was being written"
        posix.rename(temp, path)
    except BaseException:
        try:  # noqa: SIM105 - contextlib would cost an import on a path every run of some installs takes
            posix.unlink(temp)
        except OSError:
            pass
        raise
    return None
