"""The ACME client against the fake CA, in memory, with time driven by a Clock."""

from __future__ import annotations

from collections import Counter
from typing import Any, TypeVar

from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.x509.oid import NameOID
from twisted.internet.defer import Deferred, succeed
from twisted.internet.task import Clock
from twisted.trial.unittest import SynchronousTestCase

from csrproxy.acme.client import ACMEClient
from csrproxy.acme.jws import AccountKey
from csrproxy.acme.order import IssuedChain, OrderRun, PollSchedule, obtain_chain
from csrproxy.acme.problems import ACMEProblem, AuthorizationFailed
from csrproxy.retry import Backoff, RetryTimer, parse_retry_after
from tests.support.driving import run_until_fired
from tests.support.fakeacme import BASE, FakeCA

T = TypeVar("T")

ACCOUNT_KEY = AccountKey.generate("ec256")
LEAF_KEY = ec.generate_private_key(ec.SECP256R1())


def csr_der(names: list[str]) -> bytes:
    csr = (
        x509.CertificateSigningRequestBuilder()
        .subject_name(x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, names[0])]))
        .add_extension(x509.SubjectAlternativeName([x509.DNSName(n) for n in names]), False)
        .sign(LEAF_KEY, hashes.SHA256())
    )
    return csr.public_bytes(serialization.Encoding.DER)


class RecordingResponder:
    """Keeps published values like a zone would; checks the CA's lookups."""

    def __init__(self) -> None:
        self.live: Counter[tuple[str, str]] = Counter()
        self.published: list[tuple[str, str]] = []

    def publish(self, identifier: str, value: str) -> Deferred[None]:
        self.live[(identifier, value)] += 1
        self.published.append((identifier, value))
        return succeed(None)

    def unpublish(self, identifier: str, value: str) -> Deferred[None]:
        self.live[(identifier, value)] -= 1
        if self.live[(identifier, value)] <= 0:
            del self.live[(identifier, value)]
        return succeed(None)

    def serves(self, identifier: str, value: str) -> bool:
        return (identifier, value) in self.live


class ACMETestMixin:
    def setUp(self) -> None:
        self.clock = Clock()
        self.ca = FakeCA()
        self.responder = RecordingResponder()
        self.ca.published_check = self.responder.serves
        self.http, self.agent = self.ca.client()

    def make_client(self, key: AccountKey = ACCOUNT_KEY) -> ACMEClient:
        return ACMEClient(self.clock, self.http, BASE + "/dir", key, retry_first=1.0)

    def drive(self, d: Deferred[T], step: float = 0.01, limit: float = 600) -> list[Any]:
        """Advance the clock until ``d`` fires; return [result] or [Failure]."""
        return run_until_fired(d, self.agent.flush, self.clock, step, limit)

    def obtain(self, client: ACMEClient, names: list[str], deadline: float = 300) -> list[Any]:
        schedule = PollSchedule(0.05, 1.0, self.clock.seconds() + deadline)
        return self.drive(
            Deferred.fromCoroutine(
                obtain_chain(OrderRun(client, names, csr_der(names), self.responder, schedule))
            )
        )


class HappyPathTests(ACMETestMixin, SynchronousTestCase):
    def test_issues_and_cleans_up(self) -> None:
        client = self.make_client()
        [chain] = self.obtain(client, ["a.go.example.test"])
        self.assertIsInstance(chain, IssuedChain)
        cert = x509.load_pem_x509_certificate(chain.pem.encode())
        self.assertEqual(
            cert.extensions.get_extension_for_class(
                x509.SubjectAlternativeName
            ).value.get_values_for_type(x509.DNSName),
            ["a.go.example.test"],
        )
        self.assertEqual(len(self.responder.published), 1)
        self.assertEqual(dict(self.responder.live), {}, "records left behind")
        # The floor: newOrder, authz, challenge, >=1 authz poll, finalize, cert.
        self.assertEqual(self.ca.requests["newOrder"], 1)
        self.assertEqual(self.ca.requests["challenge"], 1)
        self.assertEqual(self.ca.requests["finalize"], 1)
        self.assertEqual(self.ca.requests["cert"], 1)
        self.assertEqual(self.ca.requests["authz"], 2)

    def test_directory_fetched_once_per_client(self) -> None:
        client = self.make_client()
        self.obtain(client, ["a.go.example.test"])
        self.obtain(client, ["b.go.example.test"])
        self.assertEqual(self.ca.requests["directory"], 1)
        # Nonces come from every response; newNonce only for the very first request.
        self.assertLessEqual(self.ca.requests["newNonce"], 1)

    def test_wildcard_and_base_publish_two_values_on_one_name(self) -> None:
        client = self.make_client()
        [chain] = self.obtain(client, ["x.go.example.test", "*.x.go.example.test"])
        self.assertIsInstance(chain, IssuedChain)
        idents = sorted(i for i, _ in self.responder.published)
        self.assertEqual(idents, ["x.go.example.test", "x.go.example.test"])
        self.assertEqual(len({v for _, v in self.responder.published}), 2)
        self.assertEqual(dict(self.responder.live), {})

    def test_already_valid_authorization_publishes_nothing(self) -> None:
        self.ca.faults.authz_reuse = True
        [chain] = self.obtain(self.make_client(), ["a.go.example.test"])
        self.assertIsInstance(chain, IssuedChain)
        self.assertEqual(self.responder.published, [])
        self.assertEqual(self.ca.requests["challenge"], 0)


class AccountTests(ACMETestMixin, SynchronousTestCase):
    def test_registers_once_and_finds_it_on_second_start(self) -> None:
        first = self.make_client()
        [url1] = self.drive(Deferred.fromCoroutine(first.account(["mailto:a@example.test"])))
        self.assertEqual(len(self.ca.accounts), 1)
        # A second process with the same key: onlyReturnExisting finds the account.
        second = self.make_client()
        [url2] = self.drive(Deferred.fromCoroutine(second.account(["mailto:a@example.test"])))
        self.assertEqual(url1, url2)
        self.assertEqual(len(self.ca.accounts), 1)
        self.assertEqual(self.ca.requests["newAccount"], 3)  # lookup, register, lookup


class FailureTests(ACMETestMixin, SynchronousTestCase):
    def test_bad_nonce_is_retried(self) -> None:
        self.ca.faults.bad_nonce = 3
        [chain] = self.obtain(self.make_client(), ["a.go.example.test"])
        self.assertIsInstance(chain, IssuedChain)
        self.assertEqual(self.ca.faults.bad_nonce, 0)

    def test_bad_nonce_without_end_is_reported(self) -> None:
        self.ca.faults.bad_nonce = 100
        [failure] = self.obtain(self.make_client(), ["a.go.example.test"])
        failure.trap(ACMEProblem)
        self.assertEqual(failure.value.short_type, "badNonce")

    def test_invalid_authorization_fails_and_cleans_up(self) -> None:
        self.ca.faults.invalid_names = {"bad.go.example.test"}
        [failure] = self.obtain(self.make_client(), ["ok.go.example.test", "bad.go.example.test"])
        failure.trap(AuthorizationFailed)
        self.assertEqual(failure.value.identifier, "bad.go.example.test")
        self.assertIn("unauthorized", failure.value.problem.type)
        self.assertEqual(dict(self.responder.live), {}, "records left behind")
        self.assertEqual(self.ca.requests["finalize"], 0)

    def test_rate_limited_waits_for_retry_after(self) -> None:
        self.ca.faults.rate_limited = 1
        self.ca.faults.retry_after = "7"
        client = self.make_client()
        self.drive(Deferred.fromCoroutine(client.account()))
        start = self.clock.seconds()
        [chain] = self.obtain(client, ["a.go.example.test"])
        self.assertIsInstance(chain, IssuedChain)
        self.assertGreaterEqual(self.clock.seconds() - start, 7.0)
        self.assertEqual(self.ca.requests["newOrder"], 2)

    def test_deadline_stops_polling(self) -> None:
        self.ca.faults.pending_polls = 10**6
        [failure] = self.obtain(self.make_client(), ["a.go.example.test"], deadline=20)
        self.assertIn("DeadlineExceeded", failure.type.__name__)
        self.assertEqual(dict(self.responder.live), {})


class ScheduleTests(SynchronousTestCase):
    def test_backoff_doubles_to_cap_and_retry_after_wins(self) -> None:
        b = Backoff(0.5, 3.0)
        self.assertEqual([b(), b(), b(), b()], [0.5, 1.0, 2.0, 3.0])
        self.assertEqual(b(9.0), 9.0)

    def test_retry_timer_never_waits_past_the_deadline(self) -> None:
        clock = Clock()
        timer = RetryTimer(clock, 1.0, 4.0, give_up=10.0)
        self.assertEqual([timer.next_delay(), timer.next_delay()], [1.0, 2.0])
        clock.advance(6.0)
        # A wait outside the back-off is checked against the deadline but does not advance it.
        self.assertEqual(timer.within(4.0), 4.0)
        self.assertIsNone(timer.within(4.5))
        self.assertEqual(timer.next_delay(), 4.0)
        self.assertIsNone(timer.next_delay(5.0))
    def test_retry_after_forms(self) -> None:
        self.assertEqual(parse_retry_after("120", 0), 120.0)
        self.assertEqual(parse_retry_after("Thu, 01 Jan 1970 00:01:40 GMT", 40.0), 60.0)
        self.assertIsNone(parse_retry_after("soon", 0))
        self.assertIsNone(parse_retry_after(None, 0))
