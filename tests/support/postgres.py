"""pytest fixtures of a throwaway PostgreSQL: ``postgres_server`` (one per test module)
and ``dsn`` (an empty database of it per test). Import both into a test module."""

from __future__ import annotations

import itertools
import tempfile
from collections.abc import Iterator

import pytest

from csrproxy.testing.postgres import Postgres, start_postgres

_names = itertools.count()


@pytest.fixture(scope="module")
def postgres_server() -> Iterator[Postgres]:
    with start_postgres(tempfile.mkdtemp(prefix="csrproxy-pgtest-")) as pg:
        yield pg


@pytest.fixture
def dsn(postgres_server: Postgres) -> str:
    return postgres_server.fresh_database(f"test_{next(_names)}")
