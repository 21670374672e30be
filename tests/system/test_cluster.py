"""Three instances, one service (issue 16): a shared PostgreSQL, every name server in
agreement.

pebble validates against the first instance's DNS only, while orders are placed through
all three APIs: a challenge published by the second or third instance is answered only
once every instance (``dns_peers``) serves it, so the first must serve what the others
publish. One ACME account for all; a wrong account key is refused.
"""

from __future__ import annotations

import json
import tempfile
import time
import urllib.error
import urllib.request
from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import psycopg
import pytest

from csrproxy.testing.cluster import cluster_dns_ports, start_cluster
from csrproxy.testing.daemon import Csrproxy, start_csrproxy
from csrproxy.testing.pebble import Pebble, start_pebble
from csrproxy.testing.postgres import Postgres, available, start_postgres
from tests.conftest import ZONE
from tests.support.keys import make_csr

pytestmark = [
    pytest.mark.integration,
    pytest.mark.skipif(not available(), reason="PostgreSQL server binaries not installed"),
]


class Cluster:
    def __init__(self, pg: Postgres, pebble: Pebble, instances: list[Csrproxy]) -> None:
        self.pg = pg
        self.pebble = pebble
        self.instances = instances


@pytest.fixture(scope="module")
def cluster(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Cluster]:
    work = tmp_path_factory.mktemp("cluster")
    ports = cluster_dns_ports(3)
    with (
        start_postgres(tempfile.mkdtemp(prefix="csrproxy-pgcluster-")) as pg,
        start_pebble(str(work / "pebble"), f"127.0.0.1:{ports[0]}") as pebble,
    ):
        instances = start_cluster(str(work), pebble, pg.dsn, ZONE, ports)
        try:
            yield Cluster(pg, pebble, instances)
        finally:
            for daemon in instances:
                daemon.stop()


def sign(daemon: Csrproxy, name: str) -> tuple[int, bytes]:
    req = urllib.request.Request(daemon.url + "/v1/sign", data=make_csr([name]), method="POST")
    try:
        with urllib.request.urlopen(req, timeout=90) as resp:
            return resp.status, resp.read()
    except urllib.error.HTTPError as e:
        return e.code, e.read()


def health(daemon: Csrproxy) -> dict[str, object]:
    with urllib.request.urlopen(daemon.url + "/v1/health", timeout=10) as resp:
        doc: dict[str, object] = json.loads(resp.read())
    return doc


def test_thirty_certificates_through_three_apis_validated_by_one_dns(cluster: Cluster) -> None:
    started = time.monotonic()
    with ThreadPoolExecutor(6) as pool:
        results = list(
            pool.map(
                lambda i: sign(cluster.instances[i % 3], f"cluster{i}.{ZONE}"),
                range(30),
            )
        )
    elapsed = time.monotonic() - started
    for code, body in results:
        assert code == 200, body[:600]
        assert body.startswith(b"-----BEGIN CERTIFICATE-----")
    print(f"30 certificates, 6 at a time over 3 instances: {elapsed:.1f}s")
    with psycopg.connect(cluster.pg.dsn) as conn:
        rows = conn.execute("SELECT count(*) FROM certificates").fetchone()
        left = conn.execute("SELECT count(*) FROM challenges").fetchone()
    assert rows is not None and rows[0] == 30
    assert left is not None and left[0] == 0, "every challenge record removed"


def test_one_account_and_every_instance_named(cluster: Cluster) -> None:
    docs = [health(d) for d in cluster.instances]
    assert [d["instance"] for d in docs] == ["ns1", "ns2", "ns3"]
    assert len({d["account"] for d in docs}) == 1, docs
    for doc in docs:
        database = doc["database"]
        assert isinstance(database, dict) and database["backend"] == "postgresql"
        assert "***" in database["where"]
    with psycopg.connect(cluster.pg.dsn) as conn:
        accounts = conn.execute("SELECT url, key_thumbprint FROM account").fetchall()
    assert len(accounts) == 1 and accounts[0][1], accounts


def test_an_instance_with_another_account_key_is_refused(
    cluster: Cluster, tmp_path: Path
) -> None:
    with pytest.raises(RuntimeError, match="not the cluster's account key"):
        from csrproxy.acme.jws import AccountKey
        from csrproxy.state.store import atomic_write
        from csrproxy.testing.ports import free_udp_tcp_port

        state = tmp_path / "ns4" / "state"
        state.mkdir(parents=True, mode=0o700)
        atomic_write(state / "account.key", AccountKey.generate("ec256").to_pem())
        start_csrproxy(
            str(tmp_path / "ns4"),
            cluster.pebble,
            free_udp_tcp_port(),
            ZONE,
            overrides={
                "state": {"backend": "postgresql", "dsn": cluster.pg.dsn},
                "cluster": {"instance": "ns4"},
            },
            timeout=15,
        )
