"""The HTTP port's socket: `sfllm launch` binds it once and every frontend it starts inherits it.

One socket shared by all frontends rather than one each (SO_REUSEPORT): when a frontend
stops accepting, connections waiting in the queue are taken by the others instead of being
reset with that frontend's socket. A rolling restart relies on it.
"""
from __future__ import annotations

import socket


class PortInUse(RuntimeError):
    pass


def bind_http_socket(host: str, port: int) -> socket.socket:
    """The bound socket, inheritable by child processes; listening starts in the frontend."""
    family = socket.AF_INET6 if ":" in host else socket.AF_INET
    sock = socket.socket(family, socket.SOCK_STREAM)
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    try:
        sock.bind((host, port))
    except OSError as error:
        sock.close()
        raise PortInUse(f"port {port} on {host} is already in use ({error.strerror}); stop whatever listens there "
                        "or pass --port") from None
    sock.set_inheritable(True)
    return sock
