"""Zone transfer (AXFR, RFC 5936; IXFR, RFC 1995) to the configured secondaries,
TSIG-signed (RFC 8945).

A transfer is answered only over TCP, only to an address listed in
``[dns.secondaries]`` and only for a query signed with that secondary's key; any
other AXFR or IXFR is REFUSED, and the refusals are summed up in one log line per
``LOG_INTERVAL``. IXFR is answered from the zone's history (``csrproxy.dns.ixfr``,
``csrproxy.dns.history``): the current SOA alone when the secondary is up to date,
the changes since its serial when the history holds them, else the whole zone in
AXFR form. A signed IXFR over UDP from a secondary gets the current SOA alone (the
secondary then asks over TCP); an IXFR without exactly one SOA in its authority
section, FORMERR. A query with a TSIG that fails gets NOTAUTH with the TSIG error
(BADKEY, BADSIG unsigned; BADTIME signed, RFC 8945 5.3). A secondary's signed SOA
query (its refresh check) is answered signed, as secondaries require.

Bounds: a message holds at most ``RECORDS_PER_MESSAGE`` records and
``MESSAGE_BYTES`` bytes; a transfer at most ``TRANSFER_BYTES`` (else SERVFAIL);
each address starts at most ``TRANSFERS_PER_WINDOW`` full transfers per zone (AXFR, and IXFR
answered in AXFR form) a ``WINDOW`` (REFUSED beyond), so its unsent bytes stay within
that many transfers. Incremental IXFR answers (the changes since the secondary's
serial, or the SOA alone) count in a window of their own, ``INCREMENTAL_PER_WINDOW``
an address: a secondary follows every change that way, and each answer holds at most
the history (``history.HISTORY_RECORDS`` records and two SOAs a change kept). A transfer
is built from one snapshot of the zone in one reactor turn: no transfer sees a
half-made change.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from typing import Any

from twisted.logger import Logger
from twisted.names import dns

from csrproxy.dns import tsig
from csrproxy.dns.ixfr import client_serial, incremental_records
from csrproxy.dns.messages import QueryMessage, Reply
from csrproxy.dns.zone import ChallengeZone
from csrproxy.dns.zones import Zones

log = Logger()

RECORDS_PER_MESSAGE = 100
MESSAGE_BYTES = 16384
TRANSFER_BYTES = 8 << 20
TRANSFERS_PER_WINDOW = 4
# Ten a second: NOTIFY (csrproxy.dns.notify.SPACING) makes a secondary ask at most five.
INCREMENTAL_PER_WINDOW = 600
WINDOW = 60.0
LOG_INTERVAL = 60.0

# address -> the keys it may sign with (by lowercase key name)
Keys = Mapping[str, Mapping[bytes, tsig.TSIGKey]]


def keys_of(secondaries: Sequence[Any]) -> dict[str, dict[bytes, tsig.TSIGKey]]:
    """The ``Keys`` of ``SecondaryConfig``s: each address with its secondaries' keys."""
    keys: dict[str, dict[bytes, tsig.TSIGKey]] = {}
    for secondary in secondaries:
        key = tsig.TSIGKey(secondary.tsig_name, secondary.tsig_algorithm, secondary.tsig_secret)
        keys.setdefault(secondary.address, {})[key.name.encode("ascii")] = key
    return keys


class ZoneTransfers:
    """Decides and builds AXFR and IXFR answers of ``zone`` (a :class:`ChallengeZone`, or
    each of :class:`Zones`, by the question's name) for the secondaries in ``keys``."""

    def __init__(self, reactor: Any, zone: ChallengeZone | Zones, keys: Keys) -> None:
        self.reactor = reactor
        self.zone = zone
        self.zones = Zones.of(zone)
        self.keys = keys
        self.refused = 0
        self._refused_since_log = 0
        self._next_log = 0.0
        # address -> start times within WINDOW; addresses are the configured ones only
        self._started: dict[str, list[float]] = {}
        self._incremental: dict[str, list[float]] = {}

    def answer(
        self, query: QueryMessage, reply: Reply, host: str, tcp: bool
    ) -> tuple[int, list[bytes]] | None:
        """``(rcode, the messages to send)`` for the AXFR or IXFR ``query``, or None for
        REFUSED.

        ``reply`` is the response frame (id, flags, question) to fill.
        """
        ixfr = query.queries[0].type == dns.IXFR
        keys = self.keys.get(host) if tcp or ixfr else None
        zone = self.zones.at(query.queries[0].name.name)
        if keys is None or zone is None:
            return self._refuse(host, "not a secondary" if keys is None else "not our zone")
        now = self.reactor.seconds()
        checked = self._verified(query, reply, keys, host, now)
        if checked is None or isinstance(checked, tuple):
            return checked
        signer = checked
        serial = None
        if ixfr:
            serial = client_serial(query)
            if serial is None:
                reply.rCode = dns.EFORMAT
                return dns.EFORMAT, [signer.sign(reply.toStr())]
            if not tcp:
                reply.answers = [zone.soa_header()]
                reply.auth = True
                return dns.OK, [signer.sign(reply.toStr())]
        # One snapshot of the zone, in this reactor turn.
        records = None if serial is None else incremental_records(zone, serial)
        many = len(self.zones)  # a secondary of every zone asks for each
        if records is not None:
            if not self._admit(self._incremental, host, now, INCREMENTAL_PER_WINDOW * many):
                why = f"over {INCREMENTAL_PER_WINDOW * many} incremental transfers in {WINDOW:.0f}s"
                return self._refuse(host, why)
            messages = self._messages(reply, records)
            if messages is not None:
                return dns.OK, [signer.sign(message) for message in messages]
        # AXFR, or IXFR in AXFR form (RFC 1995 section 4)
        if not self._admit(self._started, host, now, TRANSFERS_PER_WINDOW * many):
            why = f"over {TRANSFERS_PER_WINDOW * many} transfers in {WINDOW:.0f}s"
            return self._refuse(host, why)
        records = zone.transfer_records()
        records.append(records[0])  # the SOA last too
        messages = self._messages(reply, records)
        if messages is None:
            log.error(
                "the zone is over {limit} bytes: zone transfer to {host} answered SERVFAIL",
                limit=TRANSFER_BYTES,
                host=host,
            )
            reply.answers = []
            reply.queries = query.queries[:]
            reply.rCode = dns.ESERVER
            return dns.ESERVER, [signer.sign(reply.toStr())]
        return dns.OK, [signer.sign(message) for message in messages]

    @staticmethod
    def _admit(started: dict[str, list[float]], host: str, now: float, limit: int) -> bool:
        # Whether ``host`` may start one more within WINDOW of ``now``; counts it if so.
        recent = [t for t in started.get(host, []) if t > now - WINDOW]
        admitted = len(recent) < limit
        if admitted:
            recent.append(now)
        started[host] = recent
        return admitted

    def soa(self, query: QueryMessage, reply: Reply, host: str) -> tuple[int, list[bytes]] | None:
        """The signed SOA reply to a TSIG-signed SOA query for the apex from a secondary
        (its refresh check, over UDP or TCP), or None: answer it as any other query."""
        keys = self.keys.get(host)
        zone = self.zones.at(query.queries[0].name.name)
        if keys is None or zone is None:
            return None
        checked = self._verified(query, reply, keys, host, self.reactor.seconds())
        if checked is None or isinstance(checked, tuple):
            return checked
        reply.answers = [zone.soa_header()]
        reply.auth = True
        return dns.OK, [checked.sign(reply.toStr())]

    def _verified(
        self,
        query: QueryMessage,
        reply: Reply,
        keys: Mapping[bytes, tsig.TSIGKey],
        host: str,
        now: float,
    ) -> tsig.ResponseSigner | tuple[int, list[bytes]] | None:
        # The signer for a verified query; the NOTAUTH reply for a failed one; None
        # (refused) for a malformed or missing TSIG.
        try:
            verdict = tsig.verify(query.raw, keys, now)
        except Exception:
            return self._refuse(host, "malformed TSIG")
        if verdict is None:
            return self._refuse(host, "not signed")
        if verdict.error in (tsig.BADKEY, tsig.BADSIG):
            self._refuse(host, f"TSIG error {verdict.error}")
            reply.rCode = tsig.NOTAUTH
            return tsig.NOTAUTH, [tsig.unsigned_error(reply.toStr(), verdict, now)]
        signer = tsig.ResponseSigner(verdict, now)
        if verdict.error == tsig.BADTIME:
            self._refuse(host, "TSIG time outside the fudge")
            reply.rCode = tsig.NOTAUTH
            return tsig.NOTAUTH, [signer.sign(reply.toStr())]
        return signer

    def _messages(self, reply: Reply, records: list[dns.RRHeader]) -> list[bytes] | None:
        # Chunks of RECORDS_PER_MESSAGE records, halved while one exceeds MESSAGE_BYTES;
        # the question goes in the first message only (RFC 5936 2.2).
        out: list[bytes] = []
        total = 0
        question = reply.queries
        pending = [
            records[i : i + RECORDS_PER_MESSAGE]
            for i in range(0, len(records), RECORDS_PER_MESSAGE)
        ]
        pending.reverse()
        while pending:
            chunk = pending.pop()
            reply.answers = chunk
            reply.auth = True
            reply.queries = [] if out else question
            data = reply.toStr()
            if len(data) > MESSAGE_BYTES and len(chunk) > 1:
                half = len(chunk) // 2
                pending.extend((chunk[half:], chunk[:half]))
                continue
            total += len(data)
            if total > TRANSFER_BYTES:
                reply.queries = question
                return None
            out.append(data)
        reply.queries = question
        return out

    def _refuse(self, host: str, why: str) -> tuple[int, list[bytes]] | None:
        self.refused += 1
        self._refused_since_log += 1
        now = self.reactor.seconds()
        if now >= self._next_log:
            log.info(
                "refused {count} zone transfers since the last report (latest: {host}, {why})",
                count=self._refused_since_log,
                host=host,
                why=why,
            )
            self._refused_since_log = 0
            self._next_log = now + LOG_INTERVAL
        return None
