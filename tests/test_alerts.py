"""The alert rules are valid Prometheus rules, and their unit tests (alerts.test.yml) pass: each alert
fires once per deployment, across receivers and a move of the exporter lease; and the outage alerts
fire on series recorded from a real outage (a real receiver, worker and merchant), not only on
hand-written ones."""

from __future__ import annotations

import asyncio
import shutil
import subprocess
import sys
from pathlib import Path
from typing import Any

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


# What the outage rules read, as the receiver's /metrics serves it.
OUTAGE_METRICS = (
    "intergiro_destination_state",
    "intergiro_destination_queued",
    "intergiro_destination_waiting",
    "intergiro_destination_retrying",
    "intergiro_destination_workers_alive",
    "intergiro_oldest_undelivered_seconds",
)
HOUR = 60  # minutes of series after the scrape


def humanize_duration(seconds: int) -> str:
    """Prometheus' `humanizeDuration` of whole seconds (a minute or more), as the annotations print it."""
    hours, rest = divmod(seconds, 3600)
    minutes, secs = divmod(rest, 60)
    return f"{hours}h {minutes}m {secs}s" if hours else f"{minutes}m {secs}s"


def recorded_series(exposition: str) -> tuple[list[dict[str, str]], dict[tuple[str, str, str], int]]:
    """Promtool input series from one real scrape: each outage sample held for an hour, except the
    oldest-undelivered age, which grows a minute a minute (nothing is delivered while the outage lasts);
    and the scraped values by (metric, destination, state)."""
    from prometheus_client.parser import text_string_to_metric_families

    series: list[dict[str, str]] = []
    scraped: dict[tuple[str, str, str], int] = {}
    for family in text_string_to_metric_families(exposition):
        for sample in family.samples:
            if sample.name not in OUTAGE_METRICS:
                continue
            value = int(sample.value)  # whole seconds: the annotations print whole seconds past a minute
            scraped[sample.name, sample.labels["destination"], sample.labels.get("state", "")] = value
            growth = "+60" if sample.name == "intergiro_oldest_undelivered_seconds" else ""
            labels = ", ".join(f'{k}="{v}"' for k, v in sorted({**sample.labels, "instance": "r"}.items()))
            series.append({"series": f"{sample.name}{{{labels}}}", "values": f"{value}{growth}x{HOUR}"})
    return series, scraped


def expected(alert: str, destination: str, summary: str, description: str) -> dict[str, Any]:
    return {
        "exp_labels": {"severity": "page", "destination": destination},
        "exp_annotations": {
            "summary": summary,
            "description": description,
            "runbook_url": f"https://docs.example.test/operations.md#{alert.lower()}",
            "console": f"https://ops.example.test/#destination-{destination}",
        },
    }


async def test_the_outage_alerts_fire_on_series_recorded_from_a_real_outage(
    make_receiver: Any, make_sink: Any, rsa_key: Any, workers: Any, cli: Any, tmp_path: Path
) -> None:
    """A real outage: the merchant answers 503 until its breaker opens, and `erp` has updates and no
    worker. One scrape of the receiver's /metrics then, replayed by promtool for an hour, fires
    DestinationDown for merchant, DeliveryLagging once its oldest update is 30 minutes late, and
    DestinationUnserved for erp, with the runbook and console links; no other outage alert. So the
    rules read the metric names, labels and values the product really serves."""
    import yaml

    from receiver.settings import Settings
    from tests.sink import wait_for
    from tests.test_destinations import listed
    from tests.test_fanout import destinations_env, post_rounds
    from tests.test_workers import webhook_settings

    merchant, erp = await make_sink(), await make_sink()
    merchant.answer = lambda _id, _n: (503, {}, 0.0)
    env = destinations_env(erp)
    extra = Settings.from_env(env, dotenv=False).extra_destinations
    receiver = await make_receiver(extra_destinations=extra, **webhook_settings(merchant))
    workers(
        "--destination", "merchant", **env,
        **webhook_settings(merchant, delivery_retry_schedule="1h", breaker_failures=2, breaker_probe_seconds=30),
    )  # fmt: skip
    await post_rounds(receiver, rsa_key, [f"Outage{n:010d}" for n in range(3)], rounds=2)
    await wait_for(lambda: listed(cli)["merchant"]["state"] == "down", what="the merchant marked down")
    await asyncio.sleep(1.1)  # the receiver's figures are read at most once a second
    series, scraped = recorded_series(await (await receiver.get("/metrics")).text())
    assert scraped["intergiro_destination_state", "merchant", "down"] == 1
    assert scraped["intergiro_destination_workers_alive", "erp", ""] == 0
    backlog = sum(
        scraped[f"intergiro_destination_{kind}", "erp", ""] for kind in ("queued", "waiting", "retrying")
    )
    ages = {d: scraped["intergiro_oldest_undelivered_seconds", d, ""] for d in ("merchant", "erp")}
    assert backlog == 6 and all(0 < age < 60 for age in ages.values())
    # each destination's lag passes 30 minutes at its minute; the alert fires 5 minutes (its `for`) later
    fires = {d: next(m for m in range(HOUR) if age + 60 * m > 1800) + 5 for d, age in ages.items()}
    both = max(fires.values())
    cases = [
        ("IntergiroDestinationDown", 4, []),
        ("IntergiroDestinationDown", 6, [expected(
            "IntergiroDestinationDown", "merchant", "Destination merchant is down",
            "Deliveries to merchant are held: it refused connections, timed out or answered 502/503/504 "
            "repeatedly. Updates wait (no attempts spent); one probe at a time goes out.",
        )]),
        ("IntergiroDeliveryLagging", min(fires.values()) - 1, []),
        ("IntergiroDeliveryLagging", both, [
            expected(
                "IntergiroDeliveryLagging", d, f"Updates to {d} are {late} late",
                f"The oldest update not yet delivered to {d} is {late} old. "
                "`intergiro-receiver destination list` says whether it is down, paused or unserved.",
            )
            for d, late in ((d, humanize_duration(ages[d] + 60 * both)) for d in ("merchant", "erp"))
        ]),
        ("IntergiroDestinationUnserved", 4, []),
        ("IntergiroDestinationUnserved", 6, [expected(
            "IntergiroDestinationUnserved", "erp", "No worker serves destination erp",
            f"{backlog} updates wait for erp and no live worker serves it: start `intergiro-receiver "
            "worker` for it (or without --destination).",
        )]),
        ("IntergiroDestinationPaused", HOUR - 1, []),
    ]  # fmt: skip
    test = {
        "rule_files": [str(RULES / "alerts.yml")],
        "evaluation_interval": "1m",
        "tests": [
            {
                "name": "series recorded from a real outage",
                "interval": "1m",
                "external_labels": {
                    "intergiro_docs_url": "https://docs.example.test",
                    "intergiro_ops_url": "https://ops.example.test",
                },
                "input_series": series,
                "alert_rule_test": [
                    {"eval_time": f"{minute}m", "alertname": name, "exp_alerts": alerts}
                    for name, minute, alerts in cases
                ],
            }
        ],
    }
    (tmp_path / "recorded.test.yml").write_text(yaml.safe_dump(test, sort_keys=False))
    answer = await asyncio.to_thread(
        subprocess.run, [promtool(), "test", "rules", "recorded.test.yml"],
        cwd=tmp_path, capture_output=True, text=True, timeout=120, check=False,
    )  # fmt: skip
    assert answer.returncode == 0, answer.stdout + answer.stderr + "\n" + yaml.safe_dump(series)
