"""lb/rtnl.py reads what pyroute2 reads: the lab's LB namespace, with routes of every kind the
route mirror tells apart, dumped by both and compared field by field."""
from __future__ import annotations

import ipaddress
import socket
from typing import Iterator

import pytest

from lb import rtnl
from netns.nsenter import in_netns, netlink_in
from netns.topology import Lab


@pytest.fixture(scope="module")
def lab() -> Iterator[Lab]:
    with Lab.build(2) as lab:
        lab.resolve_neighbours()
        b1, b2 = lab.backends
        with netlink_in(lab.lb_ns) as ipr:
            ipr.route("add", dst="203.0.113.0/24", gateway=str(b1.address))
            ipr.route("add", dst="198.51.100.0/24", type="blackhole")
            ipr.route("add", dst="192.0.2.0/24", multipath=[{"gateway": str(b1.address)},
                                                           {"gateway": str(b2.address)}])
            ipr.route("add", dst="2001:db8:5::/64", gateway=str(b1.address6), family=socket.AF_INET6)
            ipr.rule("add", table=100, priority=1000, family=socket.AF_INET)
        yield lab


def _ip(text: str | None):
    return None if text is None else ipaddress.ip_address(text)


def test_links_and_addresses_read_as_pyroute2_reads_them(lab: Lab):
    with in_netns(lab.lb_ns):
        links, addresses = rtnl.links(), rtnl.addresses()
    with netlink_in(lab.lb_ns) as ipr:
        want_links = {l["index"]: bytes.fromhex((l.get_attr("IFLA_ADDRESS") or "").replace(":", ""))
                      for l in ipr.get_links()}
        want_addresses = {ipaddress.ip_address(a.get_attr("IFA_ADDRESS")) for a in ipr.get_addr()}
    assert {l.index: l.address for l in links} == want_links
    assert {l.kind for l in links} >= {"veth"}
    assert addresses == want_addresses and lab.backends[0].lb_address in addresses


@pytest.mark.parametrize("family", [socket.AF_INET, socket.AF_INET6])
def test_neighbours_routes_and_rules_read_as_pyroute2_reads_them(lab: Lab, family: int):
    with in_netns(lab.lb_ns):
        neighbours, routes, rules = rtnl.neighbours(family), rtnl.routes(family, table=254), rtnl.rules(family)
    with netlink_in(lab.lb_ns) as ipr:
        want_neighbours = {(n["ifindex"], n["state"], _ip(n.get_attr("NDA_DST")),
                            bytes.fromhex(n.get_attr("NDA_LLADDR").replace(":", "")) if n.get_attr("NDA_LLADDR")
                            else None) for n in ipr.get_neighbours(family=family)}
        want_routes = set()
        for r in ipr.get_routes(family=family, table=254):
            dst = r.get_attr("RTA_DST") or ("0.0.0.0" if family == socket.AF_INET else "::")
            want_routes.add((r["type"], ipaddress.ip_network(f"{dst}/{r['dst_len']}"), r.get_attr("RTA_OIF"),
                             _ip(r.get_attr("RTA_GATEWAY")), r.get_attr("RTA_MULTIPATH") is not None))
        want_rules = {(r.get_attr("FRA_PRIORITY") or 0, r.get_attr("FRA_TABLE") or r["table"])
                      for r in ipr.get_rules(family=family)}
    assert {(n.ifindex, n.state, n.dst, n.lladdr) for n in neighbours} == want_neighbours
    assert {(r.type, r.dst, r.oif, r.gateway, r.multipath) for r in routes} == want_routes
    assert {(r.priority, r.table) for r in rules} == want_rules
    if family == socket.AF_INET:
        assert any(r.multipath for r in routes) and any(r.type != 1 for r in routes)  # ECMP and blackhole seen
        assert (1000, 100) in want_rules and any(n.lladdr for n in neighbours)


def test_attributes_past_a_truncated_one_are_not_read():
    good = bytes([8, 0, 1, 0, 1, 2, 3, 4])
    truncated = bytes([12, 0, 2, 0, 9, 9])
    got = rtnl.parse_attrs(good + truncated)
    assert {k: bytes(v) for k, v in got.items()} == {1: b"\x01\x02\x03\x04"}
