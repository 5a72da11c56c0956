"""Forwarding modes through the lab: real TCP connections to dsr and tunnel VIPs, IPv4 and IPv6.

The lab has direct links from each backend to the client (Lab.build direct_return):
dsr and tunnel backends answer the client there, so the LB never sees a reply.
Backend b1 decapsulates with XDP, b2 with the TC fallback."""
from __future__ import annotations

import ipaddress
import os
import socket
from typing import Callable, Iterator

import pytest
from scapy.layers.inet import IP, TCP, UDP
from scapy.layers.inet6 import IPv6
from scapy.layers.l2 import Ether

from netns.packets import capture, send_frame
from netns.topology import Lab
from lb.structs import IPAddress
from netns.nsenter import netlink_in
from netns.traffic import NetnsHTTPConnection, Servers, http_get, wait_for
from tests.conftest import backend_name, lab_with_lb, run_lbctl

PORT = 8080  # dsr and tunnel backends listen on the VIP's own port
HOOKS = {"b1": "xdp", "b2": "tc"}
MAX_CONNECTIONS = 40  # to see both backends answer: missing one after 40 flows has odds 2^-39


@pytest.fixture(scope="module")
def lab() -> Iterator[Lab]:
    with lab_with_lb(2, direct_return=True) as lab:
        lab.resolve_neighbours()
        try:
            for b in lab.backends:
                if HOOKS[backend_name(b.ns)] == "xdp":
                    lab.remove_pass_program(b)
                run_lbctl(b.ns, "decap", "attach", "eth0", "--hook", HOOKS[backend_name(b.ns)])
            yield lab
        finally:
            for b in lab.backends:
                run_lbctl(b.ns, "decap", "detach", "eth0", check=False)


@pytest.fixture(scope="module")
def servers(lab: Lab) -> Iterator[Servers]:
    with Servers.running({b.ns: backend_name(b.ns) for b in lab.backends}, http_port=PORT) as s:
        yield s


def vip_of(lab: Lab, mode: str, family: int) -> IPAddress:
    index = {"dsr": 20, "tunnel": 21}[mode]
    return lab.vip(index) if family == 4 else lab.vip6(index)


def endpoint(address: IPAddress) -> str:
    return f"[{address}]:{PORT}/tcp" if address.version == 6 else f"{address}:{PORT}/tcp"


@pytest.fixture(scope="module")
def vips(lab: Lab) -> dict[tuple[str, int], str]:
    """A VIP of each mode and family, both backends behind it, held on their loopbacks."""
    out = {}
    for mode in ("dsr", "tunnel"):
        for family in (4, 6):
            address = vip_of(lab, mode, family)
            vip = endpoint(address)
            run_lbctl(lab.lb_ns, "add-vip", vip, "--mode", mode)
            for b in lab.backends:
                lab.hold_vip(b, address)
                run_lbctl(lab.lb_ns, "add-backend", vip, str(b.address if family == 4 else f"[{b.address6}]"))
            out[(mode, family)] = vip
    return out


def get_until_both_answer(lab: Lab, address: IPAddress) -> list[tuple[str, int]]:
    """HTTP GETs on new connections until both backends answered; (name, client port) of each."""
    answers: list[tuple[str, int]] = []
    for _ in range(MAX_CONNECTIONS):
        conn = NetnsHTTPConnection(lab.client.ns, str(address), PORT, timeout=5)
        try:
            conn.connect()
            sport = conn.sock.getsockname()[1]
            answers.append((conn.get_text(), sport))
        finally:
            conn.close()
        if {name for name, _ in answers} == {"b1", "b2"}:
            return answers
    raise AssertionError(f"only {sorted({n for n, _ in answers})} answered {MAX_CONNECTIONS} connections")


def from_vip(address: IPAddress) -> Callable[[bytes], bool]:
    """Matches a TCP segment sent from the VIP's port (an answer to the client)."""
    def match(frame: bytes) -> bool:
        pkt = Ether(frame)
        ip = pkt.getlayer(IPv6 if address.version == 6 else IP)
        return ip is not None and ip.src == str(address) and TCP in pkt and pkt[TCP].sport == PORT
    return match


def vip_stats(lab: Lab, vip: str) -> dict:
    return next(v for v in run_lbctl(lab.lb_ns, "stats", "--json").json()["vips"] if v["vip"] == vip)


@pytest.mark.parametrize("family", [4, 6])
@pytest.mark.parametrize("mode", ["dsr", "tunnel"])
def test_connections_to_vip_are_answered_directly_by_every_backend(lab: Lab, servers: Servers, vips, mode, family):
    vip, address = vips[(mode, family)], vip_of(lab, mode, family)
    with capture(lab.client.ns, "eth0") as via_lb, \
            capture(lab.client.ns, lab.direct_links[0].client_ifname) as direct1, \
            capture(lab.client.ns, lab.direct_links[1].client_ifname) as direct2:
        answers = get_until_both_answer(lab, address)

        # The answers came from the VIP over each backend's own link, none through the LB.
        assert direct1.next(from_vip(address)) is not None
        assert direct2.next(from_vip(address)) is not None
        assert via_lb.next(from_vip(address), timeout=0.5) is None
    stats = vip_stats(lab, vip)
    assert stats["packets"] > 0 and stats["new_flows"] >= len(answers)
    assert stats["reply_packets"] == 0


def decap_count(ns: str, family: str) -> int:
    return run_lbctl(ns, "decap", "stats", "--json").json()["packets"][family]


@pytest.mark.parametrize("family", [4, 6])
def test_tunnel_backends_decapsulate_what_the_lb_encapsulated(lab: Lab, servers: Servers, vips, family):
    address = vip_of(lab, "tunnel", family)
    before = {b.ns: decap_count(b.ns, f"ipv{family}") for b in lab.backends}
    b2 = lab.backends[1]
    # b2 decapsulates with TC, after the capture point: its link shows the tunnel packets themselves
    with capture(b2.ns, "eth0") as wire:
        answers = get_until_both_answer(lab, address)
        outer_type = IPv6 if family == 6 else IP
        b2_ports = {sport for name, sport in answers if name == "b2"}

        def tunnelled_syn(frame: bytes) -> bool:
            pkt = Ether(frame)
            return (outer_type in pkt and isinstance(pkt[outer_type].payload, outer_type) and
                    TCP in pkt and pkt[TCP].flags.S and pkt[TCP].sport in b2_ports)
        frame = wire.next(tunnelled_syn)

    assert frame is not None, "no encapsulated SYN seen on b2's link"
    outer = Ether(frame)[outer_type]
    inner = outer.payload
    client = lab.client.address if family == 4 else lab.client.address6
    assert (inner.src, inner.dst, inner[TCP].dport) == (str(client), str(address), PORT)
    assert outer.dst == str(b2.address if family == 4 else b2.address6)
    low = int(client) ^ inner[TCP].sport
    if family == 4:
        assert outer.src == str(ipaddress.ip_address(0xAC100000 | (low & 0xFFFF)))
        assert (outer.ttl, outer.proto, outer.flags.DF) == (64, 4, inner.flags.DF)
        rebuilt = IP(bytes(outer))
        del rebuilt.chksum  # scapy computes it afresh
        assert IP(bytes(rebuilt)).chksum == outer.chksum
    else:
        assert outer.src == str(ipaddress.ip_address((0xFD006C62 << 96) | (low & 0xFFFFFFFF)))
        assert (outer.hlim, outer.nh) == (64, 41)
    for b in lab.backends:  # both hooks counted what they stripped
        assert decap_count(b.ns, f"ipv{family}") > before[b.ns]


def test_decap_stats_show_hooks(lab: Lab):
    listed = run_lbctl(lab.backends[1].ns, "decap", "stats").stdout
    assert "eth0 (tc)" in listed
    assert run_lbctl(lab.backends[0].ns, "decap", "stats", "--json").json()["interfaces"] == {"eth0": "xdp"}


def test_decap_pins_are_root_only(lab: Lab):
    directory = os.path.join("/run/lb/bpffs/lb-decap", lab.backends[0].ns)
    assert {n for n in os.listdir(directory)} >= {"decap_addrs", "decap_vips", "decap_sources", "decap_stats"}
    for path in (os.path.dirname(directory), directory):
        assert os.stat(path).st_mode & 0o777 == 0o700, path
    for name in os.listdir(directory):
        assert os.stat(os.path.join(directory, name)).st_mode & 0o777 == 0o600, name


def test_decap_refuses_to_replace_another_xdp_program(lab: Lab):
    """b2's link carries the lab's own XDP program (its decapsulation is on TC): XDP decap must not replace it."""
    b2 = lab.backends[1]
    run_lbctl(b2.ns, "decap", "detach", "eth0")
    try:
        result = run_lbctl(b2.ns, "decap", "attach", "eth0", check=False)
        assert result.returncode == 2 and "another XDP program" in result.stderr
    finally:
        run_lbctl(b2.ns, "decap", "attach", "eth0", "--hook", "tc")


def test_decap_attach_again_takes_an_address_added_since(lab: Lab, servers: Servers):
    """Decapsulation is for the host's addresses as they were: attaching again takes a new one."""
    b1, address = lab.backends[0], lab.vip(23)
    extra = ipaddress.ip_address(int(b1.address) + 75)  # on b1's link to the LB
    vip = endpoint(address)
    with netlink_in(b1.ns) as ipr:
        ipr.addr("add", index=ipr.link_lookup(ifname="eth0")[0], address=str(extra), prefixlen=24)
    try:
        first = run_lbctl(b1.ns, "decap", "stats", "--json").json()
        again = run_lbctl(b1.ns, "decap", "attach", "eth0", "--json").json()
        assert again["resynced"] and again["hook"] == "xdp"
        assert run_lbctl(b1.ns, "decap", "stats", "--json").json()["interfaces"] == first["interfaces"]
        other_hook = run_lbctl(b1.ns, "decap", "attach", "eth0", "--hook", "tc", check=False)
        assert other_hook.returncode == 2 and "attached with xdp" in other_hook.stderr

        run_lbctl(lab.lb_ns, "add-vip", vip, "--mode", "tunnel")
        lab.hold_vip(b1, address)
        run_lbctl(lab.lb_ns, "add-backend", vip, str(extra))
        assert http_get(lab.client.ns, str(address), PORT) == "b1"  # tunnelled to the new address, decapsulated
    finally:
        run_lbctl(lab.lb_ns, "remove-vip", vip, check=False)
        with netlink_in(b1.ns) as ipr:
            ipr.addr("del", index=ipr.link_lookup(ifname="eth0")[0], address=str(extra), prefixlen=24)


def spoofed_tunnel_frame(backend, family: int, outer_src: str, inner_dst: str) -> bytes:
    """A tunnel packet as anyone on a backend's link can send it: addressed to the backend, carrying
    a UDP datagram from a forged client to inner_dst."""
    if family == 4:
        outer, inner = IP(src=outer_src, dst=str(backend.address)), IP(src="203.0.113.66", dst=inner_dst)
    else:
        outer, inner = IPv6(src=outer_src, dst=str(backend.address6)), IPv6(src="2001:db8:66::66", dst=inner_dst)
    return bytes(Ether(src=backend.lb_mac, dst=backend.mac) / outer / inner / UDP(sport=4444, dport=53) / b"x")


def decap_json(ns: str) -> dict:
    return run_lbctl(ns, "decap", "stats", "--json").json()


@pytest.mark.parametrize("family", [4, 6])
def test_decap_drops_tunnel_packets_for_an_address_that_is_not_a_served_vip(lab: Lab, servers: Servers, vips,
                                                                             family):
    """Unwrapping anything would relay a forged packet past the LB (to the host, or on to other
    networks): only inner destinations this host holds as VIPs are unwrapped. Both hooks."""
    client = lab.client.address if family == 4 else lab.client.address6
    target = str(lab.client.address if family == 4 else lab.client.address6)  # not a VIP
    sent = 5
    for b in lab.backends:
        before = decap_json(b.ns)
        for _ in range(sent):
            send_frame(lab.lb_ns, b.lb_ifname, spoofed_tunnel_frame(b, family, str(client), target))
        assert wait_for(lambda: decap_json(b.ns)["refused"]["not_a_vip"] - before["refused"]["not_a_vip"] >= sent,
                        timeout=10, what=f"{backend_name(b.ns)} to refuse the forged packets")
        after = decap_json(b.ns)
        assert after["packets"][f"ipv{family}"] == before["packets"][f"ipv{family}"]
    # the LB's real tunnel flows to a VIP the backends hold are still unwrapped
    assert {name for name, _ in get_until_both_answer(lab, vip_of(lab, "tunnel", family))} == {"b1", "b2"}


def test_decap_with_source_prefixes_drops_other_outer_sources(lab: Lab, servers: Servers, vips):
    """--source: only tunnel packets from the LB's outer source prefixes are unwrapped, even for a served VIP."""
    b1, address = lab.backends[0], vip_of(lab, "tunnel", 4)
    hook = HOOKS[backend_name(b1.ns)]
    attached = run_lbctl(b1.ns, "decap", "attach", "eth0", "--hook", hook, "--source", "172.16.0.0/16",
                         "--source", "fd00:6c62::/96", "--json").json()
    try:
        assert attached["sources"] == 2 and attached["vips"] >= 2
        before = decap_json(b1.ns)
        send_frame(lab.lb_ns, b1.lb_ifname, spoofed_tunnel_frame(b1, 4, str(lab.client.address), str(address)))
        assert wait_for(lambda: decap_json(b1.ns)["refused"]["source"] > before["refused"]["source"],
                        timeout=10, what="b1 to refuse a tunnel packet from outside the prefixes")
        assert "b1" in {name for name, _ in get_until_both_answer(lab, address)}  # the LB's tunnel still works
        assert decap_json(b1.ns)["packets"]["ipv4"] > before["packets"]["ipv4"]
    finally:
        run_lbctl(b1.ns, "decap", "attach", "eth0", "--hook", hook)  # any source again


def test_decap_attach_refuses_a_bad_vip_or_source_and_changes_nothing(lab: Lab):
    b1 = lab.backends[0]
    before = decap_json(b1.ns)
    for bad in (("--vip", "10.0.0.300"), ("--vip", "0.0.0.0"), ("--source", "10.0.0.1/33")):
        result = run_lbctl(b1.ns, "decap", "attach", "eth0", *bad, check=False)
        assert result.returncode == 2 and result.stderr.count("\n") == 1, result.stderr
    assert decap_json(b1.ns)["interfaces"] == before["interfaces"]


def test_dsr_backend_is_resolved_when_added(lab: Lab, servers: Servers):
    """A DSR packet to an unresolved next hop cannot be forwarded by the kernel (it is addressed to the
    VIP), so add-backend has the kernel resolve the backend's MAC at once."""
    b1, address = lab.backends[0], lab.vip6(22)
    vip = endpoint(address)
    with netlink_in(lab.lb_ns) as ipr:
        ipr.neigh("del", dst=str(b1.address6), ifindex=ipr.link_lookup(ifname=b1.lb_ifname)[0],
                  family=socket.AF_INET6)
    run_lbctl(lab.lb_ns, "add-vip", vip, "--mode", "dsr")
    lab.hold_vip(b1, address)
    run_lbctl(lab.lb_ns, "add-backend", vip, f"[{b1.address6}]")

    assert wait_for(lambda: lb_knows(lab, b1.address6), timeout=5, what="the LB to resolve b1")
    assert http_get(lab.client.ns, str(address), PORT) == "b1"


def test_dsr_backends_are_resolved_again_by_attach(lab: Lab, servers: Servers, vips):
    """A reboot (or a detach) may leave the neighbour table without a DSR backend: attach, which
    restores the VIPs, has the kernel resolve them as add-backend does."""
    b2 = lab.backends[1]
    run_lbctl(lab.lb_ns, "detach")
    with netlink_in(lab.lb_ns) as ipr:
        ipr.neigh("del", dst=str(b2.address6), ifindex=ipr.link_lookup(ifname=b2.lb_ifname)[0],
                  family=socket.AF_INET6)
    assert not lb_knows(lab, b2.address6)
    run_lbctl(lab.lb_ns, "attach", *lab.lb_interfaces)

    assert wait_for(lambda: lb_knows(lab, b2.address6), timeout=5, what="the LB to resolve b2")
    assert {name for name, _ in get_until_both_answer(lab, vip_of(lab, "dsr", 6))} == {"b1", "b2"}


def test_tunnel_packets_to_an_unresolved_backend_are_left_to_the_kernel(lab: Lab, servers: Servers):
    """Unlike DSR's, a tunnel packet is addressed to the backend (its outer header): while the
    backend's MAC is unknown the kernel resolves it and forwards the packet."""
    b1, address = lab.backends[0], lab.vip(24)
    vip = endpoint(address)
    before = run_lbctl(lab.lb_ns, "stats", "--json").json()["reasons"]["pass_neigh_unresolved"]
    run_lbctl(lab.lb_ns, "add-vip", vip, "--mode", "tunnel")
    try:
        lab.hold_vip(b1, address)
        # last before the traffic: b1's own ARP could teach the LB its MAC again meanwhile
        with netlink_in(lab.lb_ns) as ipr:
            ipr.neigh("del", dst=str(b1.address), ifindex=ipr.link_lookup(ifname=b1.lb_ifname)[0])
        run_lbctl(lab.lb_ns, "add-backend", vip, str(b1.address))

        assert http_get(lab.client.ns, str(address), PORT) == "b1"
        assert run_lbctl(lab.lb_ns, "stats", "--json").json()["reasons"]["pass_neigh_unresolved"] > before
    finally:
        run_lbctl(lab.lb_ns, "remove-vip", vip, check=False)


def lb_knows(lab: Lab, address: ipaddress.IPv6Address) -> bool:
    with netlink_in(lab.lb_ns) as ipr:
        return any(n.get_attr("NDA_DST") == str(address) and n.get_attr("NDA_LLADDR")
                   for n in ipr.get_neighbours(family=socket.AF_INET6))


def test_lbctl_test_packet_names_the_backend_of_a_dsr_flow(lab: Lab, vips):
    address = vip_of(lab, "dsr", 4)
    frame = (Ether(src=lab.client.mac, dst=lab.client.lb_mac) /
             IP(src=str(lab.client.address), dst=str(address)) / TCP(sport=40777, dport=PORT, flags="S"))
    result = run_lbctl(lab.lb_ns, "test-packet", "--json", "--ingress", lab.client.lb_ifname,
                       bytes(frame).hex()).json()

    assert (result["action"], result["reason"]) == ("XDP_REDIRECT", "fwd_dsr")
    chosen = next(b for b in lab.backends if result["backend"] == f"{b.address}:{PORT}")
    assert result["packet_hex"] == bytes(Ether(src=chosen.lb_mac, dst=chosen.mac) / frame[IP]).hex()
