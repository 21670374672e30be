"""Loopback ports that are free right now."""

from __future__ import annotations

import socket


def free_port(kind: str = "tcp") -> int:
    """A port on 127.0.0.1 that is free right now for ``kind`` ("tcp" or "udp")."""
    stype = {"tcp": socket.SOCK_STREAM, "udp": socket.SOCK_DGRAM}[kind]
    with socket.socket(socket.AF_INET, stype) as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def free_udp_tcp_port(attempts: int = 100) -> int:
    """A port on 127.0.0.1 free for both UDP and TCP (for a DNS server)."""
    for _ in range(attempts):
        with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as u:
            u.bind(("127.0.0.1", 0))
            port = int(u.getsockname()[1])
            with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as t:
                try:
                    t.bind(("127.0.0.1", port))
                except OSError:
                    continue
                return port
    raise RuntimeError("no port free on both UDP and TCP")
