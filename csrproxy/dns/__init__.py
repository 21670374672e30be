"""csrproxy's authoritative DNS: the zone (static records and challenge TXT values) and the
twisted.names server (UDP/TCP listeners, EDNS, answer caches)."""
