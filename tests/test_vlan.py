"""802.1Q: a forwarded frame carries the tagging of its egress link, not the client's.

This kernel has no VLAN devices (CONFIG_VLAN_8021Q unset): the fixture table and the fuzzer take
LB interfaces for VLAN devices through the egress_vlans map (tagged output byte for byte); here,
real tagged frames from a client cross the lab with each hook and reach a backend on an untagged
link untagged, and the control plane's mirror reads VLAN devices as netlink reports them."""
from __future__ import annotations

import socket
from typing import Iterator

import pytest
from pyroute2.netlink.rtnl.ifinfmsg import ifinfmsg
from scapy.layers.inet import IP, UDP
from scapy.layers.l2 import Dot1Q, Ether

from control.routes import vlan_devices
from lb import rtnl
from lb.maps import U32, DataPlaneMaps
from lb.structs import EgressVlan
from netns.packets import capture, send_frame
from netns.topology import Lab
from tests.conftest import lab_with_lb, run_lbctl


def link_message(index: int, name: str, lower: int | None = None, kind: str | None = None,
                 data: list | None = None) -> rtnl.Link:
    """An RTM_NEWLINK message as the kernel would send it (encoded by pyroute2), read by lb/rtnl.py."""
    msg = ifinfmsg()
    msg["index"], msg["family"] = index, 0
    msg["attrs"] = [("IFLA_IFNAME", name)]
    if lower is not None:
        msg["attrs"].append(("IFLA_LINK", lower))
    if kind is not None:
        info = [("IFLA_INFO_KIND", kind)] + ([("IFLA_INFO_DATA", {"attrs": data})] if data else [])
        msg["attrs"].append(("IFLA_LINKINFO", {"attrs": info}))
    msg.encode()
    return rtnl.link_of(bytes(msg.data)[16:])  # after the nlmsghdr


def test_the_mirror_reads_vlan_devices_as_netlink_reports_them():
    links = [
        link_message(2, "eth0"),
        link_message(7, "eth0.100", lower=2, kind="vlan", data=[("IFLA_VLAN_ID", 100), ("IFLA_VLAN_PROTOCOL", 0x8100)]),
        link_message(8, "eth0.200", lower=2, kind="vlan", data=[("IFLA_VLAN_ID", 200), ("IFLA_VLAN_PROTOCOL", 0x88A8)]),
        link_message(9, "veth0", lower=3, kind="veth"),
        link_message(10, "eth1.5", kind="vlan", data=[("IFLA_VLAN_ID", 5)]),  # its lower device in another namespace
    ]

    got = vlan_devices(links)

    assert {i: bytes(v) for i, v in got.items()} == {
        7: bytes(EgressVlan(lower_ifindex=2, proto=socket.htons(0x8100), tci=socket.htons(100))),
        8: bytes(EgressVlan(lower_ifindex=2, proto=socket.htons(0x88A8), tci=socket.htons(200))),
    }


@pytest.fixture(scope="module")
def lab() -> Iterator[Lab]:
    with lab_with_lb(2, attach=False) as lab:
        yield lab


def pin_dir(lab: Lab) -> str:
    return run_lbctl(lab.lb_ns, "list", "--json").json()["dataplane"]["pin_dir"]


def udp_from_client(lab: Lab, dst: str, sport: int, tag: int | None) -> Ether:
    c = lab.client
    frame = Ether(src=c.mac, dst=c.lb_mac)
    if tag is not None:
        frame = frame / Dot1Q(vlan=tag)
    return frame / IP(src=str(c.address), dst=dst, id=1) / UDP(sport=sport, dport=53) / b"tagged?"


@pytest.mark.parametrize("hook", [[], ["--xdp-mode", "native"], ["--hook", "tc"]], ids=["default", "native", "tc"])
def test_a_clients_tagged_frames_reach_a_backend_on_an_untagged_link_untagged(lab: Lab, hook: list[str]):
    run_lbctl(lab.lb_ns, "attach", *lab.lb_interfaces, *hook)
    lab.resolve_neighbours()  # lb sends itself (a packet for an unresolved neighbour goes to the kernel)
    try:
        b1, vip = lab.backends[0], f"{lab.vip(1)}:53/udp"
        run_lbctl(lab.lb_ns, "add-vip", vip)
        run_lbctl(lab.lb_ns, "add-backend", vip, f"{b1.address}:5353")
        # the capture sees tags: a tagged frame lb passes to the kernel shows its tag on the LB's side
        with capture(lab.lb_ns, lab.client.lb_ifname, tags=True) as cap:
            send_frame(lab.client.ns, lab.client.ifname, bytes(udp_from_client(lab, str(b1.address), 41000, 10)))
            seen = cap.next(lambda f: UDP in Ether(f) and Ether(f)[UDP].sport == 41000, timeout=10)
        assert seen is not None and Dot1Q in Ether(seen) and Ether(seen)[Dot1Q].vlan == 10

        for sport, tag in ((41001, 10), (41002, 4094), (41003, None)):
            with capture(b1.ns, b1.ifname, tags=True) as cap:
                send_frame(lab.client.ns, lab.client.ifname, bytes(udp_from_client(lab, str(lab.vip(1)), sport, tag)))
                got = cap.next(lambda f: UDP in Ether(f) and Ether(f)[UDP].sport == sport, timeout=10)
            assert got is not None, f"the datagram of VLAN {tag} did not reach the backend"
            want = (Ether(src=b1.lb_mac, dst=b1.mac) / IP(src=str(lab.client.address), dst=str(b1.address), id=1)
                    / UDP(sport=sport, dport=5353) / b"tagged?")
            assert got.hex() == bytes(want).hex()  # untagged, every checksum right
    finally:
        run_lbctl(lab.lb_ns, "remove-vip", f"{lab.vip(1)}:53/udp", check=False)
        run_lbctl(lab.lb_ns, "detach")


def test_the_mirror_removes_vlan_devices_the_kernel_does_not_have(lab: Lab):
    """Every changing command brings egress_vlans to the kernel's links (the daemon: on every
    netlink notification): an entry of no VLAN device goes."""
    run_lbctl(lab.lb_ns, "attach", *lab.lb_interfaces)
    try:
        with DataPlaneMaps.open(pin_dir(lab)) as maps:
            maps.egress_vlans.set(U32(4242), EgressVlan(lower_ifindex=1, proto=socket.htons(0x8100),
                                                        tci=socket.htons(7)))
            run_lbctl(lab.lb_ns, "add-vip", f"{lab.vip(2)}:53/udp")
            assert list(maps.egress_vlans.keys()) == []
    finally:
        run_lbctl(lab.lb_ns, "remove-vip", f"{lab.vip(2)}:53/udp", check=False)
        run_lbctl(lab.lb_ns, "detach")
