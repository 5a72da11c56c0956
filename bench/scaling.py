"""Per-packet cost as the number of VIPs and of backends per VIP grows, and the maps' memory.

VIPs and backends are added through the Controller (the code lbctl runs),
in-process in the LB's namespace, to keep the set-up of 1,000 VIPs short."""
from __future__ import annotations

import socket

from scapy.layers.inet import IP, TCP
from scapy.layers.l2 import Ether

from bench.perpacket import Case, measure
from control.service import Controller
from lb.maps import DataPlaneMaps
from netns.topology import Lab


def _to(lab: Lab, vip: str) -> bytes:
    c = lab.client
    return bytes(Ether(src=c.mac, dst=c.lb_mac) / IP(src=str(c.address), dst=vip)
                 / TCP(sport=1000, dport=80, flags="A") / (b"x" * 6))


def _paths(lab: Lab, lb_prog: int, vip: str, client_if: int, flow_base: int) -> list[Case]:
    frame = _to(lab, vip)
    return [Case("hit", lb_prog, frame, client_if, "XDP_REDIRECT", "fwd_nat"),
            Case("new_flow", lb_prog, frame, client_if, "XDP_REDIRECT", "fwd_nat", vary=True, flow_base=flow_base)]


def backends(lab: Lab, lb_prog: int, drop: Case, steps: tuple[int, ...], progress=print) -> dict:
    """Hit and new-flow cost of one VIP as its backends grow in number. Call inside the LB's namespace."""
    client_if = socket.if_nametoindex(lab.client.lb_ifname)
    ctl = Controller.open()
    vip = "198.19.0.50:80/tcp"
    ctl.add_vip(vip)
    out, added = {}, 0
    for i, target in enumerate(steps):
        while added < target:  # same hosts, new ports: every backend has a resolved next hop
            host = lab.backends[added % len(lab.backends)]
            ctl.add_backend(vip, f"{host.address}:{9000 + added}")
            added += 1
        out[str(target)] = _measure(lab, lb_prog, drop, "198.19.0.50", client_if, 0x3000000 + i * 0x100000)
        progress(f"  {target} backends: " + ", ".join(f"{k} {v:.0f}" for k, v in out[str(target)].items()))
    ctl.remove_vip(vip)
    return out


def vips(lab: Lab, lb_prog: int, drop: Case, steps: tuple[int, ...], progress=print) -> dict:
    """Hit and new-flow cost of one VIP as the number of VIPs grows. Call inside the LB's namespace."""
    client_if = socket.if_nametoindex(lab.client.lb_ifname)
    ctl = Controller.open()
    count, out = len(ctl.list()["vips"]), {}
    for i, target in enumerate(steps):
        while count < target:
            ctl.add_vip(f"198.19.{1 + count // 250}.{count % 250 + 1}:80/tcp")
            count += 1
        out[str(count)] = _measure(lab, lb_prog, drop, str(lab.vip(1)), client_if, 0x5000000 + i * 0x100000)
        progress(f"  {count} VIPs: " + ", ".join(f"{k} {v:.0f}" for k, v in out[str(count)].items()))
    return out


def _measure(lab: Lab, lb_prog: int, drop: Case, vip: str, client_if: int, flow_base: int) -> dict[str, float]:
    r = measure(_paths(lab, lb_prog, vip, client_if, flow_base), drop, rounds=3, blocks=10, progress=lambda m: None)
    return {k: r[k]["median_ns"] for k in ("hit", "new_flow")}


def map_memory(pin_dir: str) -> dict[str, int]:
    """Kernel memory charged to each map (fdinfo memlock), in bytes."""
    with DataPlaneMaps.open(pin_dir) as maps:
        sizes = {name: m.memlock() for name, m in maps.maps.items()}
    sizes["total"] = sum(sizes.values())
    return sizes
