"""Per-packet cost as the number of VIPs and of backends per VIP grows, and the maps' memory.

VIPs and backends are added through the Controller (the code lbctl runs) by
bench/populate.py, one process for many additions, to keep the set-up of 1,000
VIPs short."""
from __future__ import annotations

import socket
import subprocess
import sys

from scapy.layers.inet import IP, TCP
from scapy.layers.l2 import Ether

from bench.perpacket import Case, measure
from lb.maps import DataPlaneMaps
from netns.lbctl import run_lbctl
from netns.nsenter import in_netns
from netns.topology import Lab


def _to(lab: Lab, vip: str) -> bytes:
    c = lab.client
    return bytes(Ether(src=c.mac, dst=c.lb_mac) / IP(src=str(c.address), dst=vip)
                 / TCP(sport=1000, dport=80, flags="A") / (b"x" * 6))


def _paths(lab: Lab, lb_prog: int, vip: str, client_if: int, flow_base: int) -> list[Case]:
    frame = _to(lab, vip)
    return [Case("hit", lb_prog, frame, client_if, "XDP_REDIRECT", "fwd_nat"),
            Case("new_flow", lb_prog, frame, client_if, "XDP_REDIRECT", "fwd_nat", vary=True, flow_base=flow_base)]


def populate(lab: Lab, *args: str) -> None:
    subprocess.run(["ip", "netns", "exec", lab.lb_ns, sys.executable, "-m", "bench.populate", *args], check=True,
                   capture_output=True, timeout=600)


def backends(lab: Lab, lb_prog: int, drop: Case, steps: tuple[int, ...], progress=print) -> dict:
    """Hit and new-flow cost of one VIP as its backends grow in number."""
    with in_netns(lab.lb_ns):
        client_if = socket.if_nametoindex(lab.client.lb_ifname)
    vip, out = "198.19.0.50:80/tcp", {}
    hosts = ",".join(str(b.address) for b in lab.backends)
    for i, target in enumerate(steps):
        populate(lab, "backends", vip, hosts, str(target))
        out[str(target)] = _measure(lab, lb_prog, drop, "198.19.0.50", client_if, 0x3000000 + i * 0x100000)
        progress(f"  {target} backends: " + ", ".join(f"{k} {v:.0f}" for k, v in out[str(target)].items()))
    run_lbctl(lab.lb_ns, "remove-vip", vip)
    return out


def vips(lab: Lab, lb_prog: int, drop: Case, steps: tuple[int, ...], progress=print) -> dict:
    """Hit and new-flow cost of one VIP as the number of VIPs grows."""
    with in_netns(lab.lb_ns):
        client_if = socket.if_nametoindex(lab.client.lb_ifname)
    out = {}
    for i, target in enumerate(steps):
        populate(lab, "vips", str(target))
        out[str(target)] = _measure(lab, lb_prog, drop, str(lab.vip(1)), client_if, 0x5000000 + i * 0x100000)
        progress(f"  {target} VIPs: " + ", ".join(f"{k} {v:.0f}" for k, v in out[str(target)].items()))
    return out


def _measure(lab: Lab, lb_prog: int, drop: Case, vip: str, client_if: int, flow_base: int) -> dict[str, float]:
    with in_netns(lab.lb_ns):
        r = measure(_paths(lab, lb_prog, vip, client_if, flow_base), drop, rounds=3, blocks=10,
                    progress=lambda m: None)
    return {k: r[k]["median_ns"] for k in ("hit", "new_flow")}


def map_memory(pin_dir: str) -> dict[str, int]:
    """Kernel memory charged to each map (fdinfo memlock), in bytes."""
    with DataPlaneMaps.open(pin_dir) as maps:
        sizes = {name: m.memlock() for name, m in maps.maps.items()}
    sizes["total"] = sum(sizes.values())
    return sizes
