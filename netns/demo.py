"""make demo: a lab with a client, an LB and three backends; lbctl sets up a VIP;
real HTTP and UDP clients go through it; a backend is removed, another drained;
the shares, each backend's status, a configuration file's plan and the counters
are printed."""
from __future__ import annotations

import os
import tempfile
from collections import Counter

from netns.lbctl import forget, run_lbctl
from netns.topology import Lab
from netns.traffic import Servers, http_get, udp_request


def lbctl(ns: str, *args: str) -> str:
    print(f"$ ip netns exec {ns} lbctl {' '.join(args)}")
    result = run_lbctl(ns, *args, check=False)
    if result.returncode != 0:
        raise SystemExit(f"demo: lbctl failed: {result.stderr.strip()}")
    if result.stdout.strip():
        print(result.stdout.rstrip())
    return result.stdout


def shares(title: str, counts: Counter) -> None:
    total = sum(counts.values())
    print(f"\n{title}: {total} in all")
    for name, n in sorted(counts.items()):
        print(f"  {name:<4} {n:>5}  {100 * n / total:5.1f}%  {'#' * round(40 * n / total)}")


def show_plan(lab: Lab, http_vip: str, udp_vip: str) -> None:
    """What `lbctl apply --dry-run` says of a file that puts every backend back, b1 twice as heavy."""
    weights = {b.address: 2 if i == 0 else 1 for i, b in enumerate(lab.backends)}
    text = "vips:\n" + "".join(
        f"  - vip: {vip}\n    backends:\n" + "".join(f"      - {{address: {a}:{port}, weight: {w}}}\n"
                                                   for a, w in weights.items())
        for vip, port in ((http_vip, 8080), (udp_vip, 5353)))
    with tempfile.NamedTemporaryFile("w", suffix=".yaml", prefix=f"{lab.prefix}-") as f:
        f.write(text)
        f.flush()
        print(f"$ cat {f.name}\n{text.rstrip()}")
        lbctl(lab.lb_ns, "apply", "-f", f.name, "--dry-run")


def main() -> None:
    requests = int(os.environ.get("DEMO_REQUESTS", "300"))
    with Lab.build(3) as lab:
        print(f"lab {lab.prefix}: client {lab.client.address}, LB in {lab.lb_ns}, "
              f"backends {', '.join(str(b.address) for b in lab.backends)}\n")
        names = {b.ns: f"b{i}" for i, b in enumerate(lab.backends, 1)}
        try:
            lbctl(lab.lb_ns, "attach", *lab.lb_interfaces)
            http_vip, udp_vip = f"{lab.vip(1)}:80/tcp", f"{lab.vip(1)}:53/udp"
            lbctl(lab.lb_ns, "add-vip", http_vip)
            lbctl(lab.lb_ns, "add-vip", udp_vip)
            for b in lab.backends:
                lbctl(lab.lb_ns, "add-backend", http_vip, f"{b.address}:8080")
                lbctl(lab.lb_ns, "add-backend", udp_vip, f"{b.address}:5353")
            lbctl(lab.lb_ns, "list")
            with Servers.running(names):
                http = Counter(http_get(lab.client.ns, str(lab.vip(1)), 80) for _ in range(requests))
                shares(f"HTTP requests to {http_vip}, one new TCP connection each", http)
                udp = Counter(udp_request(lab.client.ns, str(lab.vip(1)), 53, b"q").split(b" ")[0].decode()
                              for _ in range(requests // 5))
                shares(f"UDP requests to {udp_vip}", udp)
                print()
                lbctl(lab.lb_ns, "remove-backend", http_vip, f"{lab.backends[0].address}:8080")
                http = Counter(http_get(lab.client.ns, str(lab.vip(1)), 80) for _ in range(requests // 3))
                shares(f"HTTP after removing b1 from {http_vip}", http)
                print()
                lbctl(lab.lb_ns, "drain", http_vip, f"{lab.backends[1].address}:8080")
                http = Counter(http_get(lab.client.ns, str(lab.vip(1)), 80) for _ in range(requests // 3))
                shares(f"HTTP after draining b2 (weight 0: no new connections)", http)
                print()
                lbctl(lab.lb_ns, "status")
            print()
            show_plan(lab, http_vip, udp_vip)
            print()
            lbctl(lab.lb_ns, "stats")
        finally:
            forget(lab.lb_ns)
    print("\nlab torn down")


if __name__ == "__main__":
    main()
