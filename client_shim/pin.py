"""The installed launcher's first run writes its interpreter into its first line (issue 14 item 1).

pip installs launchers/kubectl-oidc_login as it is: ``#!/bin/sh``, a shell part that finds the python beside the
file (so a moved venv keeps working), then Python.  The shell is a process more on every kubectl call (0.8 ms, a
tenth of the interpreter's start) and only the first run needs it.  That run (the shell passes ``-X
brokerd.portable=pin`` when the launcher's directory is writable and the venv's python is a link) comes here once
the answer is out, and replaces the first line with ``#!<interpreter> -IS``: the kernel then starts Python itself.
The interpreter named is the first absolute path outside the venv that the venv's ``bin/python`` links to
(``/usr/bin/python3``, pyenv's ``.../versions/3.11.7/bin/python3``): the file the venv runs, reached after the venv
moves.  The written launcher goes on only while the venv's python is still that file; otherwise its run is handed
to the venv's python (or the shell part), which comes here and writes the line anew, or ``#!/bin/sh`` back.

Nothing else changes: the rest of the file is byte for byte the same (``sh`` on it still runs the shell part), the
new file takes the old one's place in one step (a concurrent kubectl reads the old or the new, never half), and
nothing is written unless everything below holds.  It runs in the shim's process, after the token was written,
and never changes the exit code: any failure leaves the launcher as it was, to try again next time.  Only posix
and sys are imported up front: everything heavier waits until a write is certain to be possible.
"""

import posix
import sys

PORTABLE = b"#!/bin/sh\n"  # the launcher's first line as installed
MARK = b"\n''':'\n# The installed kubectl-oidc_login / brokerd-shim: "  # and what follows it
MAX_SIZE = 64 * 1024
# An older kernel (before 5.1) reads 128 bytes of a script's start for the "#!" line and cuts the rest off.
MAX_LINE = 127
HOPS = 40
NO_PROC = "no /proc/self (not Linux, or /proc is not mounted)"
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


def _inside(path: str, root: tuple[int, int]) -> bool:
    """Whether ``path`` is below the directory whose (st_dev, st_ino) is ``root``, however either is spelled (a venv
    reached through a symlinked home has two names)."""
    for _ in range(path.count("/")):
        path = path.rpartition("/")[0]
        try:
            st = posix.stat(path or "/")
        except OSError:
            return False
        if (st.st_dev, st.st_ino) == root:
            return True
    return False


def interpreter(bin_dir: str) -> str | None:
    """The first absolute path outside the venv that ``bin_dir/python`` links to, or None: not a link (``venv
    --copies``), dangling, or a link that is neither a name in bin/ nor absolute (a moved venv would lose it)."""
    try:
        st = posix.stat(bin_dir + "/..")
    except OSError:
        return None
    root = (st.st_dev, st.st_ino)
    path = bin_dir + "/python"
    for _ in range(HOPS):
        try:
            target = posix.readlink(path)
        except OSError:
            return None
        if target.startswith("/"):
            if not _inside(target, root):
                return target
            path = target
        elif "/" in target or target in ("", ".", ".."):
            return None
        else:
            path = path.rpartition("/")[0] + "/" + target
    return None


def first_line(target: str) -> bytes | None:
    """``#!<target> -IS`` as the kernel and Python read it, or None when they would not: a space or a control
    character ends or breaks the path, the whole line must fit in MAX_LINE bytes, Python takes ``coding:`` or
    ``coding=`` in a file's first line for its encoding (PEP 263), and the path must be spelled as CPython spells
    sys.executable."""
    if not target.isprintable() or any(c.isspace() for c in target) or "coding:" in target or "coding=" in target:
        return None
    if "//" in target or "/./" in target or "/../" in target or target.endswith(("/.", "/..")):
        return None  # CPython spells sys.executable without these (a/../b is b), and the written launcher compares
    raw = _fs(target)  # the bytes the path is on disk, whatever the locale
    try:
        raw.decode("utf-8")  # Python reads the launcher as UTF-8 source: another encoding's bytes would not parse
    except UnicodeDecodeError:
        return None
    line = b"#!" + raw + b" -IS\n"
    return line if len(line) <= MAX_LINE else None


def _fs(path: str) -> bytes:
    """``path`` as the file system has it: what os.fsencode does (the locale's encoding under -I, not UTF-8)."""
    return path.encode(sys.getfilesystemencoding(), sys.getfilesystemencodeerrors())


def _ours(text: bytes) -> bool:
    """The launcher as installed, or with a line an earlier first run wrote (which may have gone stale)."""
    first, newline, rest = text.partition(b"\n")
    return bool(newline) and (first + b"\n" == PORTABLE or (first.startswith(b"#!/") and first.endswith(b" -IS"))) \
        and (b"\n" + rest).startswith(MARK)


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


def _exchange(a: str, b: str) -> bool:
    """Swap two names in one step (renameat2 RENAME_EXCHANGE: Linux 3.15, glibc 2.28); False where that is not
    available.  OSError when it is and fails (ENOENT: one of them is gone)."""
    try:
        import ctypes

        call = ctypes.CDLL(None, use_errno=True).renameat2
    except (ImportError, OSError, AttributeError):
        return False
    call.argtypes = [ctypes.c_int, ctypes.c_char_p, ctypes.c_int, ctypes.c_char_p, ctypes.c_uint]
    call.restype = ctypes.c_int
    at_fdcwd, rename_exchange = -100, 2
    if call(at_fdcwd, _fs(a), at_fdcwd, _fs(b), rename_exchange) == 0:
        return True
    import errno

    err = ctypes.get_errno()
    if err in (errno.ENOSYS, errno.EINVAL, errno.EOPNOTSUPP):  # this kernel or file system cannot
        return False
    raise OSError(err, posix.strerror(err), b)


def _replace(temp: str, path: str, held: int) -> str | None:
    """Put ``temp`` at ``path`` only if ``path`` is still the file open as ``held`` (held open, its inode number
    cannot be given to a new file meanwhile, as ext4 does at once when pip unlinks and rewrites a script): a
    reinstall meanwhile wins, and an uninstall is not undone.  ``temp`` is gone afterwards either way."""
    st = posix.fstat(held)
    if _exchange(temp, path):
        was = posix.lstat(temp)  # what ``path`` held the moment it was swapped
        if (was.st_dev, was.st_ino) == (st.st_dev, st.st_ino):
            posix.unlink(temp)  # the old launcher
            return None
        _exchange(temp, path)  # pip's new file back where it was
        # pip makes a script executable by name after writing it; if that landed between the two swaps it went to
        # the file now at ``temp``: do what it does (an x for every r), which it does again later if it has not yet.
        back = posix.open(path, posix.O_RDONLY | posix.O_NOFOLLOW | posix.O_NONBLOCK | posix.O_CLOEXEC)
        try:
            mode = posix.fstat(back).st_mode
            if mode & S_IFMT == S_IFREG:
                posix.fchmod(back, mode & 0o7777 | (mode & 0o444) >> 2)
        finally:
            posix.close(back)
        posix.unlink(temp)
        return "the launcher changed while it was being written"
    now = posix.lstat(path)  # no exchange here: a check, then rename (a reinstall in between would be undone)
    if (now.st_dev, now.st_ino) != (st.st_dev, st.st_ino):
        posix.unlink(temp)
        return "the launcher changed while it was being written"
    posix.rename(temp, path)
    return None


class StaleLine(Exception):
    """The launcher names an interpreter its venv no longer runs and cannot be written: every run starts Python
    twice until brokerd is reinstalled.  The shim says so (one line)."""


def _wanted(bin_dir: str, running: str) -> tuple[bytes, str | None]:
    """The first line the launcher in ``bin_dir`` should have: the interpreter's (and None), or the shell's with
    the reason it cannot be the interpreter's."""
    if sys.implementation.name != "cpython":
        return PORTABLE, "only CPython's option parser is known to take -IS as the kernel passes it"
    try:  # how the written launcher finds itself (the launcher's own comment)
        posix.readlink("/proc/self/exe")
        posix.O_PATH  # noqa: B018 - Linux's; the written launcher opens itself with it
    except (OSError, AttributeError):
        return PORTABLE, NO_PROC
    target = interpreter(bin_dir)
    if target is None:
        return PORTABLE, "the venv's python does not link outside the venv by an absolute path"
    line = first_line(target)
    if line is None:
        return PORTABLE, "the interpreter's path cannot be written into a #! line"
    if not _same_binary(target, running):
        return PORTABLE, "the interpreter named is not the one running, or not a binary"
    return line, None


def _read(path: str) -> tuple[int, posix.stat_result, bytes] | str:
    """The launcher open (the caller closes it), its stat and text; or why it is not one to write."""
    fd = posix.open(path, posix.O_RDONLY | posix.O_NOFOLLOW | posix.O_NONBLOCK | posix.O_CLOEXEC)
    try:
        st = posix.fstat(fd)
        # Another name for the same file (uv links installed files from its cache) keeps the old text: the new file
        # takes only this name.
        if st.st_mode & S_IFMT != S_IFREG or st.st_size > MAX_SIZE:
            why = "the launcher is not a regular file"
        elif not st.st_mode & 0o111:
            why = "the launcher is not executable (pip has not finished installing it)"
        else:
            text = posix.read(fd, MAX_SIZE + 1)
            if len(text) != st.st_size:
                why = "the launcher did not read whole"
            elif not _ours(text):
                why = "not the launcher as installed"
            else:
                return fd, st, text
    except BaseException:
        posix.close(fd)
        raise
    posix.close(fd)
    return why


def pin(launcher: str, running: str) -> str | None:
    """Make ``launcher``'s first line the interpreter's, or the shell's again where that can no longer be (an
    earlier line gone stale: the written launcher hands such runs to the shell part, which comes here).
    ``launcher``: the path the shell part was given (its $0); ``running``: the interpreter it started (the python
    it found beside the launcher).  None when the interpreter's line is there, else why not (for the tests; the
    shim says nothing).  OSError when something failed on the way; StaleLine when the launcher holds a line its
    venv no longer runs and cannot be written."""
    path = _resolve(launcher)
    got = _read(path)
    if isinstance(got, str):
        return got
    posix.close(got[0])
    st, text = got[1], got[2]
    if st.st_uid != posix.geteuid() and text.startswith(PORTABLE):
        return "the launcher is another user's"  # the usual shared install: as cheap as can be
    bin_dir = path.rpartition("/")[0]
    line, why = _wanted(bin_dir, running)
    if text.startswith(line):
        return why
    cannot = None
    if st.st_uid != posix.geteuid():
        cannot = f"it is uid {st.st_uid}'s"
    elif not posix.access(bin_dir, posix.W_OK) or not posix.access(path, posix.W_OK):  # EROFS; EPERM: immutable
        cannot = "it or its directory is not writable"
    elif st.st_gid != posix.getegid() and st.st_gid not in posix.getgroups() and posix.geteuid() != 0:
        cannot = "its group is not one of this user's: a copy could not keep it"
    if cannot is not None:
        if not text.startswith(PORTABLE) and why != NO_PROC:  # a written line the venv no longer runs
            first = text.partition(b"\n")[0][2:-4].decode("utf-8", "replace")
            raise StaleLine(f"{path} starts {first}, which its venv no longer runs, and cannot be rewritten "
                            f"({cannot}): each run starts Python twice; reinstall brokerd")
        return cannot
    import fcntl

    # One writer per bin directory at a time (two first runs must not undo each other's swaps); a busy lock means
    # another run is writing: leave it to that one.
    lock = posix.open(bin_dir, posix.O_RDONLY | posix.O_DIRECTORY | posix.O_CLOEXEC)
    try:
        try:
            fcntl.flock(lock, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            return "another run is writing it"
        except OSError:
            return "its directory cannot be locked (NFS without flock?)"
        got = _read(path)  # again, under the lock: what the swap must find still there
        if isinstance(got, str):
            return got
        held, st, text = got
        try:
            if text.startswith(line):
                return why
            if _frozen(lock) or _frozen(held):
                return "it or its directory is immutable or append-only (chattr)"
            return _write(path, held, st, line + text.partition(b"\n")[2]) or why
        finally:
            posix.close(held)
    finally:
        posix.close(lock)


def _frozen(fd: int) -> bool:
    """Linux's immutable or append-only flag on ``fd`` (chattr +i, +a): a rename there fails after all the work,
    and in an append-only directory the temporary file could not be removed either.  False where the file system
    keeps no such flags."""
    import fcntl

    get_flags = (2 << 30) | (8 if sys.maxsize > 2**32 else 4) << 16 | ord("f") << 8 | 1  # FS_IOC_GETFLAGS
    try:
        flags = int.from_bytes(fcntl.ioctl(fd, get_flags, bytes(8))[:4], sys.byteorder)
    except OSError:
        return False
    return bool(flags & (0x10 | 0x20))  # FS_IMMUTABLE_FL, FS_APPEND_FL


def _xattrs(fd: int) -> dict[str, bytes]:
    """The file's extended attributes (ACLs, capabilities, the SELinux label), by name."""
    if not hasattr(posix, "listxattr"):
        return {}
    return {name: posix.getxattr(fd, name) for name in posix.listxattr(fd)}


def _write(path: str, held: int, st: posix.stat_result, data: bytes) -> str | None:
    """``data`` into a new file beside ``path`` with its group and mode, synced, then swapped in (_replace)."""
    import _signal  # type: ignore[import-not-found]  # built in; `signal` would load enum and more

    bin_dir = path.rpartition("/")[0]
    temp = f"{bin_dir}/.{path.rpartition('/')[2]}.{posix.getpid()}.tmp"
    # No signal between creating the temporary file and its end (SIGTERM from a timeout, SIGHUP from a closed
    # terminal would leave it behind): they wait until it is gone (SIGKILL cannot).
    mask = _signal.pthread_sigmask(_signal.SIG_BLOCK, _signal.valid_signals())
    try:
        out = posix.open(temp, posix.O_WRONLY | posix.O_CREAT | posix.O_EXCL | posix.O_NOFOLLOW | posix.O_CLOEXEC,
                         0o600)
        try:
            try:
                if posix.fstat(out).st_gid != st.st_gid:
                    posix.fchown(out, -1, st.st_gid)
                posix.fchmod(out, st.st_mode & 0o777)
                # What the launcher carries must come with the new file: an ACL the directory hands down (a default
                # ACL, NFSv4's) does; one set on the launcher alone, a file capability, a label set with chcon would
                # be lost, and then nothing is written (or synced).  The new file may carry more (a default ACL the
                # launcher predates), as a reinstall's would.
                new = _xattrs(out)
                same = all(new.get(name) == value for name, value in _xattrs(held).items())
                if same:
                    _write_all(out, data)
                    posix.fsync(out)  # the rename must not leave a launcher the disk holds empty after a crash
            finally:
                posix.close(out)
            if not same:
                posix.unlink(temp)
                return "the launcher has extended attributes (an ACL, a capability) a new file would not get"
            return _replace(temp, path, held)
        except BaseException:
            try:  # noqa: SIM105 - contextlib would cost an import on a path every run of some installs takes
                posix.unlink(temp)
            except OSError:
                pass
            raise
    finally:
        _signal.pthread_sigmask(_signal.SIG_SETMASK, mask)
