"""One DNS query over UDP, asked and read by dnspython (an implementation independent of ours)."""

from __future__ import annotations

from typing import Any


def dns_query(
    port: int, name: str, qtype: str = "TXT", host: str = "127.0.0.1", timeout: float = 2
) -> tuple[int, list[bytes]]:
    """One UDP query; returns ``(rcode, [rdata of each answer of type qtype])``; a TXT rdata
    comes as the concatenation of its character strings."""
    import dns.message
    import dns.query
    import dns.rdatatype

    rdtype = dns.rdatatype.from_text(qtype)
    answer: Any = dns.query.udp(dns.message.make_query(name, rdtype), host, timeout, port)
    out: list[bytes] = []
    for rrset in answer.answer:
        if rrset.rdtype != rdtype:
            continue
        for rdata in rrset:
            if rdtype == dns.rdatatype.TXT:
                out.append(b"".join(rdata.strings))
            else:
                out.append(rdata.to_digestable())
    return int(answer.rcode()), out
