"""The ``[acme]`` section: which CA, the account, and how long to wait for it."""

from __future__ import annotations

import base64
import binascii
from pathlib import Path
from urllib.parse import urlsplit

from csrproxy.config.model import ACMEConfig
from csrproxy.config.reader import Table

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


def parse_acme(acme: Table) -> ACMEConfig:
    directory = acme.get("directory", str)
    if not directory.startswith(("https://", "http://")):
        raise acme.error("directory", f"must be an https:// URL, not {directory!r}")
    contact = acme.strings("contact", ACMEConfig.contact)
    for c in contact:
        if not c.startswith("mailto:") or "@" not in c:
            raise acme.error("contact", f"{c!r} is not a mailto: URI")
    ca_certs = acme.get("ca_certs", str, ACMEConfig.ca_certs)
    if ca_certs is not None and not Path(ca_certs).is_file():
        raise acme.error("ca_certs", f"no such file: {ca_certs}")
    key_type = acme.get("account_key_type", str, ACMEConfig.account_key_type)
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
        poll_interval=acme.positive("poll_interval", ACMEConfig.poll_interval),
        poll_max=acme.positive("poll_max", ACMEConfig.poll_max),
        order_timeout=acme.positive("order_timeout", ACMEConfig.order_timeout),
        request_timeout=acme.positive("request_timeout", ACMEConfig.request_timeout),
        account_key_type=key_type,
        eab_kid=eab_kid,
        eab_hmac_key=eab_hmac,
        preferred_chain=acme.get("preferred_chain", str, ACMEConfig.preferred_chain),
        profile=acme.get("profile", str, ACMEConfig.profile),
    )
    acme.done()
    return config
