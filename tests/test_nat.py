"""NAT mode through the lab: real TCP and UDP clients, byte-exact rewritten packets."""
from __future__ import annotations

import socket
from collections import Counter

import pytest
from scapy.layers.inet import ICMP, IP, TCP, UDP
from scapy.layers.l2 import Ether

from lb.flowhash import maglev_slot
from lb.maps import U32, DataPlaneMaps
from netns.nsenter import netlink_in, socket_in
from netns.packets import capture, send_frame
from netns.traffic import NetnsHTTPConnection, Servers, http_get, udp_request
from tests.conftest import add_vip_with_backends, backend_name, lbctl


@pytest.fixture(scope="module")
def http_vip(lab, servers):
    """VIP 198.19.0.1:80/tcp over the three backends' HTTP servers on :8080."""
    vip = add_vip_with_backends(lab, f"{lab.vip(1)}:80/tcp", 8080)
    yield vip
    lbctl(lab)("remove-vip", vip)


def test_http_requests_through_vip_reach_every_backend(lab, http_vip):
    served = Counter(http_get(lab.client.ns, str(lab.vip(1)), 80) for _ in range(30))
    assert set(served) == {backend_name(b.ns) for b in lab.backends}
    assert sum(served.values()) == 30


def test_new_connections_spread_evenly(lab, http_vip):
    served = Counter(http_get(lab.client.ns, str(lab.vip(1)), 80) for _ in range(300))
    for name in (backend_name(b.ns) for b in lab.backends):
        assert 0.25 * 300 <= served[name] <= 0.42 * 300, served


def test_udp_request_response_through_vip(lab, servers):
    vip = add_vip_with_backends(lab, f"{lab.vip(2)}:53/udp", 5353)
    try:
        names = set()
        for i in range(30):
            answer = udp_request(lab.client.ns, str(lab.vip(2)), 53, f"ping {i}".encode())
            name, _, payload = answer.partition(b" ")
            assert payload == f"ping {i}".encode()
            names.add(name.decode())
        assert names == {backend_name(b.ns) for b in lab.backends}
    finally:
        lbctl(lab)("remove-vip", vip)


def test_removed_backend_keeps_established_connections(lab, servers):
    run = lbctl(lab)
    vip = add_vip_with_backends(lab, f"{lab.vip(3)}:80/tcp", 8080)
    conns = [NetnsHTTPConnection(lab.client.ns, str(lab.vip(3)), 80) for _ in range(30)]
    try:
        first = [c.get_text() for c in conns]
        removed = lab.backends[0]
        assert backend_name(removed.ns) in first
        run("remove-backend", vip, f"{removed.address}:8080")

        assert [c.get_text() for c in conns] == first  # same connection, same backend
        fresh = Counter(http_get(lab.client.ns, str(lab.vip(3)), 80) for _ in range(60))
        assert backend_name(removed.ns) not in fresh
        assert set(fresh) == {backend_name(b.ns) for b in lab.backends[1:]}
    finally:
        for c in conns:
            c.close()
        run("remove-vip", vip)


def test_backend_shared_by_two_vips_answers_as_each(lab, servers):
    """The same backend endpoint behind two VIPs: each client's replies come from the VIP it used."""
    vips = [add_vip_with_backends(lab, f"{lab.vip(i)}:80/tcp", 8080) for i in (5, 6)]
    try:
        for i in (5, 6):
            served = Counter(http_get(lab.client.ns, str(lab.vip(i)), 80) for _ in range(30))  # all three: about 1 in 60,000 to miss one
            assert set(served) == {backend_name(b.ns) for b in lab.backends}
    finally:
        for vip in vips:
            lbctl(lab)("remove-vip", vip)


def test_vip_of_every_port_forwards_tcp_and_udp_keeping_the_port(lab, servers):
    vips = [f"{lab.vip(7)}/tcp", f"{lab.vip(7)}/udp"]
    for vip in vips:
        lbctl(lab)("add-vip", vip)
        for b in lab.backends:
            lbctl(lab)("add-backend", vip, str(b.address))
    try:
        served = Counter(http_get(lab.client.ns, str(lab.vip(7)), 8080) for _ in range(30))
        assert set(served) == {backend_name(b.ns) for b in lab.backends}
        answer = udp_request(lab.client.ns, str(lab.vip(7)), 5353, b"any port")
        assert answer.endswith(b" any port")
    finally:
        for vip in vips:
            lbctl(lab)("remove-vip", vip)


def test_session_affinity_keeps_a_client_on_one_backend(lab, servers):
    vip = f"{lab.vip(8)}:80/tcp"
    lbctl(lab)("add-vip", vip, "--hash", "source")
    for b in lab.backends:
        lbctl(lab)("add-backend", vip, f"{b.address}:8080")
    try:
        served = Counter(http_get(lab.client.ns, str(lab.vip(8)), 80) for _ in range(30))
        assert len(served) == 1 and sum(served.values()) == 30
    finally:
        lbctl(lab)("remove-vip", vip)


def test_ipv6_vip_balances_tcp_and_udp_end_to_end(lab, servers):
    lab.resolve_neighbours()
    tcp_vip, udp_vip = f"[{lab.vip6(1)}]:80/tcp", f"[{lab.vip6(1)}]:53/udp"
    for vip, port in ((tcp_vip, 8080), (udp_vip, 5353)):
        lbctl(lab)("add-vip", vip)
        for b in lab.backends:
            lbctl(lab)("add-backend", vip, f"[{b.address6}]:{port}")
    try:
        served = Counter(http_get(lab.client.ns, str(lab.vip6(1)), 80) for _ in range(30))
        assert set(served) == {backend_name(b.ns) for b in lab.backends}
        names = {udp_request(lab.client.ns, str(lab.vip6(1)), 53, f"q{i}".encode()).split(b" ")[0] for i in range(30)}
        assert names == {backend_name(b.ns).encode() for b in lab.backends}
    finally:
        for vip in (tcp_vip, udp_vip):
            lbctl(lab)("remove-vip", vip)


def test_ping_to_a_vip_is_answered_by_the_data_plane(lab, http_vip):
    request = ICMP(type=8, id=0x4C42, seq=7) / b"are you there"
    sock = socket_in(lab.client.ns, socket.AF_INET, socket.SOCK_RAW, socket.IPPROTO_ICMP)
    try:
        sock.settimeout(2)
        before = lbctl(lab)("stats", "--json").json()["reasons"]["tx_icmp_echo"]
        sock.sendto(bytes(request), (str(lab.vip(1)), 0))
        reply = IP(sock.recv(2048))
        assert reply.src == str(lab.vip(1)) and reply[ICMP].type == 0
        assert (reply[ICMP].id, reply[ICMP].seq, bytes(reply[ICMP].payload)) == (0x4C42, 7, b"are you there")
        assert lbctl(lab)("stats", "--json").json()["reasons"]["tx_icmp_echo"] == before + 1
    finally:
        sock.close()


def test_acl_deny_blocks_a_client_prefix_and_removing_it_lets_it_in(lab, servers):
    vip = add_vip_with_backends(lab, f"{lab.vip(9)}:80/tcp", 8080)
    try:
        lbctl(lab)("acl", "add", vip, "198.18.0.0/24", "--deny")
        with pytest.raises(OSError):  # the SYN is dropped: the connection times out
            http_get(lab.client.ns, str(lab.vip(9)), 80, timeout=1)
        assert lbctl(lab)("stats", "--json").json()["reasons"]["drop_acl"] >= 1
        lbctl(lab)("acl", "add", vip, "198.18.0.2/32", "--allow")  # a longer prefix wins
        assert http_get(lab.client.ns, str(lab.vip(9)), 80) in {backend_name(b.ns) for b in lab.backends}
        lbctl(lab)("acl", "remove", vip, "198.18.0.2/32")
        with pytest.raises(OSError):
            http_get(lab.client.ns, str(lab.vip(9)), 80, timeout=1)
    finally:
        lbctl(lab)("remove-vip", vip)


def expected_backend(lab, vip_addr, sport, dport, proto):
    """The backend the data plane must pick: flow hash -> Maglev slot -> backend id -> address."""
    state = lbctl(lab)("list", "--json").json()
    with DataPlaneMaps.open(state["dataplane"]["pin_dir"]) as maps:
        info = next(info for key, info in maps.vips.items() if key.addr.address() == vip_addr)
        slot = maglev_slot(lab.client.address, vip_addr, sport, dport, proto, info.ring_size)
        backend_id = maps.maglev.get(U32(info.ring_base + slot)).value
        backend = maps.backends.get(U32(backend_id))
    address = backend.addr.address()
    return next(b for b in lab.backends if b.address == address), socket.ntohs(backend.port)


def rewritten(frame: bytes) -> bytes:
    """The same frame with checksums recomputed by scapy: equal to the input iff its checksums are right."""
    pkt = Ether(frame)
    del pkt[IP].chksum
    if TCP in pkt:
        del pkt[TCP].chksum
    if UDP in pkt and pkt[UDP].chksum != 0:
        del pkt[UDP].chksum
    return bytes(Ether(bytes(pkt)))


def exchange(sender, receiver, frame, match) -> bytes:
    """Send `frame` from one lab host and return the first matching frame the other receives."""
    with capture(receiver.ns, receiver.ifname) as cap:
        send_frame(sender.ns, sender.ifname, bytes(frame))
        got = cap.next(match)
    assert got is not None, f"nothing matching arrived at {receiver.ns}"
    return got


def assert_frame(got: bytes, want) -> None:
    want_bytes = rewritten(bytes(want))
    assert got == want_bytes, f"\n got {got.hex()}\nwant {want_bytes.hex()}"
    assert got == rewritten(got)  # its checksums are valid


@pytest.mark.parametrize("l4", ["tcp", "udp", "udp-without-checksum"])
def test_packets_rewritten_byte_for_byte(lab, http_vip, l4):
    lab.resolve_neighbours()
    vip = lab.vip(1) if l4 == "tcp" else lab.vip(4)
    if l4 != "tcp":
        add_vip_with_backends(lab, f"{vip}:53/udp", 5353)
    try:
        sport, vport = 41000, (80 if l4 == "tcp" else 53)
        proto = socket.IPPROTO_TCP if l4 == "tcp" else socket.IPPROTO_UDP
        layer = TCP if l4 == "tcp" else UDP
        tcp_fields = {"tcp": dict(flags="S", seq=1234), "udp": {}, "udp-without-checksum": dict(chksum=0)}[l4]
        client = lab.client
        backend, bport = expected_backend(lab, vip, sport, vport, proto)

        request = (Ether(src=client.mac, dst=client.lb_mac) / IP(src=str(client.address), dst=str(vip), ttl=61)
                   / layer(sport=sport, dport=vport, **tcp_fields) / b"hello")
        got = exchange(client, backend, request, lambda f: IP in Ether(f) and Ether(f)[IP].src == str(client.address))
        want = request.copy()
        want[Ether].src, want[Ether].dst = backend.lb_mac, backend.mac
        want[IP].dst = str(backend.address)
        want[layer].dport = bport
        assert_frame(got, want)

        reply_fields = dict(tcp_fields, flags="SA") if l4 == "tcp" else tcp_fields  # the SYN's answer
        reply = (Ether(src=backend.mac, dst=backend.lb_mac) / IP(src=str(backend.address), dst=str(client.address))
                 / layer(sport=bport, dport=sport, **reply_fields) / b"world")
        got = exchange(backend, client, reply, lambda f: IP in Ether(f) and Ether(f)[IP].dst == str(client.address))
        want = reply.copy()
        want[Ether].src, want[Ether].dst = client.lb_mac, client.mac
        want[IP].src = str(vip)
        want[layer].sport = vport
        assert_frame(got, want)
    finally:
        if l4 != "tcp":
            lbctl(lab)("remove-vip", f"{vip}:53/udp")


def test_stats_count_packets_per_vip_backend_and_reason(lab, http_vip):
    before = lbctl(lab)("stats", "--json").json()
    served = Counter(http_get(lab.client.ns, str(lab.vip(1)), 80) for _ in range(10))
    after = lbctl(lab)("stats", "--json").json()

    def vip_row(stats):
        return next(v for v in stats["vips"] if v["vip"] == http_vip)

    b, a = vip_row(before), vip_row(after)
    assert a["new_flows"] - b["new_flows"] == 10
    assert a["packets"] - b["packets"] >= 10 * 5  # SYN, ACK, request, FIN, ACK at least
    assert a["reply_packets"] - b["reply_packets"] >= 10 * 3
    for name, count in served.items():
        addr = next(str(x.address) for x in lab.backends if backend_name(x.ns) == name)
        rb = next(x for x in vip_row(before)["backends"] if x["backend"].startswith(addr))
        ra = next(x for x in vip_row(after)["backends"] if x["backend"].startswith(addr))
        assert ra["new_flows"] - rb["new_flows"] == count
    assert after["reasons"]["fwd_nat"] - before["reasons"]["fwd_nat"] >= 50
    assert after["reasons"]["fwd_reply"] - before["reasons"]["fwd_reply"] >= 30


def test_a_vip_address_drops_what_no_vip_serves_unless_the_operator_passes_it_to_the_host(lab, servers):
    """The LB host holds the VIP address itself and serves HTTP on another port (as it would
    SSH): by default the data plane drops that, as it would reach the host; `lbctl unserved ADDR
    pass` hands it to the host, while the VIP's own port stays balanced."""
    address = lab.vip(6)
    vip = add_vip_with_backends(lab, f"{address}:80/tcp", 8080)
    reasons = lambda: lbctl(lab)("stats", "--json").json()["reasons"]  # noqa: E731
    with netlink_in(lab.lb_ns) as ipr:
        lo = ipr.link_lookup(ifname="lo")[0]
        ipr.addr("add", index=lo, address=str(address), prefixlen=32)
    try:
        with Servers.running({lab.lb_ns: "lb-host"}, http_port=2222, udp_port=2223):
            before = reasons()["drop_unserved"]
            with pytest.raises(OSError):  # the SYN is dropped: the connection times out
                http_get(lab.client.ns, str(address), 2222, timeout=1)
            assert reasons()["drop_unserved"] > before

            assert "passed to this host" in lbctl(lab)("unserved", str(address), "pass").stdout
            before = reasons()["pass_unserved"]
            assert http_get(lab.client.ns, str(address), 2222) == "lb-host"
            assert reasons()["pass_unserved"] > before
            assert http_get(lab.client.ns, str(address), 80) in {backend_name(b.ns) for b in lab.backends}
            assert lbctl(lab)("list", "--json").json()["pass_unserved"] == [str(address)]
            assert f"pass_unserved:\n- {address}" in lbctl(lab)("export").stdout

            lbctl(lab)("unserved", str(address), "drop")
            with pytest.raises(OSError):
                http_get(lab.client.ns, str(address), 2222, timeout=1)
    finally:
        lbctl(lab)("unserved", str(address), "drop")
        lbctl(lab)("remove-vip", vip)
        with netlink_in(lab.lb_ns) as ipr:
            ipr.addr("del", index=lo, address=str(address), prefixlen=32)
