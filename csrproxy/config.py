"""The typed configuration, loaded from a TOML file.

Every mistake is reported as one :class:`~csrproxy.errors.ConfigError` naming
the key (``section.key``) and what is wrong with it.  This module does not
import Twisted.
"""

from __future__ import annotations

import tomllib
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, TypeVar

from csrproxy.errors import ConfigError

T = TypeVar("T")


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
    #: File of accepted bearer token hashes (see csrproxy.auth); None: no tokens needed.
    tokens_file: str | None = None
    #: Client addresses or CIDRs allowed to use the API; empty: everyone.
    allow_from: tuple[str, ...] = ()
    #: Reverse proxies whose X-Forwarded-For is believed.
    trusted_proxies: tuple[str, ...] = ()
    #: One access-log line per request.
    access_log: bool = False


@dataclass(frozen=True)
class PowerDNSConfig:
    api_url: str
    api_key: str = field(repr=False)
    server_id: str = "localhost"
    #: The PowerDNS zone that holds the records (default: ``[dns] zone``).
    zone: str = ""
    ttl: int = 60
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
class DNSConfig:
    zone: str
    listen: tuple[str, ...] = ()
    nameservers: tuple[str, ...] = ()
    records: tuple[str, ...] = ()
    ttl: int = 300
    challenge_ttl: int = 10
    #: "builtin" (our own authoritative server) or "powerdns" (records pushed to its API).
    backend: str = "builtin"
    powerdns: PowerDNSConfig | None = None


@dataclass(frozen=True)
class PolicyConfig:
    names: tuple[str, ...]
    #: Seed mode: the exact RFC 4514 subject every CSR must carry (names default to its CN).
    subject: str | None = None
    key_types: tuple[str, ...] = ("rsa2048", "rsa3072", "rsa4096", "ec256", "ec384")
    max_names: int = 100
    #: The registered domain the new-names budget is counted for (default: the last two
    #: labels of [dns] zone).
    registered_domain: str = ""
    new_names_per_week: int = 45
    orders_per_3h: int = 250
    same_names_per_week: int = 5
    client_requests_per_hour: int = 60


@dataclass(frozen=True)
class StateConfig:
    dir: str


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


@dataclass(frozen=True)
class Config:
    acme: ACMEConfig
    api: APIConfig
    dns: DNSConfig
    policy: PolicyConfig
    state: StateConfig
    renewal: RenewalConfig = RenewalConfig()
    source: str = field(default="", compare=False)


def load_config(path: str | Path) -> Config:
    """Read and check the TOML file at ``path``."""
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
    _no_unknown("", data, {"acme", "api", "dns", "policy", "state", "renewal"})
    acme = _section(data, "acme")
    api = _section(data, "api", required=False)
    dns = _section(data, "dns")
    policy = _section(data, "policy")
    state = _section(data, "state")

    _no_unknown(
        "acme",
        acme,
        {
            "directory",
            "contact",
            "ca_certs",
            "poll_interval",
            "poll_max",
            "order_timeout",
            "request_timeout",
            "account_key_type",
            "eab_kid",
            "eab_hmac_key",
            "preferred_chain",
            "profile",
        },
    )
    directory = _get(acme, "acme", "directory", str)
    if not directory.startswith(("https://", "http://")):
        raise ConfigError("acme.directory", f"must be an https:// URL, not {directory!r}")
    contact = _str_list(acme, "acme", "contact", default=())
    for c in contact:
        if not c.startswith("mailto:") or "@" not in c:
            raise ConfigError("acme.contact", f"{c!r} is not a mailto: URI")
    ca_certs = _get(acme, "acme", "ca_certs", str, default=None)
    if ca_certs is not None and not Path(ca_certs).is_file():
        raise ConfigError("acme.ca_certs", f"no such file: {ca_certs}")
    key_type = _get(acme, "acme", "account_key_type", str, default="ec256")
    if key_type not in ("ec256", "ec384", "rsa2048", "rsa3072", "rsa4096"):
        raise ConfigError(
            "acme.account_key_type", f"{key_type!r} is not ec256, ec384, rsa2048, rsa3072, rsa4096"
        )
    eab_kid = _get(acme, "acme", "eab_kid", str, default=None)
    eab_hmac = _get(acme, "acme", "eab_hmac_key", str, default=None)
    if (eab_kid is None) != (eab_hmac is None):
        raise ConfigError(
            "acme.eab_hmac_key" if eab_hmac is None else "acme.eab_kid",
            "eab_kid and eab_hmac_key go together",
        )
    if eab_hmac is not None:
        import base64
        import binascii

        try:
            base64.urlsafe_b64decode(eab_hmac + "=" * (-len(eab_hmac) % 4))
        except (binascii.Error, ValueError) as e:
            raise ConfigError("acme.eab_hmac_key", "is not base64url") from e
    acme_cfg = ACMEConfig(
        directory=directory,
        contact=contact,
        ca_certs=ca_certs,
        poll_interval=_positive(acme, "acme", "poll_interval", 1.0),
        poll_max=_positive(acme, "acme", "poll_max", 10.0),
        order_timeout=_positive(acme, "acme", "order_timeout", 300.0),
        request_timeout=_positive(acme, "acme", "request_timeout", 30.0),
        account_key_type=key_type,
        eab_kid=eab_kid,
        eab_hmac_key=eab_hmac,
        preferred_chain=_get(acme, "acme", "preferred_chain", str, default=None),
        profile=_get(acme, "acme", "profile", str, default=None),
    )

    _no_unknown(
        "api",
        api,
        {
            "listen",
            "max_body",
            "sync_timeout",
            "read_timeout",
            "idle_timeout",
            "tokens_file",
            "allow_from",
            "trusted_proxies",
            "access_log",
        },
    )
    from csrproxy.config_policy import parse_networks, parse_policy  # late: no import cycle

    tokens_file = _get(api, "api", "tokens_file", str, default=None)
    if tokens_file is not None and not Path(tokens_file).is_file():
        raise ConfigError("api.tokens_file", f"no such file: {tokens_file}")
    api_cfg = APIConfig(
        listen=_str_list(api, "api", "listen", default=APIConfig.listen),
        max_body=int(_positive(api, "api", "max_body", APIConfig.max_body, kind=int)),
        sync_timeout=_positive(api, "api", "sync_timeout", APIConfig.sync_timeout),
        read_timeout=_positive(api, "api", "read_timeout", APIConfig.read_timeout),
        idle_timeout=_positive(api, "api", "idle_timeout", APIConfig.idle_timeout),
        tokens_file=tokens_file,
        allow_from=parse_networks(api, "allow_from"),
        trusted_proxies=parse_networks(api, "trusted_proxies"),
        access_log=_get(api, "api", "access_log", bool, default=False),
    )

    _no_unknown(
        "dns",
        dns,
        {"zone", "listen", "nameservers", "records", "ttl", "challenge_ttl", "backend", "powerdns"},
    )
    zone = _get(dns, "dns", "zone", str).strip().rstrip(".").lower()
    if not zone or "." not in zone:
        raise ConfigError("dns.zone", f"{zone!r} is not a DNS zone name")
    backend = _get(dns, "dns", "backend", str, default="builtin")
    if backend not in ("builtin", "powerdns"):
        raise ConfigError("dns.backend", f'must be "builtin" or "powerdns", not {backend!r}')
    pdns = _section(dns, "powerdns", required=False) if "powerdns" in dns else None
    if backend == "powerdns" and pdns is None:
        raise ConfigError("dns.powerdns", "missing section [dns.powerdns] for backend powerdns")
    pdns_cfg = _powerdns(pdns, zone) if pdns is not None else None
    nameservers = tuple(
        n.rstrip(".").lower() for n in _str_list(dns, "dns", "nameservers", default=())
    )
    dns_cfg = DNSConfig(
        zone=zone,
        listen=_str_list(dns, "dns", "listen", default=()),
        nameservers=nameservers or (f"ns1.{zone}",),
        records=_str_list(dns, "dns", "records", default=()),
        ttl=int(_positive(dns, "dns", "ttl", 300, kind=int)),
        challenge_ttl=int(_positive(dns, "dns", "challenge_ttl", 10, kind=int)),
        backend=backend,
        powerdns=pdns_cfg,
    )

    policy_cfg = parse_policy(policy, zone)

    _no_unknown("state", state, {"dir"})
    state_cfg = StateConfig(dir=_get(state, "state", "dir", str))

    renewal = _section(data, "renewal", required=False)
    _no_unknown("renewal", renewal, {"enabled", "active_days", "interval", "max_parallel"})
    renewal_cfg = RenewalConfig(
        enabled=_get(renewal, "renewal", "enabled", bool, default=True),
        active_days=_positive(renewal, "renewal", "active_days", 30.0),
        interval=_positive(renewal, "renewal", "interval", 300.0),
        max_parallel=int(_positive(renewal, "renewal", "max_parallel", 4, kind=int)),
    )
    return Config(acme_cfg, api_cfg, dns_cfg, policy_cfg, state_cfg, renewal_cfg, source=source)


def _powerdns(data: Mapping[str, Any], zone: str) -> PowerDNSConfig:
    s = "dns.powerdns"
    _no_unknown(
        s,
        data,
        {
            "api_url",
            "api_key",
            "server_id",
            "zone",
            "ttl",
            "check_servers",
            "check_timeout",
            "check_propagation",
            "api_timeout",
        },
    )
    api_url = _get(data, s, "api_url", str).rstrip("/")
    if not api_url.startswith(("http://", "https://")):
        raise ConfigError(f"{s}.api_url", f"must be an http(s):// URL, not {api_url!r}")
    return PowerDNSConfig(
        api_url=api_url,
        api_key=_get(data, s, "api_key", str),
        server_id=_get(data, s, "server_id", str, default="localhost"),
        zone=_get(data, s, "zone", str, default=zone).rstrip(".").lower(),
        ttl=int(_positive(data, s, "ttl", 60, kind=int)),
        check_servers=_str_list(data, s, "check_servers", default=()),
        check_timeout=_positive(data, s, "check_timeout", 60.0),
        api_timeout=_positive(data, s, "api_timeout", 30.0),
        check_propagation=_get(data, s, "check_propagation", bool, default=True),
    )


def _section(data: Mapping[str, Any], name: str, required: bool = True) -> Mapping[str, Any]:
    value = data.get(name)
    if value is None:
        if required:
            raise ConfigError(name, f"missing section [{name}]")
        return {}
    if not isinstance(value, Mapping):
        raise ConfigError(name, f"must be a table [{name}], not {type(value).__name__}")
    return value


def _no_unknown(section: str, data: Mapping[str, Any], known: set[str]) -> None:
    for key in data:
        if key not in known:
            where = f"{section}.{key}" if section else key
            raise ConfigError(where, f"unknown key (known: {', '.join(sorted(known))})")


_MISSING: Any = object()


def _get(
    data: Mapping[str, Any],
    section: str,
    key: str,
    kind: type[T],
    default: Any = _MISSING,
) -> T:
    if key not in data:
        if default is _MISSING:
            raise ConfigError(f"{section}.{key}", "missing required key")
        return default  # type: ignore[no-any-return]
    value = data[key]
    if kind is float and isinstance(value, int) and not isinstance(value, bool):
        value = float(value)
    if not isinstance(value, kind) or (kind is int and isinstance(value, bool)):
        raise ConfigError(
            f"{section}.{key}",
            f"must be {_KIND_NAMES.get(kind, kind.__name__)}, not {type(value).__name__}",
        )
    return value


_KIND_NAMES: dict[type[Any], str] = {
    str: "a string",
    bool: "true or false",
    int: "an integer",
    float: "a number",
    list: "a list",
}


def _str_list(
    data: Mapping[str, Any],
    section: str,
    key: str,
    default: tuple[str, ...] | object = _MISSING,
) -> tuple[str, ...]:
    if key not in data and default is not _MISSING:
        return default  # type: ignore[return-value]
    value = _get(data, section, key, list)
    for item in value:
        if not isinstance(item, str):
            raise ConfigError(f"{section}.{key}", f"must be a list of strings, found {item!r}")
    return tuple(value)


def _positive(
    data: Mapping[str, Any],
    section: str,
    key: str,
    default: float,
    kind: Callable[[Any], Any] = float,
) -> float:
    value = _get(data, section, key, int if kind is int else float, default=default)
    if value <= 0:
        raise ConfigError(f"{section}.{key}", f"must be greater than 0, not {value}")
    return float(value)
