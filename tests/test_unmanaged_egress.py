"""Backends behind an interface lb is not attached to: their packets reach them.

The LB namespace's link to b3 carries no lb program, so the kernel's FIB gives the next hop. NAT
and tunnel packets, addressed to their next hop, go to the kernel as they came (to the LB's MAC),
and the kernel forwards them (pass_egress_unmanaged); DSR packets, still addressed to the VIP,
which the kernel would not forward, are sent out of that interface with bpf_redirect
(fwd_egress_unmanaged). dsr and tunnel backends answer the client themselves (here through the
LB host's kernel: their default route)."""
from __future__ import annotations

import subprocess
from typing import Iterator

import pytest
from scapy.layers.inet import IP, TCP
from scapy.layers.l2 import Ether

from netns.packets import capture, send_frame
from netns.topology import Host, Lab
from netns.traffic import Servers, http_get
from tests.conftest import lab_with_lb, run_lbctl

PORT = 8080


@pytest.fixture(scope="module")
def lab() -> Iterator[Lab]:
    """Three backends; lb attached to the client's link and b1's and b2's, not b3's."""
    with lab_with_lb(3, attach=False) as lab:
        run_lbctl(lab.lb_ns, "attach", *lab.lb_interfaces[:3])
        lab.resolve_neighbours()
        b3 = unmanaged(lab)
        run_lbctl(b3.ns, "decap", "attach", "eth0", "--hook", "tc")  # for the tunnel VIP
        try:
            yield lab
        finally:
            run_lbctl(b3.ns, "decap", "detach", "eth0", check=False)


def unmanaged(lab: Lab) -> Host:
    return lab.backends[2]


@pytest.fixture(scope="module")
def servers(lab: Lab) -> Iterator[Servers]:
    with Servers.running({unmanaged(lab).ns: "b3"}, http_port=PORT) as s:
        yield s


def reasons(lab: Lab) -> dict[str, int]:
    return run_lbctl(lab.lb_ns, "stats", "--json").json()["reasons"]


@pytest.mark.parametrize("mode, index, reason", [("dsr", 30, "fwd_egress_unmanaged"),
                                                 ("tunnel", 31, "pass_egress_unmanaged")])
def test_http_reaches_a_backend_behind_an_interface_lb_is_not_attached_to(lab, servers, mode, index, reason):
    b3, address = unmanaged(lab), lab.vip(index)
    vip = f"{address}:{PORT}/tcp"
    lab.hold_vip(b3, address)
    run_lbctl(lab.lb_ns, "add-vip", vip, "--mode", mode)
    run_lbctl(lab.lb_ns, "add-backend", vip, str(b3.address))
    try:
        if mode == "dsr":  # the kernel keeps a DSR backend's MAC resolved, though it never sends to it itself
            shown = subprocess.run(["ip", "netns", "exec", lab.lb_ns, "ip", "neigh", "show", str(b3.address)],
                                   capture_output=True, text=True, check=True, timeout=30).stdout
            assert "managed" in shown, shown
        before = reasons(lab)
        assert [http_get(lab.client.ns, str(address), PORT) for _ in range(5)] == ["b3"] * 5
        after = reasons(lab)
        assert after[reason] >= before[reason] + 5 * 3  # at least handshake, request, close of each
        assert after["drop_neigh_unresolved"] == before["drop_neigh_unresolved"]
    finally:
        run_lbctl(lab.lb_ns, "remove-vip", vip)


def test_nat_packet_reaches_a_backend_behind_an_interface_lb_is_not_attached_to(lab, servers):
    """The kernel forwards the rewritten packet, byte for byte as lb left it but for the hop (MACs,
    TTL). (A NAT backend's replies must cross an interface lb is attached to, to be rewritten back.)"""
    b3, address = unmanaged(lab), lab.vip(32)
    vip = f"{address}:80/tcp"
    run_lbctl(lab.lb_ns, "add-vip", vip)
    run_lbctl(lab.lb_ns, "add-backend", vip, f"{b3.address}:{PORT}")
    try:
        syn = (Ether(src=lab.client.mac, dst=lab.client.lb_mac)
               / IP(src=str(lab.client.address), dst=str(address), ttl=64, id=7)
               / TCP(sport=41234, dport=80, flags="S", seq=1000))
        before = reasons(lab)["pass_egress_unmanaged"]
        with capture(b3.ns, b3.ifname) as cap:
            send_frame(lab.client.ns, lab.client.ifname, bytes(syn))
            got = cap.next(lambda f: TCP in Ether(f) and Ether(f)[TCP].sport == 41234)
        assert got is not None, "the rewritten SYN did not reach the backend"
        want = (Ether(src=b3.lb_mac, dst=b3.mac) / IP(src=str(lab.client.address), dst=str(b3.address), ttl=63, id=7)
                / TCP(sport=41234, dport=PORT, flags="S", seq=1000))
        assert got.hex() == bytes(want).hex()  # every checksum right
        assert reasons(lab)["pass_egress_unmanaged"] == before + 1
    finally:
        run_lbctl(lab.lb_ns, "remove-vip", vip)
