"""contrib/prometheus/csrproxy.rules.yml: valid for promtool, its alerts unit-tested, and
naming only what csrproxy exports."""

from __future__ import annotations

import os
import shutil
import subprocess
from typing import Any

import pytest
import yaml

from tests.ops.promql import RULES, RULES_TEST, exported, unknown_names

PROMTOOL = shutil.which("promtool")
# In CI (make test installs it) a missing promtool fails the tests instead.
needs_promtool = pytest.mark.skipif(
    PROMTOOL is None and not os.environ.get("CI"),
    reason="promtool not installed (Debian package prometheus: scripts/install-system-deps)",
)


def rules() -> list[dict[str, Any]]:
    groups = yaml.safe_load(RULES.read_text())["groups"]
    return [rule for group in groups for rule in group["rules"]]


def promtool(*args: str) -> str:
    assert PROMTOOL is not None
    done = subprocess.run(
        [PROMTOOL, *args], capture_output=True, text=True, timeout=60, check=False
    )
    assert done.returncode == 0, done.stdout + done.stderr
    return done.stdout


@needs_promtool
def test_promtool_checks_the_rules() -> None:
    out = promtool("check", "rules", str(RULES))
    assert f"SUCCESS: {len(rules())} rules found" in out


@needs_promtool
def test_promtool_unit_tests_every_alert() -> None:
    promtool("test", "rules", str(RULES_TEST))


def test_the_unit_tests_cover_every_alert_firing_and_not() -> None:
    tests = yaml.safe_load(RULES_TEST.read_text())["tests"]
    cases = [case for test in tests for case in test.get("alert_rule_test", [])]
    alerts = {rule["alert"] for rule in rules() if "alert" in rule}
    firing = {c["alertname"] for c in cases if c.get("exp_alerts")}
    assert firing == alerts
    # Not firing: an empty case, or a firing case whose input has series it leaves out.
    for test in tests:
        for case in test.get("alert_rule_test", []):
            if case.get("exp_alerts"):
                assert len(test["input_series"]) > len(case["exp_alerts"]), case["alertname"]


def test_every_alert_has_for_severity_and_annotations() -> None:
    for rule in rules():
        if "alert" not in rule:
            continue
        assert rule.get("for"), rule["alert"]
        assert rule["labels"]["severity"] in {"warning", "critical"}, rule["alert"]
        assert {"summary", "description"} <= set(rule["annotations"]), rule["alert"]


def test_every_expression_names_exported_series() -> None:
    known = exported()
    for rule in rules():
        if "record" in rule:
            labels = {"job", "instance"}  # every recording rule here sums by them
            known[rule["record"]] = labels
    for rule in rules():
        name = rule.get("alert") or rule["record"]
        assert unknown_names(rule["expr"], known) == [], f"{name}: {rule['expr']}"


def test_the_readme_explains_every_alert() -> None:
    readme = (RULES.parents[2] / "README.md").read_text()
    section = readme.split("## Dashboards and alerts", 1)[1].split("\n## ", 1)[0]
    for rule in rules():
        name = rule.get("alert") or rule["record"]
        assert f"`{name}`" in section, name
