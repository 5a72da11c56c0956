"""Busy CPU time summed over all CPUs, for the end-to-end bench's CPU per packet.

Two sources, chosen once per clock:
- "cpuidle": wall time x CPUs minus the cpuidle states' residency (microseconds; catches short
  bursts that tick sampling misses). Only where every CPU exposes cpuidle states.
- "proc_stat": user + nice + system + irq + softirq + steal from /proc/stat, over all CPUs
  (USER_HZ ticks: 10 ms resolution, fine over windows of seconds). Every Linux has it; some
  VMs have no cpuidle driver at all.
LB_BENCH_BUSY=proc_stat forces the second (to compare them on one machine)."""
from __future__ import annotations

import glob
import os
import time

PROC_STAT_BUSY_FIELDS = ("user", "nice", "system", "irq", "softirq", "steal")
_PROC_STAT_FIELDS = ("user", "nice", "system", "idle", "iowait", "irq", "softirq", "steal")


def proc_stat_busy_ticks(text: str) -> int:
    """Busy ticks of the aggregate `cpu` line of /proc/stat's text."""
    for line in text.splitlines():
        parts = line.split()
        if parts and parts[0] == "cpu":
            values = dict(zip(_PROC_STAT_FIELDS, (int(v) for v in parts[1:])))
            return sum(values.get(f, 0) for f in PROC_STAT_BUSY_FIELDS)
    raise ValueError("/proc/stat has no aggregate 'cpu' line")


class BusyClock:
    def __init__(self, source: str | None = None, root: str = "/") -> None:
        self.root = root
        cpus = glob.glob(os.path.join(root, "sys/devices/system/cpu/cpu[0-9]*"))
        idle_dirs = glob.glob(os.path.join(root, "sys/devices/system/cpu/cpu[0-9]*/cpuidle"))
        self.files = sorted(glob.glob(os.path.join(root, "sys/devices/system/cpu/cpu[0-9]*/cpuidle/state[0-9]*/time")))
        self.cpus = len(idle_dirs)
        source = source or os.environ.get("LB_BENCH_BUSY")
        if source is None:
            source = "cpuidle" if self.files and len(idle_dirs) == len(cpus) else "proc_stat"
        if source == "cpuidle" and not self.files:
            raise RuntimeError("no cpuidle residency in /sys (use the proc_stat source)")
        if source not in ("cpuidle", "proc_stat"):
            raise ValueError(f"unknown busy-time source {source!r} (cpuidle or proc_stat)")
        self.source = source
        self.tick_s = 1 / os.sysconf("SC_CLK_TCK")

    def read(self) -> tuple[float, float]:
        """An opaque mark: (wall seconds, idle seconds) or (0, busy seconds)."""
        if self.source == "proc_stat":
            with open(os.path.join(self.root, "proc/stat")) as f:
                return 0.0, proc_stat_busy_ticks(f.read()) * self.tick_s
        idle_us = 0
        for path in self.files:
            with open(path) as f:
                idle_us += int(f.read())
        return time.monotonic(), idle_us / 1e6

    def busy_since(self, start: tuple[float, float]) -> float:
        """Busy CPU seconds, summed over CPUs, since the mark `start`."""
        wall, value = self.read()
        if self.source == "proc_stat":
            return value - start[1]
        return (wall - start[0]) * self.cpus - (value - start[1])
