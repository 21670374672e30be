"""The ``[renewal]`` section: renewing certificates on the server."""

from __future__ import annotations

from csrproxy.config.model import RenewalConfig
from csrproxy.config.reader import Table


def parse_renewal(renewal: Table) -> RenewalConfig:
    config = RenewalConfig(
        enabled=renewal.get("enabled", bool, RenewalConfig.enabled),
        active_days=renewal.positive("active_days", RenewalConfig.active_days),
        interval=renewal.positive("interval", RenewalConfig.interval),
        max_parallel=renewal.positive_int("max_parallel", RenewalConfig.max_parallel),
        ari_parallel=renewal.positive_int("ari_parallel", RenewalConfig.ari_parallel),
        ari_per_second=renewal.positive("ari_per_second", RenewalConfig.ari_per_second),
        ari_recheck=renewal.positive("ari_recheck", RenewalConfig.ari_recheck),
    )
    renewal.done()
    return config
