"""Prometheus metrics of one csrproxy process (its own registry, not the global one)."""

from __future__ import annotations

import collections
from collections.abc import Callable, Iterable, Iterator, Mapping, Sequence
from typing import TYPE_CHECKING, Any

from prometheus_client import (
    CollectorRegistry,
    Counter,
    Gauge,
    Histogram,
    disable_created_metrics,
    generate_latest,
)
from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily, Metric
from prometheus_client.exposition import CONTENT_TYPE_LATEST
from prometheus_client.registry import Collector
from twisted.internet.defer import Deferred

if TYPE_CHECKING:
    from csrproxy.issuance.renewal import RenewalSource
    from csrproxy.state.rows import CertificateRow


#: Certificates :class:`PendingRenewals` remembers at most (the soonest to expire kept).
PENDING_MAX = 10_000


class Metrics:
    """Every metric csrproxy exports; ``render()`` gives the text format."""

    content_type = CONTENT_TYPE_LATEST

    def __init__(self) -> None:
        disable_created_metrics()
        self._instance: bytes | None = None
        self.registry = CollectorRegistry(auto_describe=True)
        r = self.registry
        self.orders = Counter(
            "csrproxy_orders", "Orders finished, by outcome", ["outcome"], registry=r
        )
        self.orders_in_flight = Gauge(
            "csrproxy_orders_in_flight", "ACME orders running now", registry=r
        )
        self.issuance_seconds = Histogram(
            "csrproxy_issuance_seconds",
            "Time from newOrder to the downloaded chain",
            buckets=(0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 30, 60, 120, 300),
            registry=r,
        )
        self.challenge_check_seconds = Histogram(
            "csrproxy_challenge_check_seconds",
            "Time from publishing a challenge value until every checked name server served"
            " it (PowerDNS; the built-in zone with secondaries), by backend",
            ["backend"],
            buckets=(0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 30, 60),
            registry=r,
        )
        self.challenge_cache_wait_seconds = Histogram(
            "csrproxy_challenge_cache_wait_seconds",
            "Waits before answering a challenge while resolvers may still hold an older"
            " answer for its name (csrproxy's own earlier answers, or one TTL when other"
            " name servers serve the zone)",
            buckets=(0.25, 0.5, 1, 2, 3, 5, 10, 20, 30, 60),
            registry=r,
        )
        self.admission_refusals = Counter(
            "csrproxy_admission_refusals",
            "Requests refused by csrproxy's own admission control or access rules, by reason",
            ["reason"],
            registry=r,
        )
        self.cache_hits = Counter(
            "csrproxy_cache_hits",
            "Sign requests answered from the issued-certificate cache (no new order)",
            registry=r,
        )
        self.renewal_pass_seconds = Histogram(
            "csrproxy_renewal_pass_seconds",
            "Wall time of one renewal pass (the database queries for what is due included)",
            buckets=(0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5),
            registry=r,
        )
        self.renewals = Counter(
            "csrproxy_renewals",
            "Renewals by outcome (started, renewed, failed; parked: due, installation inactive)",
            ["outcome"],
            registry=r,
        )
        self.ari_lookups = Counter(
            "csrproxy_ari_lookups",
            "ARI renewal-window look-ups by outcome (window, none: the CA has no ARI, failed)",
            ["outcome"],
            registry=r,
        )
        # Hot paths bump plain dicts; the collectors turn them into metrics on scrape.
        self.dns_rcodes: collections.Counter[int] = collections.Counter()
        r.register(_DNSCollector(self.dns_rcodes))
        #: (action, kind) -> UDP replies over their rate limit (``csrproxy.dns.rrl``).
        self.dns_rrl_counts: collections.Counter[tuple[str, str]] = collections.Counter()
        r.register(
            _CountsCollector(
                "csrproxy_dns_rrl",
                "DNS UDP replies over their response rate limit, by action (dropped, slipped:"
                " sent truncated, log_only: sent) and kind (responses, wildcards, nxdomains,"
                " errors); limited = dropped + slipped",
                ("action", "kind"),
                self.dns_rrl_counts,
            )
        )
        #: (route, status) -> API requests answered.
        self.http_counts: collections.Counter[tuple[str, int]] = collections.Counter()
        r.register(
            _CountsCollector(
                "csrproxy_http_requests",
                "API requests by route and status",
                ("route", "status"),
                self.http_counts,
            )
        )
        #: (endpoint, status) -> requests to the CA.
        self.acme_counts: collections.Counter[tuple[str, int]] = collections.Counter()
        r.register(
            _CountsCollector(
                "csrproxy_acme_requests",
                "Requests to the ACME CA by endpoint and HTTP status",
                ("endpoint", "status"),
                self.acme_counts,
            )
        )

    def renewal_pass(self, seconds: float, started: int, parked: int) -> None:
        self.renewal_pass_seconds.observe(seconds)
        if parked:
            self.renewals.labels("parked").inc(parked)

    def challenge_cache_wait(self, seconds: float) -> None:
        self.challenge_cache_wait_seconds.observe(seconds)

    def challenge_checked(self, backend: str, seconds: float) -> None:
        self.challenge_check_seconds.labels(backend).observe(seconds)

    def renewal(self, outcome: str) -> None:
        self.renewals.labels(outcome).inc()

    def ari_lookup(self, outcome: str) -> None:
        self.ari_lookups.labels(outcome).inc()

    def http_request(self, route: str, status: int) -> None:
        self.http_counts[route, status] += 1

    def acme_request(self, endpoint: str, status: int) -> None:
        self.acme_counts[endpoint, status] += 1

    def refusal(self, reason: str) -> None:
        self.admission_refusals.labels(reason).inc()

    def dns_answer(self, rcode: int) -> None:
        self.dns_rcodes[rcode] += 1

    def dns_rrl(self, action: str, kind: str) -> None:
        self.dns_rrl_counts[action, kind] += 1

    def watch_readiness(self, checks: Callable[[], Iterable[tuple[str, bool]]]) -> None:
        """Export ``csrproxy_ready{check}`` (1 or 0) from ``checks()`` at every scrape."""
        self.registry.register(_ReadinessCollector(checks))

    def watch_pruning(self, pruned: Callable[[], collections.Counter[str]]) -> None:
        """Export ``csrproxy_state_pruned_total{kind}`` from the pruner's counts."""
        self.registry.register(_PrunedCollector(pruned))

    def watch_zones(self, zones: Callable[[], Iterable[Mapping[str, Any]]]) -> None:
        """Export per zone (``zones()``: each an ``origin`` with ``serial``, ``records``,
        ``challenges`` and ``room`` when known) ``csrproxy_dns_zone_serial{zone}``,
        ``csrproxy_dns_zone_records{zone}``, ``csrproxy_dns_zone_challenges{zone}`` and
        ``csrproxy_zone_new_names_room{zone}`` at every scrape."""
        self.registry.register(_ZonesCollector(zones))

    def watch_renewals(self, source: RenewalSource, limit: int = PENDING_MAX) -> RenewalSource:
        """``source`` as seen by the renewal pass, exporting the certificates it found due
        and not renewed yet (``csrproxy_renewals_pending``, the earliest ``not_after`` of
        them as ``csrproxy_renewals_pending_expiry_timestamp_seconds``)."""
        pending = PendingRenewals(limit)
        self.registry.register(_PendingCollector(pending))
        return WatchedRenewals(source, pending)

    def render(self) -> bytes:
        text = generate_latest(self.registry)
        return text if self._instance is None else _with_label(text, self._instance)

    def label_instance(self, instance: str) -> None:
        """Every sample gets ``instance="<instance>"`` (several instances behind one job)."""
        self._instance = f'instance="{instance}"'.encode()


def _with_label(text: bytes, label: bytes) -> bytes:
    out = []
    for line in text.split(b"\n"):
        if line and not line.startswith(b"#"):
            name, brace, rest = line.partition(b"{")
            if brace:
                line = name + b"{" + label + (b"," if not rest.startswith(b"}") else b"") + rest
            else:
                name, space, value = line.partition(b" ")
                line = name + b"{" + label + b"}" + space + value
        out.append(line)
    return b"\n".join(out)


class PendingRenewals:
    """Certificates a renewal pass found due, until renewed or parked: a renewal that
    failed stays while it waits for its retry.

    One that a complete pass (fewer rows than asked for) no longer finds due after its
    retry time is forgotten (renewed or leased by another instance).  Holds at most
    ``limit`` certificates; past that the latest to expire are dropped, so the count is
    then a floor and the earliest expiry still right.
    """

    def __init__(self, limit: int = PENDING_MAX) -> None:
        self.limit = limit
        #: certificate id -> (not_after, the time from which a pass must find it again)
        self.certs: dict[str, tuple[float, float]] = {}

    def seen_due(self, rows: Sequence[CertificateRow], now: float, complete: bool) -> None:
        for row in rows:
            self.certs[row.id] = (row.not_after, now)
        if complete:
            found = {row.id for row in rows}
            for cert_id, (_, again) in list(self.certs.items()):
                if again <= now and cert_id not in found:
                    del self.certs[cert_id]
        if len(self.certs) > self.limit:
            keep = sorted(self.certs.items(), key=lambda item: item[1][0])[: self.limit]
            self.certs = dict(keep)

    def retry_at(self, cert_id: str, when: float) -> None:
        if cert_id in self.certs:
            self.certs[cert_id] = (self.certs[cert_id][0], when)

    def done(self, cert_ids: Iterable[str]) -> None:
        for cert_id in cert_ids:
            self.certs.pop(cert_id, None)

    def earliest_expiry(self) -> float | None:
        return min((na for na, _ in self.certs.values()), default=None)


class WatchedRenewals:
    """A :class:`~csrproxy.issuance.renewal.RenewalSource` that tells a
    :class:`PendingRenewals` what the renewal pass reads and does."""

    def __init__(self, source: RenewalSource, pending: PendingRenewals) -> None:
        self.source = source
        self.pending = pending

    def due(self, now: float, limit: int) -> Deferred[list[CertificateRow]]:
        def seen(rows: list[CertificateRow]) -> list[CertificateRow]:
            self.pending.seen_due(rows, now, complete=len(rows) < limit)
            return rows

        return self.source.due(now, limit).addCallback(seen)

    def park(self, cert_ids: Sequence[str]) -> Deferred[Any]:
        self.pending.done(cert_ids)
        return self.source.park(cert_ids)

    def renewed(self, cert_id: str) -> Deferred[Any]:
        self.pending.done([cert_id])
        return self.source.renewed(cert_id)

    def renew_later(self, cert_id: str, when: float) -> Deferred[Any]:
        self.pending.retry_at(cert_id, when)
        return self.source.renew_later(cert_id, when)

    def schedule_unscheduled(self, limit: int) -> Deferred[int]:
        return self.source.schedule_unscheduled(limit)


class _PendingCollector(Collector):
    def __init__(self, pending: PendingRenewals) -> None:
        self.pending = pending

    def collect(self) -> Iterator[Metric]:
        yield GaugeMetricFamily(
            "csrproxy_renewals_pending",
            "Certificates the renewal pass found due (active installations) and not renewed"
            " yet, those waiting to retry a failed renewal included",
            value=len(self.pending.certs),
        )
        earliest = self.pending.earliest_expiry()
        family = GaugeMetricFamily(
            "csrproxy_renewals_pending_expiry_timestamp_seconds",
            "The earliest not_after (Unix time) of csrproxy_renewals_pending's certificates;"
            " no sample while none is pending",
        )
        if earliest is not None:
            family.add_metric([], earliest)
        yield family


class _DNSCollector(Collector):
    def __init__(self, counts: collections.Counter[int]) -> None:
        self.counts = counts

    def collect(self) -> Iterator[Metric]:
        family = CounterMetricFamily(
            "csrproxy_dns_queries", "DNS queries answered, by rcode", labels=["rcode"]
        )
        for rcode, n in sorted(self.counts.items()):
            family.add_metric([RCODES.get(rcode, str(rcode))], n)
        yield family


class _CountsCollector(Collector):
    """A counter family over a dict of label tuples (any values; shown with ``str``)."""

    def __init__(
        self,
        name: str,
        documentation: str,
        labels: tuple[str, ...],
        counts: collections.Counter[Any],
    ) -> None:
        self.name = name
        self.documentation = documentation
        self.labels = labels
        self.counts = counts

    def collect(self) -> Iterator[Metric]:
        family = CounterMetricFamily(self.name, self.documentation, labels=list(self.labels))
        for key, n in sorted(self.counts.items()):
            family.add_metric([str(v) for v in key], n)
        yield family


class _ReadinessCollector(Collector):
    def __init__(self, checks: Callable[[], Iterable[tuple[str, bool]]]) -> None:
        self.checks = checks

    def collect(self) -> Iterator[Metric]:
        family = GaugeMetricFamily(
            "csrproxy_ready", "1 while a part of readiness passes, else 0", labels=["check"]
        )
        for name, ok in self.checks():
            family.add_metric([name], 1.0 if ok else 0.0)
        yield family


class _ZonesCollector(Collector):
    FAMILIES = (
        ("serial", "csrproxy_dns_zone_serial", "The SOA serial of each zone served"),
        ("records", "csrproxy_dns_zone_records", "Records each zone serves (the SOA once)"),
        ("challenges", "csrproxy_dns_zone_challenges", "Challenge names each zone serves"),
        (
            "room",
            "csrproxy_zone_new_names_room",
            "New certificates each zone's registered domain has room for this week",
        ),
    )

    def __init__(self, zones: Callable[[], Iterable[Mapping[str, Any]]]) -> None:
        self.zones = zones

    def collect(self) -> Iterator[Metric]:
        zones = list(self.zones())
        for key, name, documentation in self.FAMILIES:
            family = GaugeMetricFamily(name, documentation, labels=["zone"])
            for zone in zones:
                if zone.get(key) is not None:
                    family.add_metric([str(zone["origin"])], float(zone[key]))
            yield family


class _PrunedCollector(Collector):
    def __init__(self, pruned: Callable[[], collections.Counter[str]]) -> None:
        self.pruned = pruned

    def collect(self) -> Iterator[Metric]:
        family = CounterMetricFamily(
            "csrproxy_state_pruned",
            "Rows pruned from the state database after [state] retention_days, by kind",
            labels=["kind"],
        )
        for kind, n in sorted(self.pruned().items()):
            family.add_metric([kind], n)
        yield family


RCODES = {
    0: "NOERROR",
    1: "FORMERR",
    2: "SERVFAIL",
    3: "NXDOMAIN",
    4: "NOTIMP",
    5: "REFUSED",
    16: "BADVERS",
    23: "BADCOOKIE",
}
