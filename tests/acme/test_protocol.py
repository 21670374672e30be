"""RFC 8555 coverage and resilience of the ACME client, against the fake CA with a Clock."""

from __future__ import annotations

import os
import signal
from collections.abc import Callable, Sequence
from typing import Any

from cryptography import x509
from cryptography.hazmat.primitives import serialization
from twisted.internet.defer import Deferred, fail
from twisted.trial.unittest import SynchronousTestCase

from csrproxy.acme.certs import ari_cert_id, chain_issuer_cns, top_issuer_cn
from csrproxy.acme.client import ACMEClient
from csrproxy.acme.jws import AccountKey
from csrproxy.acme.order import (
    CHECKPOINTS,
    Checkpoint,
    IssuedChain,
    OrderOptions,
    OrderRun,
    PollSchedule,
    complete_order,
    no_checkpoint,
    obtain_chain,
)
from csrproxy.acme.problems import ACMEProblem, ACMEProtocolError, ACMETransportError
from csrproxy.errors import BadCSR, PublishError
from csrproxy.testing.crashpoints import POINTS, crash_checkpoint_from_env
from tests.acme.test_client import ACCOUNT_KEY, ACMETestMixin, csr_der
from tests.support.fakeacme import BASE, FlakyHTTP

HMAC_KEY = b"0123456789abcdef0123456789abcdef"


class ProtocolTestCase(ACMETestMixin, SynchronousTestCase):
    def obtain_with(
        self,
        client: ACMEClient,
        names: list[str],
        options: OrderOptions | None = None,
        replaces: str | None = None,
        deadline: float = 300,
        der: bytes | None = None,
    ) -> Any:
        schedule = PollSchedule(0.05, 1.0, self.clock.seconds() + deadline)
        run = OrderRun(
            client,
            names,
            der or csr_der(names),
            self.responder,
            schedule,
            options or OrderOptions(),
            replaces,
        )
        coro = obtain_chain(run)
        [result] = self.drive(Deferred.fromCoroutine(coro))
        return result


class NonceTests(ProtocolTestCase):
    def test_bad_nonce_uses_the_nonce_that_came_with_the_error(self) -> None:
        self.ca.faults.bad_nonce = 4
        chain = self.obtain_with(self.make_client(), ["a.go.example.test"])
        self.assertIsInstance(chain, IssuedChain)
        # Every retry took the error's own Replay-Nonce: newNonce was never needed.
        self.assertEqual(self.ca.requests["newNonce"], 0)


class RetryTests(ProtocolTestCase):
    def test_rate_limited_with_http_date(self) -> None:
        client = self.make_client()
        self.drive(Deferred.fromCoroutine(client.account()))
        self.clock.advance(1_800_000_000 - self.clock.seconds())
        self.ca.faults.rate_limited = 1
        self.ca.faults.retry_after = "Fri, 15 Jan 2027 08:00:30 GMT"  # now + 30 s
        start = self.clock.seconds()
        chain = self.obtain_with(client, ["a.go.example.test"])
        self.assertIsInstance(chain, IssuedChain)
        self.assertGreaterEqual(self.clock.seconds() - start, 30.0)

    def test_503_on_directory_is_retried(self) -> None:
        self.ca.faults.service_unavailable = 2
        self.ca.faults.retry_after = "3"
        chain = self.obtain_with(self.make_client(), ["a.go.example.test"])
        self.assertIsInstance(chain, IssuedChain)
        self.assertEqual(self.ca.requests["directory"], 3)

    def test_rate_limited_past_the_deadline_is_reported(self) -> None:
        client = self.make_client()
        self.drive(Deferred.fromCoroutine(client.account()))
        self.ca.faults.rate_limited = 100
        self.ca.faults.retry_after = "60"
        start = self.clock.seconds()
        failure = self.obtain_with(client, ["a.go.example.test"], deadline=200)
        failure.trap(ACMEProblem)
        self.assertEqual(failure.value.short_type, "rateLimited")
        self.assertEqual(failure.value.status, 429)
        self.assertEqual(failure.value.retry_after, 60.0)
        self.assertLessEqual(self.clock.seconds() - start, 200)
        self.assertEqual(self.ca.requests["newOrder"], 4)  # t=0, 60, 120, 180

    def test_not_retryable_problem_is_raised_at_once(self) -> None:
        self.ca.faults.reject_orders = "rejectedIdentifier"
        failure = self.obtain_with(self.make_client(), ["a.go.example.test"])
        failure.trap(ACMEProblem)
        self.assertEqual(failure.value.short_type, "rejectedIdentifier")
        self.assertEqual(failure.value.status, 400)
        self.assertEqual(self.ca.requests["newOrder"], 1, "a problem retrying cannot fix")

    def test_connection_refused_is_retried(self) -> None:
        flaky = FlakyHTTP(self.http)
        flaky.rules.append(["GET", "/dir", "refuse", 2])
        client = ACMEClient(self.clock, flaky, BASE + "/dir", ACCOUNT_KEY)
        chain = self.obtain_with(client, ["a.go.example.test"])
        self.assertIsInstance(chain, IssuedChain)


class AmbiguousFailureTests(ProtocolTestCase):
    def test_dropped_finalize_rereads_the_order_and_never_finalizes_twice(self) -> None:
        flaky = FlakyHTTP(self.http)
        flaky.rules.append(["POST", "/finalize", "drop-after", 1])
        client = ACMEClient(self.clock, flaky, BASE + "/dir", ACCOUNT_KEY)
        chain = self.obtain_with(client, ["a.go.example.test"])
        self.assertIsInstance(chain, IssuedChain)
        self.assertEqual(self.ca.requests["finalize"], 1)
        self.assertEqual(self.ca.requests["newOrder"], 1)

    def test_dropped_challenge_answer_is_not_repeated_when_it_arrived(self) -> None:
        flaky = FlakyHTTP(self.http)
        flaky.rules.append(["POST", "/chall/", "drop-after", 1])
        client = ACMEClient(self.clock, flaky, BASE + "/dir", ACCOUNT_KEY)
        chain = self.obtain_with(client, ["a.go.example.test"])
        self.assertIsInstance(chain, IssuedChain)
        self.assertEqual(self.ca.requests["challenge"], 1)

    def test_dropped_post_as_get_is_simply_retried(self) -> None:
        flaky = FlakyHTTP(self.http)
        flaky.rules.append(["POST", "/authz/", "drop-after", 2])
        client = ACMEClient(self.clock, flaky, BASE + "/dir", ACCOUNT_KEY)
        chain = self.obtain_with(client, ["a.go.example.test"])
        self.assertIsInstance(chain, IssuedChain)

    def test_dropped_new_order_is_reported_not_guessed(self) -> None:
        flaky = FlakyHTTP(self.http)
        flaky.rules.append(["POST", "/order", "drop-after", 1])
        client = ACMEClient(self.clock, flaky, BASE + "/dir", ACCOUNT_KEY)
        failure = self.obtain_with(client, ["a.go.example.test"])
        failure.trap(ACMETransportError)
        self.assertTrue(failure.value.sent)


class AccountTests(ProtocolTestCase):
    def test_external_account_binding(self) -> None:
        self.ca.faults.eab_keys = {"kid-1": HMAC_KEY}
        client = self.make_client(AccountKey.generate("ec256"))
        [failure] = self.drive(Deferred.fromCoroutine(client.account()))
        failure.trap(ACMEProblem)
        self.assertEqual(failure.value.short_type, "externalAccountRequired")
        client.eab = ("kid-1", b"wrong key, wrong key, wrong key!")
        [failure] = self.drive(Deferred.fromCoroutine(client.account()))
        failure.trap(ACMEProblem)
        self.assertIn("MAC", failure.value.detail)
        client.eab = ("kid-1", HMAC_KEY)
        [url] = self.drive(Deferred.fromCoroutine(client.account()))
        self.assertIn(url, self.ca.accounts)

    def test_account_key_types(self) -> None:
        for key_type in ("ec384", "rsa2048"):
            client = self.make_client(AccountKey.generate(key_type))
            [url] = self.drive(Deferred.fromCoroutine(client.account()))
            self.assertIn(url, self.ca.accounts)
        with self.assertRaises(ValueError):
            AccountKey.generate("rsa1024")

    def test_contact_update_when_config_changes(self) -> None:
        client = self.make_client()
        [url] = self.drive(Deferred.fromCoroutine(client.account(["mailto:a@example.test"])))
        again = self.make_client()
        self.drive(Deferred.fromCoroutine(again.account(["mailto:b@example.test"])))
        self.assertEqual(self.ca.accounts[url]["contact"], ["mailto:b@example.test"])
        self.assertEqual(self.ca.requests["account"], 1)
        third = self.make_client()
        self.drive(Deferred.fromCoroutine(third.account(["mailto:b@example.test"])))
        self.assertEqual(self.ca.requests["account"], 1, "no update when nothing changed")

    def test_key_rollover(self) -> None:
        client = self.make_client(AccountKey.generate("ec256"))
        [url] = self.drive(Deferred.fromCoroutine(client.account()))
        new = AccountKey.generate("ec256")
        [result] = self.drive(Deferred.fromCoroutine(client.key_change(new)))
        self.assertIsNone(result)
        self.assertEqual(self.ca.accounts[url]["jwk"].thumbprint(), new.jwk.thumbprint())
        chain = self.obtain_with(client, ["a.go.example.test"])
        self.assertIsInstance(chain, IssuedChain)

    def test_csr_with_the_account_key_is_refused_locally(self) -> None:
        from tests.support.keys import make_csr

        key = AccountKey.generate("ec256")
        client = self.make_client(key)
        pem = make_csr(["a.go.example.test"], key.key)
        der = x509.load_pem_x509_csr(pem).public_bytes(serialization.Encoding.DER)
        failure = self.obtain_with(client, ["a.go.example.test"], der=der)
        failure.trap(BadCSR)
        self.assertEqual(self.ca.requests["newOrder"], 0)


class ChainTests(ProtocolTestCase):
    def test_default_and_alternate_chains(self) -> None:
        self.ca.faults.alternates = 2
        chain = self.obtain_with(self.make_client(), ["a.go.example.test"])
        self.assertEqual(top_issuer_cn(chain.pem), "Fake Root 0")
        self.assertEqual(len(chain.alternates), 2)

    def test_preferred_chain_picks_the_alternate(self) -> None:
        self.ca.faults.alternates = 2
        chain = self.obtain_with(
            self.make_client(), ["a.go.example.test"], OrderOptions(preferred_chain="Fake Root 2")
        )
        self.assertEqual(top_issuer_cn(chain.pem), "Fake Root 2")
        self.assertEqual(chain_issuer_cns(chain.pem), ["Fake Root", "Fake Root 2"])

    def test_unknown_preferred_chain_falls_back_to_default(self) -> None:
        self.ca.faults.alternates = 1
        chain = self.obtain_with(
            self.make_client(), ["a.go.example.test"], OrderOptions(preferred_chain="Nobody")
        )
        self.assertEqual(top_issuer_cn(chain.pem), "Fake Root 0")


class NewerACMETests(ProtocolTestCase):
    def test_profile_sent_only_when_offered(self) -> None:
        self.obtain_with(
            self.make_client(), ["a.go.example.test"], OrderOptions(profile="tlsserver")
        )
        self.assertNotIn("profile", self.ca.order_payloads[-1])
        self.ca.faults.profiles = ("classic", "tlsserver")
        client = self.make_client()
        self.obtain_with(client, ["b.go.example.test"], OrderOptions(profile="tlsserver"))
        self.assertEqual(self.ca.order_payloads[-1]["profile"], "tlsserver")

    def test_ari_window_and_replaces(self) -> None:
        self.ca.faults.ari = True
        client = self.make_client()
        first = self.obtain_with(client, ["a.go.example.test"])
        leaf = x509.load_pem_x509_certificates(first.pem.encode())[0]
        [window] = self.drive(Deferred.fromCoroutine(client.renewal_info(leaf)))
        self.assertEqual(self.ca.ari_queries, [ari_cert_id(leaf)])
        self.assertEqual(window.start.isoformat(), "2026-12-01T00:00:00+00:00")
        self.assertEqual(window.retry_after, 21600.0)
        self.obtain_with(client, ["a.go.example.test"], replaces=ari_cert_id(leaf))
        self.assertEqual(self.ca.order_payloads[-1]["replaces"], ari_cert_id(leaf))

    def test_no_ari_without_renewal_info(self) -> None:
        client = self.make_client()
        first = self.obtain_with(client, ["a.go.example.test"])
        leaf = x509.load_pem_x509_certificates(first.pem.encode())[0]
        [window] = self.drive(Deferred.fromCoroutine(client.renewal_info(leaf)))
        self.assertIsNone(window)
        self.obtain_with(client, ["a.go.example.test"], replaces=ari_cert_id(leaf))
        self.assertNotIn("replaces", self.ca.order_payloads[-1])

    def test_revoke_with_reason(self) -> None:
        client = self.make_client()
        chain = self.obtain_with(client, ["a.go.example.test"])
        leaf = x509.load_pem_x509_certificates(chain.pem.encode())[0]
        der = leaf.public_bytes(serialization.Encoding.DER)
        [result] = self.drive(Deferred.fromCoroutine(client.revoke(der, "keyCompromise")))
        self.assertIsNone(result)
        self.assertEqual(self.ca.revoked, {leaf.serial_number: 1})


class MalformedAnswerTests(ProtocolTestCase):
    """A CA answer RFC 8555 does not allow ends the order with ACMEProtocolError."""

    def test_order_without_finalize(self) -> None:
        self.ca.faults.order_fields = {"finalize": None}
        failure = self.obtain_with(self.make_client(), ["a.go.example.test"])
        failure.trap(ACMEProtocolError)
        self.assertIn("'finalize' is missing", str(failure.value))
        self.assertEqual(self.responder.published, [])

    def test_authorization_with_an_unknown_status(self) -> None:
        self.ca.faults.authz_fields = {"status": "done"}
        failure = self.obtain_with(self.make_client(), ["a.go.example.test"])
        failure.trap(ACMEProtocolError)
        self.assertIn("unknown status 'done'", str(failure.value))
        self.assertEqual(self.responder.published, [])
        self.assertEqual(self.ca.requests["challenge"], 0)

    def test_dns01_token_that_is_not_base64url(self) -> None:
        self.ca.faults.authz_fields = {
            "challenges": [
                {"type": "dns-01", "url": BASE + "/chall/1", "status": "pending", "token": "a b"}
            ]
        }
        failure = self.obtain_with(self.make_client(), ["a.go.example.test"])
        failure.trap(ACMEProtocolError)
        self.assertIn("is not base64url", str(failure.value))
        self.assertEqual(self.responder.published, [])

    def test_certificate_that_is_not_pem_cleans_up(self) -> None:
        self.ca.faults.cert_body = b'{"status": "valid"}'
        failure = self.obtain_with(self.make_client(), ["a.go.example.test"])
        failure.trap(ACMEProtocolError)
        self.assertIn("did not return a PEM chain", str(failure.value))
        self.assertEqual(len(self.responder.published), 1)
        self.assertEqual(dict(self.responder.live), {}, "records left behind")


class Stop(Exception):
    """What a test checkpoint raises to end a run at a named point."""


class CheckpointTests(ProtocolTestCase):
    def run_for(
        self,
        client: ACMEClient,
        names: list[str],
        checkpoint: Checkpoint,
        on_order: Callable[[str], object] | None = None,
    ) -> OrderRun:
        schedule = PollSchedule(0.05, 1.0, self.clock.seconds() + 300)
        return OrderRun(
            client,
            names,
            csr_der(names),
            self.responder,
            schedule,
            on_order=on_order,
            checkpoint=checkpoint,
        )

    def test_points_are_reached_in_order(self) -> None:
        reached: list[str] = []
        names = ["a.go.example.test", "b.go.example.test"]
        run = self.run_for(self.make_client(), names, reached.append)
        [chain] = self.drive(Deferred.fromCoroutine(obtain_chain(run)))
        self.assertIsInstance(chain, IssuedChain)
        self.assertEqual(
            reached,
            ["after-new-order", "after-challenge", "after-challenge", *CHECKPOINTS[2:]],
        )

    def test_the_default_checkpoint_does_nothing(self) -> None:
        schedule = PollSchedule(0.05, 1.0, self.clock.seconds() + 300)
        run = OrderRun(self.make_client(), ["a.go.example.test"], b"", self.responder, schedule)
        self.assertIs(run.checkpoint, no_checkpoint)

    def test_a_run_stopped_at_each_point_is_finished_by_complete_order(self) -> None:
        for point in CHECKPOINTS:
            ca_before = dict(self.ca.requests)

            def stop(reached: str, point: str = point) -> None:
                if reached == point:
                    # The CA goes on while we are down (and kill -9 leaves the records).
                    self.ca.validate_answered()
                    raise Stop(point)

            urls: list[str] = []
            names = [f"{point}.go.example.test"]
            run = self.run_for(self.make_client(), names, stop, urls.append)
            [failure] = self.drive(Deferred.fromCoroutine(obtain_chain(run)))
            failure.trap(Stop)
            self.assertEqual(dict(self.responder.live), {}, "records left behind")
            # A new process: a new client, the order URL from the record.
            again = self.run_for(self.make_client(), names, stop_nowhere)
            [chain] = self.drive(Deferred.fromCoroutine(complete_order(again, urls[0])))
            self.assertIsInstance(chain, IssuedChain, point)
            self.assertEqual(chain.order_url, urls[0])
            self.assertEqual(dict(self.responder.live), {}, "records left behind")
            made = {k: v - ca_before.get(k, 0) for k, v in self.ca.requests.items()}
            self.assertEqual(made["newOrder"], 1, point)
            self.assertEqual(made["finalize"], 1, point)
            self.assertEqual(made["challenge"], 1, point)


def stop_nowhere(point: str) -> None:
    pass


class CrashCheckpointTests(SynchronousTestCase):
    """csrproxy.testing.crashpoints: the checkpoint that kills the process, made only when asked."""

    def test_not_asked(self) -> None:
        self.assertIsNone(crash_checkpoint_from_env({}))
        self.assertIsNone(crash_checkpoint_from_env({"CSRPROXY_CRASH_AT": ""}))

    def test_kills_at_its_point_only(self) -> None:
        killed: list[tuple[int, int]] = []
        self.patch(os, "kill", lambda pid, sig: killed.append((pid, sig)))
        checkpoint = crash_checkpoint_from_env({"CSRPROXY_CRASH_AT": "after-finalize"})
        assert checkpoint is not None
        checkpoint("after-new-order")
        checkpoint("after-challenge")
        self.assertEqual(killed, [])
        checkpoint("after-finalize")
        self.assertEqual(killed, [(os.getpid(), signal.SIGKILL)])

    def test_unknown_point_is_refused(self) -> None:
        with self.assertRaises(ValueError) as cm:
            crash_checkpoint_from_env({"CSRPROXY_CRASH_AT": "after-lunch"})
        self.assertIn("after-new-order", str(cm.exception))

    def test_the_crash_tests_points_are_the_order_checkpoints(self) -> None:
        self.assertEqual(POINTS, CHECKPOINTS)


class PublishBeforeAnswerTests(ProtocolTestCase):
    """Every value is published and served, and older copies waited out, before any
    challenge is answered: a resolver asked in between would cache a set missing one."""

    def test_no_challenge_is_answered_before_every_value_is_served_and_settled(self) -> None:
        names = ["x.go.example.test", "*.x.go.example.test", "y.go.example.test"]
        inner, slow, settled = self.responder, Deferred[None](), Deferred[None]()
        settle_calls: list[tuple[list[str], int]] = []

        class SlowY:
            def publish(self, identifier: str, value: str) -> Deferred[None]:
                done = inner.publish(identifier, value)
                return slow if identifier == "y.go.example.test" else done

            def unpublish(self, identifier: str, value: str) -> Deferred[None]:
                return inner.unpublish(identifier, value)

        def settle(identifiers: Sequence[str]) -> Deferred[None]:
            settle_calls.append((sorted(identifiers), self.ca.requests["challenge"]))
            return settled

        schedule = PollSchedule(0.05, 1.0, self.clock.seconds() + 300)
        run = OrderRun(
            self.make_client(), names, csr_der(names), SlowY(), schedule, settle=settle
        )
        d = Deferred.fromCoroutine(obtain_chain(run))

        def spin() -> None:
            for _ in range(100):
                self.agent.flush()
                self.clock.advance(0.01)

        spin()
        self.assertEqual(len(inner.published), 3)
        self.assertEqual((settle_calls, self.ca.requests["challenge"]), ([], 0))
        slow.callback(None)
        spin()
        self.assertEqual(
            settle_calls,
            [(["x.go.example.test", "x.go.example.test", "y.go.example.test"], 0)],
        )
        self.assertEqual(self.ca.requests["challenge"], 0)
        settled.callback(None)
        [chain] = self.drive(d)
        self.assertIsInstance(chain, IssuedChain)
        self.assertEqual(self.ca.requests["challenge"], 3)
        self.assertEqual(dict(inner.live), {})

    def test_a_failed_publish_answers_nothing_and_removes_every_value(self) -> None:
        names = ["a.go.example.test", "b.go.example.test"]
        inner = self.responder

        class FailB:
            def publish(self, identifier: str, value: str) -> Deferred[None]:
                done = inner.publish(identifier, value)
                if identifier == "b.go.example.test":
                    return fail(PublishError("builtin", "no"))
                return done

            def unpublish(self, identifier: str, value: str) -> Deferred[None]:
                return inner.unpublish(identifier, value)

        schedule = PollSchedule(0.05, 1.0, self.clock.seconds() + 300)
        run = OrderRun(self.make_client(), names, csr_der(names), FailB(), schedule)
        [failure] = self.drive(Deferred.fromCoroutine(obtain_chain(run)))
        self.assertTrue(failure.check(PublishError))
        self.assertEqual(self.ca.requests["challenge"], 0)
        self.assertEqual(dict(inner.live), {})
