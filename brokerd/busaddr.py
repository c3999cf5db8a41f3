"""D-Bus addresses, read without the D-Bus library: is there plainly nothing to connect to?

A session bus address often outlives its bus (an SSH login that inherited a desktop's address, a session that
ended).  Telling that from the address and one ``stat`` lets the daemon skip loading jeepney and secretstorage
for a bus that cannot answer (issue 14.5: the daemon's memory); every other case is left to the library to try.
"""

from __future__ import annotations

import os
import re
import stat

_ESCAPE = re.compile(r"%([0-9A-Fa-f]{2})")


def _unescape(value: str) -> str:
    """%XX as jeepney (the library that would connect) reads it: one character per escape."""
    return _ESCAPE.sub(lambda m: chr(int(m.group(1), 16)), value)


def plainly_absent(address: str) -> bool:
    """True when no entry of ``address`` can be connected to: each is ``unix:path=...`` (with a ``guid`` at most)
    naming no socket, or a path no socket can have (a NUL in it).

    Entries are ``;``-separated ``transport:key=value,...`` with %-escaped values (D-Bus specification,
    "Server Addresses").  Abstract sockets, other transports, other keys and anything unparsable count as maybe
    present: the library decides those.
    """
    entries = [entry for entry in address.split(";") if entry]
    if not entries:
        return True
    for entry in entries:
        transport, colon, params = entry.partition(":")
        if transport != "unix" or not colon:
            return False
        keys: dict[str, str] = {}
        for param in params.split(","):
            key, equals, value = param.partition("=")
            if not equals:
                return False
            keys[key] = value
        if "path" not in keys or set(keys) - {"path", "guid"}:
            return False  # jeepney prefers "abstract" in an entry, and knows keys we do not
        try:
            st = os.stat(_unescape(keys["path"]))
        except (OSError, ValueError):  # gone, or a NUL in the path: nothing can listen there
            continue
        if stat.S_ISSOCK(st.st_mode):
            return False
    return True
