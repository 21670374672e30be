"""The registered domain of a name, as Let's Encrypt counts certificates per registered domain.

From the Public Suffix List (ICANN and private sections, as the CA uses it) bundled
with the ``publicsuffixlist`` package: ``a.b.example.co.uk`` is ``example.co.uk``,
``x.github.io`` is ``x.github.io``.  An IPv4 address counts as itself and an IPv6
address as its /64, as the CA counts them.

Fallbacks: a name that is itself a public suffix (``co.uk``, ``github.io``) counts as
itself; a name under a top-level domain the list does not know (``a.b.internal``) gets
the list's default rule ``*``: its last two labels (``b.internal``).
"""

from __future__ import annotations

import functools
import ipaddress

from publicsuffixlist import PublicSuffixList


@functools.cache
def _psl() -> PublicSuffixList:
    # Parsed once, on first use (some 10 ms): importing this module costs nothing.
    return PublicSuffixList()


def identifier_of(name: str) -> str:
    """``name`` as the CA keys an identifier: lower case, no ``*.``, no final dot."""
    return name.strip().lower().rstrip(".").removeprefix("*.")


def registered_domain(name: str) -> str:
    """The registered domain ``name`` counts for (see the module docstring)."""
    name = identifier_of(name)
    try:
        address = ipaddress.ip_address(name)
    except ValueError:
        pass
    else:
        if address.version == 6:
            return str(ipaddress.ip_network(f"{address}/64", strict=False))
        return str(address)
    return _psl().privatesuffix(name) or name
