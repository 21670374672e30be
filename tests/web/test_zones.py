"""``GET /v1/name`` with several zones: the name in the first zone with room, kept."""

from __future__ import annotations

import json

from treq.testing import StubTreq

from csrproxy.challenges.zone import ZonePublisher
from csrproxy.config.model import PolicyConfig
from csrproxy.dns.zone import ChallengeZone
from csrproxy.dns.zones import Zones
from csrproxy.issuance.admission import Admission, Budgets
from csrproxy.issuance.orders import OrderBook
from csrproxy.issuance.policy import NamePolicy
from csrproxy.issuance.room import has_room, new_names_room
from csrproxy.names import key_label
from csrproxy.web.api import SigningAPI
from csrproxy.web.auth import ClientGate, parse_tokens, token_hash
from csrproxy.web.health import Health
from csrproxy.web.problems import problem_document
from csrproxy.web.status import StatusPage
from tests.support.issuers import NO_BUDGETS, make_issuer
from tests.support.keys import EC256, make_csr
from tests.web.test_api import ZONE, APITestCase, spki

OTHER, THIRD = "go-other.example.net", "go.third.example"
ZONES = (ZONE, OTHER, THIRD)


class ZoneChoiceTests(APITestCase):
    patterns = [f"{{key}}.{z}" for z in ZONES] + [f"*.{{key}}.{z}" for z in ZONES]
    patterns += [f"{{label}}.{OTHER}", f"fixed.{THIRD}"]

    def setUp(self) -> None:
        super().setUp()
        self.full: set[str] = set()
        self.asked: list[str] = []

        def room(zone: str) -> bool:
            self.asked.append(zone)
            return zone not in self.full

        self.api.policy = NamePolicy(self.patterns, zones=ZONES)
        self.api.room = room
        self.label = key_label(spki(EC256))

    def names(self, query: str = "") -> list[str]:
        code, _, body = self.request("GET", "/v1/name" + query, make_csr([f"x.{ZONE}"]))
        self.assertEqual(code, 200, body)
        names: list[str] = json.loads(body)["names"]
        return names

    def test_first_zone_while_it_has_room(self) -> None:
        label = self.label
        self.assertEqual(
            self.names(),
            [f"{label}.{ZONE}", f"*.{label}.{ZONE}", f"{{label}}.{OTHER}", f"fixed.{THIRD}"],
        )
        self.assertEqual(self.asked, [ZONE])  # asked once a request

    def test_second_zone_when_the_first_is_full(self) -> None:
        self.full = {ZONE}
        label = self.label
        self.assertEqual(
            self.names(),
            [f"{label}.{OTHER}", f"*.{label}.{OTHER}", f"{{label}}.{OTHER}", f"fixed.{THIRD}"],
        )
        self.full = {ZONE, OTHER}
        self.assertEqual(self.names()[:2], [f"{label}.{THIRD}", f"*.{label}.{THIRD}"])

    def test_every_zone_full_gives_the_first(self) -> None:
        self.full = set(ZONES)
        self.assertEqual(self.names()[0], f"{self.label}.{ZONE}")

    def test_current_names_are_kept_while_allowed(self) -> None:
        label = self.label
        kept = [f"{label}.{OTHER}", f"*.{label}.{OTHER}"]
        query = "?current=" + "&current=".join(kept)
        self.assertEqual(self.names(query), kept)
        self.assertEqual(self.asked, [])  # no budget asked: a renewal costs none
        # A name the key may not have is not kept: a fresh choice instead.
        other = f"{key_label(b'another key')}.{OTHER}"
        self.assertEqual(self.names(f"?current={other}")[0], f"{label}.{ZONE}")
        self.assertEqual(self.names("?current=www.example.org")[0], f"{label}.{ZONE}")
        self.assertEqual(self.names(f"?current={{label}}.{OTHER}")[0], f"{label}.{ZONE}")
        many = "&".join(f"current=n{i}.{OTHER}" for i in range(200))
        self.assertEqual(self.names("?" + many)[0], f"{label}.{ZONE}")

    def test_token_policy_limits_the_choice(self) -> None:
        token = "zones-token"
        self.api.gate = ClientGate(parse_tokens(f"{token_hash(token)} {{key}}.{THIRD}\n"))
        _, _, body = self.request(
            "GET", "/v1/name", make_csr([f"x.{ZONE}"]), Authorization=f"Bearer {token}"
        )
        # {label} patterns are shown as they are (the token is checked at POST /v1/sign).
        want = [f"{self.label}.{THIRD}", f"{{label}}.{OTHER}"]
        self.assertEqual(json.loads(body)["names"], want)


class OneZoneTests(APITestCase):
    def test_one_zone_offers_every_pattern(self) -> None:
        self.api.policy = NamePolicy(self.patterns, zones=(ZONE,))
        self.api.room = lambda zone: False
        label = key_label(spki(EC256))
        _, _, body = self.request("GET", "/v1/name", make_csr([f"x.{ZONE}"]))
        self.assertEqual(json.loads(body)["names"], [f"{{label}}.{ZONE}", f"{label}.{ZONE}"])


class ThreeZonesOnboardTests(APITestCase):
    """Three zones in three registered domains: each week's new names fill one zone's
    budget after the other, and only then are sign requests refused."""

    ZONES = ("go.alpha.test", "go.beta.test", "go.gamma.test")
    patterns = [f"{{label}}.{z}" for z in ZONES]
    # Let's Encrypt's 50 less the default margin: 3 x 45 = 135 installations a week.
    PER_WEEK = PolicyConfig.new_names_per_week

    def build(
        self,
        budgets: Budgets = NO_BUDGETS,
        gate: ClientGate | None = None,
        subject: str | None = None,
        sync_timeout: float = 50.0,
        profiles: tuple[str, ...] = (),
        status: StatusPage | None = None,
    ) -> None:
        ns = [f"ns1.{self.ZONES[0]}"]
        self.zone = Zones([ChallengeZone(z, ns, ["@ A 127.0.0.1"]) for z in self.ZONES])  # type: ignore[assignment]
        budgets = Budgets(
            new_names_per_week=self.PER_WEEK,
            orders_per_3h=0,
            same_names_per_week=0,
            client_requests_per_hour=0,
        )
        admission = Admission(self.clock.seconds, budgets, "alpha.test", self.metrics.refusal)
        self.issuer = make_issuer(
            self.clock,
            self.acme,
            ZonePublisher(self.zone),
            admission=admission,
            metrics=self.metrics,
        )
        self.api = SigningAPI(
            self.issuer,
            self.issuer.ledger,
            NamePolicy(self.patterns, zones=self.ZONES),
            OrderBook(self.clock, lambda f: problem_document(f.value)),
            self.metrics,
            ClientGate(),
            clock=self.clock,
            health=Health([]),
            room=has_room(new_names_room(admission)),
        )
        self.client = StubTreq(self.api.app.resource())

    def test_each_zone_in_turn_then_refused(self) -> None:
        onboarded: list[str] = []
        for index in range(len(self.ZONES) * self.PER_WEEK):
            code, _, body = self.request("GET", "/v1/name", make_csr([f"x.{self.ZONES[0]}"]))
            [pattern] = json.loads(body)["names"]
            name = pattern.replace("{label}", f"host{index}")
            code, _, body = self.post(make_csr([name]))
            self.assertEqual(code, 200, body)
            onboarded.append(name.split(".", 1)[1])
        self.assertEqual(onboarded, [z for z in self.ZONES for _ in range(self.PER_WEEK)])
        # Every zone full: the first zone's name, and the CA's budget says no (429).
        _, _, body = self.request("GET", "/v1/name", make_csr([f"x.{self.ZONES[0]}"]))
        self.assertEqual(json.loads(body)["names"], [f"{{label}}.{self.ZONES[0]}"])
        code, headers, body = self.post(make_csr([f"late.{self.ZONES[0]}"]))
        self.assertEqual(code, 429)
        self.assertTrue(headers.getRawHeaders("retry-after"))
        # A week later the first zone has room again.
        self.clock.advance(7 * 86400)
        _, _, body = self.request("GET", "/v1/name", make_csr([f"x.{self.ZONES[0]}"]))
        self.assertEqual(json.loads(body)["names"], [f"{{label}}.{self.ZONES[0]}"])
        self.assertEqual(self.post(make_csr([f"late.{self.ZONES[0]}"]))[0], 200)
