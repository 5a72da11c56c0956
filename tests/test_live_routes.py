"""The route and neighbour mirror follows the kernel: cached next hops (a backend's, a flow's)
are resolved again after the kernel's routes or neighbours change. With the daemon that happens
on netlink notifications, with no lbctl command; without it, on each changing command."""
from __future__ import annotations

import subprocess
from typing import Iterator

import pytest
from scapy.layers.inet import IP, UDP
from scapy.layers.l2 import Ether

from netns.lbctl import DaemonProcess
from netns.topology import Lab
from netns.traffic import wait_for
from tests.conftest import lab_with_lb, run_lbctl

MOVED_MAC = "02:00:00:00:ee:01"  # where the backend's address "moves" to (as a failed-over host would)


@pytest.fixture(scope="module")
def lab() -> Iterator[Lab]:
    with lab_with_lb(1) as lab:
        lab.resolve_neighbours()
        yield lab


@pytest.fixture
def vip(lab: Lab) -> Iterator[str]:
    vip = f"{lab.vip(1)}:53/udp"
    run_lbctl(lab.lb_ns, "add-vip", vip)
    run_lbctl(lab.lb_ns, "add-backend", vip, f"{lab.backends[0].address}:5353")
    try:
        yield vip
    finally:
        neighbour(lab, lab.backends[0].mac, "reachable")
        run_lbctl(lab.lb_ns, "remove-vip", vip)


def neighbour(lab: Lab, mac: str, state: str) -> None:
    b1 = lab.backends[0]
    subprocess.run(["ip", "netns", "exec", lab.lb_ns, "ip", "neigh", "replace", str(b1.address), "lladdr", mac,
                    "dev", b1.lb_ifname, "nud", state], check=True, timeout=30)


def next_hop_mac(lab: Lab, client_port: int) -> str:
    """The destination MAC the loaded program gives a client's packet (it opens or follows the flow)."""
    frame = (Ether(src=lab.client.mac, dst=lab.client.lb_mac) / IP(src=str(lab.client.address), dst=str(lab.vip(1)))
             / UDP(sport=client_port, dport=53) / b"x")
    result = run_lbctl(lab.lb_ns, "test-packet", bytes(frame).hex(), "--ingress", lab.client.lb_ifname, "--json")
    assert result.json()["reason"] == "fwd_nat", result.stdout
    return Ether(bytes.fromhex(result.json()["packet_hex"])).dst


def test_with_the_daemon_a_neighbours_new_mac_reaches_established_and_new_flows(lab, vip, tmp_path):
    assert next_hop_mac(lab, 40001) == lab.backends[0].mac  # the flow caches its next hop
    daemon = DaemonProcess(lab.lb_ns, str(tmp_path / "daemon.log"), ()).start()
    try:
        neighbour(lab, MOVED_MAC, "permanent")
        wait_for(lambda: next_hop_mac(lab, 40001) == MOVED_MAC, timeout=15, interval=0.5,
                 what="the established flow to follow the new MAC")
        assert next_hop_mac(lab, 40002) == MOVED_MAC  # a new flow (the backend's cache) too
        assert daemon.events("route mirror refreshed")
    finally:
        daemon.stop()


def test_without_a_daemon_a_changing_command_refreshes_the_mirror(lab, vip):
    assert next_hop_mac(lab, 40011) == lab.backends[0].mac
    neighbour(lab, MOVED_MAC, "permanent")
    assert next_hop_mac(lab, 40011) == lab.backends[0].mac  # nothing has looked at the kernel yet
    run_lbctl(lab.lb_ns, "set-weight", vip, f"{lab.backends[0].address}:5353", "2")
    assert next_hop_mac(lab, 40011) == MOVED_MAC


def test_a_blackhole_route_is_left_to_the_kernel_fib_not_covered_by_a_mirrored_neighbour(lab, vip):
    b1 = lab.backends[0]
    assert next_hop_mac(lab, 40021) == b1.mac
    subprocess.run(["ip", "netns", "exec", lab.lb_ns, "ip", "route", "add", "blackhole", f"{b1.address}/32"],
                   check=True, timeout=30)
    try:
        run_lbctl(lab.lb_ns, "set-weight", vip, f"{b1.address}:5353", "3")  # refreshes the mirror
        frame = (Ether(src=lab.client.mac, dst=lab.client.lb_mac)
                 / IP(src=str(lab.client.address), dst=str(lab.vip(1))) / UDP(sport=40021, dport=53) / b"x")
        result = run_lbctl(lab.lb_ns, "test-packet", bytes(frame).hex(), "--ingress", lab.client.lb_ifname,
                           "--json").json()
        assert (result["action"], result["reason"]) == ("XDP_DROP", "drop_no_route")
    finally:
        subprocess.run(["ip", "netns", "exec", lab.lb_ns, "ip", "route", "del", "blackhole", f"{b1.address}/32"],
                       check=False, timeout=30)
