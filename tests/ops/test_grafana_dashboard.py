"""contrib/grafana/csrproxy.json names only what csrproxy exports, and stands on its own."""

from __future__ import annotations

import json
import re
from collections.abc import Iterator
from typing import Any

import pytest

from tests.ops.promql import DASHBOARD, TARGET_LABELS, exported, names_in, unknown_names


def dashboard() -> dict[str, Any]:
    loaded: dict[str, Any] = json.loads(DASHBOARD.read_text())
    return loaded


def panels(d: dict[str, Any]) -> Iterator[dict[str, Any]]:
    for panel in d["panels"]:
        yield panel
        yield from panel.get("panels", [])  # a collapsed row holds its panels


def targets() -> list[tuple[str, str, str]]:
    """(panel title, expr, legendFormat) of every query of every panel."""
    return [
        (p["title"], t["expr"], t.get("legendFormat", ""))
        for p in panels(dashboard())
        for t in p.get("targets", [])
    ]


def test_names_in_reads_promql() -> None:
    metrics, matched, grouped = names_in(
        'histogram_quantile(0.95, sum by (le, backend) (rate(csrproxy_x_bucket{instance=~"$i",'
        'backend="a,b"}[$__rate_interval]))) / on (job) group_left csrproxy_y offset 5m > 1e3'
    )
    assert metrics == {"csrproxy_x_bucket", "csrproxy_y"}
    assert matched == {"csrproxy_x_bucket": {"instance", "backend"}}
    assert grouped == {"le", "backend", "job"}


def test_a_renamed_metric_is_caught() -> None:
    known = exported()
    assert unknown_names('rate(csrproxy_orders_total{outcome="valid"}[5m])', known) == []
    assert unknown_names("rate(csrproxy_order_total[5m])", known) == ["metric csrproxy_order_total"]
    assert unknown_names('csrproxy_ready{checks="ca"}', known) == ["label checks of csrproxy_ready"]
    assert unknown_names("sum by (shard) (csrproxy_ready)", known) == ["label shard grouped by"]


@pytest.mark.parametrize(("title", "expr", "legend"), targets())
def test_every_expression_names_exported_series(title: str, expr: str, legend: str) -> None:
    known = exported()
    assert unknown_names(expr, known) == [], f"panel {title!r}: {expr}"
    every_label = set().union(*known.values()) | TARGET_LABELS
    assert set(re.findall(r"\{\{\s*(\w+)\s*\}\}", legend)) <= every_label, title


def test_the_variables_datasource_and_instance() -> None:
    d = dashboard()
    variables = {v["name"]: v for v in d["templating"]["list"]}
    assert variables["datasource"]["type"] == "datasource"
    assert variables["datasource"]["query"] == "prometheus"
    instance = variables["instance"]
    metric, label = re.fullmatch(
        r"label_values\((\w+), (\w+)\)", instance["query"]["query"]
    ).groups()  # type: ignore[union-attr]
    assert metric in exported() and label == "instance"
    assert instance["datasource"]["uid"] == "${datasource}"
    for panel in panels(d):
        if panel["type"] == "row":
            continue
        assert panel["datasource"] == {"type": "prometheus", "uid": "${datasource}"}, panel
        for t in panel["targets"]:
            assert t["datasource"]["uid"] == "${datasource}"
            assert 'instance=~"$instance"' in t["expr"], (panel["title"], t["expr"])


def test_a_dashboard_grafana_imports_without_external_assets() -> None:
    d = dashboard()
    assert 36 <= d["schemaVersion"] <= 41
    assert d["uid"] == "csrproxy"
    ids = [p["id"] for p in panels(d)]
    assert len(ids) == len(set(ids))
    # Core panel types only, and nothing fetched from elsewhere (images, scripts, links).
    assert {p["type"] for p in panels(d)} <= {"row", "timeseries", "stat", "state-timeline"}
    assert not re.search(r"https?://", DASHBOARD.read_text())


def test_the_dashboard_shows_what_operators_ask_about() -> None:
    used = set()
    for _, expr, _ in targets():
        used |= names_in(expr)[0]
    family = {re.sub(r"_(total|bucket|count|sum)$", "", name) for name in used}
    assert family >= {
        "csrproxy_orders", "csrproxy_orders_in_flight", "csrproxy_issuance_seconds",
        "csrproxy_acme_requests", "csrproxy_admission_refusals", "csrproxy_zone_new_names_room",
        "csrproxy_challenge_check_seconds", "csrproxy_challenge_cache_wait_seconds",
        "csrproxy_renewals", "csrproxy_renewals_pending",
        "csrproxy_renewals_pending_expiry_timestamp_seconds", "csrproxy_ari_lookups",
        "csrproxy_dns_queries", "csrproxy_dns_rrl", "csrproxy_ready", "csrproxy_cache_hits",
    }  # fmt: skip
