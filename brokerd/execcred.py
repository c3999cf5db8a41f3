"""The ExecCredential kubectl reads from the plugin's stdout, and the KUBERNETES_EXEC_INFO it sends in."""

from __future__ import annotations

import json
from dataclasses import dataclass
from datetime import UTC, datetime

from brokerd.errors import UsageError
from brokerd.models import EXEC_API_V1, EXEC_API_V1BETA1

SUPPORTED = (EXEC_API_V1BETA1, EXEC_API_V1)


@dataclass(frozen=True)
class ExecInfo:
    api_version: str = EXEC_API_V1BETA1
    interactive: bool = False


def parse_exec_info(raw: str | None, *, stdin_is_tty: bool = False) -> ExecInfo:
    """Parse KUBERNETES_EXEC_INFO.  Absent (an old kubectl, or run by hand): v1beta1, interactive if stdin is a tty."""
    if not raw:
        return ExecInfo(EXEC_API_V1BETA1, stdin_is_tty)
    try:
        doc = json.loads(raw)
    except ValueError as exc:
        raise UsageError("KUBERNETES_EXEC_INFO is not valid JSON") from exc
    except RecursionError:  # nesting deeper than the interpreter's stack; kubectl sends three levels
        raise UsageError("KUBERNETES_EXEC_INFO is nested too deeply") from None
    if not isinstance(doc, dict):
        raise UsageError("KUBERNETES_EXEC_INFO is not a JSON object")
    version = doc.get("apiVersion") or EXEC_API_V1BETA1
    if version not in SUPPORTED:
        raise UsageError(f"unsupported ExecCredential apiVersion {version!r} (supported: {', '.join(SUPPORTED)})")
    spec = doc.get("spec")
    interactive = bool(spec.get("interactive", False)) if isinstance(spec, dict) else False
    return ExecInfo(version, interactive)


def rfc3339(epoch: float) -> str:
    return datetime.fromtimestamp(int(epoch), UTC).strftime("%Y-%m-%dT%H:%M:%SZ")


def render(api_version: str, token: str, expires_at: float) -> str:
    """One line of JSON; ``expires_at`` is already the time kubectl should stop using the token."""
    doc = {
        "kind": "ExecCredential",
        "apiVersion": api_version,
        "spec": {},
        "status": {"token": token, "expirationTimestamp": rfc3339(expires_at)},
    }
    return json.dumps(doc, separators=(",", ":"))
