"""A Unix-socket relay script for tests of forwarded callers (run as its own process, stdlib only)."""

# What `ssh -R /remote/brokerd.sock:$BROKERD_SOCKET` does, locally: accept on one Unix socket path, relay each
# connection byte for byte to another.
RELAY = """\
import os, socket, sys, threading
listen, target = sys.argv[1], sys.argv[2]
server = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
os.umask(0o177)
server.bind(listen)
server.listen(16)
print("ready", flush=True)
def pump(src, dst):
    try:
        while data := src.recv(65536):
            dst.sendall(data)
    except OSError:
        pass
    finally:
        try:
            dst.shutdown(socket.SHUT_WR)
        except OSError:
            pass
def serve(client):
    upstream = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    upstream.connect(target)
    back = threading.Thread(target=pump, args=(upstream, client))
    back.start()
    pump(client, upstream)
    back.join()
    client.close()
    upstream.close()
while True:
    conn, _ = server.accept()
    threading.Thread(target=serve, args=(conn,), daemon=True).start()
"""
