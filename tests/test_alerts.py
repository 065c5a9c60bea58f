"""The alert rules are valid Prometheus rules, and their unit tests (alerts.test.yml) pass: each alert
fires once per deployment, across receivers and a move of the exporter lease."""

from __future__ import annotations

import shutil
import subprocess
import sys
from pathlib import Path

import pytest

RULES = Path(__file__).resolve().parents[1] / "deploy" / "prometheus"


def promtool() -> str:
    found = shutil.which("promtool") or shutil.which("promtool", path=str(Path(sys.executable).parent))
    if found is None:
        pytest.skip(
            "promtool is not installed (bin/test fetches it where apt-get works): alert rules not checked"
        )
    return found


def test_the_alert_rules_pass_promtool_check_rules() -> None:
    answer = subprocess.run(
        [promtool(), "check", "rules", "alerts.yml", "reconcile-alerts.yml"],
        cwd=RULES, capture_output=True, text=True, timeout=60, check=False,
    )  # fmt: skip
    assert answer.returncode == 0, answer.stdout + answer.stderr


def test_the_alert_rules_pass_their_unit_tests() -> None:
    answer = subprocess.run(
        [promtool(), "test", "rules", "alerts.test.yml"],
        cwd=RULES, capture_output=True, text=True, timeout=120, check=False,
    )  # fmt: skip
    assert answer.returncode == 0, answer.stdout + answer.stderr


def test_every_alert_has_a_runbook_section_a_console_link_and_a_unit_test() -> None:
    import yaml

    from tests.test_docs import headings

    rules = [
        rule
        for name in ("alerts.yml", "reconcile-alerts.yml")
        for group in yaml.safe_load((RULES / name).read_text())["groups"]
        for rule in group["rules"]
    ]
    tested = {
        case["alertname"]
        for test in yaml.safe_load((RULES / "alerts.test.yml").read_text())["tests"]
        for case in test["alert_rule_test"]
        if case.get("exp_alerts")
    }
    sections = headings(RULES.parents[1] / "docs" / "operations.md")
    assert len(rules) == 14
    for rule in rules:
        name, annotations = rule["alert"], rule["annotations"]
        assert annotations["runbook_url"].endswith(f"/operations.md#{name.lower()}"), name
        assert name.lower() in sections, name
        assert annotations["console"].startswith("{{ $externalLabels.intergiro_ops_url }}/"), name
        assert name in tested, name
