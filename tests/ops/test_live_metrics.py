"""A running ``twistd csrproxy`` exports every family the dashboard and the rules use."""

from __future__ import annotations

import json
import re
import urllib.request
from pathlib import Path

import pytest
import yaml
from prometheus_client.parser import text_string_to_metric_families

from csrproxy.testing.daemon import start_csrproxy
from csrproxy.testing.pebble import Pebble
from tests.conftest import ZONE
from tests.ops.promql import DASHBOARD, ROOT, RULES, names_in


def used_families() -> set[str]:
    panels = json.loads(DASHBOARD.read_text())["panels"]
    exprs = [t["expr"] for p in panels for t in p.get("targets", [])]
    groups = yaml.safe_load(RULES.read_text())["groups"]
    exprs += [rule["expr"] for group in groups for rule in group["rules"]]
    names = set().union(*(names_in(e)[0] for e in exprs))
    names = {n for n in names if n.startswith("csrproxy_")}  # not the recorded ones
    return {re.sub(r"_(total|bucket|count|sum)$", "", n) for n in names}


@pytest.mark.integration
def test_the_daemon_exports_every_family_the_kit_uses(
    tmp_path: Path, pebble: Pebble, dns_port: int
) -> None:
    # This tree's code, not whatever csrproxy is installed.
    env = {"PYTHONPATH": str(ROOT)}
    with (
        start_csrproxy(str(tmp_path), pebble, dns_port, ZONE, env=env) as daemon,
        urllib.request.urlopen(daemon.url + "/metrics", timeout=10) as resp,
    ):
        text = resp.read().decode()
    families = {f.name for f in text_string_to_metric_families(text)}
    assert used_families() - families == set()
    assert 'csrproxy_zone_new_names_room{zone="go.example.test"}' in text
