"""The same data plane at TC ingress (lbctl attach --hook tc): real TCP and UDP through NAT VIPs
(IPv4 and IPv6), their replies, ICMP echo, and a detach that leaves no filter behind. The hosts send
partial checksums (TX offload on, the kernel's default) and the LB computes checksums in software
(its TX offload off): every rewrite must keep a partial checksum right (bpf/csum.h)."""
from __future__ import annotations

import socket
from collections import Counter
from typing import Iterator

import pytest
from scapy.layers.inet import ICMP, IP, UDP
from scapy.layers.l2 import Ether

from lb import loader
from netns.nsenter import in_netns, netlink_in, socket_in
from netns.topology import Lab
from netns.traffic import Servers, http_get, udp_request
from tests.conftest import add_vip_with_backends, backend_name, lab_with_lb, lbctl


@pytest.fixture(scope="module")
def tc_lab() -> Iterator[Lab]:
    with lab_with_lb(3, True, "--hook", "tc", lb_tx_checksum=False) as lab:
        yield lab


@pytest.fixture(scope="module")
def tc_servers(tc_lab: Lab) -> Iterator[Servers]:
    with Servers.running({b.ns: backend_name(b.ns) for b in tc_lab.backends}) as s:
        yield s


def lb_ifindexes(lab: Lab) -> list[int]:
    with netlink_in(lab.lb_ns) as ipr:
        return [ipr.link_lookup(ifname=name)[0] for name in lab.lb_interfaces]


def test_attached_at_tc_ingress_not_xdp(tc_lab):
    listed = lbctl(tc_lab)("list", "--json").json()["dataplane"]
    assert listed["hook"] == "tc" and {i["mode"] for i in listed["interfaces"]} == {"tc"}
    with in_netns(tc_lab.lb_ns):
        for ifindex in lb_ifindexes(tc_lab):
            assert loader.tc_attached(ifindex)
            assert loader.attached_prog_id(ifindex) == 0


def test_tcp_through_a_nat_vip_and_its_replies(tc_lab, tc_servers):
    vip = add_vip_with_backends(tc_lab, f"{tc_lab.vip(1)}:80/tcp", 8080)
    try:
        before = lbctl(tc_lab)("stats", "--json").json()["reasons"]
        served = Counter(http_get(tc_lab.client.ns, str(tc_lab.vip(1)), 80) for _ in range(30))
        assert set(served) == {backend_name(b.ns) for b in tc_lab.backends}
        after = lbctl(tc_lab)("stats", "--json").json()["reasons"]
        # every connection's packets both ways went through the program (at least SYN, request, ACK, FIN)
        assert after["fwd_nat"] - before["fwd_nat"] >= 30 * 3
        assert after["fwd_reply"] - before["fwd_reply"] >= 30 * 3
    finally:
        lbctl(tc_lab)("remove-vip", vip)


def test_udp_and_ipv6_tcp_through_nat_vips(tc_lab, tc_servers):
    udp_vip = add_vip_with_backends(tc_lab, f"{tc_lab.vip(4)}:53/udp", 5353)
    tcp6_vip = f"[{tc_lab.vip6(1)}]:80/tcp"
    lbctl(tc_lab)("add-vip", tcp6_vip)
    for b in tc_lab.backends:
        lbctl(tc_lab)("add-backend", tcp6_vip, f"[{b.address6}]:8080")
    names = {backend_name(b.ns) for b in tc_lab.backends}
    try:
        assert {udp_request(tc_lab.client.ns, str(tc_lab.vip(4)), 53, b"q").decode().split()[0]
                for _ in range(12)} <= names
        assert {http_get(tc_lab.client.ns, str(tc_lab.vip6(1)), 80) for _ in range(12)} <= names
    finally:
        lbctl(tc_lab)("remove-vip", udp_vip)
        lbctl(tc_lab)("remove-vip", tcp6_vip)


def test_lbctl_test_packet_still_probes_under_the_tc_hook(tc_lab):
    vip = f"{tc_lab.vip(3)}:53/udp"
    lbctl(tc_lab)("add-vip", vip)
    lbctl(tc_lab)("add-backend", vip, f"{tc_lab.backends[0].address}:5353")
    try:
        frame = (Ether(src=tc_lab.client.mac, dst=tc_lab.client.lb_mac) / IP(src=str(tc_lab.client.address),
                 dst=str(tc_lab.vip(3))) / UDP(sport=40100, dport=53))
        result = lbctl(tc_lab)("test-packet", "--json", bytes(frame).hex()).json()
        assert (result["reason"], result["backend"]) == ("fwd_nat", f"{tc_lab.backends[0].address}:5353")
    finally:
        lbctl(tc_lab)("remove-vip", vip)


def test_ping_to_a_vip_is_answered_at_tc(tc_lab):
    vip = f"{tc_lab.vip(2)}:80/tcp"
    lbctl(tc_lab)("add-vip", vip)
    sock = socket_in(tc_lab.client.ns, socket.AF_INET, socket.SOCK_RAW, socket.IPPROTO_ICMP)
    try:
        sock.settimeout(2)
        sock.sendto(bytes(ICMP(type=8, id=0x4C42, seq=1) / b"tc"), (str(tc_lab.vip(2)), 0))
        reply = IP(sock.recv(2048))
        assert reply.src == str(tc_lab.vip(2)) and reply[ICMP].type == 0 and bytes(reply[ICMP].payload) == b"tc"
    finally:
        sock.close()
        lbctl(tc_lab)("remove-vip", vip)


def test_detach_leaves_no_filter(tc_lab):
    lbctl(tc_lab)("detach")
    with in_netns(tc_lab.lb_ns):
        for ifindex in lb_ifindexes(tc_lab):
            assert not loader.tc_attached(ifindex)
        with netlink_in(tc_lab.lb_ns) as ipr:
            for ifindex in lb_ifindexes(tc_lab):
                assert [f for parent in (loader.TC_INGRESS, loader.TC_EGRESS)
                        for f in ipr.get_filters(index=ifindex, parent=parent)] == []
                assert "clsact" not in {q.get_attr("TCA_KIND") for q in ipr.get_qdiscs(index=ifindex)}
