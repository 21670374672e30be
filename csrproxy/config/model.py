"""The typed configuration: one frozen dataclass per section of the TOML file.

Defaults live here only; the section parsers read them from these classes.
"""

from __future__ import annotations

import ipaddress
from dataclasses import dataclass, field

from csrproxy.addresses import DEFAULT_RANGES
from csrproxy.names import CSR_KEY_TYPES

#: An entry of ``[api] allow_from`` or ``trusted_proxies``: an address is a /32 or /128.
Network = ipaddress.IPv4Network | ipaddress.IPv6Network


@dataclass(frozen=True)
class ACMEConfig:
    directory: str
    contact: tuple[str, ...] = ()
    ca_certs: str | None = None
    #: The first delay (seconds) before polling an authorization or order; doubles up to poll_max.
    poll_interval: float = 1.0
    poll_max: float = 10.0
    #: The overall deadline (seconds) of one order, from newOrder to the downloaded chain.
    order_timeout: float = 300.0
    #: Seconds allowed for one HTTP request to the CA.
    request_timeout: float = 30.0
    #: Type of a newly made account key: ec256, ec384, rsa2048, rsa3072 or rsa4096.
    account_key_type: str = "ec256"
    #: External Account Binding (ZeroSSL, Google Trust Services, step-ca): key id and
    #: base64url HMAC key, both or neither.
    eab_kid: str | None = None
    eab_hmac_key: str | None = field(default=None, repr=False)
    #: Pick the chain whose top certificate's issuer CN is this (else the CA's default).
    preferred_chain: str | None = None
    #: Certificate profile to ask for when the CA's directory offers it.
    profile: str | None = None
    #: ``[[acme.fallback]]``: the CAs an order goes to, in turn, when this one refuses it
    #: for a reason another CA would not share (rate limited, unavailable, a server error).
    fallback: tuple[FallbackConfig, ...] = ()


@dataclass(frozen=True)
class FallbackConfig:
    """One ``[[acme.fallback]]`` table: a CA of its own, with its own account and budgets."""

    acme: ACMEConfig
    #: Its CAA identity (RFC 8659), when its directory's host is not a known CA's.
    caa_identity: str | None = None
    #: Its budgets (0: off); a CA other than Let's Encrypt publishes other limits, or none.
    orders_per_3h: int = 250
    new_names_per_week: int = 0
    same_names_per_week: int = 0


@dataclass(frozen=True)
class APIConfig:
    listen: tuple[str, ...] = ("tcp:8000:interface=127.0.0.1",)
    max_body: int = 64 * 1024
    #: Seconds a synchronous sign request waits before it gets 202 and an order URL.
    sync_timeout: float = 50.0
    #: Seconds a request's headers and body have to arrive (408 after).
    read_timeout: float = 30.0
    #: Seconds an idle keep-alive connection stays open.
    idle_timeout: float = 60.0
    #: API connections open at once; one more is closed as soon as it is accepted.
    #: Keep it well below the unit's LimitNOFILE (65536) minus the DNS server's caps.
    max_connections: int = 1000
    #: API connections open at once from one client address (an IPv6 /64 counts as
    #: one); trusted_proxies count only towards max_connections.
    max_connections_per_address: int = 32
    #: File of accepted bearer token hashes (see csrproxy.web.auth); None: no tokens needed.
    tokens_file: str | None = None
    #: Client networks allowed to use the API; empty: everyone.
    allow_from: tuple[Network, ...] = ()
    #: Reverse proxies whose X-Forwarded-For is believed.
    trusted_proxies: tuple[Network, ...] = ()
    #: One access-log line per request.
    access_log: bool = False


@dataclass(frozen=True)
class PowerDNSConfig:
    api_url: str
    api_key: str = field(repr=False)
    server_id: str = "localhost"
    #: The PowerDNS zone that holds the records (default: ``[dns] zone``).
    zone: str = ""
    #: TTL of the challenge TXT RRsets: an order waits this plus 1 s after they are served.
    ttl: int = 1
    #: ``host:port`` servers that must answer a TXT value before the challenge is answered;
    #: empty means the zone's NS names, resolved.
    check_servers: tuple[str, ...] = ()
    #: Seconds to wait for every check server to serve a new value.
    check_timeout: float = 60.0
    #: Check over DNS that a value is served before answering the challenge.
    check_propagation: bool = True
    #: Seconds to keep retrying a failing PowerDNS API call.
    api_timeout: float = 30.0


@dataclass(frozen=True)
class RRLConfig:
    """``[dns.rrl]``: response rate limiting of UDP replies (``csrproxy.dns.rrl``)."""

    enabled: bool = True
    #: Per source prefix and second: identical answers (one name and type) ...
    responses_per_second: int = 20
    #: ... replies synthesised from one wildcard (every ``<id>.zone`` shares one account) ...
    wildcards_per_second: int = 1000
    #: ... NXDOMAIN replies, and every other error rcode. 0: not limited.
    nxdomains_per_second: int = 20
    errors_per_second: int = 20
    #: Seconds of debt a flooding prefix runs up (it waits this long once quiet).
    window: int = 15
    #: Every slip-th limited reply goes out truncated (TC=1); 0: all dropped.
    slip: int = 2
    ipv4_prefix_length: int = 24
    ipv6_prefix_length: int = 56
    #: CIDR networks never limited.
    exempt: tuple[str, ...] = ()
    #: Count and log limited replies, but send them.
    log_only: bool = False
    #: Accounts kept at most (least recently used evicted first).
    max_table_size: int = 65536


@dataclass(frozen=True)
class SecondaryConfig:
    """One ``[[dns.secondaries]]`` table: a secondary allowed to transfer the zone."""

    #: The address transfers are allowed from (TSIG required); NOTIFY goes here.
    address: str
    tsig_name: str
    tsig_secret: bytes = field(repr=False)
    tsig_algorithm: str = "hmac-sha256"
    notify_port: int = 53
    #: ``host:port`` where a challenge value must be seen before the challenge is
    #: answered (default ``address:notify_port``); None: not checked.
    check: str | None = None


@dataclass(frozen=True)
class DNSConfig:
    #: The first zone (``[dns] zone``, or the first of ``zones``).
    zone: str
    listen: tuple[str, ...] = ()
    nameservers: tuple[str, ...] = ()
    records: tuple[str, ...] = ()
    ttl: int = 300
    #: TTL of challenge TXT answers and the SOA minimum (negative answers): each order
    #: waits up to this (plus 1 s) for resolvers to drop an older answer, so keep it short.
    challenge_ttl: int = 1
    #: "builtin" (our own authoritative server) or "powerdns" (records pushed to its API).
    backend: str = "builtin"
    powerdns: PowerDNSConfig | None = None
    rrl: RRLConfig = RRLConfig()
    #: Answered to an empty NSID option (RFC 5001): text, or hex after "0x".
    nsid: str | None = None
    #: Answer DNS cookies (RFC 7873/9018); a valid server cookie bypasses [dns.rrl].
    cookies: bool = True
    #: Seconds each server-cookie secret (derived from the stored one) is current; the
    #: previous one is accepted too. At least 7200 (twice a cookie's hour of validity).
    cookie_rotation: int = 86400
    #: BADCOOKIE to UDP queries with a client cookie but no valid server cookie (RFC
    #: 7873 5.2.3); queries without a cookie and TCP are answered. Needs cookies.
    require_cookies: bool = False
    #: Secondaries that may transfer the zone by AXFR with their TSIG key.
    secondaries: tuple[SecondaryConfig, ...] = ()
    #: With secondaries: how long every name server may take to serve a challenge value
    #: before the order fails (seconds).
    check_timeout: float = 60.0
    #: CAA issue and issuewild at the apex (served, or written into PowerDNS) allowing
    #: only these CA identities, only our ACME account and only dns-01 (RFC 8657).
    caa: bool = True
    #: The CAs' CAA identities ("letsencrypt.org"): as configured, else the known one of
    #: [acme] directory's CA; empty when unknown (no CAA served, warned at start).
    caa_identities: tuple[str, ...] = ()
    #: Every zone csrproxy is authoritative for, in configuration order; ``(zone,)`` when
    #: only ``zone`` is given. Records and nameservers are the same in each.
    zones: tuple[str, ...] = ()

    def __post_init__(self) -> None:
        if not self.zones:
            object.__setattr__(self, "zones", (self.zone,))


@dataclass(frozen=True)
class PolicyConfig:
    names: tuple[str, ...]
    #: Seed mode: the exact RFC 4514 subject every CSR must carry (names default to its CN).
    subject: str | None = None
    key_types: tuple[str, ...] = CSR_KEY_TYPES
    max_names: int = 100
    #: The addresses names of ``{ip}`` patterns may carry (default: private and loopback).
    ip_ranges: tuple[Network, ...] = DEFAULT_RANGES
    #: Certificate profiles a request may ask for (POST /v1/sign "profile"), if the CA's
    #: directory offers them; empty: requests get [acme] profile.
    profiles: tuple[str, ...] = ()
    #: Names at or below it count for it in the new-names budget; every other name (and
    #: every name when empty, the default) for its registered domain by the Public Suffix
    #: List. The budgets below: csrproxy.issuance.admission.Budgets; 0 turns one off.
    registered_domain: str = ""
    new_names_per_week: int = 45
    orders_per_3h: int = 250
    same_names_per_week: int = 5
    client_requests_per_hour: int = 60
    failed_authorizations_per_hour: int = 5
    consecutive_failed_authorizations: int = 1152


@dataclass(frozen=True)
class StateConfig:
    #: Local files (the state lock; the account key file; the SQLite database).
    dir: str
    #: Days a superseded or expired certificate is kept after it expired, and a finished
    #: order after it ended (then pruned).
    retention_days: float = 30.0
    #: "sqlite" (a file in ``dir``) or "postgresql" (``dsn``: shared by several instances).
    backend: str = "sqlite"
    #: ``postgresql://user[:password]@host:port/db?...`` (libpq also reads ~/.pgpass and
    #: PGPASSWORD); kept out of reprs and logs.
    dsn: str | None = field(default=None, repr=False)


@dataclass(frozen=True)
class ClusterConfig:
    """``[cluster]``: this instance among several sharing one PostgreSQL database."""

    #: Unique per instance (default: the host name); in health, metrics and leases.
    instance: str = ""
    #: Every instance's DNS (``host:port``): each must serve a challenge value before the
    #: challenge is answered.
    dns_peers: tuple[str, ...] = ()
    #: Seconds an order stays this instance's without its heartbeat (every quarter of it);
    #: then another instance takes it over.
    order_lease: float = 60.0


@dataclass(frozen=True)
class RenewalConfig:
    #: Renew certificates on the server, without the installation.
    enabled: bool = True
    #: Only for installations that asked for their certificate within this many days.
    active_days: float = 30.0
    #: Seconds between looks for certificates due.
    interval: float = 300.0
    #: Renewals running at once.
    max_parallel: int = 4
    #: ARI (RFC 9773) look-ups running at once.
    ari_parallel: int = 4
    #: ARI look-ups started per second at most (a million certificates never ask at once).
    ari_per_second: float = 20.0
    #: Seconds between two ARI look-ups of one certificate at least (longer when the CA's
    #: Retry-After says so).
    ari_recheck: float = 6 * 3600.0


@dataclass(frozen=True)
class StatusConfig:
    """``[status]``: the operator's status page, ``GET /status`` on the API listeners."""

    enabled: bool = False
    #: Who may see it: a file in the API tokens' format (required when enabled).
    tokens_file: str | None = None
    #: Certificates due for renewal within this many days are listed.
    due_days: float = 7.0


@dataclass(frozen=True)
class Config:
    acme: ACMEConfig
    api: APIConfig
    dns: DNSConfig
    policy: PolicyConfig
    state: StateConfig
    renewal: RenewalConfig = RenewalConfig()
    source: str = field(default="", compare=False)
    cluster: ClusterConfig = ClusterConfig()
    status: StatusConfig = StatusConfig()
