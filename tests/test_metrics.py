"""The counters kept in plain dicts still come out in the Prometheus text format."""

from __future__ import annotations

from collections.abc import Sequence

from twisted.internet.defer import Deferred, succeed

from csrproxy.metrics import Metrics
from csrproxy.state.rows import CertificateRow


def test_dict_counters_render_as_prometheus_counters() -> None:
    m = Metrics()
    m.http_request("/v1/sign", 200)
    m.http_request("/v1/sign", 200)
    m.http_request("refused", 413)
    m.acme_request("newOrder", 201)
    text = m.render().decode()
    assert "# TYPE csrproxy_http_requests_total counter" in text
    assert 'csrproxy_http_requests_total{route="/v1/sign",status="200"} 2.0' in text
    assert 'csrproxy_http_requests_total{route="refused",status="413"} 1.0' in text
    assert 'csrproxy_acme_requests_total{endpoint="newOrder",status="201"} 1.0' in text


def test_readiness_gauges() -> None:
    metrics = Metrics()
    state = {"store": True}
    metrics.watch_readiness(lambda: [("account", True), ("store", state["store"])])
    text = metrics.render().decode()
    assert 'csrproxy_ready{check="account"} 1.0' in text
    assert 'csrproxy_ready{check="store"} 1.0' in text
    state["store"] = False
    assert 'csrproxy_ready{check="store"} 0.0' in metrics.render().decode()


def test_dns_rcodes_named_extended_ones_included() -> None:
    m = Metrics()
    for rcode in (0, 0, 16, 23):
        m.dns_answer(rcode)
    text = m.render().decode()
    assert 'csrproxy_dns_queries_total{rcode="NOERROR"} 2.0' in text
    assert 'csrproxy_dns_queries_total{rcode="BADVERS"} 1.0' in text
    assert 'csrproxy_dns_queries_total{rcode="BADCOOKIE"} 1.0' in text


def test_every_sample_carries_the_instance_when_asked() -> None:
    from prometheus_client.parser import text_string_to_metric_families

    from csrproxy.metrics import Metrics

    metrics = Metrics()
    metrics.acme_request("newOrder", 201)
    metrics.issuance_seconds.observe(0.5)
    metrics.orders_in_flight.set(2)
    plain = metrics.render()
    metrics.label_instance("ns1")
    labelled = metrics.render()
    samples = [
        s for family in text_string_to_metric_families(labelled.decode()) for s in family.samples
    ]
    assert samples and all(s.labels.get("instance") == "ns1" for s in samples)
    bare = [s for f in text_string_to_metric_families(plain.decode()) for s in f.samples]
    assert len(bare) == len(samples)
    assert {(s.name, s.value) for s in bare} == {(s.name, s.value) for s in samples}


def test_zone_gauges_per_zone() -> None:
    metrics = Metrics()
    zones = [
        {"origin": "go.example.test", "serial": 7, "records": 4, "challenges": 1, "room": 44.0},
        {"origin": "go-other.example.net", "serial": 9, "records": 3, "challenges": 0},
    ]
    metrics.watch_zones(lambda: zones)
    text = metrics.render().decode()
    assert 'csrproxy_dns_zone_serial{zone="go.example.test"} 7.0' in text
    assert 'csrproxy_dns_zone_serial{zone="go-other.example.net"} 9.0' in text
    assert 'csrproxy_dns_zone_records{zone="go-other.example.net"} 3.0' in text
    assert 'csrproxy_dns_zone_challenges{zone="go.example.test"} 1.0' in text
    assert 'csrproxy_zone_new_names_room{zone="go.example.test"} 44.0' in text
    assert 'csrproxy_zone_new_names_room{zone="go-other.example.net"}' not in text  # unknown


def _row(cert_id: str, not_after: float) -> CertificateRow:
    return CertificateRow(cert_id, "key", b"", ["a.example"], "", "", 0.0, not_after)


class _Source:
    """A renewal source that answers ``due`` with ``self.rows`` (and records the rest)."""

    def __init__(self) -> None:
        self.rows: list[CertificateRow] = []
        self.calls: list[tuple[str, object]] = []

    def due(self, now: float, limit: int) -> Deferred[list[CertificateRow]]:
        return succeed(list(self.rows[:limit]))

    def park(self, cert_ids: Sequence[str]) -> Deferred[None]:
        self.calls.append(("park", list(cert_ids)))
        return succeed(None)

    def renewed(self, cert_id: str) -> Deferred[None]:
        self.calls.append(("renewed", cert_id))
        return succeed(None)

    def renew_later(self, cert_id: str, when: float) -> Deferred[None]:
        self.calls.append(("renew_later", (cert_id, when)))
        return succeed(None)

    def schedule_unscheduled(self, limit: int) -> Deferred[int]:
        return succeed(0)

def _pending(metrics: Metrics) -> tuple[float, float | None]:
    from prometheus_client.parser import text_string_to_metric_families

    found = {
        s.name: s.value
        for f in text_string_to_metric_families(metrics.render().decode())
        for s in f.samples
    }
    return (
        found["csrproxy_renewals_pending"],
        found.get("csrproxy_renewals_pending_expiry_timestamp_seconds"),
    )


def test_pending_renewals_follow_the_pass() -> None:
    metrics = Metrics()
    source = _Source()
    watched = metrics.watch_renewals(source)
    assert _pending(metrics) == (0, None)
    source.rows = [_row("a", 500.0), _row("b", 300.0), _row("c", 900.0)]
    watched.due(100.0, 200)
    assert _pending(metrics) == (3, 300.0)
    watched.park(["c"])  # an inactive installation: not renewed on purpose
    watched.renewed("b")
    assert _pending(metrics) == (1, 500.0)
    # "a" failed: retried at 1000; a pass before then that does not see it keeps it.
    watched.renew_later("a", 1000.0)
    source.rows = []
    watched.due(200.0, 200)
    assert _pending(metrics) == (1, 500.0)
    assert ("renew_later", ("a", 1000.0)) in source.calls
    # A complete pass after its retry time without it: renewed elsewhere, forgotten.
    watched.due(1000.0, 200)
    assert _pending(metrics) == (0, None)


def test_pending_renewals_a_full_batch_forgets_nothing() -> None:
    metrics = Metrics()
    source = _Source()
    watched = metrics.watch_renewals(source)
    source.rows = [_row("a", 500.0)]
    watched.due(100.0, 1)
    source.rows = [_row("b", 600.0)]
    watched.due(200.0, 1)  # as many rows as asked for: "a" may be beyond the batch
    assert _pending(metrics) == (2, 500.0)


def test_pending_renewals_are_bounded_keeping_the_soonest() -> None:
    metrics = Metrics()
    source = _Source()
    watched = metrics.watch_renewals(source, limit=100)
    source.rows = [_row(f"c{i}", 10_000.0 - i) for i in range(5000)]
    watched.due(1.0, 5000)
    count, earliest = _pending(metrics)
    assert count == 100
    assert earliest == 10_000.0 - 4999
