"""The ``[api]`` section: where the HTTP API listens, its limits, and who may use it."""

from __future__ import annotations

import ipaddress
from pathlib import Path

from csrproxy.config.model import APIConfig, Network
from csrproxy.config.reader import Table


def parse_api(api: Table) -> APIConfig:
    tokens_file = api.get("tokens_file", str, APIConfig.tokens_file)
    if tokens_file is not None and not Path(tokens_file).is_file():
        raise api.error("tokens_file", f"no such file: {tokens_file}")
    config = APIConfig(
        listen=api.strings("listen", APIConfig.listen),
        max_body=api.positive_int("max_body", APIConfig.max_body),
        sync_timeout=api.positive("sync_timeout", APIConfig.sync_timeout),
        read_timeout=api.positive("read_timeout", APIConfig.read_timeout),
        idle_timeout=api.positive("idle_timeout", APIConfig.idle_timeout),
        max_connections=api.positive_int("max_connections", APIConfig.max_connections),
        max_connections_per_address=api.positive_int(
            "max_connections_per_address", APIConfig.max_connections_per_address
        ),
        tokens_file=tokens_file,
        allow_from=_networks(api, "allow_from"),
        trusted_proxies=_networks(api, "trusted_proxies"),
        access_log=api.get("access_log", bool, APIConfig.access_log),
    )
    api.done()
    return config


def _networks(api: Table, key: str) -> tuple[Network, ...]:
    """A list of addresses or CIDRs (host bits allowed: ``10.1.2.3/8`` is ``10.0.0.0/8``)."""
    networks = []
    for entry in api.strings(key, ()):
        try:
            networks.append(ipaddress.ip_network(entry.strip(), strict=False))
        except ValueError as e:
            raise api.error(key, f"{entry!r} is not an address or CIDR: {e}") from None
    return tuple(networks)
