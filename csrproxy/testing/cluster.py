"""Several ``twistd csrproxy`` instances on one PostgreSQL database, on loopback.

Each instance has its own state directory (with the same provisioned ``account.key``),
API port and DNS port; ``[cluster] dns_peers`` lists every instance's DNS, so each
challenge is answered only once all of them serve it.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

from csrproxy.acme.jws import AccountKey
from csrproxy.state.store import ACCOUNT_KEY, atomic_write
from csrproxy.testing.daemon import Csrproxy, start_csrproxy
from csrproxy.testing.pebble import Pebble
from csrproxy.testing.ports import free_udp_tcp_port


def cluster_dns_ports(count: int) -> list[int]:
    """Free DNS ports for ``count`` instances (pebble is told the first before they start)."""
    return [free_udp_tcp_port() for _ in range(count)]


def provision_account_key(workdirs: Sequence[Path]) -> str:
    """One account key written into every instance's state directory; its thumbprint."""
    key = AccountKey.generate("ec256")
    for work in workdirs:
        state = work / "state"
        state.mkdir(mode=0o700, parents=True, exist_ok=True)
        atomic_write(state / ACCOUNT_KEY, key.to_pem())
    return key.thumbprint


def start_cluster(
    workdir: str,
    pebble: Pebble,
    dsn: str,
    zone: str,
    dns_ports: Sequence[int],
    *,
    overrides: Mapping[str, Mapping[str, Any]] | None = None,
) -> list[Csrproxy]:
    """Start one instance per DNS port, ``ns1``, ``ns2``, ...; stops those started if one
    fails."""
    root = Path(workdir)
    works = [root / f"ns{i + 1}" for i in range(len(dns_ports))]
    provision_account_key(works)
    peers = [f"127.0.0.1:{port}" for port in dns_ports]
    started: list[Csrproxy] = []
    try:
        for i, (work, port) in enumerate(zip(works, dns_ports, strict=True)):
            config: dict[str, dict[str, Any]] = {
                "state": {"backend": "postgresql", "dsn": dsn},
                "cluster": {"instance": f"ns{i + 1}", "dns_peers": peers},
            }
            for section, values in (overrides or {}).items():
                config.setdefault(section, {}).update(values)
            started.append(
                start_csrproxy(str(work), pebble, port, zone, overrides=config, timeout=60)
            )
    except BaseException:
        for daemon in started:
            daemon.stop()
        raise
    return started
