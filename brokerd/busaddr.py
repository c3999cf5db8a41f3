"""D-Bus addresses, read without the D-Bus library: is there plainly nothing to connect to?

A session bus address often outlives its bus (an SSH login that inherited a desktop's address, a session that
ended).  Telling that from the address and one ``stat`` lets the daemon skip loading jeepney and secretstorage
for a bus that cannot answer (issue 14.5: the daemon's memory); every other case is left to the library to try.
"""

from __future__ import annotations

import os
import stat
from urllib.parse import unquote


def plainly_absent(address: str) -> bool:
    """True when no entry of ``address`` can be connected to: each is ``unix:path=...`` naming no socket.

    Entries are ``;``-separated ``transport:key=value,...`` with %-escaped values (D-Bus specification,
    "Server Addresses").  Abstract sockets, other transports and anything unparsable count as maybe present.
    """
    entries = [entry for entry in address.split(";") if entry]
    if not entries:
        return True
    for entry in entries:
        transport, _, params = entry.partition(":")
        if transport != "unix":
            return False
        keys = dict(param.partition("=")[::2] for param in params.split(","))
        path = keys.get("path")
        if not path:
            return False
        try:
            st = os.stat(unquote(path))
        except OSError:
            continue
        if stat.S_ISSOCK(st.st_mode):
            return False
    return True
