"""The issued-certificate cache."""

from __future__ import annotations

from twisted.internet.task import Clock
from twisted.trial.unittest import SynchronousTestCase

from csrproxy.issuance.cache import CachedChain, MemoryIssuedCache


class CacheTests(SynchronousTestCase):
    def test_fresh_while_more_than_half_the_life_is_left(self) -> None:
        clock = Clock()
        cache = MemoryIssuedCache(clock.seconds)
        cache.put("k", CachedChain("PEM", 0.0, 100.0))
        self.assertEqual(cache.get("k"), CachedChain("PEM", 0.0, 100.0))
        clock.advance(49)
        self.assertIsNotNone(cache.get("k"))
        clock.advance(2)
        self.assertIsNone(cache.get("k"))
        self.assertIsNone(cache.get("k"))

    def test_bounded_least_recently_used_first_out(self) -> None:
        clock = Clock()
        cache = MemoryIssuedCache(clock.seconds, max_entries=2)
        for k in ("a", "b"):
            cache.put(k, CachedChain(k, 0.0, 100.0))
        cache.get("a")
        cache.put("c", CachedChain("c", 0.0, 100.0))
        self.assertIsNone(cache.get("b"))
        self.assertIsNotNone(cache.get("a"))
        self.assertEqual(len(cache), 2)

    def test_from_pem_reads_the_leaf(self) -> None:
        import datetime

        from cryptography import x509
        from cryptography.hazmat.primitives import hashes, serialization
        from cryptography.x509.oid import NameOID

        from tests.support.keys import EC256

        name = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, "x")])
        start = datetime.datetime(2030, 1, 1, tzinfo=datetime.UTC)
        cert = (
            x509.CertificateBuilder()
            .subject_name(name)
            .issuer_name(name)
            .public_key(EC256.public_key())
            .serial_number(1)
            .not_valid_before(start)
            .not_valid_after(start + datetime.timedelta(days=10))
            .sign(EC256, hashes.SHA256())
        )
        pem = cert.public_bytes(serialization.Encoding.PEM).decode()
        chain = CachedChain.from_pem(pem)
        self.assertEqual(chain.not_after - chain.not_before, 10 * 86400)
        self.assertTrue(chain.fresh(start.timestamp() + 4 * 86400))
        self.assertFalse(chain.fresh(start.timestamp() + 6 * 86400))
