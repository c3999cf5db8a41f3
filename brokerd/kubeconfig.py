"""``brokerd kubeconfig convert|revert``: rewrite kubelogin users into the direct form and back.

The kubelogin form (``kubectl oidc-login get-token ...``) costs kubectl's plugin dispatch (a second kubectl) plus a
launcher on every call; the direct form names the interpreter and the shim file, so kubectl runs Python isolated
at once.  Only ``command`` and ``args`` of a user's ``exec`` change; apiVersion, env, installHint,
interactiveMode, provideClusterInfo and every flag (in order) stay.  ruamel.yaml's round-trip mode keeps comments,
key order and quoting, so the diff shows only those lines.  A file is replaced atomically with its mode kept, and
the previous text is saved beside it (``<file>.brokerd.bak``, mode 0600).
"""

from __future__ import annotations

import difflib
import io
import os
import stat
import tempfile
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from ruamel.yaml import YAML
from ruamel.yaml.error import YAMLError
from ruamel.yaml.util import load_yaml_guess_indent

from brokerd.errors import UsageError

BACKUP_SUFFIX = ".brokerd.bak"
SHIM_TAIL = "client_shim/shim.py"
MAX_BYTES = 16 << 20  # a kubeconfig is kilobytes; refuse to load something that is clearly not one


@dataclass(frozen=True)
class Target:
    """Where the direct form points: the interpreter (absolute, not resolved: a venv's python is a symlink whose
    path selects the venv) and the shim launcher file."""

    interpreter: str
    shim: str


@dataclass
class Change:
    path: Path
    old: str
    new: str
    users: list[str] = field(default_factory=list)

    def diff(self) -> str:
        return "".join(difflib.unified_diff(self.old.splitlines(keepends=True), self.new.splitlines(keepends=True),
                                            f"{self.path} (before)", f"{self.path} (after)"))


def kubeconfig_files(explicit: str | None, environ: Mapping[str, str]) -> list[Path]:
    """The files kubectl reads, in its order: --kubeconfig, else $KUBECONFIG's list, else ~/.kube/config."""
    if explicit:
        return [Path(explicit).expanduser()]
    listed = [Path(p).expanduser() for p in environ.get("KUBECONFIG", "").split(os.pathsep) if p]
    if listed:
        seen: list[Path] = []
        for p in listed:
            if p not in seen:
                seen.append(p)
        return seen
    return [Path(environ.get("HOME", str(Path.home()))) / ".kube" / "config"]


# The flags are returned as the loaded scalars (not str copies), so a quoted flag keeps its quotes when written.
def kubelogin_flags(exec_: Mapping[str, Any]) -> list[Any] | None:
    """The get-token flags when this exec runs kubelogin (any of its three spellings), else None."""
    command = str(exec_.get("command") or "")
    raw = list(exec_.get("args") or [])
    args = [str(a) for a in raw]
    name = command.rpartition("/")[2]
    if name == "kubectl" and args[:2] == ["oidc-login", "get-token"]:
        return raw[2:]
    if name in ("kubelogin", "kubectl-oidc_login", "brokerd-shim") and args[:1] == ["get-token"]:
        return raw[1:]
    return None


def direct_flags(exec_: Mapping[str, Any]) -> list[Any] | None:
    """The get-token flags when this exec is already brokerd's direct form, else None."""
    raw = list(exec_.get("args") or [])
    args = [str(a) for a in raw]
    if args[:2] == ["-I", "-S"] and len(args) >= 4 and args[2].endswith(SHIM_TAIL) and args[3] == "get-token":
        return raw[4:]
    return None


def _rewrite(exec_: Any, command: str, args: list[Any]) -> bool:
    if str(exec_.get("command")) == command and [str(a) for a in exec_.get("args") or []] == [str(a) for a in args]:
        return False
    exec_["command"] = command
    if exec_.get("args") is None:
        exec_["args"] = args
    else:
        exec_["args"][:] = args  # in place: the sequence keeps its style (block or flow) and comments
    return True


def _yaml(text: str) -> tuple[YAML, Any]:
    yaml = YAML(typ="rt")
    yaml.preserve_quotes = True
    yaml.width = 1 << 16  # never fold a long line (a token or URL) that was one line
    # kubectl writes `clusters: null`; round-trip mode would print an empty value (a needless diff line).
    yaml.representer.add_representer(type(None), _null)
    try:
        _, indent, seq_indent = load_yaml_guess_indent(text)  # only for the file's indentation
        data = yaml.load(text)
    except YAMLError as exc:
        raise UsageError(f"not valid YAML: {str(exc).splitlines()[0] if str(exc) else type(exc).__name__}") from exc
    # The guess gives the sequence indent and the dash's offset in it; `  - name:` lists under 2-space mappings
    # read as sequence 4, offset 2.
    sequence, offset = indent or 2, seq_indent or 0
    mapping = sequence - offset if sequence - offset >= 2 else sequence
    yaml.indent(mapping=mapping, sequence=sequence, offset=offset)
    return yaml, data


def _null(representer: Any, _: None) -> Any:
    return representer.represent_scalar("tag:yaml.org,2002:null", "null")


def _users(data: Any) -> list[tuple[str, Any]]:
    if not isinstance(data, dict):
        return []
    found = []
    for entry in data.get("users") or []:
        if isinstance(entry, dict) and isinstance(entry.get("user"), dict) and isinstance(entry["user"].get("exec"),
                                                                                         dict):
            found.append((str(entry.get("name")), entry["user"]["exec"]))
    return found


def _read(path: Path) -> str | None:
    try:
        with path.open("rb") as f:
            raw = f.read(MAX_BYTES + 1)
    except FileNotFoundError:
        return None
    except OSError as exc:
        raise UsageError(f"cannot read {path}: {exc.strerror or exc}") from exc
    if len(raw) > MAX_BYTES:
        raise UsageError(f"{path} is larger than {MAX_BYTES >> 20} MB; not a kubeconfig")
    try:
        return raw.decode("utf-8")
    except UnicodeDecodeError as exc:
        raise UsageError(f"{path} is not UTF-8 text") from exc


def plan(files: Sequence[Path], names: Sequence[str], target: Target, revert: bool) -> list[Change]:
    """What convert (or revert) would write, per file; users defined twice count where kubectl takes them (first)."""
    claimed: set[str] = set()
    changes: list[Change] = []
    matched: set[str] = set()
    for path in files:
        text = _read(path)
        if text is None:
            continue
        try:
            yaml, data = _yaml(text)
        except UsageError as exc:
            raise UsageError(f"{path}: {exc}") from None
        change = Change(path, text, text)
        for name, exec_ in _users(data):
            if name in claimed:
                continue  # kubectl uses the first file's definition; a later one is dead text
            claimed.add(name)
            if names and name not in names:
                continue
            kubelogin, direct = kubelogin_flags(exec_), direct_flags(exec_)
            if kubelogin is None and direct is None:
                continue
            matched.add(name)
            if revert:
                done = direct is not None and _rewrite(exec_, "kubectl", ["oidc-login", "get-token", *direct])
            else:
                flags = direct if direct is not None else kubelogin
                assert flags is not None
                done = _rewrite(exec_, target.interpreter, ["-I", "-S", target.shim, "get-token", *flags])
            if done:
                change.users.append(name)
        if change.users:
            out = io.StringIO()
            yaml.dump(data, out)
            change.new = out.getvalue()
            changes.append(change)
    missing = [n for n in names if n not in matched]
    if missing:
        raise UsageError(f"no kubelogin or brokerd user named {', '.join(missing)} in {', '.join(map(str, files))}")
    return changes


def write(change: Change) -> Path:
    """Save the old text beside the file (0600), then replace the file atomically, keeping its mode."""
    real = Path(os.path.realpath(change.path))  # a symlinked kubeconfig stays a symlink
    mode = stat.S_IMODE(real.stat().st_mode)
    backup = real.with_name(real.name + BACKUP_SUFFIX)
    _atomic_write(backup, change.old, 0o600)
    _atomic_write(real, change.new, mode)
    return backup


def _atomic_write(path: Path, text: str, mode: int) -> None:
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", dir=path.parent)
    try:
        with os.fdopen(fd, "w", encoding="utf-8") as f:  # owns fd from here, closed on any failure
            os.fchmod(f.fileno(), mode)
            f.write(text)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise
