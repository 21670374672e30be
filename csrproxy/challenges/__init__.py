"""Where dns-01 challenge values go (the built-in zone, PowerDNS) and the check that the
name servers serve them."""
