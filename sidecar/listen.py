"""Binding a listener, and saying in one line why it could not be bound."""
from __future__ import annotations

import os
import socket

from sidecar.transports.http_side import LimitedHttpServer


class StartupError(Exception):
    """The sidecar cannot start as configured (a port in use, an address not on this host);
    the message names the flag and the address. Whatever had started is stopped again."""


def listen_error(flag: str, addr: str, exc: BaseException) -> StartupError:
    """A bind failure as one line, naming the flag, the address and the reason."""
    reason = str(exc)
    if isinstance(exc, OSError) and exc.errno:
        reason = os.strerror(exc.errno)
    elif not isinstance(exc, OSError):  # gRPC only says "Failed to bind": ask the kernel
        try:
            probe_bind(addr)
        except OSError as probe_exc:
            reason = os.strerror(probe_exc.errno) if probe_exc.errno else str(probe_exc)
    return StartupError(f"cannot listen on {addr} ({flag}): {reason}")


def probe_bind(addr: str) -> None:
    """Bind HOST:PORT once and let go (raises the kernel's OSError): checked before gRPC
    binds, whose own failure is a multi-line C-core log and a bare RuntimeError."""
    host, _, port = addr.rpartition(":")
    host = host.strip("[]") or "0.0.0.0"
    family = socket.AF_INET6 if ":" in host else socket.AF_INET
    with socket.socket(family, socket.SOCK_STREAM) as probe:
        probe.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)  # as gRPC does
        probe.bind((host, int(port)))


def host_port(addr: str) -> tuple[str, int]:
    """("" = every interface, which the exposure check treats as beyond loopback)."""
    host, _, port = addr.rpartition(":")
    return host.strip("[]"), int(port)


async def listen(server: LimitedHttpServer, flag: str, addr: str) -> int:
    try:
        return await server.start(*host_port(addr))
    except OSError as exc:
        raise listen_error(flag, addr, exc) from None
