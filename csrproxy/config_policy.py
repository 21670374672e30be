"""Parsing of the ``[policy]`` section and the ``[api]`` address lists (split from
:mod:`csrproxy.config` to keep it small).  No Twisted here either."""

from __future__ import annotations

import ipaddress
from collections.abc import Mapping
from typing import Any

from csrproxy.config import (
    _MISSING,
    PolicyConfig,
    _get,
    _no_unknown,
    _positive,
    _str_list,
)
from csrproxy.errors import ConfigError


def parse_policy(policy: Mapping[str, Any], zone: str) -> PolicyConfig:
    """The ``[policy]`` section."""
    from csrproxy.policy import NamePattern, subject_common_name  # pure; imported late

    _no_unknown(
        "policy",
        policy,
        {
            "names",
            "subject",
            "key_types",
            "max_names",
            "registered_domain",
            "new_names_per_week",
            "orders_per_3h",
            "same_names_per_week",
            "client_requests_per_hour",
        },
    )
    subject = _get(policy, "policy", "subject", str, default=None)
    names = _str_list(policy, "policy", "names", default=() if subject is not None else _MISSING)
    if subject is not None:
        try:
            cn = subject_common_name(subject)
        except ValueError as e:
            raise ConfigError("policy.subject", str(e)) from e
        names = names or (cn,)
    if not names:
        raise ConfigError("policy.names", "needs at least one name pattern")
    for n in names:
        try:
            NamePattern.parse(n)
        except ValueError as e:
            raise ConfigError("policy.names", str(e)) from e
    defaults = PolicyConfig(names=())
    key_types = _str_list(policy, "policy", "key_types", default=defaults.key_types)
    for kt in key_types:
        if kt not in defaults.key_types:
            raise ConfigError(
                "policy.key_types", f"{kt!r} is not one of {', '.join(defaults.key_types)}"
            )
    if not key_types:
        raise ConfigError("policy.key_types", "needs at least one key type")
    registered = _get(policy, "policy", "registered_domain", str, default="")
    registered = registered.strip().rstrip(".").lower() or ".".join(zone.split(".")[-2:])

    def budget(key: str) -> int:
        value = _get(policy, "policy", key, int, default=getattr(defaults, key))
        if value < 0:
            raise ConfigError(f"policy.{key}", f"must be 0 (off) or more, not {value}")
        return value

    return PolicyConfig(
        names=names,
        subject=subject,
        key_types=key_types,
        max_names=int(_positive(policy, "policy", "max_names", 100, kind=int)),
        registered_domain=registered,
        new_names_per_week=budget("new_names_per_week"),
        orders_per_3h=budget("orders_per_3h"),
        same_names_per_week=budget("same_names_per_week"),
        client_requests_per_hour=budget("client_requests_per_hour"),
    )


def parse_networks(data: Mapping[str, Any], key: str) -> tuple[str, ...]:
    """``[api] allow_from`` / ``trusted_proxies``: addresses or CIDRs."""
    entries = _str_list(data, "api", key, default=())
    for entry in entries:
        try:
            ipaddress.ip_network(entry.strip(), strict=False)
        except ValueError as e:
            raise ConfigError(f"api.{key}", f"{entry!r} is not an address or CIDR: {e}") from None
    return entries
