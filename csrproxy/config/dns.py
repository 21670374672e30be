"""The ``[dns]`` section and its ``[dns.powerdns]`` and ``[dns.rrl]`` tables: the zone,
where its challenge records go, and how its UDP replies are rate limited."""

from __future__ import annotations

import base64
import binascii
import ipaddress

from csrproxy.config.acme import caa_identity
from csrproxy.config.model import DNSConfig, PowerDNSConfig, RRLConfig, SecondaryConfig
from csrproxy.config.reader import Table
from csrproxy.dns.cookies import MAX_NSID, MIN_ROTATION, nsid_bytes
from csrproxy.names import is_issuer_domain

BACKENDS = ("builtin", "powerdns")


def parse_dns(dns: Table, directory: str = "") -> DNSConfig:
    """``[dns]``; ``directory`` (``[acme] directory``) gives the default CAA identity."""
    zones = parse_zones(dns)
    zone = zones[0]
    backend = dns.get("backend", str, DNSConfig.backend)
    if backend not in BACKENDS:
        raise dns.error("backend", f'must be "builtin" or "powerdns", not {backend!r}')
    if backend == "powerdns" and len(zones) > 1:
        raise dns.error("zones", "several zones with backend powerdns are not supported yet")
    pdns = dns.optional_table("powerdns")
    if backend == "powerdns" and pdns is None:
        raise dns.error("powerdns", "missing section [dns.powerdns] for backend powerdns")
    nameservers = tuple(n.rstrip(".").lower() for n in dns.strings("nameservers", ()))
    config = DNSConfig(
        zone=zone,
        zones=zones,
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
        cookie_rotation=parse_cookie_rotation(dns),
        require_cookies=dns.get("require_cookies", bool, DNSConfig.require_cookies),
        secondaries=parse_secondaries(dns),
        check_timeout=dns.positive("check_timeout", DNSConfig.check_timeout),
        caa=dns.get("caa", bool, DNSConfig.caa),
        caa_identities=parse_caa_identities(dns, directory),
    )
    if config.require_cookies and not config.cookies:
        raise dns.error("require_cookies", "needs cookies = true (no cookies to require)")
    dns.done()
    return config


# More zones than this is a mistake: each is a registered domain's weekly budget.
MAX_ZONES = 64


def parse_zones(dns: Table) -> tuple[str, ...]:
    """``zone`` and ``zones``: every zone, in configuration order (``zone`` first when
    both are given, and then it must be ``zones[0]``); none below another."""
    one = dns.get("zone", str, None)
    listed = dns.strings("zones", ())
    if one is None and not listed:
        raise dns.error("zone", "missing required key (or give zones)")
    if len(listed) > MAX_ZONES:
        raise dns.error("zones", f"at most {MAX_ZONES}, not {len(listed)}")
    zones: list[str] = []
    for key, text in [("zones", z) for z in listed] or [("zone", one or "")]:
        zone = text.strip().rstrip(".").lower()
        if not zone or "." not in zone or not all(1 <= len(x) <= 63 for x in zone.split(".")):
            raise dns.error(key, f"{text!r} is not a DNS zone name")
        if zone in zones:
            raise dns.error(key, f"{zone} is listed twice")
        for other in zones:
            if zone.endswith("." + other) or other.endswith("." + zone):
                inner, outer = (zone, other) if len(zone) > len(other) else (other, zone)
                raise dns.error(key, f"{inner} is inside {outer}: zones must not nest")
        zones.append(zone)
    if one is not None and listed and one.strip().rstrip(".").lower() != zones[0]:
        raise dns.error("zone", f"{one!r} must be the first of zones ({zones[0]}), or left out")
    return tuple(zones)


# More CAs than this in CAA is a mistake (each costs two records in every CAA answer).
MAX_CAA_IDENTITIES = 8


def parse_caa_identities(dns: Table, directory: str) -> tuple[str, ...]:
    """``caa_identities`` (lowercase, duplicates dropped), else the known identity of the
    CA at ``directory``, else none."""
    if "caa_identities" not in dns.data:
        dns.strings("caa_identities", ())  # known to done()
        known = caa_identity(directory)
        return (known,) if known is not None else ()
    found: list[str] = []
    for entry in dns.strings("caa_identities"):
        identity = entry.strip().rstrip(".").lower()
        if not is_issuer_domain(identity):
            raise dns.error("caa_identities", f"{entry!r} is not a CA's domain name (RFC 8659)")
        if identity not in found:
            found.append(identity)
    if not found:
        raise dns.error("caa_identities", "is empty: to serve no CAA, set caa = false")
    if len(found) > MAX_CAA_IDENTITIES:
        raise dns.error("caa_identities", f"at most {MAX_CAA_IDENTITIES}, not {len(found)}")
    return tuple(found)


def parse_cookie_rotation(dns: Table) -> int:
    rotation = dns.get("cookie_rotation", int, DNSConfig.cookie_rotation)
    if rotation < MIN_ROTATION:
        raise dns.error(
            "cookie_rotation",
            f"must be at least {MIN_ROTATION} seconds (twice a cookie's lifetime), not {rotation}",
        )
    return rotation


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


# The HMACs csrproxy.dns.tsig signs with (that package imports twisted: not here), and
# the shortest secret accepted (128 bits).
TSIG_ALGORITHMS = ("hmac-sha256", "hmac-sha384", "hmac-sha512", "hmac-sha224")
MIN_SECRET = 16
# More secondaries than this is a mistake, not a deployment.
MAX_SECONDARIES = 32


def parse_secondaries(dns: Table) -> tuple[SecondaryConfig, ...]:
    """``[[dns.secondaries]]``: each needs address, tsig_name and tsig_secret (base64)."""
    entries = dns.get("secondaries", list, [])
    if len(entries) > MAX_SECONDARIES:
        raise dns.error("secondaries", f"at most {MAX_SECONDARIES}, not {len(entries)}")
    found = []
    for index, entry in enumerate(entries):
        if not isinstance(entry, dict):
            raise dns.error("secondaries", "must be tables [[dns.secondaries]]")
        found.append(parse_secondary(Table(entry, f"{dns.where('secondaries')}[{index}]")))
    return tuple(found)


def parse_secondary(table: Table) -> SecondaryConfig:
    raw_address = table.get("address", str).strip()
    try:
        address = str(ipaddress.ip_address(raw_address))
    except ValueError:
        raise table.error("address", f"{raw_address!r} is not an IP address") from None
    notify_port = table.get("notify_port", int, SecondaryConfig.notify_port)
    if not 1 <= notify_port <= 65535:
        raise table.error("notify_port", f"must be from 1 to 65535, not {notify_port}")
    name = table.get("tsig_name", str).strip().rstrip(".").lower()
    if not name or len(name) > 253 or any(not 1 <= len(x) <= 63 for x in name.split(".")):
        raise table.error("tsig_name", f"{name!r} is not a DNS name")
    algorithm = table.get("tsig_algorithm", str, SecondaryConfig.tsig_algorithm).lower()
    algorithm = algorithm.rstrip(".")
    if algorithm not in TSIG_ALGORITHMS:
        raise table.error(
            "tsig_algorithm", f"must be one of {', '.join(TSIG_ALGORITHMS)}, not {algorithm!r}"
        )
    text = table.get("tsig_secret", str).strip()
    try:
        secret = base64.b64decode(text, validate=True)
    except (binascii.Error, ValueError):
        raise table.error("tsig_secret", "is not base64") from None
    if len(secret) < MIN_SECRET:
        raise table.error("tsig_secret", f"must be at least {MIN_SECRET} bytes, not {len(secret)}")
    # Where the secondary serves the zone: by default where NOTIFY goes; "" skips it.
    default_check = f"[{address}]" if ":" in address else address
    check: str | None = table.get("check", str, f"{default_check}:{notify_port}").strip()
    if check:
        host, colon, port = check.rpartition(":")
        if not colon or not port.isdigit() or not 1 <= int(port) <= 65535 or not host:
            raise table.error("check", f"must be host:port or [v6]:port, not {check!r}")
    else:
        check = None
    config = SecondaryConfig(
        address=address,
        tsig_name=name,
        tsig_secret=secret,
        tsig_algorithm=algorithm,
        notify_port=notify_port,
        check=check,
    )
    table.done()
    return config


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
