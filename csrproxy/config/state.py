"""The ``[state]`` section (where durable state is kept) and ``[cluster]`` (this instance
among several sharing a PostgreSQL database)."""

from __future__ import annotations

import re
import socket

from csrproxy.config.model import ClusterConfig, StateConfig
from csrproxy.config.reader import Table

BACKENDS = ("sqlite", "postgresql")
#: An instance name: what a host name label may be, a little longer.
_INSTANCE = re.compile(r"^[A-Za-z0-9][A-Za-z0-9._-]{0,62}$")
# The shortest order lease: heartbeats every quarter of it must not be lost in a hiccup.
MIN_LEASE = 4.0
# More peers than this is a mistake, not a deployment.
MAX_PEERS = 32


def parse_state(state: Table) -> StateConfig:
    backend = state.get("backend", str, StateConfig.backend)
    if backend not in BACKENDS:
        raise state.error("backend", f'must be "sqlite" or "postgresql", not {backend!r}')
    dsn = state.get("dsn", str, None)
    if backend == "postgresql":
        if not dsn:
            raise state.error("dsn", "is needed with backend = \"postgresql\"")
        if not dsn.startswith(("postgresql://", "postgres://")):
            raise state.error("dsn", "must be a postgresql:// URL")
    elif dsn is not None:
        raise state.error("dsn", "is only read with backend = \"postgresql\"")
    config = StateConfig(
        dir=state.get("dir", str),
        retention_days=state.positive("retention_days", StateConfig.retention_days),
        backend=backend,
        dsn=dsn,
    )
    state.done()
    return config


def parse_cluster(cluster: Table | None) -> ClusterConfig:
    if cluster is None:
        return ClusterConfig(instance=default_instance())
    instance = cluster.get("instance", str, "") or default_instance()
    if not _INSTANCE.match(instance):
        raise cluster.error(
            "instance", f"{instance!r}: letters, digits, '.', '_' and '-', at most 63"
        )
    peers = cluster.strings("dns_peers", ())
    if len(peers) > MAX_PEERS:
        raise cluster.error("dns_peers", f"at most {MAX_PEERS}, not {len(peers)}")
    for peer in peers:
        host, colon, port = peer.strip().rpartition(":")
        if not colon or not host or not port.isdigit() or not 1 <= int(port) <= 65535:
            raise cluster.error("dns_peers", f"{peer!r}: want host:port or [v6]:port")
    lease = cluster.positive("order_lease", ClusterConfig.order_lease)
    if lease < MIN_LEASE:
        raise cluster.error("order_lease", f"must be at least {MIN_LEASE:g} seconds, not {lease:g}")
    config = ClusterConfig(
        instance=instance, dns_peers=tuple(p.strip() for p in peers), order_lease=lease
    )
    cluster.done()
    return config


def default_instance() -> str:
    """The host name's first label (what an operator calls the box)."""
    name = socket.gethostname().split(".")[0]
    return name if _INSTANCE.match(name) else "csrproxy"
