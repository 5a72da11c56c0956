"""Full NAT through the lab: backends whose routes do not lead back through the LB.

One lab for the module: the lab's backends lose their default routes and keep only their own
link and a route to the LB's source address (198.18.250.1 on the LB's loopback), so a reply
to a client can only come back through the LB if the LB rewrote the source. Real TCP (HTTP)
and UDP clients; two VIPs sharing a backend endpoint; a backend calling its own VIP; a pool
too small for the flows."""
from __future__ import annotations

import contextlib
import socket
from collections import Counter
from typing import Iterator

import pytest

from lb.maps import U32, DataPlaneMaps
from netns.lbctl import lab_with_lb, run_lbctl
from netns.nsenter import netlink_in, socket_in
from netns.topology import Lab
from netns.traffic import NetnsHTTPConnection, Servers, http_get, udp_request
from tests.conftest import backend_name

SOURCE = "198.18.250.1"  # full NAT's source address: the LB's own, on its loopback


@pytest.fixture(scope="module")
def lab() -> Iterator[Lab]:
    with lab_with_lb(3) as lab:
        with netlink_in(lab.lb_ns) as ipr:
            ipr.addr("add", index=ipr.link_lookup(ifname="lo")[0], address=SOURCE, prefixlen=32)
        for b in lab.backends:
            with netlink_in(b.ns) as ipr:  # no way to the client but through the LB's rewrite
                ipr.route("del", dst="default", gateway=str(b.lb_address))
                ipr.route("del", dst="::/0", gateway=str(b.lb_address6), family=socket.AF_INET6)
                ipr.route("add", dst=f"{SOURCE}/32", gateway=str(b.lb_address))
        run_lbctl(lab.lb_ns, "snat", "add", SOURCE)
        yield lab


@pytest.fixture(scope="module")
def servers(lab: Lab) -> Iterator[Servers]:
    with Servers.running({b.ns: backend_name(b.ns) for b in lab.backends}) as s:
        yield s


@contextlib.contextmanager
def fullnat_vip(lab: Lab, vip: str, port: int, backends=None, *options: str) -> Iterator[str]:
    run_lbctl(lab.lb_ns, "add-vip", vip, "--mode", "fullnat", *options)
    try:
        for b in backends if backends is not None else lab.backends:
            run_lbctl(lab.lb_ns, "add-backend", vip, f"{b.address}:{port}")
        yield vip
    finally:
        run_lbctl(lab.lb_ns, "remove-vip", vip)


def reasons(lab: Lab) -> dict[str, int]:
    return run_lbctl(lab.lb_ns, "stats", "--json").json()["reasons"]


def test_backends_cannot_reach_the_client_without_the_lb(lab, servers):
    """The premise: plain NAT to these backends fails (their replies have no route to the client)."""
    run_lbctl(lab.lb_ns, "add-vip", f"{lab.vip(9)}:80/tcp")
    try:
        run_lbctl(lab.lb_ns, "add-backend", f"{lab.vip(9)}:80/tcp", f"{lab.backends[0].address}:8080")
        with pytest.raises(OSError):
            http_get(lab.client.ns, str(lab.vip(9)), 80, timeout=1.5)
    finally:
        run_lbctl(lab.lb_ns, "remove-vip", f"{lab.vip(9)}:80/tcp")


def test_http_through_a_fullnat_vip_reaches_every_backend(lab, servers):
    with fullnat_vip(lab, f"{lab.vip(1)}:80/tcp", 8080):
        served = Counter(http_get(lab.client.ns, str(lab.vip(1)), 80) for _ in range(30))
    assert set(served) == {backend_name(b.ns) for b in lab.backends}
    assert sum(served.values()) == 30


def test_udp_through_a_fullnat_vip(lab, servers):
    with fullnat_vip(lab, f"{lab.vip(2)}:53/udp", 5353):
        names = set()
        for i in range(30):
            name, _, payload = udp_request(lab.client.ns, str(lab.vip(2)), 53, f"ping {i}".encode()).partition(b" ")
            assert payload == f"ping {i}".encode()
            names.add(name.decode())
    assert names == {backend_name(b.ns) for b in lab.backends}


def test_backends_see_the_lbs_address_not_the_clients(lab, servers):
    """What a backend's socket sees as its peer: the source address, and a port the LB chose."""
    b1 = lab.backends[0]
    with fullnat_vip(lab, f"{lab.vip(3)}:7000/tcp", 7000, [b1]):
        listener = socket_in(b1.ns, socket.AF_INET, socket.SOCK_STREAM)
        try:
            listener.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
            listener.bind(("0.0.0.0", 7000))
            listener.listen(4)
            listener.settimeout(5)
            client = socket_in(lab.client.ns, socket.AF_INET, socket.SOCK_STREAM)
            try:
                client.settimeout(5)
                client.connect((str(lab.vip(3)), 7000))
                conn, peer = listener.accept()
                with conn:
                    conn.sendall(b"hello")
                    assert client.recv(16) == b"hello"
                    assert client.getpeername() == (str(lab.vip(3)), 7000)
                    assert peer[0] == SOURCE
                    assert 1024 <= peer[1] <= 65535
            finally:
                client.close()
        finally:
            listener.close()


def _bound_client(lab: Lab, port: int, kind: int) -> socket.socket:
    sock = socket_in(lab.client.ns, socket.AF_INET, kind)
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    sock.bind((str(lab.client.address), port))
    sock.settimeout(5)
    return sock


def _response(tcp: socket.socket, limit: int = 65536) -> bytes:
    """An HTTP response as it arrives (headers and body may come in separate segments), until its
    Content-Length is complete or the server closes; bounded by the socket's timeout and `limit`."""
    data = b""
    while len(data) < limit:
        head, sep, body = data.partition(b"\r\n\r\n")
        if sep:
            length = next((int(line.split(b":", 1)[1]) for line in head.split(b"\r\n")
                           if line.lower().startswith(b"content-length:")), None)
            if length is not None and len(body) >= length:
                return data
        chunk = tcp.recv(4096)
        if not chunk:
            return data
        data += chunk
    return data


def test_two_vips_sharing_a_backend_endpoint_one_client_port_to_both(lab, servers):
    """One client ip:port talks to two VIPs whose only backend is the same endpoint: the backend sees
    two source ports, and each conversation's replies come from the VIP it used."""
    b1 = lab.backends[0]
    vips = (lab.vip(4), lab.vip(5))
    with fullnat_vip(lab, f"{vips[0]}:53/udp", 5353, [b1]), fullnat_vip(lab, f"{vips[1]}:53/udp", 5353, [b1]), \
            fullnat_vip(lab, f"{vips[0]}:80/tcp", 8080, [b1]), fullnat_vip(lab, f"{vips[1]}:80/tcp", 8080, [b1]):
        udp = _bound_client(lab, 45000, socket.SOCK_DGRAM)
        try:
            for round_ in range(5):
                for vip in vips:
                    udp.sendto(f"to {vip} {round_}".encode(), (str(vip), 53))
                answers = {}
                for _ in vips:
                    data, peer = udp.recvfrom(2048)
                    answers[peer] = data
                assert answers == {(str(vip), 53): f"b1 to {vip} {round_}".encode() for vip in vips}
        finally:
            udp.close()
        conns = []
        try:
            for vip in vips:
                tcp = _bound_client(lab, 45001, socket.SOCK_STREAM)
                conns.append(tcp)
                tcp.connect((str(vip), 80))
            for tcp, vip in zip(conns, vips):
                assert tcp.getpeername() == (str(vip), 80)
                tcp.sendall(f"GET / HTTP/1.1\r\nHost: {vip}\r\n\r\n".encode())
            for tcp in conns:
                assert _response(tcp).endswith(b"b1")
        finally:
            for tcp in conns:
                tcp.close()


def test_a_backend_connects_to_its_own_vip_and_is_balanced(lab, servers):
    """Hairpin: b1 calls the VIP it serves; the LB sends it to any backend, b1 itself included."""
    b1 = lab.backends[0]
    with netlink_in(b1.ns) as ipr:
        ipr.route("add", dst=f"{lab.vip(6)}/32", gateway=str(b1.lb_address))
    try:
        with fullnat_vip(lab, f"{lab.vip(6)}:80/tcp", 8080):
            served = Counter(http_get(b1.ns, str(lab.vip(6)), 80) for _ in range(30))
        assert set(served) == {backend_name(b.ns) for b in lab.backends}, served
    finally:
        with netlink_in(b1.ns) as ipr:
            ipr.route("del", dst=f"{lab.vip(6)}/32", gateway=str(b1.lb_address))


def test_a_pool_too_small_drops_and_counts_new_flows_and_leaves_the_others_alone(lab, servers):
    """Four source ports for one backend endpoint: four connections hold them; a fifth is dropped
    and counted (never sent with a port in use); the four keep working, as does a VIP with another
    backend; once the four close and age out, their ports serve new flows again."""
    b1, b2 = lab.backends[:2]
    run_lbctl(lab.lb_ns, "snat", "ports", "40000-40003")
    try:
        with fullnat_vip(lab, f"{lab.vip(7)}:80/tcp", 8080, [b1]), fullnat_vip(lab, f"{lab.vip(8)}:80/tcp", 8080, [b2]):
            held = [NetnsHTTPConnection(lab.client.ns, str(lab.vip(7)), 80, timeout=3) for _ in range(4)]
            try:
                assert [c.get_text() for c in held] == ["b1"] * 4
                before = reasons(lab)["drop_snat_exhausted"]
                with pytest.raises(OSError):
                    http_get(lab.client.ns, str(lab.vip(7)), 80, timeout=1.5)
                assert reasons(lab)["drop_snat_exhausted"] > before
                assert [c.get_text() for c in held] == ["b1"] * 4  # the four go on
                assert http_get(lab.client.ns, str(lab.vip(8)), 80) == "b2"  # another endpoint has its own ports
            finally:
                for c in held:
                    c.close()
            _advance_clock(lab, 11)  # past the closing timeout (10 s) of the four closed connections
            assert http_get(lab.client.ns, str(lab.vip(7)), 80) == "b1"
    finally:
        run_lbctl(lab.lb_ns, "snat", "ports", "1024-65535")


def _advance_clock(lab: Lab, ticks: int) -> None:
    """Move the data plane's clock (lb_config.clock_offset, ticks of 1.07 s), as tests may."""
    pin_dir = run_lbctl(lab.lb_ns, "list", "--json").json()["dataplane"]["pin_dir"]
    with DataPlaneMaps.open(pin_dir) as maps:
        config = maps.lb_config.get(U32(0))
        config.clock_offset = (config.clock_offset + ticks) & 0xFFFFFFFF
        maps.lb_config.set(U32(0), config)


def test_source_addresses_must_be_the_lbs_own(lab):
    result = run_lbctl(lab.lb_ns, "snat", "add", "192.0.2.77", check=False)
    assert result.returncode == 2
    assert "not an address of this host" in result.stderr
    assert "192.0.2.77" not in run_lbctl(lab.lb_ns, "snat", "list", "--json").json()["pool"]


def test_status_and_list_show_a_fullnat_vips_sources(lab, servers):
    with fullnat_vip(lab, f"{lab.vip(3)}:81/tcp", 8080, lab.backends[:1]):
        listed = {v["vip"]: v for v in run_lbctl(lab.lb_ns, "list", "--json").json()["vips"]}
        assert listed[f"{lab.vip(3)}:81/tcp"]["snat"] == [SOURCE]
        assert http_get(lab.client.ns, str(lab.vip(3)), 81) == "b1"
        status = {v["vip"]: v for v in run_lbctl(lab.lb_ns, "status", "--json").json()["vips"]}
        entry = status[f"{lab.vip(3)}:81/tcp"]
        assert entry["snat"] == [SOURCE]
        assert entry["backends"][0]["connections"] >= 1  # full NAT's flows count as connections


def test_a_fullnat_vip_needs_a_source_of_its_ip_version(lab):
    before = run_lbctl(lab.lb_ns, "list", "--json").json()
    result = run_lbctl(lab.lb_ns, "add-vip", f"[{lab.vip6(1)}]:80/tcp", "--mode", "fullnat", check=False)
    assert result.returncode == 2 and "no IPv6 source address" in result.stderr
    result = run_lbctl(lab.lb_ns, "add-vip", f"{lab.vip(1)}:80/tcp", "--snat", SOURCE, check=False)
    assert result.returncode == 2 and "not fullnat" in result.stderr
    assert run_lbctl(lab.lb_ns, "list", "--json").json() == before


def test_the_pool_keeps_the_sources_its_fullnat_vips_use(lab):
    with fullnat_vip(lab, f"{lab.vip(1)}:82/tcp", 8080, []):
        result = run_lbctl(lab.lb_ns, "snat", "remove", SOURCE, check=False)
        assert result.returncode == 2 and "no IPv4 source address" in result.stderr
        assert run_lbctl(lab.lb_ns, "snat", "list", "--json").json()["pool"] == [SOURCE]


def test_apply_files_carry_the_pool_and_a_vips_own_sources(lab, tmp_path):
    text = (f"snat:\n  addresses: [{SOURCE}]\n  ports: 20000-29999\n"
            f"vips:\n  - vip: {lab.vip(1)}:83/tcp\n    mode: fullnat\n    snat: [{lab.backends[1].lb_address}]\n"
            f"    backends: ['{lab.backends[1].address}:8080']\n")
    path = tmp_path / "lb.yaml"
    path.write_text(text)
    try:
        run_lbctl(lab.lb_ns, "apply", "-f", str(path))
        exported = run_lbctl(lab.lb_ns, "export").stdout
        assert "ports: 20000-29999" in exported and f"- {lab.backends[1].lb_address}" in exported
        listed = {v["vip"]: v for v in run_lbctl(lab.lb_ns, "list", "--json").json()["vips"]}
        assert listed[f"{lab.vip(1)}:83/tcp"]["snat"] == [str(lab.backends[1].lb_address)]
    finally:
        path.write_text(f"snat:\n  addresses: [{SOURCE}]\nvips: []\n")
        run_lbctl(lab.lb_ns, "apply", "-f", str(path))
