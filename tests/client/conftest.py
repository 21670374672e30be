"""Fixtures of the client tests: a fresh CA, clock and fake server per test."""

from __future__ import annotations

import pytest

from tests.client.fakes import CA, FakeClock, FakeServer


@pytest.fixture
def ca() -> CA:
    return CA()


@pytest.fixture
def clock() -> FakeClock:
    return FakeClock()


@pytest.fixture
def server(ca: CA, clock: FakeClock) -> FakeServer:
    return FakeServer(ca, clock)
