"""IXFR (RFC 1995): the client's serial in its query, and the records of the answer.

Pure logic over a :class:`ChallengeZone` and its ``history``; deciding who may
transfer, the bounds and the signing are ``transfer``'s. The answer to a client at
serial ``s`` is:

- the current SOA alone, when ``s`` is the current serial or newer (RFC 1982), as
  over UDP always (RFC 1995 section 2: the client asks again over TCP);
- when the history holds the changes since ``s``: the current SOA, then for each
  change the SOA of its old serial, the records deleted, the SOA of its new serial,
  the records added, and the current SOA again (section 4, one sequence a change);
- else None: the caller sends the whole zone in AXFR form (section 4).
"""

from __future__ import annotations

import struct

from twisted.names import dns

from csrproxy.dns.messages import QueryMessage
from csrproxy.dns.zone import ChallengeZone, Records

# An SOA's RDATA ends in five 32-bit fields, the serial first; two names come before.
SOA_FIXED = 20


def client_serial(query: QueryMessage) -> int | None:
    """The serial of the SOA an IXFR ``query`` carries in its authority section, or None
    (FORMERR) when that section is not exactly one SOA with well-sized RDATA."""
    if len(query.authority) != 1 or query.authority[0].type != dns.SOA:
        return None
    # QueryMessage leaves RDATA undecoded; the names may be compressed, but the
    # fixed fields at the end are not.
    data = bytes(getattr(query.authority[0].payload, "data", b""))
    if len(data) < SOA_FIXED + 2:
        return None
    serial: int = struct.unpack_from("!I", data, len(data) - SOA_FIXED)[0]
    return serial


def up_to_date(serial: int, current: int) -> bool:
    """Whether a client at ``serial`` holds ``current`` or a newer serial (RFC 1982)."""
    return (serial - current) & 0xFFFFFFFF < 1 << 31


def incremental_records(zone: ChallengeZone, serial: int) -> Records | None:
    """The answer's records for a client at ``serial`` (see the module docstring), or
    None when ``zone.history`` does not reach back to ``serial``."""
    current = zone.soa_header()
    if up_to_date(serial, zone.serial):
        return [current]
    changes = zone.history.since(serial)
    if not changes or changes[-1].new_serial != zone.serial:
        return None
    out = [current]
    for change in changes:
        out.append(zone.soa_at(change.old_serial))
        out.extend(change.deleted)
        out.append(zone.soa_at(change.new_serial))
        out.extend(change.added)
    out.append(current)
    return out
