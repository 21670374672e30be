"""A Clock that binds fake UDP ports, for code that sends datagrams of its own."""

from __future__ import annotations

from twisted.internet.protocol import DatagramProtocol
from twisted.internet.task import Clock


class FakeUDPPort:
    """A bound UDP port that records what it was asked to write."""

    def __init__(self, protocol: DatagramProtocol, interface: str) -> None:
        self.protocol = protocol
        self.interface = interface
        self.written: list[tuple[bytes, tuple[str, int]]] = []
        self.stopped = False

    def write(self, data: bytes, addr: tuple[str, int]) -> None:
        self.written.append((data, addr))

    def stopListening(self) -> None:
        self.stopped = True


class UDPClock(Clock):
    """A Clock (started at ``start``) whose ``listenUDP`` gives :class:`FakeUDPPort`s."""

    def __init__(self, start: float = 0.0) -> None:
        super().__init__()
        self.advance(start)
        self.udp: list[FakeUDPPort] = []

    def listenUDP(
        self, port: int, protocol: DatagramProtocol, interface: str = "", maxPacketSize: int = 0
    ) -> FakeUDPPort:
        bound = FakeUDPPort(protocol, interface)
        self.udp.append(bound)
        return bound
