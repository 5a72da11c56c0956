"""Attaching and detaching the data plane; the first packet of a flow; generic XDP."""
from __future__ import annotations

import os
import stat
from collections import Counter


from lb import loader
from netns.lbctl import STATE_DIR
from netns.nsenter import in_netns, netlink_in
from netns.traffic import Servers, http_get, udp_request
from tests.conftest import add_vip_with_backends, backend_name, lab_with_lb, run_lbctl


def xdp_prog_ids(ns: str, ifnames: list[str]) -> dict[str, int]:
    with netlink_in(ns) as ipr:
        out = {}
        for name in ifnames:
            link = ipr.get_links(ipr.link_lookup(ifname=name)[0])[0]
            xdp = link.get_attr("IFLA_XDP")
            out[name] = (xdp.get_attr("IFLA_XDP_PROG_ID") or 0) if xdp else 0
        return out


def egress_programs(ns: str, ifnames: list[str]) -> dict[str, bool]:
    """Which interfaces carry lb's TC egress program (health-check steering)."""
    with netlink_in(ns) as ipr, in_netns(ns):
        return {name: loader.tc_attached(ipr.link_lookup(ifname=name)[0], loader.TC_EGRESS) for name in ifnames}


def test_first_packet_to_an_unresolved_neighbour_is_not_lost():
    with lab_with_lb(1) as lab, Servers.running({lab.backends[0].ns: "b1"}):
        vip = f"{lab.vip(1)}:53/udp"
        run_lbctl(lab.lb_ns, "add-vip", vip)
        run_lbctl(lab.lb_ns, "add-backend", vip, f"{lab.backends[0].address}:5353")
        # No traffic has crossed the lab yet: the LB knows no backend MAC. One try only.
        assert udp_request(lab.client.ns, str(lab.vip(1)), 53, b"first", attempts=1) == b"b1 first"
        reasons = run_lbctl(lab.lb_ns, "stats", "--json").json()["reasons"]
        assert reasons["pass_neigh_unresolved"] >= 1  # handed to the kernel, which resolved it

        assert udp_request(lab.client.ns, str(lab.vip(1)), 53, b"second", attempts=1) == b"b1 second"
        after = run_lbctl(lab.lb_ns, "stats", "--json").json()["reasons"]
        assert after["fwd_nat"] > reasons["fwd_nat"]  # now forwarded by XDP itself


def test_detach_removes_program_and_pins_and_attach_restores_vips():
    with lab_with_lb(2) as lab, Servers.running({b.ns: backend_name(b.ns) for b in lab.backends}):
        add_vip_with_backends(lab, f"{lab.vip(1)}:80/tcp", 8080)
        pin_dir = run_lbctl(lab.lb_ns, "list", "--json").json()["dataplane"]["pin_dir"]
        assert all(xdp_prog_ids(lab.lb_ns, lab.lb_interfaces).values())
        assert all(egress_programs(lab.lb_ns, lab.lb_interfaces).values())
        assert os.path.isdir(pin_dir)

        assert "detached from" in run_lbctl(lab.lb_ns, "detach").stdout
        assert set(xdp_prog_ids(lab.lb_ns, lab.lb_interfaces).values()) == {0}
        assert not any(egress_programs(lab.lb_ns, lab.lb_interfaces).values())
        assert not os.path.exists(pin_dir)

        out = run_lbctl(lab.lb_ns, "attach", *lab.lb_interfaces).stdout
        assert "1 VIP(s) restored" in out
        served = Counter(http_get(lab.client.ns, str(lab.vip(1)), 80) for _ in range(20))
        assert set(served) == {backend_name(b.ns) for b in lab.backends}


def test_generic_xdp_mode_balances_too():
    with lab_with_lb(2, True, "--xdp-mode", "generic") as lab, \
            Servers.running({b.ns: backend_name(b.ns) for b in lab.backends}):
        add_vip_with_backends(lab, f"{lab.vip(1)}:80/tcp", 8080)
        assert run_lbctl(lab.lb_ns, "list", "--json").json()["dataplane"]["interfaces"][0]["mode"] == "generic"
        served = Counter(http_get(lab.client.ns, str(lab.vip(1)), 80) for _ in range(20))
        assert set(served) == {backend_name(b.ns) for b in lab.backends}
        stats = run_lbctl(lab.lb_ns, "stats", "--json").json()
        assert stats["vips"][0]["new_flows"] == 20


def assert_root_only(path: str) -> None:
    mode = os.stat(path).st_mode
    want = 0o700 if stat.S_ISDIR(mode) else 0o600
    assert mode & 0o777 == want, f"{path}: {oct(mode & 0o777)}, want {oct(want)}"


def test_state_pins_and_their_directories_are_root_only():
    """Pinned maps can be opened and written by anyone the directories let through; the state holds
    every VIP and rule: all of it is root's alone."""
    with lab_with_lb(1) as lab:
        add_vip_with_backends(lab, f"{lab.vip(1)}:80/tcp", 8080)
        pin_dir = run_lbctl(lab.lb_ns, "list", "--json").json()["dataplane"]["pin_dir"]
        state = os.path.join(STATE_DIR, f"{lab.lb_ns}.db")
        for path in (os.path.dirname(pin_dir), pin_dir, *(os.path.join(pin_dir, n) for n in os.listdir(pin_dir)),
                     STATE_DIR, state, "/run/lb"):
            assert_root_only(path)
        for suffix in ("-wal", "-shm"):  # present only while a connection has them open
            if os.path.exists(state + suffix):
                assert_root_only(state + suffix)
