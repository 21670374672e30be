"""Publishing dns-01 TXT values into our own in-memory zone."""

from __future__ import annotations

from twisted.internet.defer import Deferred, fail, succeed

from csrproxy.dns.zone import ChallengeZone
from csrproxy.dns.zones import Zones
from csrproxy.errors import PublishError

CHALLENGE_LABEL = "_acme-challenge"


def challenge_name(identifier: str) -> str:
    """``_acme-challenge.<name>`` for an identifier (a wildcard's base name for ``*.x``)."""
    base = identifier[2:] if identifier.startswith("*.") else identifier
    return f"{CHALLENGE_LABEL}.{base.rstrip('.').lower()}"


class ZonePublisher:
    """Puts challenge values into a :class:`ChallengeZone` (or, given :class:`Zones`, into
    the zone of each identifier); served at once."""

    backend = "builtin"

    def __init__(self, zone: ChallengeZone | Zones) -> None:
        self.zone = zone

    def publish(self, identifier: str, value: str) -> Deferred[None]:
        name = challenge_name(identifier)
        try:
            self.zone.add_txt(name, value)
        except ValueError as e:
            return fail(PublishError(self.backend, str(e)))
        # The same check as for PowerDNS, cheaply: the zone the server answers from has it.
        if value not in self.zone.txt_values(name):
            return fail(PublishError(self.backend, f"{name} does not serve the new value"))
        return succeed(None)

    def unpublish(self, identifier: str, value: str) -> Deferred[None]:
        self.zone.remove_txt(challenge_name(identifier), value)
        return succeed(None)
