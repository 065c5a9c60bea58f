"""The status model's cost per order: `python -m bench.status [--rounds 5]`.

Times, per order, what the receiver runs for every callback (`history_and_amount`, and all of
`build_updates`) over the bench's orders (`bench/tokens.py`) and Intergiro's real callbacks
(`tests/data/intergiro/real-callbacks.jsonl`), taking the best of the rounds.
"""

from __future__ import annotations

import argparse
import json
import timeit
from collections.abc import Callable
from pathlib import Path
from typing import Any

from bench.tokens import bench_order
from receiver.keys import intergiro_key
from receiver.order import build_updates, parse_order
from receiver.status import history_and_amount
from receiver.verify import strict_json, verify_local

REAL_CALLBACKS = (
    Path(__file__).resolve().parent.parent / "tests" / "data" / "intergiro" / "real-callbacks.jsonl"
)


def real_orders() -> list[dict[str, Any]]:
    """The orders of the real callbacks as the receiver reads them: each token verified with
    Intergiro's production key, each JSON order parsed strictly."""
    keys = [intergiro_key("production")]
    orders = []
    for line in REAL_CALLBACKS.read_text().splitlines():
        callback = json.loads(line)
        if callback["kind"] == "order-jwt":
            orders.append(verify_local(callback["body"].encode(), keys, "production").order)
        elif callback["kind"] == "order-json":
            orders.append(strict_json(callback["body"]))
    return orders


def per_order(run: Callable[[dict[str, Any]], object], orders: list[dict[str, Any]], rounds: int) -> float:
    """Microseconds per order, the best of `rounds` passes over every order (repeated to about 0.2 s)."""

    def one_pass() -> None:
        for order in orders:
            run(order)

    timer = timeit.Timer(one_pass)
    number, _ = timer.autorange()
    return min(timer.repeat(rounds, number)) / number / len(orders) * 1e6


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--rounds", type=int, default=5)
    args = parser.parse_args()
    sets = {
        "bench orders (200)": [parse_order(json.loads(json.dumps(bench_order(i)))) for i in range(200)],
        f"real orders ({len(real := real_orders())})": [parse_order(order) for order in real],
    }
    for name, orders in sets.items():
        statuses = per_order(history_and_amount, orders, args.rounds)
        updates = per_order(
            lambda order: build_updates(order, received_at="2026-01-01T00:00:00Z", verified_by="local"),
            orders,
            args.rounds,
        )
        print(f"{name:<22} history_and_amount {statuses:7.2f} us   build_updates {updates:7.2f} us")


if __name__ == "__main__":
    main()
