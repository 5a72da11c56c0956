"""Crash safety without a daemon: an lbctl change killed at any point (kill -9) leaves the old or
the new state in force, and the next command repairs the maps to the stored state before it
acts. No VIP the state does not know forwards (no orphans), every VIP it knows forwards to
one of its own backends.

Kills are real SIGKILLs: at a chosen map write or at the store's commit through the
LB_FAULT hook (lb/fault.py), which reaches every point of a change, and after a delay."""
from __future__ import annotations

import ipaddress
import os
import signal
import subprocess
import time
from pathlib import Path
from typing import Iterator

import pytest
from scapy.layers.inet import IP, TCP
from scapy.layers.l2 import Ether

from lb import loader
from lb.maps import DataPlaneMaps
from lb.probe import probe
from lb.structs import LbAddr
from netns.lbctl import LBCTL
from netns.nsenter import in_netns, netlink_in
from netns.topology import Lab
from tests.conftest import lab_with_lb, run_lbctl

RING = "251"  # a small prime: 600 VIPs' Maglev tables stay small
KILLED = -signal.SIGKILL


@pytest.fixture(scope="module")
def lab() -> Iterator[Lab]:
    with lab_with_lb(3, True, "--ring-size", RING, "--max-vips", "1024") as lab:
        lab.resolve_neighbours()
        yield lab


def vip_of(i: int) -> str:
    """The i-th VIP of the tests: 100 addresses, a port per VIP."""
    return f"198.19.0.{10 + i % 100}:{1000 + i}/tcp"


def config_text(lab: Lab, indexes: range, shift: int = 0) -> str:
    """VIPs `indexes`, each with two of the lab's three backends (which two: by index and shift)."""
    lines = ["vips:"]
    for i in indexes:
        picked = [lab.backends[(i + shift + k) % len(lab.backends)] for k in range(2)]
        lines.append(f"  - vip: {vip_of(i)}")
        lines.append("    backends: [" + ", ".join(f"{b.address}:8080" for b in picked) + "]")
    return "\n".join(lines) + "\n" if len(lines) > 1 else "vips: []\n"


class Prober:
    """Asks the loaded program what it does with a SYN to each VIP (a new client port each round,
    so no connection-table entry of an earlier round answers)."""

    def __init__(self, lab: Lab):
        self.lab = lab
        self.round = 0
        with netlink_in(lab.lb_ns) as ipr:
            self.ifindex = ipr.link_lookup(ifname=lab.client.lb_ifname)[0]

    def backends(self, vips: list[str]) -> dict[str, str | None]:
        """VIP -> the backend its SYN was sent to, None where it was not balanced."""
        self.round += 1
        pin_dir = run_lbctl(self.lab.lb_ns, "list", "--json").json()["dataplane"]["pin_dir"]
        c = self.lab.client
        found: dict[str, str | None] = {}
        prog_fd = loader.pinned_program(pin_dir)
        try:
            with in_netns(self.lab.lb_ns):
                for vip in vips:
                    host, port = vip.removesuffix("/tcp").rsplit(":", 1)
                    frame = bytes(Ether(src=c.mac, dst=c.lb_mac) / IP(src=str(c.address), dst=host)
                                  / TCP(sport=10000 + self.round, dport=int(port), flags="S"))
                    result = probe(prog_fd, frame, self.ifindex)
                    if result.reason in ("fwd_nat", "pass_neigh_unresolved") and result.backend is not None:
                        addr, bport = result.backend
                        found[vip] = f"{LbAddr.from_buffer_copy(addr).address()}:{bport}"
                    else:
                        found[vip] = None
        finally:
            os.close(prog_fd)
        return found


def listed(lab: Lab) -> dict[str, set[str]]:
    """What the state holds, VIP -> backends, read by `lbctl list`: the next command after a crash."""
    return {v["vip"]: {b["backend"] for b in v["backends"]}
            for v in run_lbctl(lab.lb_ns, "list", "--json").json()["vips"]}


def assert_all_or_nothing(lab: Lab, prober: Prober, every_vip: list[str]) -> dict[str, set[str]]:
    """Every VIP is in the state and forwards to one of its backends, or is in neither; the maps
    hold exactly the state's VIP keys. Returns the state's VIPs."""
    state = listed(lab)
    sent = prober.backends(every_vip)
    orphans = sorted(v for v in every_vip if v not in state and sent[v] is not None)
    assert not orphans, f"{len(orphans)} VIPs the state does not know forward, e.g. {orphans[:3]}"
    wrong = sorted(v for v in state if sent[v] not in state[v])
    assert not wrong, f"{len(wrong)} VIPs of the state do not forward to their backends, e.g. " \
                      f"{[(v, sent[v], state[v]) for v in wrong[:3]]}"
    pin_dir = run_lbctl(lab.lb_ns, "list", "--json").json()["dataplane"]["pin_dir"]
    with DataPlaneMaps.open(pin_dir) as maps:
        assert sum(1 for _ in maps.vips.keys()) == len(state)
    return state


def apply_killed(lab: Lab, path: Path, fault: str) -> int:
    return run_lbctl(lab.lb_ns, "apply", "-f", str(path), check=False, env={"LB_FAULT": fault}).returncode


@pytest.mark.xfail(strict=True, reason="issue 13 item 4: orphan VIPs survive a killed apply (fixed next)")
def test_apply_killed_after_its_vip_keys_leaves_no_orphans(lab: Lab, tmp_path):
    """Issue 13 item 4: kill -9 of apply after the VIP keys are written, before the state is saved."""
    vips = [vip_of(i) for i in range(900, 903)]
    path = tmp_path / "lb.yaml"
    path.write_text(config_text(lab, range(900, 903)))
    assert apply_killed(lab, path, "store_commit:1") == KILLED
    prober = Prober(lab)
    assert listed(lab) == {}  # the state was never saved: the old one (no VIP) is in force ...
    assert prober.backends(vips) == {v: None for v in vips}  # ... and so no VIP forwards
    path.write_text("vips: []\n")
    run_lbctl(lab.lb_ns, "apply", "-f", str(path))
    assert prober.backends(vips) == {v: None for v in vips}
    assert_all_or_nothing(lab, prober, vips)
