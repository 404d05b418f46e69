"""The HTTP port's socket: `sfllm launch` binds it once and every frontend it starts inherits it.

One socket shared by all frontends rather than one each (SO_REUSEPORT): when a frontend
stops accepting, connections waiting in the queue are taken by the others instead of being
reset with that frontend's socket. A rolling restart relies on it.
"""
from __future__ import annotations

import errno
import socket


class CannotBind(RuntimeError):
    """The HTTP address can't be bound: the message says why and which flag changes it."""


def bind_http_socket(host: str, port: int) -> socket.socket:
    """The bound socket, inheritable by child processes; listening starts in the frontend."""
    family = socket.AF_INET6 if ":" in host else socket.AF_INET
    sock = socket.socket(family, socket.SOCK_STREAM)
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    try:
        sock.bind((host, port))
    except OSError as error:
        sock.close()
        raise CannotBind(_why(error, host, port)) from None
    sock.set_inheritable(True)
    return sock


def _why(error: OSError, host: str, port: int) -> str:
    if isinstance(error, socket.gaierror):
        return f"cannot bind to host {host!r}: {error.strerror}; pass --host with a name or address of this machine"
    if error.errno == errno.EADDRINUSE:
        return f"port {port} on {host} is already in use; stop whatever listens there or pass --port"
    if error.errno == errno.EADDRNOTAVAIL:
        return f"{host} is not an address of this machine ({error.strerror}); pass --host with one of its addresses"
    if error.errno == errno.EACCES:
        return f"binding port {port} on {host} needs privileges this process lacks ({error.strerror}); pass --port"
    return f"cannot bind port {port} on {host}: {error.strerror or error}"
