"""The ``[policy]`` section: which names may be asked for, with which keys, how often."""

from __future__ import annotations

from collections.abc import Sequence

from csrproxy.addresses import parse_ranges
from csrproxy.config.model import PolicyConfig
from csrproxy.config.reader import Table
from csrproxy.errors import ConfigError
from csrproxy.names import CSR_KEY_TYPES, NamePattern, subject_common_name


def parse_policy(policy: Table) -> PolicyConfig:
    """``[policy]``; the registered domain of a name comes from the Public Suffix List
    unless ``registered_domain`` names it."""
    subject = policy.get("subject", str, PolicyConfig.subject)
    if subject is None:
        names = policy.strings("names")
    else:
        try:
            cn = subject_common_name(subject)
        except ValueError as e:
            raise policy.error("subject", str(e)) from e
        names = policy.strings("names", ()) or (cn,)
    if not names:
        raise policy.error("names", "needs at least one name pattern")
    for n in names:
        try:
            NamePattern.parse(n)
        except ValueError as e:
            raise policy.error("names", str(e)) from e
    key_types = policy.strings("key_types", PolicyConfig.key_types)
    for kt in key_types:
        if kt not in CSR_KEY_TYPES:
            raise policy.error("key_types", f"{kt!r} is not one of {', '.join(CSR_KEY_TYPES)}")
    if not key_types:
        raise policy.error("key_types", "needs at least one key type")
    ip_ranges = PolicyConfig.ip_ranges
    given = policy.strings("ip_ranges", ())
    if "ip_ranges" in policy.data:
        try:
            ip_ranges = parse_ranges(given)
        except ValueError as e:
            raise policy.error("ip_ranges", str(e)) from None
    profiles = policy.strings("profiles", PolicyConfig.profiles)
    for profile in profiles:
        # RFC 8555 leaves profile names to the CA; Let's Encrypt's are short lowercase words.
        if not profile or len(profile) > 64 or not profile.isprintable() or " " in profile:
            raise policy.error("profiles", f"{profile!r} is not a profile name")
    registered = policy.get("registered_domain", str, PolicyConfig.registered_domain)
    registered = registered.strip().rstrip(".").lower()

    def budget(key: str) -> int:
        """A budget (the CA's rate limits and our own); 0 turns it off."""
        value = policy.get(key, int, getattr(PolicyConfig, key))
        if value < 0:
            raise policy.error(key, f"must be 0 (off) or more, not {value}")
        return value

    config = PolicyConfig(
        names=names,
        subject=subject,
        key_types=key_types,
        max_names=policy.positive_int("max_names", PolicyConfig.max_names),
        profiles=profiles,
        ip_ranges=ip_ranges,
        registered_domain=registered,
        new_names_per_week=budget("new_names_per_week"),
        orders_per_3h=budget("orders_per_3h"),
        same_names_per_week=budget("same_names_per_week"),
        client_requests_per_hour=budget("client_requests_per_hour"),
        failed_authorizations_per_hour=budget("failed_authorizations_per_hour"),
        consecutive_failed_authorizations=budget("consecutive_failed_authorizations"),
    )
    policy.done()
    return config


def check_names_in_zones(names: Sequence[str], zones: Sequence[str]) -> None:
    """Every ``[policy] names`` pattern lies in one of ``zones`` (the zones csrproxy
    serves or writes to): a name outside them could never get its challenge answered."""
    for text in names:
        if NamePattern.parse(text).zone_in(zones) is None:
            raise ConfigError(
                "policy.names", f"{text!r} is in none of the zones {', '.join(zones)}"
            )
