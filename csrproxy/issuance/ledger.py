"""What the issuer writes down about each order, so that a restart can finish it.

Before anything reaches the CA the order is on record; the CA's order URL is
recorded as soon as the CA made it; every challenge record is recorded before
it is published and forgotten after it is removed (lazily, with the next
write: a leftover record only costs a harmless removal at the next start); the
chain is recorded, together with the order's end, before any client sees it.
Without a store (unit tests) every step is a no-op.

The ledger also keeps each installation's activity clock (``last_requested``,
renewal's ``active_days``), moved only by requests that prove they come from that
installation: see :meth:`Ledger.signed` and :meth:`Ledger.read`.
"""

from __future__ import annotations

import base64
import hashlib
import random
import re
import secrets
import time
from collections.abc import Callable, Sequence
from typing import Any

from cryptography import x509
from cryptography.exceptions import UnsupportedAlgorithm
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.ciphers import Cipher, algorithms, modes
from twisted.internet.defer import Deferred, succeed
from twisted.logger import Logger

from csrproxy.acme.order import DNS01Responder, IssuedChain
from csrproxy.challenges.zone import challenge_name
from csrproxy.issuance.csr import CheckedCSR
from csrproxy.names import key_label
from csrproxy.state.database import CertificateRow, ChallengeRow, OrderRow
from csrproxy.state.store import Store

log = Logger()

#: The name of the certificate ids' secret in the state database.
CERTIFICATE_ID_SECRET = "certificate-id"


class CertificateIds:
    """Certificate ids (``GET /v1/certificates/<id>``): the first 128 bits of the request
    key enciphered with AES-256 under a server-side secret, in hex (32 characters: never a
    leading ``-`` that a command line would take for an option).

    The request key (SHA-256 of public key and names) can be computed from any public
    certificate (CT logs); the id cannot without the secret, and is only ever told to
    the installation that signed the CSR.  Deciphering an id gives back the key's prefix,
    so the certificate is found through the request key's index: no id is stored, and a
    row copied or restored elsewhere keeps answering to its id.  One block of a block
    cipher is a pseudo-random permutation: as unguessable as a MAC of the same length.
    Pure logic.
    """

    def __init__(self, secret: bytes) -> None:
        if len(secret) < 16:
            raise ValueError("the certificate id secret needs at least 16 bytes")
        key = hashlib.sha256(b"csrproxy certificate ids\0" + secret).digest()
        self._cipher = Cipher(algorithms.AES(key), modes.ECB())

    @classmethod
    def ephemeral(cls) -> CertificateIds:
        """Ids good for this process only (a ledger without a store)."""
        return cls(secrets.token_bytes(32))

    def of(self, request_key: str) -> str:
        block = bytes.fromhex(request_key[:32])
        encryptor = self._cipher.encryptor()
        return (encryptor.update(block) + encryptor.finalize()).hex()

    def key_prefix(self, certificate_id: str) -> str | None:
        """The first 32 hex digits of the request key behind ``certificate_id``; None when
        it is not an id at all (not 32 lowercase hex digits)."""
        if len(certificate_id) != 32 or not _HEX.fullmatch(certificate_id):
            return None
        decryptor = self._cipher.decryptor()
        return (decryptor.update(bytes.fromhex(certificate_id)) + decryptor.finalize()).hex()


_HEX = re.compile(r"[0-9a-f]{32}")


def certificate_key_label(row: CertificateRow) -> str:
    """The ``{key}`` label of ``row``'s public key (:func:`csrproxy.names.key_label`),
    from the SPKI digest on record."""
    digest = bytes.fromhex(row.spki_sha256)[:20]
    return base64.b32encode(digest).decode("ascii").lower()


def order_key_label(row: OrderRow) -> str | None:
    """The ``{key}`` label of the public key in an order's CSR; None when it does not parse."""
    try:
        key = x509.load_der_x509_csr(row.csr).public_key()
        spki = key.public_bytes(
            serialization.Encoding.DER, serialization.PublicFormat.SubjectPublicKeyInfo
        )
    except (ValueError, TypeError, UnsupportedAlgorithm):
        return None
    return key_label(spki)


def leaf_id(leaf: x509.Certificate) -> str:
    """A stable id of one issued certificate: the SHA-256 of its leaf, shortened."""
    return hashlib.sha256(leaf.public_bytes(serialization.Encoding.DER)).hexdigest()[:32]


class RecordingResponder:
    """Records each challenge value before the inner responder publishes it."""

    def __init__(self, inner: DNS01Responder, ledger: Ledger, order_id: str) -> None:
        self.inner = inner
        self.ledger = ledger
        self.order_id = order_id

    async def _publish(self, identifier: str, value: str) -> None:
        store = self.ledger.store
        if store is not None:
            name = challenge_name(identifier)
            await store.run(store.db.add_challenge, self.order_id, name, value, self.ledger.backend)
        await self.inner.publish(identifier, value)

    def _forget(self, _: object, identifier: str, value: str) -> Deferred[Any] | None:
        store = self.ledger.store
        if store is None:
            return None
        name = challenge_name(identifier)
        if store.db.shared:
            # Other instances serve it too: they must hear of its end now.
            return store.run(store.db.remove_challenge, name, value).addErrback(
                lambda f: store.db.forget_challenge_later(name, value)
            )
        store.db.forget_challenge_later(name, value)
        return None

    def publish(self, identifier: str, value: str) -> Deferred[None]:
        return Deferred.fromCoroutine(self._publish(identifier, value))

    def unpublish(self, identifier: str, value: str) -> Deferred[None]:
        # Forgotten only once it is gone; the row goes with the store's next write.
        return self.inner.unpublish(identifier, value).addCallback(self._forget, identifier, value)


class Ledger:
    """The durable side of orders and certificates.  Nothing is held in memory: every
    look-up is one indexed query on the store's thread."""

    def __init__(
        self,
        store: Store | None,
        backend: str = "builtin",
        *,
        ari_recheck: float = 6 * 3600.0,
        rng: random.Random | None = None,
    ) -> None:
        self.store = store
        self.backend = backend
        #: Seconds over which a new certificate's first ARI look-up is spread.
        self.ari_recheck = ari_recheck
        self.rng = rng or random.Random()
        #: The state database's ids once :meth:`load` read its secret.
        self.ids = CertificateIds.ephemeral()
        #: Without a store (unit tests): what would be on record, by request key.
        self._memory: dict[str, CertificateRow] = {}

    # -- start-up (synchronous: before the reactor runs and the store's thread starts) ----

    def load(self) -> None:
        """Read the certificate ids' secret (made on the first start)."""
        if self.store is None:
            return
        self.ids = CertificateIds(self.store.db.secret(CERTIFICATE_ID_SECRET))

    def unfinished_orders(self) -> list[OrderRow]:
        return [] if self.store is None else self.store.db.unfinished_orders()

    def leftover_challenges(self) -> list[ChallengeRow]:
        return [] if self.store is None else self.store.db.own_challenges()

    def forget_challenges(self, rows: list[ChallengeRow]) -> Deferred[Any]:
        if self.store is None or not rows:
            return succeed(None)
        return self.store.run(self.store.db.clear_challenges, [r.id for r in rows])

    # -- an order's life ------------------------------------------------------------

    def _run(self, method: Callable[..., Any], *args: Any, **kwargs: Any) -> Deferred[Any]:
        if self.store is None:
            return succeed(None)
        return self.store.run(method, *args, **kwargs)

    def order_started(
        self, order_id: str, csr: CheckedCSR, replaces: str | None = None, ca: str | None = None
    ) -> Deferred[Any]:
        if self.store is None:
            return succeed(None)
        row = OrderRow(
            order_id,
            csr.request_key,
            csr.der,
            list(csr.names),
            replaces=replaces,
            profile=csr.profile,
            ca=ca,
        )
        return self._run(self.store.db.save_order, row)

    def order_created(self, order_id: str) -> Callable[[str], Deferred[Any]]:
        """The ``on_order`` callback: records the CA's order URL."""

        def record(url: str) -> Deferred[Any]:
            if self.store is None:
                return succeed(None)
            return self._run(self.store.db.update_order, order_id, acme_url=url, status="pending")

        return record

    def responder(self, inner: DNS01Responder, order_id: str) -> DNS01Responder:
        return inner if self.store is None else RecordingResponder(inner, self, order_id)

    async def order_valid(
        self,
        order_id: str,
        csr: CheckedCSR,
        chain: IssuedChain,
        renewal: bool = False,
        ca: str | None = None,
    ) -> CertificateRow:
        leaf = x509.load_pem_x509_certificate(chain.pem.encode("ascii"))
        not_before = leaf.not_valid_before_utc.timestamp()
        not_after = leaf.not_valid_after_utc.timestamp()
        now = time.time()
        row = CertificateRow(
            id=leaf_id(leaf),
            request_key=csr.request_key,
            csr=csr.der,
            names=list(csr.names),
            spki_sha256=csr.spki_sha256,
            chain=chain.pem,
            not_before=not_before,
            not_after=not_after,
            order_id=order_id,
            acme_url=chain.certificate_url,
            renew_at=lifetime_due(not_before, not_after, self.rng),
            ari_next=now + self.rng.random() * self.ari_recheck,
            profile=csr.profile,
            ca=ca,
        )
        if self.store is not None:
            recorded: CertificateRow = await self.store.run(
                self.store.db.certificate_issued, row, order_id, renewal
            )
            return recorded
        current = self._memory.get(row.request_key)
        if current is not None:
            row.signed_by = current.signed_by
            if renewal:
                row.last_requested = current.last_requested
        if current is None or row.not_after >= current.not_after:
            self._memory[row.request_key] = row
        return row

    def order_failed(self, order_id: str, error: str) -> None:
        """Best effort: a store that fails here must not hide the order's own error."""
        if self.store is None:
            return
        d = self.store.run(self.store.db.update_order, order_id, status="invalid", error=error)
        d.addErrback(
            lambda f: log.warn("order {id} not marked failed: {e}", id=order_id, e=f.value)
        )

    def order_with_chain(
        self, order_id: str
    ) -> Deferred[tuple[OrderRow, CertificateRow | None] | None]:
        """An order on record and its certificate (an async order id of an earlier run)."""
        if self.store is None:
            return succeed(None)
        return self.store.run(self.store.db.order_with_chain, order_id)

    # -- what the issuer and the web API read ------------------------------------------

    def sign_lookup(
        self, request_key: str, names: Sequence[str]
    ) -> Deferred[tuple[CertificateRow | None, bool]]:
        """The current certificate of ``request_key`` and whether ``names`` were issued
        before (the new-names budget)."""
        if self.store is None:
            current = self._memory.get(request_key)
            wanted = sorted(names)
            before = any(sorted(r.names) == wanted for r in self._memory.values())
            return succeed((current, before))
        return self.store.run(self.store.db.sign_lookup, request_key, list(names))

    @property
    def shared(self) -> bool:
        """True when other instances share the state database."""
        return self.store is not None and self.store.db.shared

    def running_elsewhere(self, request_key: str, now: float) -> Deferred[OrderRow | None]:
        """The unfinished order for ``request_key`` another live instance runs, if any."""
        if self.store is None or not self.store.db.shared:
            return succeed(None)
        return self.store.run(self.store.db.running_elsewhere, request_key, now)

    def names_issued(self, names: Sequence[str]) -> Deferred[bool]:
        return self.sign_lookup("", names).addCallback(lambda found: found[1])

    def current(self, request_key: str) -> Deferred[CertificateRow | None]:
        if self.store is None:
            return succeed(self._memory.get(request_key))
        return self.store.run(self.store.db.current_certificate, request_key)

    def certificate_id(self, request_key: str) -> str:
        """The id the installation of ``request_key`` is told (:class:`CertificateIds`)."""
        return self.ids.of(request_key)

    def newest(self, certificate_id: str) -> Deferred[CertificateRow | None]:
        """The current certificate of the CSR whose id is ``certificate_id``."""
        prefix = self.ids.key_prefix(certificate_id)
        if prefix is None:
            return succeed(None)
        if self.store is None:
            found = [r for k, r in self._memory.items() if k.startswith(prefix)]
            return succeed(found[0] if found else None)
        return self.store.run(self.store.db.current_by_key_prefix, prefix)

    # -- the installation's activity (renewal's active_days) ------------------------

    def signed(self, request_key: str, when: float, signer: str | None) -> None:
        """A ``POST /v1/sign`` for the CSR behind ``request_key``: always the
        installation's activity (its key signed the CSR).

        ``signer`` (the token's client id; None without tokens) becomes the client whose
        reads of the certificate count as activity (:meth:`read`).
        """
        if self.store is None:
            row = self._memory.get(request_key)
            if row is not None:
                row.last_requested, row.signed_by = when, signer
            return
        _best_effort(self.store.run(self.store.db.certificate_signed, request_key, when, signer))

    def read(self, row: CertificateRow, when: float, reader: str | None) -> bool:
        """A ``GET /v1/certificates/<id>`` of ``row``: the installation's activity only when
        it comes from the installation itself; True when it counted.

        With tokens that is the token on record as the last to sign it (:meth:`signed`);
        a read by any other token never counts, nor one of a certificate with no signer
        on record (signed while no tokens were configured: it counts again once its
        installation signs with its token).  Without tokens (``reader`` None) any caller
        counts: it knows the unguessable id, which only the installation is told.
        """
        if reader is not None and reader != row.signed_by:
            return False
        row.last_requested = when
        if self.store is not None:
            _best_effort(self.store.run(self.store.db.touch_certificate, row.id, when))
        return True


def lifetime_due(not_before: float, not_after: float, rng: random.Random) -> float:
    """A random point between 2/3 and 3/4 of a certificate's lifetime (renewal without ARI)."""
    return not_before + (not_after - not_before) * (2 / 3 + rng.random() / 12)


def _best_effort(d: Deferred[Any]) -> None:
    d.addErrback(lambda f: None)  # a missed touch only delays the activity clock


# CertificateRow is re-exported: it is what ``Ledger.newest`` hands the web API.
__all__ = [
    "CERTIFICATE_ID_SECRET",
    "CertificateIds",
    "CertificateRow",
    "Ledger",
    "RecordingResponder",
    "certificate_key_label",
    "leaf_id",
    "lifetime_due",
    "order_key_label",
]
