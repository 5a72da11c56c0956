"""Path MTU discovery through the LB: an ICMP "fragmentation needed" / ICMPv6 "packet too big"
about a reply of a flow reaches the flow's backend (NAT: rewritten byte for byte; dsr: unchanged,
to its MAC; tunnel: encapsulated as the flow's packets), and the backend's kernel lowers its
path MTU to the client."""
from __future__ import annotations

import ipaddress
import socket
from typing import Iterator

import pytest
from scapy.layers.inet import ICMP, IP, TCP
from scapy.layers.inet6 import ICMPv6PacketTooBig, IPv6
from scapy.layers.l2 import Ether

from netns.nsenter import netlink_in, write_sysctl
from netns.packets import Capture, capture, send_frame
from netns.topology import Host, Lab
from netns.traffic import NetnsHTTPConnection, Servers, wait_for
from tests.conftest import backend_name, lab_with_lb, lbctl, run_lbctl

FAMILIES = {4: socket.AF_INET, 6: socket.AF_INET6}
LOWERED_MTU = {4: 1200, 6: 1280}  # above the kernels' minimum path MTUs (552, 1280), below the links' 1500


@pytest.fixture(scope="module")
def vips(lab: Lab, servers) -> Iterator[dict[int, str]]:
    """An IPv4 and an IPv6 VIP on port 80 over every backend's HTTP server."""
    lab.resolve_neighbours()
    made = {4: (f"{lab.vip(1)}:80/tcp", lambda b: f"{b.address}:8080"),
            6: (f"[{lab.vip6(1)}]:80/tcp", lambda b: f"[{b.address6}]:8080")}
    for vip, backend in made.values():
        lbctl(lab)("add-vip", vip)
        for b in lab.backends:
            lbctl(lab)("add-backend", vip, backend(b))
    yield {4: str(lab.vip(1)), 6: str(lab.vip6(1))}
    for vip, _ in made.values():
        lbctl(lab)("remove-vip", vip)


def ip_layer(version: int):
    return IP if version == 4 else IPv6


def address(host: Host, version: int) -> str:
    return str(host.address if version == 4 else host.address6)


def reply_segments(cap: Capture, version: int, vip: str, client_port: int, limit: int = 50) -> list:
    """The VIP's segments to the client's port that the capture holds (a bounded drain)."""
    layer, segments = ip_layer(version), []
    for _ in range(limit):
        frame = cap.next(lambda f: layer in Ether(f) and TCP in Ether(f) and Ether(f)[layer].src == vip
                         and Ether(f)[TCP].dport == client_port, timeout=0.3)
        if frame is None:
            break
        segments.append(Ether(frame)[TCP])
    return segments


def next_sequence(segments: list) -> int:
    """The backend's snd_nxt as the client saw it: a quote must carry a sequence number in
    [snd_una, snd_nxt] for the kernel to believe it."""
    return max((s.seq + len(s.payload) + (1 if s.flags & 0x03 else 0)) % 2**32 for s in segments)


def too_big(version: int, mtu: int):
    return ICMP(type=3, code=4, nexthopmtu=mtu) if version == 4 else ICMPv6PacketTooBig(mtu=mtu)


def is_too_big(frame: bytes, version: int) -> bool:
    pkt = Ether(frame)
    return (ICMP in pkt and pkt[ICMP].type == 3) if version == 4 else ICMPv6PacketTooBig in pkt


def route_mtu(ns: str, dst: str, version: int) -> int | None:
    """The path MTU the kernel of `ns` holds for dst (a route exception), None if none."""
    with netlink_in(ns) as ipr:
        route = ipr.route("get", dst=dst, family=FAMILIES[version])[0]
    metrics = route.get_attr("RTA_METRICS")
    return metrics.get_attr("RTAX_MTU") if metrics else None


@pytest.mark.parametrize("version", [4, 6])
def test_too_big_about_a_reply_reaches_the_flows_backend_and_lowers_its_path_mtu(lab, vips, version):
    vip, client, layer, mtu = vips[version], address(lab.client, version), ip_layer(version), LOWERED_MTU[version]
    conn = NetnsHTTPConnection(lab.client.ns, vip, 80)
    try:
        with capture(lab.client.ns, lab.client.ifname) as cap:
            name = conn.get_text()
            client_port = conn.sock.getsockname()[1]
            segments = reply_segments(cap, version, vip, client_port)
        backend = next(b for b in lab.backends if backend_name(b.ns) == name)
        assert route_mtu(backend.ns, client, version) is None
        # The reply's header as the client saw it, with the backend's next sequence number.
        quote = layer(bytes(layer(src=vip, dst=client) / TCP(sport=80, dport=client_port, flags="A",
                                                             seq=next_sequence(segments))))
        error = Ether(src=lab.client.mac, dst=lab.client.lb_mac) / layer(src=client, dst=vip) / too_big(version, mtu) / quote
        before = lbctl(lab)("stats", "--json").json()["reasons"]["fwd_icmp_error"]

        with capture(backend.ns, backend.ifname) as cap:
            send_frame(lab.client.ns, lab.client.ifname, bytes(error))
            got = cap.next(lambda f: is_too_big(f, version))

        assert got is not None, "the error did not reach the flow's backend"
        backend_addr = address(backend, version)
        want = (Ether(src=backend.lb_mac, dst=backend.mac) / layer(src=client, dst=backend_addr) / too_big(version, mtu)
                / layer(src=backend_addr, dst=client)
                / TCP(sport=8080, dport=client_port, flags="A", seq=quote[TCP].seq, chksum=quote[TCP].chksum))
        assert got.hex() == bytes(want).hex()  # outer destination, quoted source, every checksum
        assert lbctl(lab)("stats", "--json").json()["reasons"]["fwd_icmp_error"] == before + 1
        # test-packet names the flow's backend too, and does what the wire showed
        probed = lbctl(lab)("test-packet", bytes(error).hex(), "--ingress", lab.client.lb_ifname, "--json").json()
        want_backend = f"{backend_addr}:8080" if version == 4 else f"[{backend_addr}]:8080"
        assert (probed["reason"], probed["backend"]) == ("fwd_icmp_error", want_backend)
        assert probed["packet_hex"] == bytes(want).hex()
        wait_for(lambda: route_mtu(backend.ns, client, version) == mtu, timeout=5, what="the backend's path MTU")
    finally:
        conn.close()


def test_too_big_about_no_flow_is_dropped_and_counted(lab, vips):
    vip, client = vips[4], str(lab.client.address)
    error = (Ether(src=lab.client.mac, dst=lab.client.lb_mac) / IP(src=client, dst=vip) / too_big(4, 1200)
             / IP(src=vip, dst=client) / TCP(sport=80, dport=1, flags="A"))
    before = lbctl(lab)("stats", "--json").json()["reasons"]["drop_icmp_no_flow"]
    send_frame(lab.client.ns, lab.client.ifname, bytes(error))
    wait_for(lambda: lbctl(lab)("stats", "--json").json()["reasons"]["drop_icmp_no_flow"] == before + 1,
             timeout=5, what="the drop to be counted")


MODE_PORT = 8080  # dsr and tunnel backends listen on the VIP's own port


@pytest.fixture(scope="module")
def direct_lab() -> Iterator[Lab]:
    """Two backends that answer clients over their own links (dsr, tunnel) and decapsulate at TC
    ingress, after the capture point: a backend's wire shows what the LB sent, encapsulation too."""
    with lab_with_lb(2, direct_return=True) as lab:
        lab.resolve_neighbours()
        try:
            for b in lab.backends:
                run_lbctl(b.ns, "decap", "attach", "eth0", "--hook", "tc")
            with Servers.running({b.ns: backend_name(b.ns) for b in lab.backends}, http_port=MODE_PORT):
                yield lab
        finally:
            for b in lab.backends:
                run_lbctl(b.ns, "decap", "detach", "eth0", check=False)


@pytest.fixture(scope="module")
def mode_vips(direct_lab: Lab) -> dict[tuple[str, int], str]:
    """A dsr and a tunnel VIP of each family over both backends, which hold them on their loopbacks."""
    lab, out = direct_lab, {}
    for index, mode in ((20, "dsr"), (21, "tunnel")):
        for version in (4, 6):
            vip = lab.vip(index) if version == 4 else lab.vip6(index)
            endpoint = f"{vip}:{MODE_PORT}/tcp" if version == 4 else f"[{vip}]:{MODE_PORT}/tcp"
            run_lbctl(lab.lb_ns, "add-vip", endpoint, "--mode", mode)
            for b in lab.backends:
                lab.hold_vip(b, vip)
                run_lbctl(lab.lb_ns, "add-backend", endpoint, address(b, version) if version == 4
                          else f"[{address(b, version)}]")
            out[(mode, version)] = str(vip)
    return out


def tunnel_header(version: int, client: str, backend: str):
    """The outer header tunnel mode puts on a packet from `client` without ports (an ICMP error):
    source = the fixed prefix plus the client's low address bits (XOR port 0)."""
    low = int(ipaddress.ip_address(client))
    if version == 4:
        return IP(src=str(ipaddress.ip_address(0xAC100000 | (low & 0xFFFF))), dst=backend, ttl=64, id=0)
    return IPv6(src=str(ipaddress.ip_address((0xFD006C62 << 96) | (low & 0xFFFFFFFF))), dst=backend, hlim=64)


@pytest.mark.parametrize("version", [4, 6])
@pytest.mark.parametrize("mode", ["dsr", "tunnel"])
def test_too_big_reaches_a_dsr_or_tunnel_backend_as_it_came_and_lowers_its_path_mtu(direct_lab, mode_vips,
                                                                                     mode, version):
    lab = direct_lab
    vip, client, layer, mtu = mode_vips[(mode, version)], address(lab.client, version), ip_layer(version), \
        LOWERED_MTU[version]
    conn = NetnsHTTPConnection(lab.client.ns, vip, MODE_PORT)
    backend = None
    try:
        # The backends answer over their own links: the reply segments are there.
        with capture(lab.client.ns, lab.direct_links[0].client_ifname) as direct1, \
                capture(lab.client.ns, lab.direct_links[1].client_ifname) as direct2:
            name = conn.get_text()
            client_port = conn.sock.getsockname()[1]
            segments = [s for cap in (direct1, direct2) for s in reply_segments(cap, version, vip, client_port)]
        backend = next(b for b in lab.backends if backend_name(b.ns) == name)
        assert route_mtu(backend.ns, client, version) is None
        quote = layer(bytes(layer(src=vip, dst=client) / TCP(sport=MODE_PORT, dport=client_port, flags="A",
                                                             seq=next_sequence(segments))))
        error = layer(bytes(layer(src=client, dst=vip) / too_big(version, mtu) / quote))
        before = run_lbctl(lab.lb_ns, "stats", "--json").json()["reasons"]["fwd_icmp_error"]

        with capture(backend.ns, backend.ifname) as cap:
            send_frame(lab.client.ns, lab.client.ifname, bytes(Ether(src=lab.client.mac, dst=lab.client.lb_mac) / error))
            got = cap.next(lambda f: is_too_big(f, version))

        assert got is not None, "the error did not reach the flow's backend"
        sent = error if mode == "dsr" else tunnel_header(version, client, address(backend, version)) / error
        assert got.hex() == bytes(Ether(src=backend.lb_mac, dst=backend.mac) / sent).hex()
        assert run_lbctl(lab.lb_ns, "stats", "--json").json()["reasons"]["fwd_icmp_error"] == before + 1
        probed = run_lbctl(lab.lb_ns, "test-packet", bytes(Ether(src=lab.client.mac, dst=lab.client.lb_mac) / error)
                           .hex(), "--ingress", lab.client.lb_ifname, "--json").json()
        backend_addr = address(backend, version)
        assert (probed["reason"], probed["backend"]) == ("fwd_icmp_error", f"{backend_addr}:{MODE_PORT}"
                                                         if version == 4 else f"[{backend_addr}]:{MODE_PORT}")
        wait_for(lambda: route_mtu(backend.ns, client, version) == mtu, timeout=5, what="the backend's path MTU")
    finally:
        conn.close()
        if backend is not None:  # the next case may pick the same backend: forget the learnt path MTU
            write_sysctl(backend.ns, f"net.ipv{version}.route.flush", "1")
