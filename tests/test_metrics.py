"""The counters kept in plain dicts still come out in the Prometheus text format."""

from __future__ import annotations

from csrproxy.metrics import Metrics


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
