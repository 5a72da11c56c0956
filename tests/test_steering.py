"""Health-check steering: a connection of the LB host itself to a VIP, whose socket carries
SO_MARK = backend_mark(backend id), reaches exactly that backend (TC egress program), and its
replies come back to the socket as from the VIP."""
from __future__ import annotations

import ipaddress
import socket

import pytest

from lb.maps import DataPlaneMaps
from lb.structs import backend_mark
from netns.nsenter import netlink_in, socket_in
from netns.topology import Lab
from tests.conftest import add_vip_with_backends, backend_name, lbctl


def backend_id(lab: Lab, address: ipaddress.IPv4Address, port: int) -> int:
    pin_dir = lbctl(lab)("list", "--json").json()["dataplane"]["pin_dir"]
    with DataPlaneMaps.open(pin_dir) as maps:
        return next(k.value for k, v in maps.backends.items()
                    if v.flags and v.addr.address() == address and socket.ntohs(v.port) == port)


def http_get_marked(ns: str, vip: str, port: int, mark: int, timeout: float = 5.0, limit: int = 64) -> bytes:
    """One HTTP request from namespace ns on a socket carrying `mark`; the whole response."""
    sock = socket_in(ns, socket.AF_INET, socket.SOCK_STREAM)
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


@pytest.fixture
def vip_routed_via_first_backend(lab, servers):
    """VIP 1 on :80 over every backend; the LB host's own route to it points at the first
    backend, so only the mark can take a connection anywhere else."""
    vip = add_vip_with_backends(lab, f"{lab.vip(1)}:80/tcp", 8080)
    with netlink_in(lab.lb_ns) as ipr:
        ipr.route("add", dst=f"{lab.vip(1)}/32", gateway=str(lab.backends[0].address))
    yield str(lab.vip(1))
    with netlink_in(lab.lb_ns) as ipr:
        ipr.route("del", dst=f"{lab.vip(1)}/32", gateway=str(lab.backends[0].address))
    lbctl(lab)("remove-vip", vip)


def test_a_marked_local_connection_reaches_exactly_the_marked_backend(lab, vip_routed_via_first_backend):
    vip = vip_routed_via_first_backend
    before = lbctl(lab)("stats", "--json").json()["reasons"]
    for target in lab.backends:
        for _ in range(3):  # the same backend every time, whatever the flow hash would pick
            response = http_get_marked(lab.lb_ns, vip, 80, backend_mark(backend_id(lab, target.address, 8080)))
            assert response.startswith(b"HTTP/1.1 200"), response
            assert response.endswith(b"\r\n\r\n" + backend_name(target.ns).encode())
    after = lbctl(lab)("stats", "--json").json()["reasons"]
    assert after["fwd_steered"] - before["fwd_steered"] >= 9 * 3  # at least SYN, request, ACK of each
    assert after["pass_local_reply"] - before["pass_local_reply"] >= 9 * 2


def test_a_mark_naming_no_backend_is_dropped(lab, vip_routed_via_first_backend):
    unused = max(backend_id(lab, b.address, 8080) for b in lab.backends) + 1
    before = lbctl(lab)("stats", "--json").json()["reasons"]["drop_no_backend"]
    with pytest.raises(OSError):  # the SYN is dropped: the connection times out
        http_get_marked(lab.lb_ns, vip_routed_via_first_backend, 80, backend_mark(unused), timeout=1.5)
    assert lbctl(lab)("stats", "--json").json()["reasons"]["drop_no_backend"] > before
