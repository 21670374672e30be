"""The zone's history of changes: distinct-record diffs, and its bounds."""

from __future__ import annotations

from typing import Any

from twisted.names import dns
from twisted.trial.unittest import SynchronousTestCase

from csrproxy.dns.history import HISTORY_CHANGES, HISTORY_RECORDS, Change, ZoneHistory
from csrproxy.dns.zone import ChallengeZone

ORIGIN = "go.example.test"
CHALLENGE = "_acme-challenge.demo.go.example.test"
SERIAL = 1000


def make_zone(history: ZoneHistory | None = None) -> ChallengeZone:
    return ChallengeZone(
        ORIGIN,
        ["ns1." + ORIGIN],
        ["@ A 127.0.0.1", 'txt 60 TXT "static"'],
        serial=SERIAL,
        clock=lambda: SERIAL,
        history=history,
    )


def texts(records: tuple[dns.RRHeader, ...]) -> list[bytes]:
    return [b"".join(payload(record).data) for record in records]


def payload(record: dns.RRHeader) -> Any:
    return record.payload


def change(old: int, size: int = 0) -> Change:
    record = dns.RRHeader(b"x", dns.TXT, dns.IN, 10, dns.Record_TXT(b"v", ttl=10))
    return Change(old, old + 1, (), (record,) * size)


class ZoneChangeTests(SynchronousTestCase):
    """Every serial change is kept as the change of the distinct TXT RRset."""

    def test_a_new_zone_has_no_history(self) -> None:
        zone = make_zone()
        self.assertEqual(len(zone.history), 0)
        self.assertIsNone(zone.history.since(zone.serial))

    def test_add_and_remove(self) -> None:
        zone = make_zone()
        zone.add_txt(CHALLENGE, "a")
        zone.add_txt(CHALLENGE, "b")
        zone.remove_txt(CHALLENGE, "a")
        changes = zone.history.since(SERIAL)
        assert changes is not None
        self.assertEqual(
            [(c.old_serial, c.new_serial) for c in changes],
            [(SERIAL, SERIAL + 1), (SERIAL + 1, SERIAL + 2), (SERIAL + 2, SERIAL + 3)],
        )
        self.assertEqual([texts(c.added) for c in changes], [[b"a"], [b"b"], []])
        self.assertEqual([texts(c.deleted) for c in changes], [[], [], [b"a"]])
        added = changes[0].added[0]
        self.assertEqual(added.name.name, CHALLENGE.encode())
        self.assertEqual((added.type, added.ttl), (dns.TXT, zone.challenge_ttl))
        self.assertEqual(zone.history.since(SERIAL + 2), changes[2:])
        self.assertIsNone(zone.history.since(SERIAL + 3))

    def test_multiset_changes_are_empty_but_move_the_serial(self) -> None:
        zone = make_zone()
        zone.add_txt(CHALLENGE, "a")
        zone.add_txt(CHALLENGE, "a")  # served twice, held once
        zone.remove_txt(CHALLENGE, "a")  # served once: still held
        zone.remove_txt(CHALLENGE, "a")
        changes = zone.history.since(SERIAL)
        assert changes is not None
        self.assertEqual(zone.serial, SERIAL + 4)
        self.assertEqual(
            [(texts(c.deleted), texts(c.added)) for c in changes],
            [([], [b"a"]), ([], []), ([], []), ([b"a"], [])],
        )

    def test_a_value_equal_to_a_static_record_changes_nothing(self) -> None:
        zone = make_zone()
        zone.add_txt("txt." + ORIGIN, "static")
        zone.remove_txt("txt." + ORIGIN, "static")
        changes = zone.history.since(SERIAL)
        assert changes is not None
        self.assertEqual([c.size for c in changes], [0, 0])

    def test_a_removal_of_nothing_is_no_change(self) -> None:
        zone = make_zone()
        zone.remove_txt(CHALLENGE, "never")
        self.assertEqual((zone.serial, len(zone.history)), (SERIAL, 0))

    def test_soa_at_an_old_serial(self) -> None:
        zone = make_zone()
        zone.add_txt(CHALLENGE, "a")
        old = zone.soa_at(SERIAL)
        current = zone.soa_header()
        self.assertEqual(payload(old).serial, SERIAL)
        self.assertEqual(payload(current).serial, SERIAL + 1)
        payload(old).serial = payload(current).serial
        self.assertEqual(old.payload, current.payload)
        self.assertEqual(old.ttl, current.ttl)


class BoundTests(SynchronousTestCase):
    """The oldest changes go first, beyond either bound."""

    def test_defaults(self) -> None:
        history = ZoneHistory()
        self.assertEqual((history.max_changes, history.max_records), (1000, 4000))
        self.assertEqual((HISTORY_CHANGES, HISTORY_RECORDS), (1000, 4000))

    def test_change_count_bound(self) -> None:
        zone = make_zone(ZoneHistory(max_changes=3))
        for index in range(5):
            zone.add_txt(CHALLENGE, f"v{index}")
        self.assertEqual(len(zone.history), 3)
        self.assertIsNone(zone.history.since(SERIAL + 1))
        changes = zone.history.since(SERIAL + 2)
        assert changes is not None
        self.assertEqual([texts(c.added) for c in changes], [[b"v2"], [b"v3"], [b"v4"]])

    def test_record_bound(self) -> None:
        history = ZoneHistory(max_records=5)
        for old in range(4):
            history.record(change(old, 2))
        self.assertEqual((len(history), history.records), (2, 4))
        self.assertIsNone(history.since(1))
        self.assertIsNotNone(history.since(2))
        history.record(change(4, 6))  # alone over the bound
        self.assertEqual((len(history), history.records), (0, 0))

    def test_empty_changes_count_against_the_change_bound_only(self) -> None:
        history = ZoneHistory(max_changes=10, max_records=1)
        for old in range(25):
            history.record(change(old))
        self.assertEqual((len(history), history.records), (10, 0))

    def test_a_gap_forgets_what_came_before(self) -> None:
        history = ZoneHistory()
        history.record(change(1))
        history.record(change(7))
        self.assertIsNone(history.since(1))
        self.assertEqual(len(history), 1)

    def test_a_hostile_flood_stays_within_both_bounds(self) -> None:
        zone = make_zone()
        for index in range(HISTORY_RECORDS + 500):
            zone.add_txt(f"_acme-challenge.n{index % 50}.{ORIGIN}", f"value-{index}")
        self.assertLessEqual(len(zone.history), HISTORY_CHANGES)
        self.assertLessEqual(zone.history.records, HISTORY_RECORDS)
        self.assertEqual(len(zone.history), HISTORY_CHANGES)
