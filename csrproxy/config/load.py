"""The whole document: read the TOML file and hand each section to its parser."""

from __future__ import annotations

import tomllib
from collections.abc import Mapping
from pathlib import Path
from typing import Any

from csrproxy.config.acme import parse_acme
from csrproxy.config.api import parse_api
from csrproxy.config.dns import parse_dns
from csrproxy.config.model import Config
from csrproxy.config.policy import check_names_in_zones, parse_policy
from csrproxy.config.reader import Table
from csrproxy.config.renewal import parse_renewal
from csrproxy.config.state import parse_cluster, parse_state
from csrproxy.config.status import parse_status
from csrproxy.errors import ConfigError


def load_config(path: str | Path) -> Config:
    """Read and check the TOML file at ``path``; every mistake is one :class:`ConfigError`."""
    try:
        raw = Path(path).read_bytes()
    except OSError as e:
        raise ConfigError("", f"cannot read configuration file {path}: {e.strerror}") from e
    try:
        data = tomllib.loads(raw.decode("utf-8"))
    except (UnicodeDecodeError, tomllib.TOMLDecodeError) as e:
        raise ConfigError("", f"{path} is not valid TOML: {e}") from e
    return parse_config(data, source=str(path))


def parse_config(data: Mapping[str, Any], source: str = "") -> Config:
    """Build a :class:`Config` from already-parsed TOML data."""
    document = Table(data)
    acme = parse_acme(document.table("acme"))
    api = parse_api(document.table("api", required=False))
    dns = parse_dns(document.table("dns"), acme.directory)
    policy = parse_policy(document.table("policy"))
    pdns_zone = (dns.powerdns.zone,) if dns.powerdns is not None else ()
    check_names_in_zones(policy.names, (*dns.zones, *pdns_zone))
    state = parse_state(document.table("state"))
    renewal = parse_renewal(document.table("renewal", required=False))
    cluster = parse_cluster(document.table("cluster", required=False))
    status = parse_status(document.table("status", required=False))
    if cluster.dns_peers and state.backend != "postgresql":
        raise ConfigError("cluster.dns_peers", 'needs [state] backend = "postgresql"')
    document.done()
    return Config(
        acme, api, dns, policy, state, renewal, source=source, cluster=cluster, status=status
    )
