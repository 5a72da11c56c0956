"""Control-plane speed: Maglev table builds, and lbctl add-backend from process start to map updated."""
from __future__ import annotations

import statistics
import subprocess
import time

from lb.maglev import MaglevBackend, build_table
from netns.lbctl import LBCTL


def summary(values: list[float]) -> dict[str, float]:
    return {"median": statistics.median(values), "min": min(values), "max": max(values)}


def maglev_build_ms(counts: tuple[int, ...] = (10, 100, 1000), runs: int = 5) -> dict[str, dict]:
    out = {}
    for n in counts:
        backends = [MaglevBackend(f"10.{i // 65536}.{i // 256 % 256}.{i % 256}:80") for i in range(n)]
        times = []
        for _ in range(runs):
            start = time.perf_counter()
            build_table(backends)
            times.append((time.perf_counter() - start) * 1000)
        out[str(n)] = summary(times)
    return out


def lbctl_add_backend_ms(lb_ns: str, vip: str, address: str, runs: int = 10) -> dict[str, float]:
    """Wall time of `ip netns exec NS lbctl add-backend` (then remove-backend, untimed), as an operator runs it."""
    times = []
    for _ in range(runs):
        start = time.perf_counter()
        subprocess.run(["ip", "netns", "exec", lb_ns, LBCTL, "add-backend", vip, address], check=True,
                       capture_output=True)
        times.append((time.perf_counter() - start) * 1000)
        subprocess.run(["ip", "netns", "exec", lb_ns, LBCTL, "remove-backend", vip, address], check=True,
                       capture_output=True)
    return summary(times)
