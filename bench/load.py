"""Load generators for bench/ingest: `wrk` with bench/ingest.lua when installed, else asyncio + aiohttp.

Both POST each token at most once (a run stops early when the pool runs out), keep `connections`
keep-alive connections busy for `seconds`, and report answers by kind and latency percentiles.
"""

from __future__ import annotations

import asyncio
import json
import shutil
import subprocess
import time
from dataclasses import dataclass
from pathlib import Path

import aiohttp

LUA_SCRIPT = Path(__file__).resolve().parent / "ingest.lua"


@dataclass(frozen=True)
class LoadResult:
    requests: int
    seconds: float
    p50_ms: float
    p99_ms: float
    accepted: int  # 200 with status "accepted" (the bare app answers that too)
    other_200: int  # 200 duplicate: only when a token was sent twice
    failed: int  # non-200 answers and socket errors
    exhausted: bool  # the run stopped because the token pool ran out
    sent: int  # distinct tokens sent, including any still in flight when the run ended

    @property
    def accepted_per_second(self) -> float:
        return self.accepted / self.seconds if self.seconds else 0.0


def wrk_available() -> bool:
    return shutil.which("wrk") is not None


def run_wrk(
    url: str, tokens_file: Path, limit: int, seconds: float, connections: int, cycle: bool = False
) -> LoadResult:
    command = ["wrk", "-t1", f"-c{connections}", f"-d{max(1, round(seconds))}s", "-s", str(LUA_SCRIPT),
               url, "--", str(tokens_file), str(limit), "cycle" if cycle else "once"]  # fmt: skip
    output = subprocess.run(command, capture_output=True, text=True, check=True).stdout
    line = next(x for x in output.splitlines() if x.startswith("WRK-RESULT "))
    raw = json.loads(line.removeprefix("WRK-RESULT "))
    return LoadResult(
        requests=raw["requests"],
        seconds=raw["duration_us"] / 1e6,
        p50_ms=raw["p50_us"] / 1000,
        p99_ms=raw["p99_us"] / 1000,
        accepted=raw["accepted"],
        other_200=raw["other_200"],
        failed=raw["failed"] + raw["socket_errors"],
        exhausted=bool(raw["exhausted"]),
        sent=min(raw["sent"], limit),
    )


def percentile(sorted_values: list[float], p: float) -> float:
    if not sorted_values:
        return 0.0
    return sorted_values[min(len(sorted_values) - 1, int(len(sorted_values) * p / 100))]


async def _run_asyncio(
    url: str, tokens: list[bytes], seconds: float, connections: int, cycle: bool
) -> LoadResult:
    latencies: list[float] = []
    counts = {"accepted": 0, "other": 0, "failed": 0}
    next_index = 0
    headers = {"Content-Type": "application/jwt"}
    connector = aiohttp.TCPConnector(limit=connections)
    async with aiohttp.ClientSession(connector=connector) as session:
        started = time.perf_counter()
        deadline = started + seconds

        async def client() -> None:
            nonlocal next_index
            while (cycle or next_index < len(tokens)) and time.perf_counter() < deadline:
                body = tokens[next_index % len(tokens)]
                next_index += 1
                sent = time.perf_counter()
                try:
                    async with session.post(url, data=body, headers=headers) as answer:
                        text = await answer.read()
                        ok = answer.status == 200
                except aiohttp.ClientError:
                    counts["failed"] += 1
                    continue
                latencies.append(time.perf_counter() - sent)
                if not ok:
                    counts["failed"] += 1
                elif b'"accepted"' in text:
                    counts["accepted"] += 1
                else:
                    counts["other"] += 1

        await asyncio.gather(*(client() for _ in range(connections)))
        elapsed = time.perf_counter() - started
    latencies.sort()
    return LoadResult(
        requests=len(latencies) + counts["failed"],
        seconds=elapsed,
        p50_ms=percentile(latencies, 50) * 1000,
        p99_ms=percentile(latencies, 99) * 1000,
        accepted=counts["accepted"],
        other_200=counts["other"],
        failed=counts["failed"],
        exhausted=not cycle and next_index >= len(tokens),
        sent=min(next_index, len(tokens)),
    )


def run_asyncio(
    url: str, tokens: list[bytes], seconds: float, connections: int, cycle: bool = False
) -> LoadResult:
    return asyncio.run(_run_asyncio(url, tokens, seconds, connections, cycle))
