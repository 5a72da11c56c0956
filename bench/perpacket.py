"""Per-packet cost of the data plane, measured with BPF_PROG_TEST_RUN.

Method (the same every time): repeat=1 calls in a tight C loop (bench/loop.c), so
every call gets a fresh copy of the packet; each case runs in blocks of 1,000
calls, the blocks of all cases interleaved in random order, for several rounds;
a case's cost in a round is its mean kernel-reported duration minus that of a
program that only returns XDP_DROP in the same round. Reported: the median
over rounds, with min and max."""
from __future__ import annotations

import contextlib
import ctypes
import os
import random
import socket
import statistics
import subprocess
import tempfile
from dataclasses import dataclass
from typing import Callable
from pathlib import Path

from scapy.layers.inet import IP, TCP
from scapy.layers.inet6 import IPv6
from scapy.layers.l2 import Ether

from lb.probe import probe
from netns.nsenter import in_netns
from netns.topology import Lab

HERE = Path(__file__).parent
BLOCK = 1000
MODE_PORT = 8080  # dsr and tunnel VIPs of the bench lab: backends listen on the VIP's own port
ACTIONS = {"XDP_DROP": 1, "XDP_PASS": 2, "XDP_TX": 3, "XDP_REDIRECT": 4}


def build_loop() -> ctypes.CDLL:
    out = Path(tempfile.mkdtemp(prefix="lb-bench-")) / "loop.so"
    subprocess.run(["gcc", "-O2", "-shared", "-fPIC", "-o", str(out), str(HERE / "loop.c")], check=True)
    lib = ctypes.CDLL(str(out))
    lib.bench_run.restype = ctypes.c_int
    lib.bench_run.argtypes = [
        ctypes.c_int, ctypes.c_char_p, ctypes.c_uint32, ctypes.c_uint32, ctypes.c_uint32, ctypes.c_int,
        ctypes.c_uint32, ctypes.c_uint32, ctypes.c_uint64, ctypes.c_uint64, ctypes.POINTER(ctypes.c_uint64),
        ctypes.POINTER(ctypes.c_uint32), ctypes.c_uint32, ctypes.POINTER(ctypes.c_uint32)]
    return lib


def load_baselines() -> dict[str, int]:
    from bcc import BPF
    bpf = BPF(src_file=os.fsencode(HERE / "baselines.c"))
    fds = {name: os.dup(bpf.load_func(name.encode(), BPF.XDP).fd) for name in ("xdp_drop", "xdp_macswap", "xdp_line64")}
    bpf.cleanup()
    return fds


@dataclass
class Case:
    """One path through a program: a packet, how it varies per call, what must come out."""

    name: str
    prog_fd: int
    frame: bytes
    ingress_ifindex: int
    action: str
    reason: str | None = None   # checked once with a probe before timing
    vary: bool = False
    flow_base: int = 0
    flow_mod: int = 0
    warmup_calls: int = 0        # calls before timing (to establish flows)
    before_block: Callable[[], None] | None = None  # untimed, before each block (a rate limit's reset)
    netns: str | None = None     # run in this namespace (the ingress ifindex is its); None: the caller's

    def namespace(self) -> contextlib.AbstractContextManager:
        return in_netns(self.netns) if self.netns else contextlib.nullcontext()

    def __post_init__(self) -> None:
        self.flow_index = ctypes.c_uint64(0)

    def offsets(self) -> tuple[int, int]:
        """Where the source port and the source address's last 4 bytes are in the frame."""
        if self.frame[12:14] == b"\x86\xdd":  # IPv6
            return 14 + 40, 14 + 8 + 12
        return 14 + 20, 14 + 12


def run_block(lib: ctypes.CDLL, case: Case, n: int) -> list[int]:
    if case.before_block is not None:
        case.before_block()
    durations = (ctypes.c_uint32 * n)()
    bad = ctypes.c_uint32()
    sport_off, saddr_off = case.offsets()
    with case.namespace():
        rc = lib.bench_run(case.prog_fd, case.frame, len(case.frame), case.ingress_ifindex, n, int(case.vary),
                           sport_off, saddr_off, case.flow_base, case.flow_mod, ctypes.byref(case.flow_index),
                           durations, ACTIONS[case.action], ctypes.byref(bad))
    if rc < 0:
        raise OSError(-rc, f"{case.name}: BPF_PROG_TEST_RUN failed: {os.strerror(-rc)}")
    if bad.value:
        raise AssertionError(f"{case.name}: {bad.value} of {n} calls did not return {case.action}")
    return list(durations)


def check_path(case: Case) -> None:
    """Once per case: the path timed is the path named."""
    if case.reason is None:
        return
    with case.namespace():
        result = probe(case.prog_fd, case.frame, case.ingress_ifindex)
    if (result.action, result.reason) != (case.action, case.reason):
        raise AssertionError(f"{case.name}: expected {case.action}/{case.reason}, "
                             f"got {result.action}/{result.reason}")


def measure(cases: list[Case], drop: Case, rounds: int, blocks: int, progress=print) -> dict[str, dict]:
    lib = build_loop()
    for case in cases:
        check_path(case)
        if case.warmup_calls:
            run_block(lib, case, case.warmup_calls)
    per_round: dict[str, list[float]] = {c.name: [] for c in cases}
    raw_means: dict[str, list[float]] = {c.name: [] for c in [drop, *cases]}
    rng = random.Random(1)
    for r in range(rounds):
        totals = {c.name: 0 for c in [drop, *cases]}
        for _ in range(blocks):
            order = [drop, *cases]
            rng.shuffle(order)
            for case in order:
                totals[case.name] += sum(run_block(lib, case, BLOCK))
        floor = totals[drop.name] / (blocks * BLOCK)
        raw_means[drop.name].append(floor)
        for case in cases:
            mean = totals[case.name] / (blocks * BLOCK)
            raw_means[case.name].append(mean)
            per_round[case.name].append(mean - floor)
        progress(f"  round {r + 1}/{rounds}: " + ", ".join(f"{n} {v[-1]:.0f}" for n, v in per_round.items()))
    return {
        name: {"median_ns": statistics.median(v), "min_ns": min(v), "max_ns": max(v),
               "calls": rounds * blocks * BLOCK, "raw_mean_ns": statistics.median(raw_means[name]),
               "net_ns_rounds": [round(x, 1) for x in v]}
        for name, v in per_round.items()
    } | {"xdp_drop_floor": {"median_ns": statistics.median(raw_means[drop.name])}}


def _client_frame(lab: Lab, dst: str, sport: int, dport: int = 80) -> bytes:
    """A TCP segment from the lab's client to dst (IPv4 or IPv6), as it reaches the LB."""
    c = lab.client
    ip = IPv6(src=str(c.address6), dst=dst) if ":" in dst else IP(src=str(c.address), dst=dst)
    return bytes(Ether(src=c.mac, dst=c.lb_mac) / ip / TCP(sport=sport, dport=dport, flags="A") / (b"x" * 6))


def _client_ifindex(lab: Lab) -> int:
    with in_netns(lab.lb_ns):
        return socket.if_nametoindex(lab.client.lb_ifname)


def mode_cases(lab: Lab, lb_prog: int) -> list[Case]:
    """Hit and new flow over IPv6 (NAT) and through the dsr, tunnel and fullnat VIPs of the bench lab,
    and the reply of a full-NAT flow. Timed apart from the main table, with fewer calls, so that
    their new flows do not fill the connection table under the main figures."""
    client_if = _client_ifindex(lab)
    paths = {"v6": (str(lab.vip6(1)), 80, "fwd_nat"), "dsr": (str(lab.vip(3)), MODE_PORT, "fwd_dsr"),
             "tunnel": (str(lab.vip(4)), MODE_PORT, "fwd_tunnel"), "fullnat": (str(lab.vip(5)), 80, "fwd_fullnat")}
    cases = []
    for i, (name, (dst, dport, reason)) in enumerate(paths.items()):
        frame = _client_frame(lab, dst, 1000, dport)
        cases += [Case(f"hit_{name}", lb_prog, frame, client_if, "XDP_REDIRECT", reason),
                  Case(f"new_flow_{name}", lb_prog, frame, client_if, "XDP_REDIRECT", reason,
                       vary=True, flow_base=0x6000000 + i * 0x400000)]
    cases.append(fullnat_reply_case(lab, lb_prog, next(c for c in cases if c.name == "hit_fullnat")))
    return cases


def fullnat_reply_case(lab: Lab, lb_prog: int, hit: Case) -> Case:
    """The backend's answer to the full-NAT flow of `hit`, to the source address and port it took."""
    out = Ether(probe(lb_prog, hit.frame, hit.ingress_ifindex).packet)
    b = next(h for h in lab.backends if str(h.address) == out[IP].dst)
    with in_netns(lab.lb_ns):
        b_if = socket.if_nametoindex(b.lb_ifname)
    reply = bytes(Ether(src=b.mac, dst=b.lb_mac) / IP(src=out[IP].dst, dst=out[IP].src)
                  / TCP(sport=out[TCP].dport, dport=out[TCP].sport, flags="A") / (b"x" * 6))
    return Case("reply_hit_fullnat", lb_prog, reply, b_if, "XDP_REDIRECT", "fwd_fullnat_reply")


def lab_cases(lab: Lab, lb_prog: int, baselines: dict[str, int]) -> tuple[list[Case], Case]:
    """The data plane's paths in an attached lab (VIP 198.19.0.1:80/tcp over its backends)."""
    client_if = _client_ifindex(lab)
    c, vip = lab.client, str(lab.vip(1))

    def to_vip(dst: str, sport: int) -> bytes:
        return _client_frame(lab, dst, sport)

    drop = Case("xdp_drop", baselines["xdp_drop"], to_vip(vip, 1000), client_if, "XDP_DROP")
    cases = [
        Case("macswap_tx", baselines["xdp_macswap"], to_vip(vip, 1000), client_if, "XDP_TX"),
        Case("hit", lb_prog, to_vip(vip, 1000), client_if, "XDP_REDIRECT", "fwd_nat"),
        Case("hit_100k", lb_prog, to_vip(vip, 1000), client_if, "XDP_REDIRECT", "fwd_nat",
             vary=True, flow_base=0x10000, flow_mod=100_000, warmup_calls=100_000),
        Case("new_flow", lb_prog, to_vip(vip, 1000), client_if, "XDP_REDIRECT", "fwd_nat",
             vary=True, flow_base=0x2000000),
        Case("not_vip", lb_prog, to_vip("198.19.0.200", 1000), client_if, "XDP_PASS", "pass_not_vip"),
    ]
    # the reply of the `hit` flow, as the backend that serves it sends it
    check = probe(lb_prog, next(case for case in cases if case.name == "hit").frame, client_if)
    if check.backend is not None:
        b_addr = socket.inet_ntoa(check.backend[0][12:])
        b = next(h for h in lab.backends if str(h.address) == b_addr)
        with in_netns(lab.lb_ns):
            b_if = socket.if_nametoindex(b.lb_ifname)
        reply = bytes(Ether(src=b.mac, dst=b.lb_mac) / IP(src=b_addr, dst=str(c.address))
                      / TCP(sport=check.backend[1], dport=1000, flags="A") / (b"x" * 6))
        cases.append(Case("reply_hit", lb_prog, reply, b_if, "XDP_REDIRECT", "fwd_reply"))
    return cases, drop
