"""Fixtures that start real pebble and csrproxy on free loopback ports."""

from __future__ import annotations

import shutil
from collections.abc import Iterator
from pathlib import Path

import pytest

from csrproxy.testing.daemon import Csrproxy, start_csrproxy
from csrproxy.testing.pebble import Pebble, start_pebble
from csrproxy.testing.ports import free_udp_tcp_port

# The throwaway PostgreSQL fixtures (postgres_server, dsn) for the tests that use them.
pytest_plugins = ["tests.support.postgres"]

ZONE = "go.example.test"


def need(binary: str) -> None:
    if shutil.which(binary) is None and not Path(binary).exists():
        pytest.fail(f"{binary} is not installed: run `make system-deps` (make test does)")


@pytest.fixture(scope="module")
def dns_port() -> int:
    return free_udp_tcp_port()


@pytest.fixture(scope="module")
def pebble(tmp_path_factory: pytest.TempPathFactory, dns_port: int) -> Iterator[Pebble]:
    need("/usr/bin/pebble")
    work = tmp_path_factory.mktemp("pebble")
    with start_pebble(str(work), f"127.0.0.1:{dns_port}") as p:
        yield p


@pytest.fixture(scope="module")
def daemon(
    tmp_path_factory: pytest.TempPathFactory, pebble: Pebble, dns_port: int
) -> Iterator[Csrproxy]:
    work = tmp_path_factory.mktemp("csrproxy")
    with start_csrproxy(str(work), pebble, dns_port, ZONE) as d:
        yield d
