"""Names that carry their address: the ``{ip}`` label of ``[policy] names`` patterns.

As sslip.io's and p2p-forge's names do, ``10-0-0-5.<key>.go.example.com`` stands for
10.0.0.5: the DNS server answers ``A 10.0.0.5`` computed from the name, with no record
stored per installation, and an installation on a LAN gets a browser-trusted name for its
own address. The label forms:

- IPv4: four decimal parts joined by ``-`` (``192-168-1-20``), no leading zeros;
- IPv6: the address with ``:`` written ``-`` (``fd00-0-0-0-0-0-0-1``, or compressed
  ``fd00--1``); a label may not start or end with ``-``, so ``::1`` is ``0--1``.

:func:`address_label` writes the canonical form (IPv6 in full, lowercase, without leading
zeros: never a ``--``, which LDH rules forbid in positions 3-4, ``xn--``'s place); any
form that parses is answered. Which addresses a name may embed is the policy's
``ip_ranges`` (default :data:`DEFAULT_RANGES`: private and loopback ranges only, so no
one gets a name for an address on the internet they do not control). Pure logic: no I/O.
"""

from __future__ import annotations

import ipaddress
from collections.abc import Iterable, Sequence

Address = ipaddress.IPv4Address | ipaddress.IPv6Address
Network = ipaddress.IPv4Network | ipaddress.IPv6Network

#: RFC 1918, RFC 6598 (carrier-grade NAT), loopback, link-local, RFC 4193 unique local.
DEFAULT_RANGES: tuple[Network, ...] = tuple(
    ipaddress.ip_network(n)
    for n in (
        "10.0.0.0/8",
        "172.16.0.0/12",
        "192.168.0.0/16",
        "100.64.0.0/10",
        "127.0.0.0/8",
        "169.254.0.0/16",
        "::1/128",
        "fc00::/7",
        "fe80::/10",
    )
)

#: The placeholder label of a pattern.
IP_PLACEHOLDER = "{ip}"


def address_of_label(label: str) -> Address | None:
    """The address a label carries (any case), or None when it carries none."""
    label = label.lower()
    if not label or len(label) > 63 or label[0] == "-" or label[-1] == "-":
        return None
    parts = label.split("-")
    try:
        if len(parts) == 4 and all(p.isdigit() and p == str(int(p)) for p in parts):
            return ipaddress.IPv4Address(".".join(parts))
        if all(c in "0123456789abcdef-" for c in label) and len(parts) >= 3:
            return ipaddress.IPv6Address(label.replace("-", ":"))
    except ValueError:
        return None
    return None


def address_label(address: Address) -> str:
    """The canonical label for ``address`` (IPv6 in full: eight groups, no ``--``)."""
    if isinstance(address, ipaddress.IPv4Address):
        return str(address).replace(".", "-")
    return "-".join(f"{int(g, 16):x}" for g in address.exploded.split(":"))


def parse_ranges(texts: Iterable[str]) -> tuple[Network, ...]:
    """``[policy] ip_ranges`` entries as networks; ValueError naming a bad one."""
    out = []
    for text in texts:
        try:
            out.append(ipaddress.ip_network(text.strip(), strict=False))
        except ValueError as e:
            raise ValueError(f"{text!r} is not an IP network: {e}") from None
    return tuple(out)


def within(address: Address, ranges: Sequence[Network]) -> bool:
    """True when ``address`` is in one of ``ranges``."""
    return any(address.version == net.version and address in net for net in ranges)


__all__ = [
    "DEFAULT_RANGES",
    "IP_PLACEHOLDER",
    "Address",
    "Network",
    "address_label",
    "address_of_label",
    "parse_ranges",
    "within",
]
