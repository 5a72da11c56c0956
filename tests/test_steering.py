"""Health-check steering: a connection of the LB host itself to a VIP, whose socket carries
SO_MARK = backend_mark(backend id), reaches exactly that backend (TC egress program) the VIP's
way (NAT: rewritten, its replies rewritten back; dsr: to the backend's MAC; tunnel: encapsulated;
dsr and tunnel backends answer the host from the VIP themselves), and the socket gets the replies."""
from __future__ import annotations

import ipaddress
import socket

import pytest

from lb.maps import DataPlaneMaps
from lb.structs import backend_mark
from netns.nsenter import netlink_in, socket_in
from netns.topology import Host, Lab
from tests.conftest import backend_name, lbctl, run_lbctl


FAMILIES = {4: socket.AF_INET, 6: socket.AF_INET6}


def backend_id(lab: Lab, address: ipaddress.IPv4Address | ipaddress.IPv6Address, port: int) -> int:
    pin_dir = lbctl(lab)("list", "--json").json()["dataplane"]["pin_dir"]
    with DataPlaneMaps.open(pin_dir) as maps:
        return next(k.value for k, v in maps.backends.items()
                    if v.flags and v.addr.address() == address and socket.ntohs(v.port) == port)


def http_get_marked(ns: str, vip: str, port: int, mark: int, timeout: float = 5.0, limit: int = 64) -> bytes:
    """One HTTP request from namespace ns on a socket carrying `mark`; the whole response."""
    sock = socket_in(ns, FAMILIES[ipaddress.ip_address(vip).version], socket.SOCK_STREAM)
    try:
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_MARK, mark)
        sock.settimeout(timeout)
        sock.connect((vip, port))
        sock.sendall(b"GET / HTTP/1.1\r\nHost: lab\r\nConnection: close\r\n\r\n")
        chunks = []
        for _ in range(limit):  # until the server closes
            chunk = sock.recv(4096)
            if not chunk:
                break
            chunks.append(chunk)
        return b"".join(chunks)
    finally:
        sock.close()


def addresses(host: Host, version: int) -> ipaddress.IPv4Address | ipaddress.IPv6Address:
    return host.address if version == 4 else host.address6


@pytest.fixture(params=[4, 6], ids=["ipv4", "ipv6"])
def vip_routed_via_first_backend(request, lab, servers):
    """VIP 1 on :80 over every backend; the LB host's own route to it points at the first
    backend, so only the mark can take a connection anywhere else."""
    version = request.param
    vip_addr = lab.vip(1) if version == 4 else lab.vip6(1)
    vip = f"{vip_addr}:80/tcp" if version == 4 else f"[{vip_addr}]:80/tcp"
    lab.resolve_neighbours()
    lbctl(lab)("add-vip", vip)
    for b in lab.backends:
        lbctl(lab)("add-backend", vip, f"{b.address}:8080" if version == 4 else f"[{b.address6}]:8080")
    route = {"dst": f"{vip_addr}/{vip_addr.max_prefixlen}", "gateway": str(addresses(lab.backends[0], version)),
             "family": FAMILIES[version]}
    with netlink_in(lab.lb_ns) as ipr:
        ipr.route("add", **route)
    yield version, str(vip_addr)
    with netlink_in(lab.lb_ns) as ipr:
        ipr.route("del", **route)
    lbctl(lab)("remove-vip", vip)


def test_a_marked_local_connection_reaches_exactly_the_marked_backend(lab, vip_routed_via_first_backend):
    version, vip = vip_routed_via_first_backend
    before = lbctl(lab)("stats", "--json").json()["reasons"]
    for target in lab.backends:
        mark = backend_mark(backend_id(lab, addresses(target, version), 8080))
        for _ in range(3):  # the same backend every time, whatever the flow hash would pick
            response = http_get_marked(lab.lb_ns, vip, 80, mark)
            assert response.startswith(b"HTTP/1.1 200"), response
            assert response.endswith(b"\r\n\r\n" + backend_name(target.ns).encode())
    after = lbctl(lab)("stats", "--json").json()["reasons"]
    assert after["fwd_steered"] - before["fwd_steered"] >= 9 * 3  # at least SYN, request, ACK of each
    assert after["pass_local_reply"] - before["pass_local_reply"] >= 9 * 2


@pytest.fixture(scope="module")
def decapsulating_backends(lab):
    """Backends that strip tunnel mode's outer header (TC ingress: the lab's XDP program stays)."""
    for b in lab.backends:
        run_lbctl(b.ns, "decap", "attach", "eth0", "--hook", "tc")
    yield
    for b in lab.backends:
        run_lbctl(b.ns, "decap", "detach", "eth0", check=False)


@pytest.fixture(params=[("dsr", 4), ("dsr", 6), ("tunnel", 4), ("tunnel", 6)], ids=lambda p: f"{p[0]}-ipv{p[1]}")
def mode_vip_routed_via_first_backend(request, lab, servers, decapsulating_backends):
    """A dsr or tunnel VIP on :8080 (the backends' own port) over every backend, which hold it on
    their loopbacks; the LB host's route to it points at the first backend, as above."""
    mode, version = request.param
    index = {"dsr": 11, "tunnel": 12}[mode]  # a backend holds each VIP address once
    vip_addr = lab.vip(index) if version == 4 else lab.vip6(index)
    vip = f"{vip_addr}:8080/tcp" if version == 4 else f"[{vip_addr}]:8080/tcp"
    lab.resolve_neighbours()
    lbctl(lab)("add-vip", vip, "--mode", mode)
    for b in lab.backends:
        lab.hold_vip(b, vip_addr)
        lbctl(lab)("add-backend", vip, str(b.address) if version == 4 else f"[{b.address6}]")
    route = {"dst": f"{vip_addr}/{vip_addr.max_prefixlen}", "gateway": str(addresses(lab.backends[0], version)),
             "family": FAMILIES[version]}
    with netlink_in(lab.lb_ns) as ipr:
        ipr.route("add", **route)
    yield mode, version, str(vip_addr)
    with netlink_in(lab.lb_ns) as ipr:
        ipr.route("del", **route)
    lbctl(lab)("remove-vip", vip)


def decapsulated(host: Host, version: int) -> int:
    return run_lbctl(host.ns, "decap", "stats", "--json").json()["packets"][f"ipv{version}"]


def test_a_marked_local_connection_to_a_dsr_or_tunnel_vip_reaches_exactly_the_marked_backend(
        lab, mode_vip_routed_via_first_backend):
    mode, version, vip = mode_vip_routed_via_first_backend
    before = lbctl(lab)("stats", "--json").json()["reasons"]
    for target in lab.backends:
        mark = backend_mark(backend_id(lab, addresses(target, version), 8080))
        stripped = decapsulated(target, version)
        for _ in range(2):
            response = http_get_marked(lab.lb_ns, vip, 8080, mark)
            assert response.startswith(b"HTTP/1.1 200"), response
            assert response.endswith(b"\r\n\r\n" + backend_name(target.ns).encode())
        # tunnel: the backend stripped an outer header from every packet the host sent it
        assert (decapsulated(target, version) - stripped >= 2 * 3) == (mode == "tunnel")
    after = lbctl(lab)("stats", "--json").json()["reasons"]
    assert after["fwd_steered"] - before["fwd_steered"] >= 6 * 3
    # The backends answered from the VIP straight to the host: nothing for the LB to rewrite.
    assert after["pass_local_reply"] == before["pass_local_reply"]


def test_a_mark_naming_no_backend_is_dropped(lab, vip_routed_via_first_backend):
    version, vip = vip_routed_via_first_backend
    unused = max(backend_id(lab, addresses(b, version), 8080) for b in lab.backends) + 1
    before = lbctl(lab)("stats", "--json").json()["reasons"]["drop_no_backend"]
    with pytest.raises(OSError):  # the SYN is dropped: the connection times out
        http_get_marked(lab.lb_ns, vip, 80, backend_mark(unused), timeout=1.5)
    assert lbctl(lab)("stats", "--json").json()["reasons"]["drop_no_backend"] > before
