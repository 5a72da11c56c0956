"""Control-plane speed: Maglev table builds, lbctl add-backend from process start to map updated,
the same through the daemon's API, applying a file of many VIPs, the daemon's memory."""
from __future__ import annotations

import contextlib
import os
import statistics
import subprocess
import tempfile
import time
from typing import Iterator

from control.api import ApiClient, default_socket_path
from lb.maglev import MaglevBackend, build_table
from netns.lbctl import LBCTL, DaemonProcess


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
        times.append(timed_lbctl_ms(lb_ns, "add-backend", vip, address))
        timed_lbctl_ms(lb_ns, "remove-backend", vip, address)
    return summary(times)


def many_vips_config(lab, count: int, port: int = 8080) -> str:
    """A configuration file of `count` VIPs, each with every lab backend behind it, on a port of its
    own (a NAT backend endpoint serves a few VIPs at most: structs.REPLY_VIPS)."""
    def backends(i: int) -> str:
        return "".join(f"      - {b.address}:{port + i}\n" for b in lab.backends)
    return "vips:\n" + "".join(f"  - vip: 198.19.{1 + i // 250}.{i % 250 + 1}:80/tcp\n    backends:\n{backends(i)}"
                               for i in range(count))


def timed_lbctl_ms(lb_ns: str, *args: str) -> float:
    """Wall time of one `ip netns exec NS lbctl ARGS`, process start to exit."""
    start = time.perf_counter()
    subprocess.run(["ip", "netns", "exec", lb_ns, LBCTL, *args], check=True, capture_output=True, timeout=1200)
    return (time.perf_counter() - start) * 1000


def apply_many_vips(lab, count: int, workdir: str) -> dict[str, float]:
    """Seconds to apply a file of `count` VIPs on an empty state, to apply it again (no change), and to
    remove them all (`vips: []`), each one `lbctl apply -f` process."""
    full, empty = os.path.join(workdir, "many.yaml"), os.path.join(workdir, "none.yaml")
    with open(full, "w") as f:
        f.write(many_vips_config(lab, count))
    with open(empty, "w") as f:
        f.write("vips: []\n")
    timed_lbctl_ms(lab.lb_ns, "apply", "-f", empty)
    return {"apply_s": timed_lbctl_ms(lab.lb_ns, "apply", "-f", full) / 1000,
            "apply_again_s": timed_lbctl_ms(lab.lb_ns, "apply", "-f", full) / 1000,
            "remove_all_s": timed_lbctl_ms(lab.lb_ns, "apply", "-f", empty) / 1000}


def rss_mib(pid: int) -> float:
    with open(f"/proc/{pid}/status") as f:
        kib = next(int(line.split()[1]) for line in f if line.startswith("VmRSS:"))
    return kib / 1024


def daemon_api_add_backend_ms(api: ApiClient, vip: str, address: str, runs: int = 20) -> dict[str, float]:
    """One add-backend request on the daemon's socket, answered once the maps are updated
    (then remove-backend, untimed): what a script or an orchestrator talking to the API sees."""
    times = []
    for _ in range(runs):
        start = time.perf_counter()
        api.command("add-backend", {"vip": vip, "backend": address})
        times.append((time.perf_counter() - start) * 1000)
        api.command("remove-backend", {"vip": vip, "backend": address})
    return summary(times)


@contextlib.contextmanager
def running_daemon(lab) -> Iterator[tuple[DaemonProcess, ApiClient]]:
    """`lbctl daemon` in the LB namespace for the block, and a client of its API."""
    with tempfile.TemporaryDirectory() as workdir:
        daemon = DaemonProcess(lab.lb_ns, os.path.join(workdir, "daemon.log"), ())
        try:
            daemon.start()
            yield daemon, ApiClient(default_socket_path(lab.lb_ns))
        finally:
            daemon.stop()


def daemon_figures(lab, vip: str, address: str, runs: int) -> dict[str, dict | float]:
    """The API's add-backend latency, lbctl's through the daemon, and the daemon's resident memory."""
    with running_daemon(lab) as (daemon, api):
        return {"api_add_backend_ms": daemon_api_add_backend_ms(api, vip, address, runs),
                "lbctl_add_backend_via_daemon_ms": lbctl_add_backend_ms(lab.lb_ns, vip, address, runs),
                "daemon_rss_mib": rss_mib(daemon.proc.pid)}
