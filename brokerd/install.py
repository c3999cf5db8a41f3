"""Install and remove the systemd user units (``brokerd install-systemd [--uninstall]``).

The unit templates ship in the package as ``brokerd/units/*.in``; ``systemd/`` in the source tree holds the same
units rendered with ``EXAMPLE_EXEC_START`` (tests/test_systemd.py fails when the two drift).  Nothing here runs
systemctl: cli_local.py prints ``ENABLE_COMMAND`` / ``DISABLE_COMMAND`` for the person to run.
"""

from __future__ import annotations

import os
import sys
from collections.abc import Mapping, Sequence
from importlib import resources
from pathlib import Path

UNIT_NAMES = ("brokerd.service", "brokerd.socket")
PLACEHOLDER = "@BROKERD@"
ENABLE_COMMAND = "systemctl --user daemon-reload && systemctl --user enable --now brokerd.socket"
DISABLE_COMMAND = "systemctl --user disable --now brokerd.socket brokerd.service"
# What systemd/ in the source tree is rendered with: where pipx and `pip install --user` put console scripts.
EXAMPLE_EXEC_START = "%h/.local/bin/brokerd"

# Characters that need no quoting in an ExecStart= word.  % and $ are escaped separately: systemd expands
# specifiers everywhere and environment variables in the arguments (not in the program path), quoted or not.
_PLAIN = frozenset("abcdefghijklmnopqrstuvwxyzABCDEFGHIJKLMNOPQRSTUVWXYZ0123456789/._-+:@,=%$")


def template_text(name: str) -> str:
    """The packaged template for ``name`` (one of ``UNIT_NAMES``)."""
    if name not in UNIT_NAMES:
        raise ValueError(f"not a brokerd unit: {name}")
    return (resources.files("brokerd") / "units" / f"{name}.in").read_text(encoding="utf-8")


def render_unit(name: str, exec_start: str) -> str:
    """The unit ``name`` with ``exec_start`` (an ExecStart= command line, already quoted) in place."""
    if "\n" in exec_start or "\r" in exec_start:
        raise ValueError("ExecStart command must be one line")
    return template_text(name).replace(PLACEHOLDER, exec_start)


def exec_start_word(word: str, *, program: bool = False) -> str:
    """``word`` quoted for an ExecStart= line, so paths with spaces, %, $, quotes or backslashes survive.

    ``program`` marks the first word, in which systemd substitutes no variables, so ``$`` stays as it is.
    """
    if not word or any(c in word for c in "\n\r\0"):
        raise ValueError(f"cannot put {word!r} in an ExecStart= line")
    escaped = word.replace("%", "%%")
    if not program:
        escaped = escaped.replace("$", "$$")
    if all(c in _PLAIN for c in word):
        return escaped
    return '"' + escaped.replace("\\", "\\\\").replace('"', '\\"') + '"'


def exec_start_line(argv: Sequence[str]) -> str:
    return " ".join(exec_start_word(word, program=i == 0) for i, word in enumerate(argv))


def default_exec_start(executable: str | None = None) -> str:
    """This installation's brokerd command for systemd: ``<python> -E -P -m brokerd``.

    Not the ``brokerd`` console script beside it: pip writes that without ``-E``, so Python's variables in the user
    manager's environment (an empty PYTHONPATH entry is the unit's working directory, $HOME) would choose its code.
    The interpreter path is kept as given, not resolved: in a virtualenv ``bin/python`` is a symlink, and
    resolving it would leave the virtualenv and lose its packages.
    """
    python = os.path.abspath(executable or sys.executable)
    return exec_start_line([python, "-E", "-P", "-m", "brokerd"])


def default_unit_dir(environ: Mapping[str, str] | None = None) -> Path:
    """``$XDG_CONFIG_HOME/systemd/user``, else ``~/.config/systemd/user`` (where ``systemctl --user`` looks)."""
    env = os.environ if environ is None else environ
    config = env.get("XDG_CONFIG_HOME", "")
    # The XDG spec says to ignore a relative XDG_CONFIG_HOME; systemd does the same.
    if not os.path.isabs(config):
        home = env.get("HOME") or str(Path.home())
        config = os.path.join(home, ".config")
    return Path(config) / "systemd" / "user"


def install_units(unit_dir: Path, exec_start: str) -> list[Path]:
    """Write the filled-in units into ``unit_dir`` (created if missing), mode 0644; returns the paths written.

    Each file is written to a temporary name and renamed, so a reload never sees half a unit.
    """
    unit_dir.mkdir(parents=True, exist_ok=True)
    written: list[Path] = []
    for name in UNIT_NAMES:
        target = unit_dir / name
        tmp = unit_dir / f".{name}.tmp"
        text = render_unit(name, exec_start)
        try:
            with os.fdopen(os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_TRUNC | os.O_CLOEXEC, 0o644), "w",
                           encoding="utf-8") as out:
                os.fchmod(out.fileno(), 0o644)  # the umask may have taken bits off; units are meant to be readable
                out.write(text)
                out.flush()
                os.fsync(out.fileno())
        except BaseException:
            tmp.unlink(missing_ok=True)
            raise
        os.replace(tmp, target)
        written.append(target)
    return written


def uninstall_units(unit_dir: Path) -> list[Path]:
    """Remove the units and any ``*.wants/`` links to them in ``unit_dir``; returns what was removed.

    Stopping and disabling is systemctl's job (``DISABLE_COMMAND``, before this); the links are removed too so a
    skipped disable does not leave dangling ones behind.
    """
    removed: list[Path] = []
    if unit_dir.is_dir():
        for wants in sorted(unit_dir.glob("*.wants")):
            for name in UNIT_NAMES:
                link = wants / name
                if link.is_symlink():
                    link.unlink()
                    removed.append(link)
    for name in UNIT_NAMES:
        path = unit_dir / name
        if path.is_file() or path.is_symlink():
            path.unlink()
            removed.append(path)
    return removed
