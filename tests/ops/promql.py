"""What the ops kit may name: the series csrproxy exports, and the metric and label names a
PromQL expression uses (enough of PromQL for a dashboard's and the rules' expressions)."""

from __future__ import annotations

import collections
import re
from collections import defaultdict
from pathlib import Path

from prometheus_client.parser import text_string_to_metric_families
from twisted.internet.defer import Deferred, succeed

from csrproxy.metrics import Metrics
from csrproxy.state.rows import CertificateRow

ROOT = Path(__file__).resolve().parents[2]
DASHBOARD = ROOT / "contrib" / "grafana" / "csrproxy.json"
RULES = ROOT / "contrib" / "prometheus" / "csrproxy.rules.yml"
RULES_TEST = Path(__file__).resolve().parent / "csrproxy.rules.test.yml"

#: Labels Prometheus adds to every scraped series (and ``le`` of histogram buckets).
TARGET_LABELS = {"instance", "job"}
KEYWORDS = {
    "by", "without", "on", "ignoring", "group_left", "group_right",
    "and", "or", "unless", "bool", "offset", "inf", "nan",
}  # fmt: skip


class _DueSource:
    def due(self, now: float, limit: int) -> Deferred[list[CertificateRow]]:
        return succeed([CertificateRow("c", "k", b"", ["a.example"], "", "", 0.0, 1e9)])

    def park(self, cert_ids: object) -> Deferred[None]:
        return succeed(None)

    def renewed(self, cert_id: str) -> Deferred[None]:
        return succeed(None)

    def renew_later(self, cert_id: str, when: float) -> Deferred[None]:
        return succeed(None)

    def schedule_unscheduled(self, limit: int) -> Deferred[int]:
        return succeed(0)


def exported() -> dict[str, set[str]]:
    """Every series name ``Metrics().render()`` gives, with its label names, once each
    family has a sample (each labelled one fed once, as the daemon would)."""
    m = Metrics()
    m.orders.labels("valid").inc()
    m.orders_in_flight.set(1)
    m.issuance_seconds.observe(1)
    m.challenge_checked("builtin", 0.1)
    m.challenge_cache_wait(1)
    m.refusal("new-names")
    m.cache_hits.inc()
    m.renewal_pass(0.01, 1, 1)
    m.renewal("renewed")
    m.ari_lookup("window")
    m.dns_answer(0)
    m.dns_rrl("dropped", "responses")
    m.http_request("/v1/sign", 200)
    m.acme_request("newOrder", 201)
    m.watch_readiness(lambda: [("store", True)])
    m.watch_pruning(lambda: collections.Counter({"orders": 1}))
    zone = {"origin": "go.example.com", "serial": 1, "records": 1, "challenges": 0, "room": 10.0}
    m.watch_zones(lambda: [zone])
    m.watch_renewals(_DueSource()).due(0.0, 10)
    names: dict[str, set[str]] = defaultdict(set)
    empty = []
    for family in text_string_to_metric_families(m.render().decode()):
        if not family.samples:
            empty.append(family.name)
        for sample in family.samples:
            names[sample.name] |= set(sample.labels)
    assert not empty, f"feed these families in tests/ops/promql.py: {empty}"
    return dict(names)


_STRING = re.compile(r'"(?:[^"\\]|\\.)*"')
_GRAFANA_VARIABLE = re.compile(r"\$(?:\{\w+\}|\w+)")
_RANGE = re.compile(r"\[[^\]]*\]")
_GROUPING = re.compile(r"\b(?:by|without|on|ignoring|group_left|group_right)\s*\(([^)]*)\)")
_SELECTOR = re.compile(r"([A-Za-z_:][\w:]*)?\s*\{([^}]*)\}")
_MATCHER = re.compile(r"(\w+)\s*(?:=~|!~|!=|=)")
_TOKEN = re.compile(r"[A-Za-z_:][\w:]*|\d[\w.]*")


def names_in(expr: str) -> tuple[set[str], dict[str, set[str]], set[str]]:
    """(metric names, label names matched per metric name, label names grouped by)."""
    e = _GRAFANA_VARIABLE.sub("", _STRING.sub('""', expr))
    e = _RANGE.sub("", e)
    grouped = {label.strip() for labels in _GROUPING.findall(e) for label in labels.split(",")}
    grouped.discard("")
    e = _GROUPING.sub("", e)
    matched: dict[str, set[str]] = defaultdict(set)
    for name, matchers in _SELECTOR.findall(e):
        matched[name or "__name__"] |= set(_MATCHER.findall(matchers))
    e = _SELECTOR.sub(lambda mo: f" {mo.group(1) or ''} ", e)
    metrics = set()
    for token in _TOKEN.finditer(e):
        word = token.group()
        if word[0].isdigit() or word in KEYWORDS or e[token.end() :].lstrip().startswith("("):
            continue
        metrics.add(word)
    return metrics, dict(matched), grouped


def unknown_names(expr: str, known: dict[str, set[str]]) -> list[str]:
    """What ``expr`` names that ``known`` (series name -> its labels) does not have."""
    metrics, matched, grouped = names_in(expr)
    problems = [f"metric {m}" for m in sorted(metrics - set(known))]
    for metric, labels in matched.items():
        allowed = known.get(metric, set()) | TARGET_LABELS
        problems += [f"label {label} of {metric}" for label in sorted(labels - allowed)]
    every_label = set().union(*known.values()) | TARGET_LABELS
    problems += [f"label {label} grouped by" for label in sorted(grouped - every_label)]
    if not metrics:
        problems.append("no metric at all")
    return problems
