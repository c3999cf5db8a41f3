"""The ceiling for the daemon's socket throughput: the least an asyncio-streams server can do per request.

    python bench/echo_server.py SOCKET_PATH REPLY_BYTES [asyncio|uvloop]

Reads a request up to the protocol's terminator (``\\0\\0``), answers one ``O`` line of exactly REPLY_BYTES
(the size of the daemon's real reply), closes.  Same loop, same stream API, same backlog as the daemon, none of its
work: no peer check, no parsing, no session lookup, no JSON.  Prints ``ready`` once it listens; stops on SIGTERM.
"""

from __future__ import annotations

import asyncio
import os
import signal
import socket
import sys

import uvloop


async def serve(path: str, reply: bytes) -> None:
    async def handle(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        try:
            await reader.readuntil(b"\0\0")
            writer.write(reply)
            await writer.drain()
        except (ConnectionError, asyncio.IncompleteReadError):
            pass
        finally:
            writer.close()

    sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    sock.bind(path)
    sock.listen(512)  # the daemon's backlog
    sock.setblocking(False)
    server = await asyncio.start_unix_server(handle, sock=sock, limit=64 * 1024)
    stop = asyncio.Event()
    asyncio.get_running_loop().add_signal_handler(signal.SIGTERM, stop.set)
    os.write(1, b"ready\n")
    async with server:
        await stop.wait()
    os.unlink(path)


def main() -> None:
    path, size = sys.argv[1], int(sys.argv[2])
    loop = sys.argv[3] if len(sys.argv) > 3 else "asyncio"  # the daemon's event loop ([daemon] event_loop)
    reply = b"O" + b"x" * (size - 2) + b"\n"
    if loop == "uvloop":
        uvloop.run(serve(path, reply))
    else:
        asyncio.run(serve(path, reply))


if __name__ == "__main__":
    main()
