"""The state database on PostgreSQL (issue 16): the same StateDB, the same migrations.

Each test gets an empty database on one throwaway server (csrproxy/testing/postgres.py)
and checks a part of what the daemon asks of the database, as the SQLite tests do, plus
what only a server has: instances migrating together, a dropped connection.
"""

from __future__ import annotations

import json
import threading
from collections.abc import Iterator

import psycopg
import pytest
from twisted.internet.defer import Deferred

from csrproxy.state.budgets import load_budgets, save_budgets
from csrproxy.state.database import CertificateRow, OrderRow, StateDB
from csrproxy.state.engine import POSTGRESQL, postgres_ddl
from csrproxy.state.prune import BUDGETS, EXPIRED, ORDERS, SUPERSEDED, auto_vacuum, prune_step
from csrproxy.state.schema import MIGRATIONS
from csrproxy.state.serials import load_serial, save_serial
from csrproxy.testing.postgres import Postgres, available

pytestmark = [
    pytest.mark.integration,
    pytest.mark.skipif(not available(), reason="PostgreSQL server binaries not installed"),
]



@pytest.fixture
def db(dsn: str) -> Iterator[StateDB]:
    opened = StateDB(dsn)
    yield opened
    opened.close()


def cert(cid: str = "c1", request_key: str = "rk", not_after: float = 2e9) -> CertificateRow:
    return CertificateRow(
        id=cid,
        request_key=request_key,
        csr=b"\x00csr",
        names=["a.go.example.test"],
        spki_sha256="ab",
        chain="PEM",
        not_before=1e9,
        not_after=not_after,
    )


def test_migrated_once_and_reopened(dsn: str) -> None:
    first = StateDB(dsn)
    assert first.dialect is POSTGRESQL
    assert first.version == len(MIGRATIONS)
    assert "***" in first.where or "@" not in first.where
    first.close()
    again = StateDB(dsn)
    assert again.version == len(MIGRATIONS)
    again.close()


def test_instances_starting_together_migrate_once(dsn: str) -> None:
    opened: list[StateDB] = []
    errors: list[BaseException] = []

    def start() -> None:
        try:
            opened.append(StateDB(dsn))
        except BaseException as e:
            errors.append(e)

    threads = [threading.Thread(target=start) for _ in range(4)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(30)
    assert errors == []
    assert [d.version for d in opened] == [len(MIGRATIONS)] * 4
    for d in opened:
        d.close()


def test_a_version_1_database_with_rows_is_migrated(dsn: str) -> None:
    with psycopg.connect(dsn, autocommit=True) as conn:
        for statement in postgres_ddl(MIGRATIONS[0]):
            conn.execute(statement)
        conn.execute("CREATE TABLE csrproxy_schema (version BIGINT NOT NULL)")
        conn.execute("INSERT INTO csrproxy_schema VALUES (1)")
        for cid, not_after in (("old", 1.5e9), ("new", 2.5e9)):
            conn.execute(
                "INSERT INTO certificates (id, request_key, csr, names, spki_sha256, chain, "
                "not_before, not_after, created, last_requested) VALUES "
                "(%s, 'rk', '\\x00', %s, 'ab', 'PEM', 1, %s, 3, 4)",
                (cid, json.dumps(["b.go.example.test", "a.go.example.test"]), not_after),
            )
        conn.execute(
            "INSERT INTO orders (id, request_key, csr, names, status, certificate_id, "
            "created, updated) VALUES ('o1', 'rk', '\\x00', '[]', 'valid', 'new', 1, 1)"
        )
    db = StateDB(dsn)
    try:
        assert db.version == len(MIGRATIONS)
        new, old = db.certificate("new"), db.certificate("old")
        assert new is not None and old is not None
        assert new.names_key == "a.go.example.test,b.go.example.test"
        assert new.superseded is None and old.superseded is not None
        assert db.current_certificate("rk") == new
        [order] = db.orders(["issued"])
        assert order.id == "o1"
    finally:
        db.close()


def test_orders_and_certificates(db: StateDB) -> None:
    db.save_account("https://ca/dir", "https://ca/acct/1", "account.key")
    db.save_account("https://ca/dir", "https://ca/acct/2", "account.key")
    assert db.account("https://ca/dir")["url"] == "https://ca/acct/2"  # type: ignore[index]
    db.save_order(OrderRow("o1", "rk", b"\x00csr", ["a.go.example.test"]))
    db.update_order("o1", status="pending", acme_url="https://ca/order/1")
    [unfinished] = db.unfinished_orders()
    assert (unfinished.id, unfinished.acme_url, unfinished.csr) == (
        "o1",
        "https://ca/order/1",
        b"\x00csr",
    )
    db.save_certificate(cert("c0", not_after=1.9e9))
    issued = db.certificate_issued(cert("c1"), "o1")
    assert issued.names_key == "a.go.example.test"
    assert db.unfinished_orders() == []
    assert db.order_with_chain("o1")[1].id == "c1"  # type: ignore[index,union-attr]
    assert db.certificate("c0").superseded is not None  # type: ignore[union-attr]
    current, seen = db.sign_lookup("rk", ["a.go.example.test"])
    assert current is not None and current.id == "c1" and seen
    assert db.sign_lookup("other", ["new.go.example.test"]) == (None, False)
    assert db.current_by_key_prefix("r").id == "c1"  # type: ignore[union-attr]
    db.certificate_signed("rk", 5.0, "token:abc")
    db.touch_certificate("c1", 6.0)
    row = db.certificate("c1")
    assert row is not None and (row.last_requested, row.signed_by) == (6.0, "token:abc")
    db.mark_revoked("c1", 1)
    assert db.newest_certificate("rk").id == "c0"  # type: ignore[union-attr]


def test_a_failed_write_is_all_or_nothing(db: StateDB) -> None:
    db.save_order(OrderRow("o1", "rk", b"csr", ["a.go.example.test"]))
    bad = cert()
    bad.chain = None  # type: ignore[assignment]  # NOT NULL
    with pytest.raises(psycopg.IntegrityError):
        db.certificate_issued(bad, "o1")
    assert [o.id for o in db.unfinished_orders()] == ["o1"]
    db.save_certificate(cert())  # the connection is usable after the rollback
    assert db.certificate("c1") is not None


def test_batch_keeps_each_call_all_or_nothing(db: StateDB) -> None:
    bad = cert("bad")
    bad.chain = None  # type: ignore[assignment]
    outcomes = db.batch(
        [
            (db.save_certificate, (cert("c1"),), {}),
            (db.save_certificate, (bad,), {}),
            (db.save_certificate, (cert("c2", request_key="rk2"),), {}),
        ]
    )
    assert [ok for ok, _ in outcomes] == [True, False, True]
    assert db.certificate("c1") is not None and db.certificate("c2") is not None
    assert db.certificate("bad") is None


def test_secrets_first_write_wins_for_every_instance(db: StateDB, dsn: str) -> None:
    other = StateDB(dsn)
    try:
        assert db.existing_secret("certificate-id") is None
        secret = other.secret("certificate-id")
        assert db.secret("certificate-id") == secret
        assert db.existing_secret("certificate-id") == secret
        assert len(db.secret("dns-cookie", 16)) == 16
    finally:
        other.close()


def test_challenges_are_a_multiset_and_forgotten_with_the_next_write(db: StateDB) -> None:
    first = db.add_challenge("o1", "n", "v", "builtin")
    second = db.add_challenge("o1", "n", "v", "builtin")
    assert second > first
    db.remove_challenge("n", "v")
    assert [c.value for c in db.challenges()] == ["v"]
    db.add_challenge("o1", "n", "w", "builtin")
    db.forget_challenge_later("n", "v")
    db.flush_removals()
    assert [c.value for c in db.challenges()] == ["w"]
    db.clear_challenges([c.id for c in db.challenges()])
    assert db.challenges() == []


def test_budgets_and_serials(db: StateDB) -> None:
    save_budgets(db, [("names:a", 4.0, 10.0), ("orders", 200.0, 11.0)])
    save_budgets(db, [("names:a", 3.0, 12.0)])
    assert load_budgets(db, 0.0, 10) == [("names:a", 3.0, 12.0), ("orders", 200.0, 11.0)]
    assert load_budgets(db, 0.0, 10, prefix="names:") == [("names:a", 3.0, 12.0)]
    assert load_serial(db, "go.example.test") is None
    save_serial(db, "go.example.test", 4_000_000_000)
    save_serial(db, "go.example.test", 4_000_000_001)
    assert load_serial(db, "go.example.test") == 4_000_000_001


def test_renewal_queries(db: StateDB) -> None:
    for i in range(3):
        db.save_certificate(cert(f"c{i}", request_key=f"rk{i}"))
    assert db.schedule_unscheduled(3600.0, 2) == 2
    assert db.schedule_unscheduled(3600.0, 10) == 1
    rows = [db.certificate(f"c{i}") for i in range(3)]
    for row in rows:
        assert row is not None and row.renew_at is not None and row.ari_next is not None
        lifetime = row.not_after - row.not_before
        assert row.not_before + lifetime * 2 / 3 <= row.renew_at <= row.not_before + lifetime * 0.75
    due = db.due_certificates(2e9, 10)
    assert sorted(r.id for r in due) == ["c0", "c1", "c2"]
    db.park(["c0"])
    db.renew_later("c1", 3e9)
    assert [r.id for r in db.due_certificates(2e9, 10)] == ["c2"]
    db.mark_renewed("c2")
    assert db.due_certificates(2e9, 10) == []
    assert [r[0] for r in db.ari_due(1e12, 10)] == ["c1"]
    db.ari_looked("c1", (1.8e9, 1.9e9), 1e13, 1.85e9)
    row = db.certificate("c1")
    assert row is not None and (row.ari_start, row.ari_end, row.renew_at) == (
        1.8e9,
        1.9e9,
        1.85e9,
    )


def test_pruning(db: StateDB) -> None:
    db.save_certificate(cert("gone", request_key="a", not_after=10.0))
    db.save_certificate(cert("kept", request_key="b", not_after=2e9))
    db.save_order(OrderRow("o1", "a", b"csr", [], status="issued", updated=5.0))
    save_budgets(db, [("old", 1.0, 1.0), ("new", 1.0, 1e12)])
    for rule in (SUPERSEDED, EXPIRED, ORDERS):
        prune_step(db, rule, 100.0)
    assert db.certificate("gone") is None and db.certificate("kept") is not None
    assert db.order("o1") is None
    step = prune_step(db, BUDGETS, 100.0)
    assert step.deleted == 1
    assert [name for name, _, _ in load_budgets(db, 0.0, 10)] == ["new"]
    assert auto_vacuum(db) == "server"


def test_a_dropped_connection_fails_one_call_then_reconnects(
    db: StateDB, postgres_server: Postgres, dsn: str
) -> None:
    db.save_certificate(cert())
    dbname = dsn.rsplit("/", 1)[1].split("?")[0]
    assert postgres_server.terminate_connections(dbname) >= 1
    with pytest.raises(psycopg.OperationalError):
        db.certificate("c1")
    assert db.certificate("c1") is not None
    db.save_certificate(cert("c2", request_key="rk2"))
    assert db.certificate("c2") is not None


def test_the_store_turns_unhealthy_and_back(
    db: StateDB, postgres_server: Postgres, dsn: str
) -> None:
    from twisted.internet import reactor

    from csrproxy.state.store import Store, StoreUnavailable

    store = Store(reactor, db)
    store.start()
    try:
        dbname = dsn.rsplit("/", 1)[1].split("?")[0]
        postgres_server.terminate_connections(dbname)
        failed = _wait(store.run(db.save_certificate, cert()))
        assert isinstance(failed, StoreUnavailable), failed
        assert not store.healthy
        assert _wait(store.run(db.save_certificate, cert())) is None
        assert store.healthy
    finally:
        store.pool.stop()


def _wait(d: Deferred[object]) -> object:
    # The store's thread answers through reactor.callFromThread: run the reactor a little.
    from twisted.internet import reactor

    done = threading.Event()
    result: list[object] = []

    def got(value: object) -> None:
        result.append(value.value if hasattr(value, "value") else value)
        done.set()

    d.addBoth(got)
    for _ in range(200):
        if done.is_set():
            break
        reactor.iterate(0.05)
    assert done.is_set()
    return result[0]


def test_challenge_records_name_their_instance_and_are_announced(dsn: str) -> None:
    a, b = StateDB(dsn, "ns1"), StateDB(dsn, "ns2")
    listener = psycopg.connect(dsn, autocommit=True)
    try:
        listener.execute("LISTEN csrproxy_challenges")
        a.add_challenge("o1", "_acme-challenge.x", "va", "builtin")
        b.add_challenge("o2", "_acme-challenge.y", "vb", "builtin")
        b.add_challenge("o3", "_acme-challenge.z", "vp", "powerdns")
        assert [c.value for c in a.own_challenges()] == ["va"]
        assert a.others_challenges() == [("_acme-challenge.y", "vb")]
        assert b.others_challenges() == [("_acme-challenge.x", "va")]
        a.remove_challenge("_acme-challenge.x", "va")
        assert b.others_challenges() == []
        heard = [n.payload for n in listener.notifies(timeout=2.0, stop_after=4)]
        assert heard == ["ns1", "ns2", "ns2", "ns1"]
    finally:
        listener.close()
        a.close()
        b.close()


def test_a_due_renewal_is_leased_to_one_instance(dsn: str) -> None:
    from csrproxy.state.renewal_queries import RENEWAL_LEASE

    a, b = StateDB(dsn, "ns1"), StateDB(dsn, "ns2")
    try:
        for i in range(4):
            a.save_certificate(cert(f"c{i}", request_key=f"rk{i}"))
            a.renew_later(f"c{i}", 100.0 + i)
        mine = [r.id for r in a.due_certificates(1000.0, 2)]
        theirs = [r.id for r in b.due_certificates(1000.0, 10)]
        assert mine == ["c0", "c1"] and theirs == ["c2", "c3"]
        assert [r.id for r in a.due_certificates(1000.0, 10)] == ["c0", "c1"]  # ours again
        a.mark_renewed("c0")  # done: superseded and no longer leased
        # ns1 died holding c1: once the lease ran out, ns2 takes it.
        later = 1000.0 + RENEWAL_LEASE + 1
        assert [r.id for r in b.due_certificates(later, 10)] == ["c1", "c2", "c3"]
    finally:
        a.close()
        b.close()


def test_a_starting_instance_resumes_only_its_own_orders(dsn: str) -> None:
    a, b = StateDB(dsn, "ns1"), StateDB(dsn, "ns2")
    try:
        a.save_order(OrderRow("oa", "rk1", b"csr", ["a.go.example.test"], status="pending"))
        b.save_order(OrderRow("ob", "rk2", b"csr", ["b.go.example.test"], status="pending"))
        assert [o.id for o in a.unfinished_orders()] == ["oa"]
        assert [o.id for o in b.unfinished_orders()] == ["ob"]
        assert a.order("ob") is not None  # any instance reads any order (async polls)
    finally:
        a.close()
        b.close()


def test_an_order_whose_lease_ran_out_is_taken_over_once(dsn: str) -> None:
    dead, a, b = StateDB(dsn, "ns3"), StateDB(dsn, "ns1"), StateDB(dsn, "ns2")
    try:
        dead.order_lease = 10.0
        dead.save_order(OrderRow("o1", "rk", b"csr", ["a.go.example.test"], status="pending"))
        dead.add_challenge("o1", "_acme-challenge.a.go.example.test", "v", "builtin")
        row = a.order("o1")
        assert row is not None and row.owner == "ns3" and row.lease_until is not None
        assert a.take_over_orders(row.lease_until - 1, 10) == []  # still alive
        assert dead.extend_leases(row.lease_until + 100) == 1
        assert a.take_over_orders(row.lease_until + 50, 10) == []  # its heartbeat kept it
        later = row.lease_until + 101
        [(order, records)] = a.take_over_orders(later, 10)
        assert b.take_over_orders(later, 10) == []  # one taker
        assert (order.id, order.owner) == ("o1", "ns1")
        assert [(r.value, r.instance) for r in records] == [("v", "ns1")]
        assert [o.id for o in a.unfinished_orders()] == ["o1"]
        assert dead.unfinished_orders() == []  # back up, it does not resume it too
    finally:
        for db in (dead, a, b):
            db.close()
