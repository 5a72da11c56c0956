"""Run packets through the loaded BPF program and the reference model side by side."""
from __future__ import annotations

import contextlib
import socket
import tomllib
from dataclasses import dataclass
from pathlib import Path
from typing import Iterator

from scapy.compat import raw
from scapy.layers.inet import ICMP, IP, TCP, UDP, IPOption_NOP
from scapy.layers.inet6 import (ICMPv6EchoReply, ICMPv6EchoRequest, ICMPv6ND_NS, ICMPv6PacketTooBig, IPv6,
                                IPv6ExtHdrFragment, IPv6ExtHdrHopByHop)
from scapy.layers.l2 import ARP, Dot1Q, Ether
from scapy.packet import Raw

from lb import loader
from lb.maps import U32, DataPlaneMaps
from lb.probe import Probe, probe
from lb.refmodel import DataPlaneModel, ModelResult, Tables, kernel_fib
from lb.structs import EgressVlan
from netns.nsenter import in_netns, netlink_in
from netns.topology import Lab
from tests.conftest import lab_with_lb, run_lbctl

FIXTURES = Path(__file__).parent / "fixtures" / "packets.toml"


def load_fixtures() -> dict:
    with open(FIXTURES, "rb") as f:
        return tomllib.load(f)


def expression_names(lab: Lab) -> dict:
    """What a fixture's scapy expression may name."""
    b1, b2, b3 = lab.backends[:3]
    return {
        "Ether": Ether, "Dot1Q": Dot1Q, "ARP": ARP, "IP": IP, "IPOption_NOP": IPOption_NOP, "IPv6": IPv6,
        "TCP": TCP, "UDP": UDP, "ICMP": ICMP, "Raw": Raw, "raw": raw,
        "IPv6ExtHdrFragment": IPv6ExtHdrFragment, "IPv6ExtHdrHopByHop": IPv6ExtHdrHopByHop,
        "ICMPv6EchoRequest": ICMPv6EchoRequest, "ICMPv6EchoReply": ICMPv6EchoReply, "ICMPv6ND_NS": ICMPv6ND_NS,
        "ICMPv6PacketTooBig": ICMPv6PacketTooBig,
        "CLIENT6": str(lab.client.address6), "B1_6": str(b1.address6),
        **{f"VIP6_{i}": str(lab.vip6(i)) for i in range(1, 4)},
        "CLIENT": str(lab.client.address), "B1": str(b1.address), "B2": str(b2.address), "LB_B1": str(b1.lb_address),
        "LB_B1_6": str(b1.lb_address6), "LB_B2": str(b2.lb_address),
        **{f"VIP{i}": str(lab.vip(i)) for i in range(1, 10)},
        "CLIENT_MAC": lab.client.mac, "B1_MAC": b1.mac, "LB_CLIENT_MAC": lab.client.lb_mac, "LB_B1_MAC": b1.lb_mac,
        "B2_MAC": b2.mac, "LB_B2_MAC": b2.lb_mac, "B3": str(b3.address), "B3_MAC": b3.mac, "LB_B3_MAC": b3.lb_mac,
    }


def evaluate(expression: str, names: dict) -> bytes:
    return bytes(eval(expression, {"__builtins__": {}}, names))  # fixtures are the project's own data


@dataclass
class Harness:
    lab: Lab
    prog_fd: int
    maps: DataPlaneMaps
    model: DataPlaneModel
    ifindex: dict[str, int]  # "client", "b1", ... -> the LB's interface

    ring_size: int
    vlans: dict[str, list] | None = None  # made-up VLAN devices: see set_egress_vlans

    def resnapshot(self) -> None:
        """The model takes the maps as the control plane left them (after a change between packets)."""
        self.set_egress_vlans(self.vlans)

    def set_egress_vlans(self, vlans: dict[str, list] | None) -> None:
        """Have the data plane and the model take LB interfaces for VLAN devices (this kernel has no
        VLAN devices to mirror): {"b3": ["b1", 300]} makes b3's interface a VLAN device, id 300,
        on b1's; a third item 0x88a8 makes it 802.1ad. None or {}: none. Kept across resnapshot()
        (the control plane's mirror, run by every change, would remove them)."""
        self.vlans = vlans
        for key in list(self.maps.egress_vlans.keys()):
            self.maps.egress_vlans.delete(key)
        for egress, (lower, vid, *proto) in (vlans or {}).items():
            self.maps.egress_vlans.set(U32(self.ifindex[egress]), EgressVlan(
                lower_ifindex=self.ifindex[lower], proto=socket.htons(proto[0] if proto else 0x8100),
                tci=socket.htons(vid)))
        self.model.t = Tables.snapshot(self.maps, self.ring_size)

    def forget_evicted(self) -> int:
        """The model forgets the flows the program's LRU table evicted (which ones is the kernel's
        choice, not the data plane's: the model takes it as given); returns how many."""
        kept = {(bytes(k.src), bytes(k.dst), socket.ntohs(k.sport), socket.ntohs(k.dport), k.proto)
                for k in self.maps.conn_table.keys()}
        gone = [k for k in self.model.t.conn if k not in kept]
        for k in gone:
            del self.model.t.conn[k]
        return len(gone)

    def run(self, frame: bytes, ingress: str) -> tuple[Probe, ModelResult]:
        ifindex = self.ifindex[ingress]
        expected = self.model.process(frame, ifindex)
        with in_netns(self.lab.lb_ns):
            actual = probe(self.prog_fd, frame, ifindex)
        return actual, expected


@contextlib.contextmanager
def configured_harness(config: dict, conn_table_size: int = 262144) -> Iterator[Harness]:
    """A lab with three backends, the data plane attached to the client's and the first two's
    links (b3 is behind an interface lb is not attached to) and `config` ([config] of the
    fixtures) applied."""
    with lab_with_lb(3, False) as lab:
        run_lbctl(lab.lb_ns, "attach", *lab.lb_interfaces[:3], "--conn-table-size", str(conn_table_size))
        lab.resolve_neighbours()  # so the route mirror knows every host, as after real traffic
        lab.pin_neighbours()  # and keeps knowing them through a long run (the fixtures expect resolved MACs)
        if "snat_ports" in config:  # full NAT's source ports ([config] snat_ports = "FIRST-LAST")
            run_lbctl(lab.lb_ns, "snat", "ports", config["snat_ports"])
        for v in config["vips"]:
            sources = [arg for address in v.get("snat", []) for arg in ("--snat", address)]
            run_lbctl(lab.lb_ns, "add-vip", v["vip"], "--hash", v.get("hash", "flow"), "--mode", v.get("mode", "nat"),
                      *sources)
            for b in v["backends"]:
                run_lbctl(lab.lb_ns, "add-backend", v["vip"], b)
            for prefix, action in v.get("acl", {}).items():
                run_lbctl(lab.lb_ns, "acl", "add", v["vip"], prefix, f"--{action}")
        for address in config.get("pass_unserved", []):
            run_lbctl(lab.lb_ns, "unserved", address, "pass")
        listed = run_lbctl(lab.lb_ns, "list", "--json").json()["dataplane"]
        prog_fd = loader.pinned_program(listed["pin_dir"])
        with DataPlaneMaps.open(listed["pin_dir"]) as maps, netlink_in(lab.lb_ns) as ipr:
            ifindex = {"client": ipr.link_lookup(ifname=lab.client.lb_ifname)[0]}
            ifindex.update({b.ns.rsplit("-", 1)[1]: ipr.link_lookup(ifname=b.lb_ifname)[0] for b in lab.backends})
            model = DataPlaneModel(Tables.snapshot(maps, listed["ring_size"]), kernel_fib(ipr))
            try:
                yield Harness(lab, prog_fd, maps, model, ifindex, listed["ring_size"])
            finally:
                import os
                os.close(prog_fd)


def disagreement(frame: bytes, actual: Probe, expected: ModelResult) -> str:
    """A report with the packet as a scapy expression, ready for the fixture table."""
    return (f"program and model disagree on\n  packet = \"{Ether(frame).command()}\"\n"
            f"  program: {actual.action} {actual.reason} {actual.packet.hex()}\n"
            f"  model:   {expected.action} {expected.reason} {expected.packet.hex()}")


def agree(actual: Probe, expected: ModelResult) -> bool:
    return (actual.action, actual.packet, actual.reason, actual.backend) == \
        (expected.action, expected.packet, expected.reason, expected.backend)
