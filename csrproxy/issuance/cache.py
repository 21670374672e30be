"""The issued-certificate cache: the same CSR sent again while its certificate has most
of its life left gets the stored chain and no new order.

The state database is the cache (the issuer asks it through the ledger, by the request
key's index); :class:`MemoryIssuedCache` is a small bounded front of it (least recently
used first out) for installations that send the same CSR again and again.
"""

from __future__ import annotations

from collections import OrderedDict
from collections.abc import Callable
from dataclasses import dataclass
from typing import Protocol

from cryptography import x509


@dataclass(frozen=True)
class CachedChain:
    """A PEM chain and its leaf's validity, in POSIX seconds."""

    pem: str
    not_before: float
    not_after: float

    def fresh(self, now: float, min_fraction: float = 0.5) -> bool:
        """True while more than ``min_fraction`` of the leaf's lifetime is left."""
        life = self.not_after - self.not_before
        return life > 0 and (self.not_after - now) > life * min_fraction

    @classmethod
    def from_pem(cls, pem: str) -> CachedChain:
        leaf = x509.load_pem_x509_certificate(pem.encode("ascii"))
        return cls(pem, leaf.not_valid_before_utc.timestamp(), leaf.not_valid_after_utc.timestamp())


class IssuedCache(Protocol):
    """Chains by request key (public key + names)."""

    def get(self, request_key: str) -> CachedChain | None: ...

    def put(self, request_key: str, chain: CachedChain) -> None: ...


class MemoryIssuedCache:
    """An in-memory :class:`IssuedCache` of at most ``max_entries`` chains."""

    def __init__(
        self, now: Callable[[], float], max_entries: int = 1000, min_fraction: float = 0.5
    ) -> None:
        self.now = now
        self.max_entries = max_entries
        self.min_fraction = min_fraction
        self._chains: OrderedDict[str, CachedChain] = OrderedDict()

    def get(self, request_key: str) -> CachedChain | None:
        chain = self._chains.get(request_key)
        if chain is None:
            return None
        if not chain.fresh(self.now(), self.min_fraction):
            del self._chains[request_key]
            return None
        self._chains.move_to_end(request_key)
        return chain

    def put(self, request_key: str, chain: CachedChain) -> None:
        self._chains[request_key] = chain
        self._chains.move_to_end(request_key)
        while len(self._chains) > self.max_entries:
            self._chains.popitem(last=False)

    def forget(self, request_key: str) -> None:
        self._chains.pop(request_key, None)

    def __len__(self) -> int:
        return len(self._chains)
