"""Usage: loopback-forward.py LISTEN_PORT TARGET_HOST TARGET_PORT (local development only)."""

import contextlib
import socket
import sys
import threading


def pipe(src: socket.socket, dst: socket.socket) -> None:
    try:
        while True:
            data = src.recv(65536)
            if not data:
                break
            dst.sendall(data)
    except OSError:
        pass
    finally:
        with contextlib.suppress(OSError):
            dst.shutdown(socket.SHUT_WR)


def serve(client: socket.socket, host: str, port: int) -> None:
    try:
        upstream = socket.create_connection((host, port), timeout=10)
    except OSError:
        client.close()
        return
    upstream.settimeout(None)
    back = threading.Thread(target=pipe, args=(upstream, client), daemon=True)
    back.start()
    pipe(client, upstream)
    back.join()
    client.close()
    upstream.close()


def main(argv: list[str]) -> None:
    listen_port, host, port = int(argv[0]), argv[1], int(argv[2])
    server = socket.create_server(("127.0.0.1", listen_port))
    print(f"loopback-forward: 127.0.0.1:{server.getsockname()[1]} -> {host}:{port}", flush=True)
    while True:
        client, _ = server.accept()
        threading.Thread(target=serve, args=(client, host, port), daemon=True).start()


if __name__ == "__main__":
    main(sys.argv[1:])
