"""A test transport with back-pressure: bytes written stay unsent until the peer reads
them, and the protocol's reads stop while it pauses the transport."""

from __future__ import annotations

from io import BytesIO
from typing import Any, cast

from twisted.internet.interfaces import IConsumer, IPushProducer, ITransport
from twisted.internet.testing import StringTransport
from zope.interface import implementer


@implementer(ITransport, IConsumer, IPushProducer)
class BufferedTransport(StringTransport):
    """Stands for a TCP connection's transport (twisted's ``FileDescriptor``) and its peer.

    As ``FileDescriptor`` does, each ``write`` that leaves more than ``bufferSize``
    bytes unsent pauses the registered streaming producer, and the producer is resumed
    when everything was sent (here: read by the peer, with :meth:`read`). The peer's
    bytes (:meth:`send`) reach the protocol in reads of at most ``bufferSize`` bytes,
    and only while the protocol has not paused the transport; the rest waits in
    ``inbound``, as in a kernel buffer. ``most_unsent`` is the largest ``unsent`` seen.
    """

    bufferSize = 2**16

    def __init__(self, hostAddress: Any = None, peerAddress: Any = None) -> None:
        cast(Any, super()).__init__(hostAddress, peerAddress)
        self.protocol: Any = None
        self.producerPaused = False
        self.inbound = b""
        self.most_unsent = 0

    def connect(self, protocol: Any) -> None:
        """Make ``protocol`` the one this transport delivers to and connect it."""
        self.protocol = protocol
        protocol.makeConnection(self)

    @property
    def unsent(self) -> int:
        """Bytes written and not yet read by the peer."""
        return len(self._written())

    def _written(self) -> bytes:
        data: bytes = self.io.getvalue()
        return data

    def write(self, data: bytes) -> None:
        cast(Any, super()).write(data)
        self.most_unsent = max(self.most_unsent, self.unsent)
        if self.producer is not None and self.streaming and self.unsent > self.bufferSize:
            self.producerPaused = True
            self.producer.pauseProducing()

    def send(self, data: bytes) -> None:
        """The peer sends ``data``; the protocol reads what it is not paused for."""
        self.inbound += data
        self.pump()

    def pump(self) -> None:
        """Deliver waiting ``inbound`` bytes while the protocol reads (a reactor's reads)."""
        while (
            self.inbound
            and self.protocol is not None
            and self.producerState == "producing"
            and not self.disconnecting
        ):
            chunk, self.inbound = self.inbound[: self.bufferSize], self.inbound[self.bufferSize :]
            self.protocol.dataReceived(chunk)

    def read(self, size: int = -1) -> bytes:
        """The peer reads up to ``size`` bytes (all when negative); once nothing is
        left unsent a paused producer is resumed."""
        data = self._written()
        taken, rest = (data, b"") if size < 0 else (data[:size], data[size:])
        self.io = BytesIO(rest)
        self.io.seek(len(rest))
        if not rest and self.producerPaused and self.producer is not None:
            self.producerPaused = False
            self.producer.resumeProducing()
        return taken
