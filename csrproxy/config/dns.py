"""The ``[dns]`` section and its ``[dns.powerdns]`` table: the zone and where its
challenge records go."""

from __future__ import annotations

from csrproxy.config.model import DNSConfig, PowerDNSConfig
from csrproxy.config.reader import Table

BACKENDS = ("builtin", "powerdns")


def parse_dns(dns: Table) -> DNSConfig:
    zone = dns.get("zone", str).strip().rstrip(".").lower()
    if not zone or "." not in zone:
        raise dns.error("zone", f"{zone!r} is not a DNS zone name")
    backend = dns.get("backend", str, DNSConfig.backend)
    if backend not in BACKENDS:
        raise dns.error("backend", f'must be "builtin" or "powerdns", not {backend!r}')
    pdns = dns.optional_table("powerdns")
    if backend == "powerdns" and pdns is None:
        raise dns.error("powerdns", "missing section [dns.powerdns] for backend powerdns")
    nameservers = tuple(n.rstrip(".").lower() for n in dns.strings("nameservers", ()))
    config = DNSConfig(
        zone=zone,
        listen=dns.strings("listen", DNSConfig.listen),
        nameservers=nameservers or (f"ns1.{zone}",),
        records=dns.strings("records", DNSConfig.records),
        ttl=dns.positive_int("ttl", DNSConfig.ttl),
        challenge_ttl=dns.positive_int("challenge_ttl", DNSConfig.challenge_ttl),
        backend=backend,
        powerdns=parse_powerdns(pdns, zone) if pdns is not None else None,
    )
    dns.done()
    return config


def parse_powerdns(pdns: Table, zone: str) -> PowerDNSConfig:
    """``[dns.powerdns]``; its ``zone`` defaults to ``[dns] zone``."""
    api_url = pdns.get("api_url", str).rstrip("/")
    if not api_url.startswith(("http://", "https://")):
        raise pdns.error("api_url", f"must be an http(s):// URL, not {api_url!r}")
    config = PowerDNSConfig(
        api_url=api_url,
        api_key=pdns.get("api_key", str),
        server_id=pdns.get("server_id", str, PowerDNSConfig.server_id),
        zone=pdns.get("zone", str, zone).rstrip(".").lower(),
        ttl=pdns.positive_int("ttl", PowerDNSConfig.ttl),
        check_servers=pdns.strings("check_servers", PowerDNSConfig.check_servers),
        check_timeout=pdns.positive("check_timeout", PowerDNSConfig.check_timeout),
        check_propagation=pdns.get("check_propagation", bool, PowerDNSConfig.check_propagation),
        api_timeout=pdns.positive("api_timeout", PowerDNSConfig.api_timeout),
    )
    pdns.done()
    return config
