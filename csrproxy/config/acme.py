"""The ``[acme]`` section: which CA, the account, and how long to wait for it."""

from __future__ import annotations

import base64
import binascii
import dataclasses
from pathlib import Path
from urllib.parse import urlsplit

from csrproxy.config.model import ACMEConfig, FallbackConfig
from csrproxy.config.reader import Table
from csrproxy.names import is_issuer_domain

ACCOUNT_KEY_TYPES = ("ec256", "ec384", "rsa2048", "rsa3072", "rsa4096")

#: The CAA identity (RFC 8659 issuer domain name) of well-known CAs, by how their ACME
#: directory's host name ends.
KNOWN_CAA_IDENTITIES = (
    ("letsencrypt.org", "letsencrypt.org"),
    ("zerossl.com", "sectigo.com"),
    ("pki.goog", "pki.goog"),
    ("buypass.com", "buypass.com"),
)


def caa_identity(directory: str) -> str | None:
    """The CAA identity of the CA at ``directory`` (an ACME directory URL) when it is a
    known one (:data:`KNOWN_CAA_IDENTITIES`), else None."""
    host = (urlsplit(directory).hostname or "").rstrip(".").lower()
    for suffix, identity in KNOWN_CAA_IDENTITIES:
        if host == suffix or host.endswith("." + suffix):
            return identity
    return None


#: More fallback CAs than this is a mistake, not a deployment.
MAX_FALLBACKS = 4


def parse_acme(acme: Table, primary: ACMEConfig | None = None) -> ACMEConfig:
    """``[acme]``, or (``primary`` given) one ``[[acme.fallback]]`` table, whose absent keys
    are the primary's (but the directory, the EAB and the profile, which are each CA's)."""
    base = primary or ACMEConfig(directory="")
    directory = acme.get("directory", str)
    if not directory.startswith(("https://", "http://")):
        raise acme.error("directory", f"must be an https:// URL, not {directory!r}")
    contact = acme.strings("contact", base.contact)
    for c in contact:
        if not c.startswith("mailto:") or "@" not in c:
            raise acme.error("contact", f"{c!r} is not a mailto: URI")
    ca_certs = acme.get("ca_certs", str, base.ca_certs)
    if ca_certs is not None and not Path(ca_certs).is_file():
        raise acme.error("ca_certs", f"no such file: {ca_certs}")
    key_type = acme.get("account_key_type", str, base.account_key_type)
    if key_type not in ACCOUNT_KEY_TYPES:
        raise acme.error("account_key_type", f"{key_type!r} is not {', '.join(ACCOUNT_KEY_TYPES)}")
    eab_kid = acme.get("eab_kid", str, ACMEConfig.eab_kid)
    eab_hmac = acme.get("eab_hmac_key", str, ACMEConfig.eab_hmac_key)
    if (eab_kid is None) != (eab_hmac is None):
        raise acme.error(
            "eab_hmac_key" if eab_hmac is None else "eab_kid",
            "eab_kid and eab_hmac_key go together",
        )
    if eab_hmac is not None:
        try:
            base64.urlsafe_b64decode(eab_hmac + "=" * (-len(eab_hmac) % 4))
        except (binascii.Error, ValueError) as e:
            raise acme.error("eab_hmac_key", "is not base64url") from e
    config = ACMEConfig(
        directory=directory,
        contact=contact,
        ca_certs=ca_certs,
        poll_interval=acme.positive("poll_interval", base.poll_interval),
        poll_max=acme.positive("poll_max", base.poll_max),
        order_timeout=acme.positive("order_timeout", base.order_timeout),
        request_timeout=acme.positive("request_timeout", base.request_timeout),
        account_key_type=key_type,
        eab_kid=eab_kid,
        eab_hmac_key=eab_hmac,
        preferred_chain=acme.get("preferred_chain", str, base.preferred_chain),
        profile=acme.get("profile", str, ACMEConfig.profile),
    )
    if primary is None:
        config = dataclasses.replace(config, fallback=parse_fallbacks(acme, config))
    acme.done()
    return config


def parse_fallbacks(acme: Table, primary: ACMEConfig) -> tuple[FallbackConfig, ...]:
    """``[[acme.fallback]]``: each a CA (``directory`` required), tried in turn."""
    entries = acme.get("fallback", list, [])
    if len(entries) > MAX_FALLBACKS:
        raise acme.error("fallback", f"at most {MAX_FALLBACKS}, not {len(entries)}")
    found: list[FallbackConfig] = []
    seen = {primary.directory}
    for index, entry in enumerate(entries):
        if not isinstance(entry, dict):
            raise acme.error("fallback", "must be tables [[acme.fallback]]")
        table = Table(entry, f"{acme.where('fallback')}[{index}]")
        identity = table.get("caa_identity", str, FallbackConfig.caa_identity)
        if identity is not None:
            identity = identity.strip().rstrip(".").lower()
            if not is_issuer_domain(identity):
                raise table.error("caa_identity", f"{identity!r} is not a domain name")

        def budget(key: str, table: Table = table) -> int:
            value = table.get(key, int, getattr(FallbackConfig, key))
            if value < 0:
                raise table.error(key, f"must be 0 (off) or more, not {value}")
            return value

        budgets = {
            key: budget(key)
            for key in ("orders_per_3h", "new_names_per_week", "same_names_per_week")
        }
        # What is left is the CA's own [acme]-like keys; a nested fallback is not one.
        if "fallback" in entry:
            raise table.error("fallback", "a fallback has no fallbacks of its own")
        ca = parse_acme(table, primary)
        if ca.directory in seen:
            raise table.error("directory", f"{ca.directory} is configured twice")
        seen.add(ca.directory)
        found.append(FallbackConfig(ca, identity, **budgets))
    return tuple(found)
