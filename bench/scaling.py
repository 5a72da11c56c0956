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


def run(lab: Lab, lb_prog: int, drop: Case, steps_backends: tuple[int, ...], steps_vips: tuple[int, ...],
        progress=print) -> dict:
    """Call inside the LB's namespace."""
    client_if = socket.if_nametoindex(lab.client.lb_ifname)
    ctl = Controller.open()
    out: dict[str, dict] = {"backends_per_vip": {}, "vips": {}}

    vip = "198.19.0.50:80/tcp"
    ctl.add_vip(vip)
    added = 0
    for i, target in enumerate(steps_backends):
        while added < target:
            host = lab.backends[added % len(lab.backends)]
            ctl.add_backend(vip, f"{host.address}:{9000 + added}")
            added += 1
        r = measure(_paths(lab, lb_prog, "198.19.0.50", client_if, 0x3000000 + i * 0x100000), drop,
                    rounds=3, blocks=10, progress=lambda m: None)
        out["backends_per_vip"][str(target)] = {k: r[k]["median_ns"] for k in ("hit", "new_flow")}
        progress(f"  {target} backends: hit {r['hit']['median_ns']:.0f}, new flow {r['new_flow']['median_ns']:.0f}")

    vips = len(ctl.list()["vips"])
    for i, target in enumerate(steps_vips):
        while vips < target:
            ctl.add_vip(f"198.19.{1 + vips // 250}.{vips % 250 + 1}:80/tcp")
            vips += 1
        r = measure(_paths(lab, lb_prog, str(lab.vip(1)), client_if, 0x5000000 + i * 0x100000), drop,
                    rounds=3, blocks=10, progress=lambda m: None)
        out["vips"][str(vips)] = {k: r[k]["median_ns"] for k in ("hit", "new_flow")}
        progress(f"  {vips} VIPs: hit {r['hit']['median_ns']:.0f}, new flow {r['new_flow']['median_ns']:.0f}")
    return out


def map_memory(pin_dir: str) -> dict[str, int]:
    """Kernel memory charged to each map (fdinfo memlock), in bytes."""
    with DataPlaneMaps.open(pin_dir) as maps:
        sizes = {name: m.memlock() for name, m in maps.maps.items()}
    sizes["total"] = sum(sizes.values())
    return sizes
