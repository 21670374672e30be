"""The ``[dns]`` section and its ``[dns.powerdns]`` and ``[dns.rrl]`` tables: the zone,
where its challenge records go, and how its UDP replies are rate limited."""

from __future__ import annotations

import ipaddress

from csrproxy.config.model import DNSConfig, PowerDNSConfig, RRLConfig
from csrproxy.config.reader import Table
from csrproxy.dns.cookies import MAX_NSID, nsid_bytes

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
        rrl=parse_rrl(dns.table("rrl", required=False)),
        nsid=parse_nsid(dns),
        cookies=dns.get("cookies", bool, DNSConfig.cookies),
    )
    dns.done()
    return config


def parse_nsid(dns: Table) -> str | None:
    nsid = dns.get("nsid", str, None)
    if nsid is None:
        return None
    try:
        wire = nsid_bytes(nsid)
    except ValueError:
        raise dns.error("nsid", f"{nsid!r} starts with 0x but is not hex") from None
    if not 1 <= len(wire) <= MAX_NSID:
        raise dns.error("nsid", f"must be 1 to {MAX_NSID} bytes, not {len(wire)}")
    return nsid


# The largest table accepted: about 290 MB of accounts (csrproxy.dns.rrl.ENTRY_BYTES).
MAX_RRL_TABLE = 1 << 20


def parse_rrl(rrl: Table) -> RRLConfig:
    """``[dns.rrl]``; every key has a default, and the table itself may be absent."""

    def between(key: str, default: int, low: int, high: int) -> int:
        value = rrl.get(key, int, default)
        if not low <= value <= high:
            raise rrl.error(key, f"must be from {low} to {high}, not {value}")
        return value

    exempt = []
    for entry in rrl.strings("exempt", RRLConfig.exempt):
        try:
            exempt.append(str(ipaddress.ip_network(entry.strip(), strict=False)))
        except ValueError:
            raise rrl.error("exempt", f"{entry!r} is not an IP network (CIDR)") from None
    config = RRLConfig(
        enabled=rrl.get("enabled", bool, RRLConfig.enabled),
        responses_per_second=between(
            "responses_per_second", RRLConfig.responses_per_second, 0, 1_000_000
        ),
        wildcards_per_second=between(
            "wildcards_per_second", RRLConfig.wildcards_per_second, 0, 1_000_000
        ),
        nxdomains_per_second=between(
            "nxdomains_per_second", RRLConfig.nxdomains_per_second, 0, 1_000_000
        ),
        errors_per_second=between("errors_per_second", RRLConfig.errors_per_second, 0, 1_000_000),
        # BIND's bounds for window and slip.
        window=between("window", RRLConfig.window, 1, 3600),
        slip=between("slip", RRLConfig.slip, 0, 10),
        ipv4_prefix_length=between("ipv4_prefix_length", RRLConfig.ipv4_prefix_length, 8, 32),
        ipv6_prefix_length=between("ipv6_prefix_length", RRLConfig.ipv6_prefix_length, 16, 128),
        exempt=tuple(exempt),
        log_only=rrl.get("log_only", bool, RRLConfig.log_only),
        max_table_size=between("max_table_size", RRLConfig.max_table_size, 1, MAX_RRL_TABLE),
    )
    rrl.done()
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
