"""PowerDNSPublisher.set_caa: the apex CAA RRset through the PowerDNS API (fake, in memory)."""

from __future__ import annotations

from twisted.trial.unittest import SynchronousTestCase

from tests.challenges.test_powerdns import ZONE, PowerDNSTestMixin

APEX = ZONE + "."
ACCOUNT = "https://acme-v02.api.letsencrypt.org/acme/acct/42"


def caa(tag: str, value: str) -> str:
    return f'0 {tag} "{value}"'


class SetCAATests(PowerDNSTestMixin, SynchronousTestCase):
    def rrset(self) -> list[str] | None:
        found = self.fake.zones[APEX].get((APEX, "CAA"))
        return None if found is None else [r["content"] for r in found["records"]]

    def test_replaces_the_apex_rrset_with_issue_and_issuewild(self) -> None:
        self.ok(self.publisher.set_caa([("letsencrypt.org", ACCOUNT)]))
        value = f"letsencrypt.org; accounturi={ACCOUNT}; validationmethods=dns-01"
        self.assertEqual(self.rrset(), [caa("issue", value), caa("issuewild", value)])
        [body] = self.fake.patches
        [rrset] = body["rrsets"]
        self.assertEqual(
            (rrset["name"], rrset["type"], rrset["changetype"], rrset["ttl"]),
            (APEX, "CAA", "REPLACE", 10),
        )
        self.assertEqual(self.publisher.live_names, set())  # not a challenge name

    def test_latest_wins_and_writes_are_serialised(self) -> None:
        self.fake.hold = True
        first = self.publisher.set_caa([("letsencrypt.org", None)])
        second = self.publisher.set_caa([("letsencrypt.org", ACCOUNT + "0")])
        third = self.publisher.set_caa([("letsencrypt.org", ACCOUNT)])
        self.agent.flush()
        self.fake.release()
        self.drive(first)
        self.fake.hold = False
        self.fake.release()
        self.drive(second, third)
        self.assertEqual(len(self.fake.patches), 2)  # the second call's write never went out
        self.assertEqual(self.fake.max_in_flight[APEX], 1)
        rrset = self.rrset()
        assert rrset is not None
        self.assertTrue(all(f"accounturi={ACCOUNT};" in content for content in rrset))

    def test_failure_reported(self) -> None:
        self.fake.fail_always = 422
        error = self.failed(self.publisher.set_caa([("letsencrypt.org", ACCOUNT)]))
        self.assertEqual(error.http_status, 422)
        self.fake.fail_always = None
        self.ok(self.publisher.set_caa([("letsencrypt.org", ACCOUNT)]))  # the queue goes on

    def test_bad_input_refused_without_a_request(self) -> None:
        for issuers in ([], [("lets encrypt", None)], [("letsencrypt.org", "a b")]):
            with self.assertRaises(ValueError):
                self.publisher.set_caa(issuers)
        self.assertEqual(self.fake.patches, [])
