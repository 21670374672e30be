"""Test doubles for the DNS server: a protocol that records replies instead of sending them."""

from __future__ import annotations

from typing import Any

from csrproxy.dns.factory import ZoneServerFactory


class ReplyRecorder:
    """Stands for a DNS protocol (``factory.ReplyWriter``): records each reply and address."""

    def __init__(self) -> None:
        self.replies: list[tuple[bytes, Any]] = []

    def writeReply(self, data: bytes, address: Any) -> None:
        self.replies.append((data, address))


def reply_to(factory: ZoneServerFactory, packet: bytes, tcp: bool = False) -> bytes | None:
    """The reply ``factory`` sends to ``packet`` over UDP (or TCP), None if it sends none.

    Zone look-ups fire at once, so the reply is written before this returns.
    """
    recorder = ReplyRecorder()
    factory.packetReceived(packet, recorder, None if tcp else ("127.0.0.1", 5353))
    if not recorder.replies:
        return None
    ((data, _),) = recorder.replies
    return data
