"""`process_*` metrics: a process's own (prometheus_client's collectors), or a forked group's summed
from /proc."""

from __future__ import annotations

import os
from collections.abc import Iterable
from pathlib import Path
from typing import Any

from prometheus_client import GC_COLLECTOR, PLATFORM_COLLECTOR, PROCESS_COLLECTOR, CollectorRegistry
from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily
from prometheus_client.registry import Collector


def _proc_stat(pid: int) -> list[str]:
    return Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()


class ProcessGroupMetrics(Collector):
    """`process_*` of a parent and its children together (`serve --processes N`, `worker --processes
    N`): CPU and memory add up over the group, so a pod's figure is one series, whichever process
    answers the scrape. Linux only (/proc); nothing elsewhere."""

    def __init__(self, root_pid: int) -> None:
        self.root_pid = root_pid
        self.ticks = os.sysconf("SC_CLK_TCK") if hasattr(os, "sysconf") else 100
        self.page = os.sysconf("SC_PAGE_SIZE") if hasattr(os, "sysconf") else 4096

    def pids(self) -> list[int]:
        try:
            path = f"/proc/{self.root_pid}/task/{self.root_pid}/children"
            return [self.root_pid, *(int(p) for p in Path(path).read_text().split())]
        except OSError:
            return []

    def collect(self) -> Iterable[Any]:
        cpu = rss = fds = 0.0
        pids = self.pids()
        if not pids:
            return
        for pid in pids:
            try:
                stat = _proc_stat(pid)
                cpu += (int(stat[11]) + int(stat[12])) / self.ticks
                rss += int(stat[21]) * self.page
                fds += len(os.listdir(f"/proc/{pid}/fd"))
            except (OSError, IndexError, ValueError):
                continue  # a child that just ended
        yield CounterMetricFamily(
            "process_cpu_seconds", "User and system CPU of the process group, in seconds.", value=cpu
        )
        yield GaugeMetricFamily("process_resident_memory_bytes", "Resident memory of the process group.", rss)
        yield GaugeMetricFamily("process_open_fds", "Open file descriptors of the process group.", fds)
        yield GaugeMetricFamily("process_group_processes", "Processes in the group.", len(pids))
        try:
            boot = next(
                float(line.split()[1])
                for line in Path("/proc/stat").read_text().splitlines()
                if line.startswith("btime")
            )
            start = boot + int(_proc_stat(self.root_pid)[19]) / self.ticks
            yield GaugeMetricFamily(
                "process_start_time_seconds", "Start of the group's first process (Unix time).", start
            )
        except (OSError, StopIteration, IndexError, ValueError):
            pass


def process_collectors(registry: CollectorRegistry, group_root: int | None = None) -> None:
    """This process's own `process_*`, `python_gc_*` and `python_info`; or, for a group of forked
    processes, the group's `process_*` summed (see ProcessGroupMetrics)."""
    if group_root is None:
        for collector in (PROCESS_COLLECTOR, PLATFORM_COLLECTOR, GC_COLLECTOR):
            registry.register(collector)
    else:
        registry.register(ProcessGroupMetrics(group_root))
        registry.register(PLATFORM_COLLECTOR)
