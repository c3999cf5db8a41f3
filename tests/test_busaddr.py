"""brokerd/busaddr.py: which session bus addresses plainly lead nowhere (so jeepney is not even loaded)."""

from __future__ import annotations

import socket
from pathlib import Path

from brokerd.busaddr import plainly_absent


def test_dead_unix_paths_and_empty_addresses_are_absent(tmp_path: Path) -> None:
    regular = tmp_path / "not-a-socket"
    regular.write_text("")
    assert plainly_absent("")
    assert plainly_absent(f"unix:path={tmp_path}/gone")
    assert plainly_absent(f"unix:path={regular},guid=0123")
    assert plainly_absent(f"unix:path={tmp_path}/a;unix:path={tmp_path}/b")


def test_a_listening_socket_or_anything_else_may_answer(tmp_path: Path) -> None:
    path = tmp_path / "bus dir" / "bus"
    path.parent.mkdir()
    listener = socket.socket(socket.AF_UNIX)
    try:
        listener.bind(str(path))
        assert not plainly_absent(f"unix:path={path}")
        escaped = str(path).replace(" ", "%20")  # D-Bus addresses %-escape their values
        assert not plainly_absent(f"unix:path={escaped}")
        assert not plainly_absent(f"unix:path={tmp_path}/gone;unix:path={path}")  # any entry that may answer
    finally:
        listener.close()
    assert not plainly_absent("unix:abstract=/tmp/dbus-XXXX,guid=1")  # no file to look at: let jeepney try
    assert not plainly_absent("tcp:host=127.0.0.1,port=1")
    assert not plainly_absent("unix:tmpdir=/tmp")
