"""csrproxy's authoritative DNS: the challenge zone and its UDP/TCP listeners."""

from csrproxy.dns.server import DNSServerService, parse_listen
from csrproxy.dns.zone import ChallengeZone

__all__ = ["ChallengeZone", "DNSServerService", "parse_listen"]
