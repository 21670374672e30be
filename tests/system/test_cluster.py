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
from tests.support.api import post_sign
from tests.support.keys import make_csr

pytestmark = [
    pytest.mark.integration,
    pytest.mark.skipif(not available(), reason="PostgreSQL server binaries not installed"),
]


#: The cluster's budget of new orders in 3 h: the tests above use 32; the last spends it.
ORDERS = 40


class Cluster:
    def __init__(
        self,
        pg: Postgres,
        pebble: Pebble,
        instances: list[Csrproxy],
        work: Path,
        ports: list[int],
    ) -> None:
        self.pg = pg
        self.pebble = pebble
        self.instances = instances
        self.work = work
        self.ports = ports


@pytest.fixture(scope="module")
def cluster(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Cluster]:
    work = tmp_path_factory.mktemp("cluster")
    ports = cluster_dns_ports(3)
    with (
        start_postgres(tempfile.mkdtemp(prefix="csrproxy-pgcluster-")) as pg,
        start_pebble(str(work / "pebble"), f"127.0.0.1:{ports[0]}") as pebble,
    ):
        instances = start_cluster(
            str(work),
            pebble,
            pg.dsn,
            ZONE,
            ports,
            overrides={"cluster": {"order_lease": 8}, "policy": {"orders_per_3h": ORDERS}},
        )
        try:
            yield Cluster(pg, pebble, instances, work, ports)
        finally:
            for daemon in instances:
                daemon.stop()


def sign(daemon: Csrproxy, name: str) -> tuple[int, bytes]:
    return post_sign(daemon, make_csr([name]))


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


def test_one_csr_at_three_instances_is_one_order(cluster: Cluster) -> None:
    csr = make_csr([f"together.{ZONE}"])
    with ThreadPoolExecutor(6) as pool:
        twice = [d for d in cluster.instances for _ in range(2)]
        results = list(pool.map(lambda daemon: post_sign(daemon, csr), twice))
    assert {code for code, _ in results} == {200}, results
    assert len({body for _, body in results}) == 1, "one certificate"
    created = sum(d.log.read_text().count("created for together.") for d in cluster.instances)
    assert created == 1, f"{created} ACME orders for one CSR"


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


def test_csrproxy_admin_reads_the_shared_database(
    cluster: Cluster, capsys: pytest.CaptureFixture[str]
) -> None:
    from csrproxy.admin import main

    for daemon in cluster.instances:  # any instance's configuration: the same database
        config = ["--config", str(daemon.config)]
        assert main([*config, "certificates"]) == 0
        listing = capsys.readouterr().out
        assert sum(f"cluster{i}.{ZONE}" in listing for i in range(30)) == 30
        assert main([*config, "orders", "--unfinished"]) == 0
        capsys.readouterr()
    config = ["--config", str(cluster.instances[0].config)]
    assert main([*config, "backup", "/tmp/never"]) == 2
    assert "pg_dump" in capsys.readouterr().err


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


def test_kill_9_mid_order_another_instance_finishes_it(cluster: Cluster) -> None:
    """ns4 dies (SIGKILL) right after answering the first challenge of three async orders;
    once its lease (8 s) ran out the other instances take them over from their ACME URLs and
    finish them: each async id answers the chain through ns1 and ns2, no second ACME order,
    no challenge record left."""
    import shutil

    from csrproxy.testing.ports import free_udp_tcp_port

    work = cluster.work / "ns4"
    work.mkdir()
    (work / "state").mkdir(mode=0o700)
    shutil.copy(cluster.work / "ns1" / "state" / "account.key", work / "state" / "account.key")
    peers = [f"127.0.0.1:{port}" for port in cluster.ports]
    doomed = start_csrproxy(
        str(work),
        cluster.pebble,
        free_udp_tcp_port(),
        ZONE,
        overrides={
            "state": {"backend": "postgresql", "dsn": cluster.pg.dsn},
            "cluster": {"instance": "ns4", "dns_peers": peers, "order_lease": 8},
            "policy": {"orders_per_3h": ORDERS},
        },
        env={"CSRPROXY_CRASH_AT": "after-challenge"},
    )
    try:

        def place(i: int) -> str | None:
            csr = make_csr([f"takeover{i}.{ZONE}"])
            try:
                code, body = post_sign(doomed, csr, {"Prefer": "respond-async"}, timeout=30)
            except OSError:  # it died before answering this one
                return None
            assert code == 202, body
            return str(json.loads(body)["id"])

        with ThreadPoolExecutor(3) as pool:
            placed = [order_id for order_id in pool.map(place, range(3)) if order_id]
        assert doomed.proc.wait(30) == -9, doomed.log_tail()
        died = time.monotonic()
        assert len(placed) >= 2, placed  # orders in flight when it died
        with psycopg.connect(cluster.pg.dsn) as conn:
            # The orders whose ACME URL was on record when it died: resumed, never re-ordered
            # (one whose URL had not been written yet is ordered again, as after any crash).
            recorded = [
                json.loads(names)[0]
                for (names,) in conn.execute(
                    "SELECT names FROM orders WHERE id = ANY(%s) AND acme_url != ''", (placed,)
                ).fetchall()
            ]
        assert recorded, "the order that crashed after its challenge had its URL recorded"
        for order_id in placed:
            status = ""
            for _ in range(600):
                with urllib.request.urlopen(
                    f"{cluster.instances[0].url}/v1/orders/{order_id}", timeout=10
                ) as resp:
                    status = json.loads(resp.read())["status"]
                if status != "processing":
                    break
                threading_wait(0.1)
            assert status == "valid", (order_id, status)
            with urllib.request.urlopen(
                f"{cluster.instances[1].url}/v1/orders/{order_id}/certificate", timeout=10
            ) as resp:
                assert resp.read().startswith(b"-----BEGIN CERTIFICATE-----")
        took = time.monotonic() - died
        print(f"{len(placed)} orders taken over and finished {took:.1f}s after the kill")
        with psycopg.connect(cluster.pg.dsn) as conn:
            rows = conn.execute(
                "SELECT owner, status FROM orders WHERE id = ANY(%s)", (placed,)
            ).fetchall()
            left = conn.execute("SELECT count(*) FROM challenges").fetchone()
        assert len(rows) == len(placed)
        assert all(owner in ("ns1", "ns2", "ns3") and st == "issued" for owner, st in rows), rows
        assert left is not None and left[0] == 0
        takers = "".join(d.log.read_text() for d in cluster.instances)
        for name in recorded:
            assert f"created for {name}" not in takers, f"{name} ordered a second time"
    finally:
        doomed.stop()


def test_the_order_budget_is_the_clusters(cluster: Cluster) -> None:
    """Orders placed through all three instances spend one budget of ORDERS: once it is
    spent, every instance refuses, with the same reason."""
    codes: list[int] = []
    refusals: list[dict[str, object]] = []
    for i in range(3 * ORDERS):
        code, body = sign(cluster.instances[i % 3], f"budget{i}.{ZONE}")
        codes.append(code)
        if code == 429:
            refusals.append(json.loads(body))
            if len(refusals) == 6:
                break
    first = codes.index(429)
    assert all(code == 429 for code in codes[first:]), codes
    assert len(refusals) == 6, "two refusals from each instance in a row"
    assert {str(r["type"]).rsplit("/", 1)[-1] for r in refusals} == {"rate-limited"}, refusals
    with psycopg.connect(cluster.pg.dsn) as conn:
        placed = conn.execute("SELECT count(*) FROM orders").fetchone()
    assert placed is not None and placed[0] <= ORDERS, placed
    print(f"budget of {ORDERS}: {placed[0]} orders on record, refused from the {first + 1}th")


def threading_wait(seconds: float) -> None:
    import threading

    threading.Event().wait(seconds)
