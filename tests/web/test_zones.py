"""``GET /v1/name`` with several zones: the name in the first zone with room, kept."""

from __future__ import annotations

import json

from csrproxy.issuance.policy import NamePolicy
from csrproxy.names import key_label
from csrproxy.web.auth import ClientGate, parse_tokens, token_hash
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
