"""Crash safety without a daemon: an lbctl change killed at any point (kill -9) leaves the old or
the new state in force, and the next command repairs the maps to the stored state before it
acts. No VIP the state does not know forwards (no orphans), every VIP it knows forwards to
one of its own backends.

Kills are real SIGKILLs: at a chosen map write or at the store's commit through the
LB_FAULT hook (lb/fault.py), which reaches every point of a change, and after a delay."""
from __future__ import annotations

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
from lb.maps import U32, DataPlaneMaps
from lb.probe import probe
from lb.structs import NO_BACKEND, Backend, LbAddr, VipMeta
from netns.lbctl import LBCTL
from netns.nsenter import in_netns, netlink_in
from netns.topology import Lab
from tests.conftest import lab_with_lb, run_lbctl

RING = "251"  # a small prime: 600 VIPs' Maglev tables stay small
KILLED = -signal.SIGKILL
SPORT = slice(34, 36)  # a TCP source port behind Ethernet and a 20-byte IPv4 header


@pytest.fixture(scope="module")
def lab() -> Iterator[Lab]:
    with lab_with_lb(3, True, "--ring-size", RING, "--max-vips", "1024") as lab:
        lab.resolve_neighbours()
        yield lab


def vip_of(i: int) -> str:
    """The i-th VIP of the tests: 100 addresses, a port per VIP."""
    return f"198.19.0.{10 + i % 100}:{1000 + i}/tcp"


def config_text(lab: Lab, indexes: range, shift: int = 0) -> str:
    """VIPs `indexes`, each with two of the lab's three backends (which two: by index and shift), on a
    port of the VIP's own (a NAT backend endpoint serves a few VIPs at most)."""
    lines = ["vips:"]
    for i in indexes:
        picked = [lab.backends[(i + shift + k) % len(lab.backends)] for k in range(2)]
        lines.append(f"  - vip: {vip_of(i)}")
        lines.append("    backends: [" + ", ".join(f"{b.address}:{2000 + i}" for b in picked) + "]")
    return "\n".join(lines) + "\n" if len(lines) > 1 else "vips: []\n"


class Prober:
    """Asks the loaded program what it does with a SYN to each VIP (a new client port each round,
    so no connection-table entry of an earlier round answers)."""

    def __init__(self, lab: Lab):
        self.lab = lab
        self.round = 0
        self.frames: dict[str, bytes] = {}
        with netlink_in(lab.lb_ns) as ipr:
            self.ifindex = ipr.link_lookup(ifname=lab.client.lb_ifname)[0]

    def syn(self, vip: str) -> bytearray:
        """A SYN from the client to `vip`, from this round's port."""
        if vip not in self.frames:
            c = self.lab.client
            host, port = vip.removesuffix("/tcp").rsplit(":", 1)
            self.frames[vip] = bytes(Ether(src=c.mac, dst=c.lb_mac) / IP(src=str(c.address), dst=host)
                                     / TCP(sport=0, dport=int(port), flags="S"))
        frame = bytearray(self.frames[vip])
        frame[SPORT] = (10000 + self.round).to_bytes(2, "big")  # the program checks no TCP checksum
        return frame

    def backends(self, vips: list[str], pin_dir: str) -> dict[str, str | None]:
        """VIP -> the backend its SYN was sent to, None where it was not balanced."""
        self.round += 1
        found: dict[str, str | None] = {}
        prog_fd = loader.pinned_program(pin_dir)
        try:
            with in_netns(self.lab.lb_ns):
                for vip in vips:
                    result = probe(prog_fd, bytes(self.syn(vip)), self.ifindex)
                    if result.reason in ("fwd_nat", "pass_neigh_unresolved") and result.backend is not None:
                        addr, bport = result.backend
                        found[vip] = f"{LbAddr.from_buffer_copy(addr).address()}:{bport}"
                    else:
                        found[vip] = None
        finally:
            os.close(prog_fd)
        return found


def listed(lab: Lab) -> tuple[dict[str, set[str]], str]:
    """What the state holds, VIP -> backends, and the pin directory, by `lbctl list`: the command
    that runs next after a crash."""
    out = run_lbctl(lab.lb_ns, "list", "--json").json()
    return {v["vip"]: {b["backend"] for b in v["backends"]} for v in out["vips"]}, out["dataplane"]["pin_dir"]


def assert_all_or_nothing(lab: Lab, prober: Prober, every_vip: list[str]) -> dict[str, set[str]]:
    """Every VIP is in the state and forwards to one of its backends, or is in neither; the maps
    hold exactly the state's VIP keys. Returns the state's VIPs."""
    state, pin_dir = listed(lab)
    sent = prober.backends(every_vip, pin_dir)
    orphans = sorted(v for v in every_vip if v not in state and sent[v] is not None)
    assert not orphans, f"{len(orphans)} VIPs the state does not know forward, e.g. {orphans[:3]}"
    wrong = sorted(v for v in state if sent[v] not in state[v])
    assert not wrong, f"{len(wrong)} VIPs of the state do not forward to their backends, e.g. " \
                      f"{[(v, sent[v], state[v]) for v in wrong[:3]]}"
    with DataPlaneMaps.open(pin_dir) as maps:  # and nothing in the maps belongs to a VIP the state lacks
        ids = {info.id for _, info in maps.vips.items()}
        assert len(ids) == len(state)
        metas = {i for i in range(maps.vip_meta.max_entries) if bytes(maps.vip_meta.get(U32(i))) != bytes(VipMeta())}
        assert metas == ids, f"VIP metadata of ids no VIP has: {sorted(metas - ids)[:5]}"
        ring = int(RING)
        slots = maps.maglev.read_range(0, maps.maglev.max_entries)
        tables = {i // ring for i, backend in enumerate(slots) if backend != NO_BACKEND}
        assert tables <= ids, f"Maglev tables of ids no VIP has: {sorted(tables - ids)[:5]}"
        named = set(slots) - {NO_BACKEND}
        assert all(bytes(maps.backends.get(U32(b))) != bytes(Backend()) for b in named)
    return state


def apply_killed(lab: Lab, path: Path, fault: str) -> int:
    return run_lbctl(lab.lb_ns, "apply", "-f", str(path), check=False, env={"LB_FAULT": fault}).returncode


def test_apply_killed_after_its_vip_keys_leaves_no_orphans(lab: Lab, tmp_path):
    """Issue 13 item 4: kill -9 of apply after the VIP keys are written, before the state is saved."""
    vips = [vip_of(i) for i in range(900, 903)]
    path = tmp_path / "lb.yaml"
    path.write_text(config_text(lab, range(900, 903)))
    assert apply_killed(lab, path, "store_commit:1") == KILLED
    prober = Prober(lab)
    state, pin_dir = listed(lab)
    assert state == {}  # the state was never saved: the old one (no VIP) is in force ...
    assert prober.backends(vips, pin_dir) == {v: None for v in vips}  # ... and so no VIP forwards
    path.write_text("vips: []\n")
    run_lbctl(lab.lb_ns, "apply", "-f", str(path))
    assert prober.backends(vips, pin_dir) == {v: None for v in vips}
    assert_all_or_nothing(lab, prober, vips)


# Map writes of one apply below: 2,400-2,850 (per backend its record, counters and next hop; per
# VIP its metadata, counters, table and key; then the removals). Kill points spread over them.
KILL_AT_WRITE = (1, 2, 3, 40, 200, 500, 800, 1100, 1400, 1700, 2000, 2200, 2390)


def test_apply_of_300_vips_killed_anywhere_leaves_old_or_new(lab: Lab, tmp_path):
    files = {"a": tmp_path / "a.yaml", "b": tmp_path / "b.yaml"}
    files["a"].write_text(config_text(lab, range(0, 300)))
    files["b"].write_text(config_text(lab, range(150, 450), shift=1))  # half the VIPs new, the rest re-weighed
    wanted = {name: {vip_of(i) for i in (range(0, 300) if name == "a" else range(150, 450))} for name in files}
    every_vip = [vip_of(i) for i in range(0, 450)]
    prober = Prober(lab)
    started = time.monotonic()
    run_lbctl(lab.lb_ns, "apply", "-f", str(files["a"]))
    apply_seconds = time.monotonic() - started
    in_force, kills = "a", 0

    def killed_then_checked(returncode: int, what: str) -> None:
        nonlocal in_force, kills
        kills += returncode == KILLED
        assert returncode in (0, KILLED), what
        state = assert_all_or_nothing(lab, prober, every_vip)
        assert set(state) in (wanted["a"], wanted["b"]), f"{what}: neither the old nor the new state"
        in_force = "a" if set(state) == wanted["a"] else "b"

    for n in KILL_AT_WRITE:  # through the hook: at exactly the nth map write
        target = "b" if in_force == "a" else "a"
        killed_then_checked(apply_killed(lab, files[target], f"map_write:{n}"), f"killed at map write {n}")
    target = "b" if in_force == "a" else "a"
    killed_then_checked(apply_killed(lab, files[target], "store_commit:1"), "killed before the commit")
    for fraction in (0.5, 0.75, 1.0):  # a real kill -9 from outside, after a growing delay
        target = "b" if in_force == "a" else "a"
        proc = subprocess.Popen(["ip", "netns", "exec", lab.lb_ns, LBCTL, "apply", "-f", str(files[target])],
                                stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
        try:
            proc.wait(timeout=apply_seconds * fraction)
        except subprocess.TimeoutExpired:
            proc.kill()
        killed_then_checked(proc.wait(timeout=30), f"kill -9 after {fraction:.0%} of an apply's time")
    assert kills >= len(KILL_AT_WRITE)  # the hook's kills all happened (the file was large enough)
