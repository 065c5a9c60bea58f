"""The benchmarks still run: each once, briefly, with tiny numbers (no timing is asserted; their own
checks are: one job per event for the ingest runs, only the markers left for the memory run, each
update POSTed once and in sequence for the drain run, every update delivered for the end-to-end run)."""

from __future__ import annotations

import shutil
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]


def run_bench(*args: str) -> str:
    done = subprocess.run(
        [sys.executable, "-m", *args], cwd=ROOT, capture_output=True, text=True, timeout=120
    )
    assert done.returncode == 0, done.stdout + done.stderr
    return done.stdout


@pytest.mark.parametrize("loader", ["asyncio", "wrk"])
def test_the_ingest_benchmark_runs_and_finds_one_job_per_event(loader: str) -> None:
    if loader == "wrk" and shutil.which("wrk") is None:
        pytest.skip("wrk is not installed (apt-get install wrk); the asyncio loader is tested")
    out = run_bench(
        "bench.ingest", "--rounds", "1", "--seconds", "1", "--requests", "200", "--loader", loader,
        "--source", str(ROOT),  # the "before" receiver of a before/after: here this very tree
    )  # fmt: skip
    assert out.count("queue ok") == 4, out  # baseline, lean path, --source's receiver, receiver
    for row in ("(l) lean path (lab)", "(s) receiver of --source", "(c) intergiro-receiver"):
        assert row in out, out
    assert "of (l): " in out


def test_the_memory_benchmark_runs_and_leaves_only_the_markers() -> None:
    out = run_bench("bench.memory", "--orders", "500")
    assert "1,000 callbacks' events remembered" in out
    assert "bytes per event" in out


def test_the_drain_benchmark_runs_and_finds_every_update_delivered_once_in_sequence() -> None:
    out = run_bench("bench.drain", "--updates", "40", "--rounds", "1", "--processes", "2")
    assert "ok: 40 updates each POSTed once, 20 orders in sequence" in out, out
    assert "ok: queue drained, no failed job" in out, out
    assert "no-op jobs/s" in out


def test_the_drain_benchmark_with_two_destinations_delivers_every_update_to_each_once_in_sequence() -> None:
    out = run_bench(
        "bench.drain", "--updates", "40", "--rounds", "1", "--processes", "1", "--destinations", "2"
    )
    assert out.count("ok: 40 updates each POSTed once, 20 orders in sequence") == 4, out  # 1 in flight too
    assert "fan-out, same rounds" in out


def test_the_end_to_end_benchmark_runs_and_prints_its_table() -> None:
    out = run_bench("bench.e2e", "--rates", "5", "--seconds", "1", "--processes", "1")
    assert "appendfsync always" in out, out
    assert "rate/s" in out and "p99 ms" in out, out
    assert "highest rate with p99 <= 100 ms" in out, out


def test_the_round_trips_benchmark_counts_the_writing_round_trips_of_each_delivery() -> None:
    out = run_bench("bench.round_trips", "--updates", "20")
    assert "20 deliveries by one DeliveryWorker" in out, out
    assert "writing round trips per delivery" in out and "LMOVE" in out, out
