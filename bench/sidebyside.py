"""lb beside Katran in one run, at steady state: the ratios issue 14 sets targets on.

The same harness as bench/perpacket.py (repeat=1 calls from a C loop, cases in 1,000-call
blocks interleaved in random order, net of XDP_DROP in the same round) runs Katran's program
and lb's on the same frames, byte for byte: Katran is configured with lb's VIPs and backends.
For each family (IPv4, IPv6) and each lb mode (NAT, tunnel), a hit, a hit cycling over 100k
established flows, a new flow (a new source every call: a SYN), a new entry, and a packet to no VIP.
lb's SYN opens no entry (flood defence: the handshake's next packet does), so its new flow is
cheaper than Katran's SYN, which inserts; "new entry" times lb's inserting packet (the ACK of a
tuple it has no entry for) beside Katran's SYN, the packet that inserts in Katran (the same
timed case as its new flow: more of Katran's inserts would evict its cycled flows).

Steady state: both connection tables have the same size (lb's conn_table as attached;
Katran's table for the bench's CPU is created that size) and are filled beyond it before
timing (each with the packets that insert: lb's ACKs, Katran's SYNs), so that every new
entry evicts one; the fill is checked. The 100k flows are established after the fill
(they are the youngest entries; the timed new entries evict older fill entries first).

Checked, not assumed: each case's path once before timing (lb: its probe's action and
reason, and a new-flow count; Katran: its action, the encapsulation to one of the reals with
the original packet inside, and its miss counters), then over the whole timed run: lb's new
flows per VIP equal the new-flow calls (so every hit was a hit), Katran counted no non-SYN
miss and never fell back to its small shared table, and both programs' last new entries are in their tables.

At steady state ("hit, 100,000 flows cycled, at steady state", path hit_100k_steady): hit_100k is
each LRU hash's best case, its cycled flows being the newest entries (each at the head of its bucket's
chain) when its timing starts. After the main timing, one table's worth of newer flows goes into both programs (each with its
inserting packet, in chunks of FILL_CHUNK), every cycled flow being hit once after each chunk so that
neither LRU evicts it; then the same cycled flows are timed again, beside Katran's, in a second pass of
the same harness (no insert among its cases: the tables stay as the churn left them). Checked: a sample
of the cycled flows is in both tables after each chunk (before the hits that keep them), and all of the
sample after the timing; Katran counted no non-SYN miss over the timing."""
from __future__ import annotations

import contextlib
import ctypes
import ipaddress
import os
import socket
import statistics
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Callable, Iterator

from scapy.layers.inet import IP, TCP
from scapy.layers.inet6 import IPv6
from scapy.layers.l2 import Ether

from bench import perpacket
from bench.katran import FALLBACK_LRU, LRU_MISS, Katran
from bench.perpacket import Case, build_loop, run_block
from lb import bpfsys, structs
from lb.maps import DataPlaneMaps
from lb.probe import probe
from lb.testrun import run_xdp
from netns.nsenter import in_netns
from netns.topology import Lab

PATHS = ("hit", "hit_100k", "new_flow", "new_entry", "not_vip")
STEADY = "hit_100k_steady"  # timed in a second pass, after a table's worth of newer flows
FLOW_PATHS = PATHS[:4]
FAMILIES = ("v4", "v6")
MODES = {"nat": (1, 80, "fwd_nat"), "tunnel": (4, perpacket.MODE_PORT, "fwd_tunnel")}  # VIP index, port, reason
CYCLED = 100_000
FILL_BASE, CYCLE_BASE, NEW_BASE, ENTRY_BASE = 0x1000_0000, 0x2000_0000, 0x3000_0000, 0x5000_0000
CHURN_BASE = 0x6000_0000  # the newer flows of the steady-state pass
KEPT_SAMPLE = 97  # every 97th cycled flow is looked up in both tables
PROBE_FLOWS = {"new_flow": 0x4000_ABCD, "new_entry": 0x4000_ABCE}
FULL = 0.95  # the share of the table both fills must reach (an LRU may evict a little before its size)
FILL_CHUNK = 100_000  # < Katran's 125k new flows per second and CPU: its table is written every time
SPORT = 1000


def frame(lab: Lab, family: str, dst: str, dport: int, flags: str) -> bytes:
    c = lab.client
    ip = IPv6(src=str(c.address6), dst=dst) if family == "v6" else IP(src=str(c.address), dst=dst)
    return bytes(Ether(src=c.mac, dst=c.lb_mac) / ip / TCP(sport=SPORT, dport=dport, flags=flags) / (b"x" * 6))


def with_flow(frame_: bytes, flow: int) -> bytes:
    """The frame of flow number `flow`, as bench/loop.c writes it (source port, low half of the source)."""
    sport_off, saddr_off = Case("", 0, frame_, 0, "XDP_PASS").offsets()
    out = bytearray(frame_)
    out[sport_off:sport_off + 2] = (flow & 0xFFFF).to_bytes(2, "big")
    out[saddr_off + 2:saddr_off + 4] = ((flow >> 16) & 0xFFFF).to_bytes(2, "big")
    if family_of(frame_) == "v4":  # a valid header checksum, so the output can be checked
        out[24:26] = b"\0\0"
        s = sum(int.from_bytes(out[i:i + 2], "big") for i in range(14, 34, 2))
        while s >> 16:
            s = (s & 0xFFFF) + (s >> 16)
        out[24:26] = (~s & 0xFFFF).to_bytes(2, "big")
    return bytes(out)


def family_of(frame_: bytes) -> str:
    return "v6" if frame_[12:14] == b"\x86\xdd" else "v4"


@dataclass
class Pair:
    """One path through one lb mode and family: lb's case and Katran's on the same frames."""
    family: str
    mode: str
    path: str
    lb: Case
    katran: Case
    vip: tuple[str, int]


@contextlib.contextmanager
def pinned_to_one_cpu() -> Iterator[int]:
    """Katran's tables are per CPU, and per-CPU counters are read on one: run on the last CPU."""
    before = os.sched_getaffinity(0)
    cpu = max(before)
    os.sched_setaffinity(0, {cpu})
    try:
        yield cpu
    finally:
        os.sched_setaffinity(0, before)


def run(lab: Lab, lb_prog: int, pin_dir: str, drop: Case, katran_path: Path, quick: bool,
        progress: Callable[[str], None] = print, line_prog: int | None = None) -> dict:
    """line_prog: the memory floor (bench/baselines.c, xdp_line64), timed on the hit_100k frames when given."""
    with in_netns(lab.lb_ns), pinned_to_one_cpu() as cpu, DataPlaneMaps.open(pin_dir) as maps:
        table = maps.conn_table.max_entries
        with Katran(katran_path, lru_entries=table, cpu=cpu) as katran:
            client_if = socket.if_nametoindex(lab.client.lb_ifname)
            pairs = build_pairs(lab, lb_prog, katran, client_if)
            lib = build_loop()
            progress(f"  filling both connection tables ({table:,} entries each) beyond full, "
                     f"then {CYCLED:,} established flows per VIP")
            fill(lib, pairs, katran, table)
            occupancy = {"lb": maps.conn_table.count(), "katran": count_entries(katran.lru, katran_key_size())}
            if min(occupancy.values()) < FULL * table:
                raise AssertionError(f"not at steady state: tables of {table:,} entries hold {occupancy} after the fill")
            verified = {f"{p.family}_{p.mode}_{p.path}": verify(p, katran, maps, lab) for p in pairs}
            cases = list({id(c): c for p in pairs for c in (p.lb, p.katran)}.values())  # Katran's SYN serves two rows
            floors = floor_cases(pairs, line_prog) if line_prog is not None else []
            cases += [case for case, _ in floors]
            before = counters(pairs, katran, maps)
            rounds, blocks = (2, 2) if quick else (7, 20)
            timed = perpacket.measure(cases, drop, rounds=rounds, blocks=blocks, progress=progress)
            after = counters(pairs, katran, maps)
            checks = check_counters(pairs, katran, maps, before, after, rounds * blocks * perpacket.BLOCK)
            steady = steady_state(lib, pairs, katran, maps, lab, drop, table, rounds, blocks, progress)
    return {"table_entries": table, "occupancy_after_fill": occupancy, "cpu": cpu,
            "calls_per_case": rounds * blocks * perpacket.BLOCK, "verified": verified, "checks": checks,
            "cases": timed, "ratios": ratios(pairs, timed) | steady.pop("ratios"), "floor": floor_ratios(floors, timed),
            "steady": steady}


def steady_pairs(pairs: list[Pair]) -> list[Pair]:
    """The hit_100k pairs again, as new cases (their own flow counters) over the same cycled flows."""
    def again(c: Case) -> Case:
        return Case(c.name.replace("hit_100k", STEADY), c.prog_fd, c.frame, c.ingress_ifindex, c.action,
                    vary=True, flow_base=c.flow_base, flow_mod=c.flow_mod)
    return [Pair(p.family, p.mode, STEADY, again(p.lb), again(p.katran), p.vip) for p in pairs if p.path == "hit_100k"]


def cycled_kept(pairs: list[Pair], katran: Katran, maps: DataPlaneMaps) -> dict[str, list[int]]:
    """How many of a sample of the cycled flows (every KEPT_SAMPLE-th of each VIP's) each table holds:
    {"lb": [kept, sampled], "katran": [kept, sampled]}."""
    kept = {"lb": [0, 0], "katran": [0, 0]}
    for p in pairs:
        if p.path != "hit_100k":
            continue
        for i in range(0, CYCLED, KEPT_SAMPLE):
            pkt = with_flow(p.lb.frame, CYCLE_BASE + i)
            src = ipaddress.ip_address(pkt[26:30] if p.family == "v4" else pkt[22:38])
            kept["lb"][0] += lb_has_flow(maps, pkt)
            kept["katran"][0] += katran.lru_has(str(src), p.vip[0], (CYCLE_BASE + i) & 0xFFFF, p.vip[1])
            kept["lb"][1] += 1
            kept["katran"][1] += 1
    return kept


def churn(lib: ctypes.CDLL, pairs: list[Pair], katran: Katran, maps: DataPlaneMaps, table: int) -> dict:
    """One table's worth of newer flows into both programs (lb's ACKs of new tuples, Katran's SYNs), in
    chunks; after each chunk, the cycled flows still held are counted (a sample), then each is hit once
    (one that was evicted opens again: Katran counts it as a non-SYN miss, reported). Both kernels' LRU
    lists see the same sequence of operations and lose the same few: 0.4% of the sample in the first
    chunk (with or without a hit of every cycled flow before it), none in the later ones."""
    first_new = next(p for p in pairs if p.path == "new_entry")
    inserters = [Case(f"churn_{c.name}", c.prog_fd, c.frame, c.ingress_ifindex, c.action, vary=True,
                      flow_base=CHURN_BASE, before_block=c.before_block) for c in (first_new.lb, first_new.katran)]
    keepers = [Case(f"keep_{c.name}", c.prog_fd, c.frame, c.ingress_ifindex, c.action, vary=True,
                    flow_base=CYCLE_BASE, flow_mod=CYCLED)
               for p in pairs if p.path == "hit_100k" for c in (p.lb, p.katran)]
    miss0 = katran.stat(LRU_MISS)
    kept = {"lb": [0, 0], "katran": [0, 0]}
    per_chunk: dict[str, list[int]] = {"lb": [], "katran": []}
    remaining = table
    while remaining > 0:
        for case in inserters:
            run_block(lib, case, min(FILL_CHUNK, remaining))
        remaining -= FILL_CHUNK
        for name, (k, n) in cycled_kept(pairs, katran, maps).items():
            kept[name][0] += k
            kept[name][1] += n
            per_chunk[name].append(k)
        for case in keepers:
            run_block(lib, case, CYCLED)
    miss1 = katran.stat(LRU_MISS)
    last = inserters[0].flow_base + table - 1
    return {"flows": table, "chunk": FILL_CHUNK, "cycled_kept_between_chunks": {k: f"{a}/{b}" for k, (a, b) in kept.items()},
            "cycled_kept_share": {k: a / b for k, (a, b) in kept.items()}, "cycled_kept_per_chunk": per_chunk,
            "katran_syns": miss1.v1 - miss0.v1, "katran_cycled_reopened": miss1.v2 - miss0.v2,
            "lb_last_churned_in_table": lb_has_flow(maps, with_flow(first_new.lb.frame, last))}


def steady_state(lib: ctypes.CDLL, pairs: list[Pair], katran: Katran, maps: DataPlaneMaps, lab: Lab, drop: Case,
                 table: int, rounds: int, blocks: int, progress: Callable[[str], None]) -> dict:
    """The cycled flows timed again after a table's worth of newer flows (see the module's doc)."""
    progress(f"  steady state: {table:,} newer flows into both tables, in chunks of {FILL_CHUNK:,}, "
             f"the cycled flows hit after each chunk; then their hits timed again")
    started = time.monotonic()
    fallback0 = katran.stat(FALLBACK_LRU).v1
    churned = churn(lib, pairs, katran, maps, table)
    churned["katran_fallback_used"] = katran.stat(FALLBACK_LRU).v1 - fallback0
    churn_s = time.monotonic() - started
    if churned["katran_syns"] != table or churned["katran_fallback_used"] or not churned["lb_last_churned_in_table"]:
        raise AssertionError(f"the newer flows did not all go into both tables: {churned}")
    steady = steady_pairs(pairs)
    verified = {f"{p.family}_{p.mode}_{p.path}": verify(p, katran, maps, lab) for p in steady}
    before_kept = cycled_kept(pairs, katran, maps)
    miss0 = katran.stat(LRU_MISS)
    started = time.monotonic()
    timed = perpacket.measure([c for p in steady for c in (p.lb, p.katran)], drop, rounds=rounds, blocks=blocks,
                              progress=progress)
    timed_s = time.monotonic() - started
    miss1 = katran.stat(LRU_MISS)
    after_kept = cycled_kept(pairs, katran, maps)
    checks = {"cycled_kept_before_timing": {k: f"{a}/{b}" for k, (a, b) in before_kept.items()},
              "cycled_kept_after_timing": {k: f"{a}/{b}" for k, (a, b) in after_kept.items()},
              "katran_nonsyn_misses": miss1.v2 - miss0.v2, "katran_syns": miss1.v1 - miss0.v1}
    if (any(a != b for a, b in [*before_kept.values(), *after_kept.values()])
            or checks["katran_nonsyn_misses"] or checks["katran_syns"]):
        raise AssertionError(f"steady state: the cycled flows timed were not all hits in both tables: {checks}")
    return {"churn": churned, "verified": verified, "checks": checks, "cases": timed, "ratios": ratios(steady, timed),
            "churn_s": round(churn_s, 1), "timing_s": round(timed_s, 1)}


def floor_cases(pairs: list[Pair], line_prog: int) -> list[tuple[Case, Pair]]:
    """The memory floor on each family's hit_100k frames (the same flows, the same order), beside the
    Katran case it is compared with (its NAT hit_100k)."""
    return [(Case(f"floor_{p.family}_line64_100k", line_prog, p.lb.frame, p.lb.ingress_ifindex, "XDP_DROP",
                  vary=True, flow_base=CYCLE_BASE, flow_mod=CYCLED), p)
            for p in pairs if p.path == "hit_100k" and p.mode == "nat"]


def floor_ratios(floors: list[tuple[Case, Pair]], timed: dict) -> dict:
    """Each floor over Katran's hit_100k, per round, then median, min and max: what share of Katran's whole
    hit over 100k flows one uncached line of a 64 MiB map costs alone (no table in one such map does better)."""
    out = {}
    for case, p in floors:
        f_r, k_r = timed[case.name]["net_ns_rounds"], timed[p.katran.name]["net_ns_rounds"]
        per_round = [a / b for a, b in zip(f_r, k_r) if b > 0]
        out[f"{p.family}_line64_100k"] = {
            "floor_ns": timed[case.name]["median_ns"], "katran_ns": timed[p.katran.name]["median_ns"],
            "over_katran": statistics.median(per_round) if per_round else None,
            "over_katran_min": min(per_round, default=None), "over_katran_max": max(per_round, default=None)}
    return out


def build_pairs(lab: Lab, lb_prog: int, katran: Katran, client_if: int) -> list[Pair]:
    pairs = []
    for family in FAMILIES:
        backends = [str(b.address6 if family == "v6" else b.address) for b in lab.backends]
        for mode, (index, port, _) in MODES.items():
            vip = str(lab.vip6(index) if family == "v6" else lab.vip(index))
            katran.add_vip(vip, port, socket.IPPROTO_TCP, backends)
            syn, ack = frame(lab, family, vip, port, "S"), frame(lab, family, vip, port, "A")
            for path in FLOW_PATHS:
                pkt, kw = {"hit": (ack, {}),
                           "hit_100k": (ack, {"vary": True, "flow_base": CYCLE_BASE, "flow_mod": CYCLED}),
                           "new_flow": (syn, {"vary": True, "flow_base": NEW_BASE}),
                           "new_entry": (ack, {"vary": True, "flow_base": ENTRY_BASE})}[path]
                name = f"{family}_{mode}_{path}"
                lb_case = Case(f"lb_{name}", lb_prog, pkt, client_if, "XDP_REDIRECT", **kw)
                if path == "new_entry":  # Katran's inserting packet is its new flow's SYN
                    k_case = next(q.katran for q in pairs if (q.family, q.mode, q.path) == (family, mode, "new_flow"))
                else:
                    k_case = Case(f"katran_{name}", katran.prog, pkt, client_if, "XDP_TX", **kw,
                                  before_block=katran.reset_conn_rate if path == "new_flow" else None)
                pairs.append(Pair(family, mode, path, lb_case, k_case, (vip, port)))
        no_vip = str(lab.vip6(200) if family == "v6" else lab.vip(200))
        pkt = frame(lab, family, no_vip, 80, "A")
        pairs.append(Pair(family, "nat", "not_vip", Case(f"lb_{family}_not_vip", lb_prog, pkt, client_if, "XDP_PASS"),
                          Case(f"katran_{family}_not_vip", katran.prog, pkt, client_if, "XDP_PASS"), (no_vip, 80)))
    return pairs


def fill(lib: ctypes.CDLL, pairs: list[Pair], katran: Katran, table: int) -> None:
    """Both tables beyond full (every later new entry evicts), each with the packets that insert in it,
    then the flows the hits use."""
    first_new = next(p for p in pairs if p.path == "new_entry")
    for case in (first_new.lb, first_new.katran):
        filler = Case(f"fill_{case.name}", case.prog_fd, case.frame, case.ingress_ifindex, case.action, vary=True,
                      flow_base=FILL_BASE, before_block=case.before_block)
        remaining = table + table // 10
        while remaining > 0:
            run_block(lib, filler, min(FILL_CHUNK, remaining))
            remaining -= FILL_CHUNK
    for p in pairs:
        if p.path == "hit_100k":
            syn = next(q for q in pairs if (q.family, q.mode, q.path) == (p.family, p.mode, "new_flow"))
            for case, new in ((p.lb, syn.lb), (p.katran, syn.katran)):
                opener = Case(f"open_{case.name}", case.prog_fd, new.frame, case.ingress_ifindex, case.action,
                              vary=True, flow_base=CYCLE_BASE, flow_mod=CYCLED, before_block=new.before_block)
                # a handshake, as a client makes it: lb's entry opens at the SYN's next packet (flood defence)
                acker = Case(f"ack_{case.name}", case.prog_fd, case.frame, case.ingress_ifindex, case.action,
                             vary=True, flow_base=CYCLE_BASE, flow_mod=CYCLED)
                for _ in range(CYCLED // FILL_CHUNK):
                    run_block(lib, opener, FILL_CHUNK)
                    run_block(lib, acker, FILL_CHUNK)
        elif p.path == "hit":  # the one hot flow, opened with a SYN like any other
            syn_frame = next(q.lb.frame for q in pairs if (q.family, q.mode, q.path) == (p.family, p.mode, "new_flow"))
            for case in (p.lb, p.katran):
                katran.reset_conn_rate()
                run_xdp(case.prog_fd, syn_frame, case.ingress_ifindex)


def verify(p: Pair, katran: Katran, maps: DataPlaneMaps, lab: Lab) -> dict:
    """The path timed is the path named, for both programs, on a flow of the timed kind."""
    pkt, k_pkt = p.lb.frame, p.katran.frame
    if p.path in PROBE_FLOWS:
        pkt, k_pkt = with_flow(pkt, PROBE_FLOWS[p.path]), with_flow(k_pkt, PROBE_FLOWS[p.path])
    elif p.path in ("hit_100k", STEADY):
        pkt = k_pkt = with_flow(pkt, CYCLE_BASE + 12_345)
    lb_vip = vip_id(maps, *p.vip) if p.path != "not_vip" else None
    new0 = new_flows(maps, lb_vip, katran.cpu) if lb_vip is not None else 0
    got = probe(p.lb.prog_fd, pkt, p.lb.ingress_ifindex)
    new1 = new_flows(maps, lb_vip, katran.cpu) if lb_vip is not None else 0
    if p.path == "not_vip":
        # Whatever lb does with traffic to no VIP (pass it up, or route it), it must not be a VIP's path;
        # the case is timed with the action it takes.
        lb_ok = got.reason is not None and got.reason not in {r for _, _, r in MODES.values()} | {"fwd_dsr"}
        p.lb.action = got.action
    else:
        lb_ok = got.action == p.lb.action and got.reason == MODES[p.mode][2]
    lb_ok = lb_ok and new1 - new0 == (1 if p.path == "new_flow" else 0)
    if p.path in PROBE_FLOWS:  # lb's SYN opens no entry, its ACK of a new tuple does
        lb_ok = lb_ok and lb_has_flow(maps, pkt) == (p.path == "new_entry")
    katran.reset_conn_rate()
    miss0 = katran.stat(LRU_MISS)
    out = run_xdp(p.katran.prog_fd, k_pkt, p.katran.ingress_ifindex)
    miss1 = katran.stat(LRU_MISS)
    k_ok = out.action == p.katran.action
    if p.path != "not_vip":
        reals = {str(b.address6 if p.family == "v6" else b.address) for b in lab.backends}
        k_ok = k_ok and encapsulated_to(out.packet, k_pkt, reals)
        # Katran counts every SYN in v1 (it never looks a SYN up) and a missed non-SYN in v2
        k_ok = k_ok and (miss1.v1 - miss0.v1, miss1.v2 - miss0.v2) == ((1, 0) if p.path in PROBE_FLOWS else (0, 0))
    result = {"lb": {"action": got.action, "reason": got.reason, "new_flows": new1 - new0, "ok": lb_ok},
              "katran": {"action": out.action, "out_len": len(out.packet), "ok": k_ok}}
    if not (lb_ok and k_ok):
        raise AssertionError(f"{p.family} {p.mode} {p.path}: not the path named: {result}")
    return result


def encapsulated_to(out: bytes, inner: bytes, reals: set[str]) -> bool:
    """Katran's output: an IPIP (IPv6-in-IPv6) packet to one of the reals, the input's IP packet inside."""
    if family_of(inner) == "v6":
        outer, proto, dst = 40, out[20], socket.inet_ntop(socket.AF_INET6, out[38:54])
        return proto == socket.IPPROTO_IPV6 and dst in reals and out[14 + outer:] == inner[14:]
    return (out[23] == socket.IPPROTO_IPIP and socket.inet_ntoa(out[30:34]) in reals
            and out[14 + 20:] == inner[14:])


def flow_key_of(frame_: bytes) -> structs.FlowKey:
    """lb's conn_table key of a client's TCP frame."""
    if family_of(frame_) == "v6":
        src, dst, l4 = frame_[22:38], frame_[38:54], 54
    else:
        src, dst, l4 = frame_[26:30], frame_[30:34], 14 + 20
    sport, dport = (int.from_bytes(frame_[l4 + i:l4 + i + 2], "big") for i in (0, 2))
    return structs.FlowKey(src=structs.LbAddr.of(ipaddress.ip_address(src)),
                           dst=structs.LbAddr.of(ipaddress.ip_address(dst)),
                           sport=socket.htons(sport), dport=socket.htons(dport), proto=socket.IPPROTO_TCP)


def lb_has_flow(maps: DataPlaneMaps, frame_: bytes) -> bool:
    return maps.conn_table.get(flow_key_of(frame_)) is not None


def vip_id(maps: DataPlaneMaps, addr: str, port: int) -> int:
    key = structs.VipKey(addr=structs.LbAddr.of(ipaddress.ip_address(addr)), port=socket.htons(port),
                         proto=socket.IPPROTO_TCP)
    info = maps.vips.get(key)
    if info is None:
        raise LookupError(f"lb has no VIP {addr}:{port}/tcp")
    return info.id


def new_flows(maps: DataPlaneMaps, vip: int, cpu: int) -> int:
    per_cpu = maps.vip_stats.get(ctypes.c_uint32(vip))
    return per_cpu[cpu].new_flows if per_cpu else 0


def counters(pairs: list[Pair], katran: Katran, maps: DataPlaneMaps) -> dict:
    vips = {p.vip for p in pairs if p.path != "not_vip"}
    return {"lb_new_flows": {v: new_flows(maps, vip_id(maps, *v), katran.cpu) for v in vips},
            "katran_miss": katran.stat(LRU_MISS), "katran_fallback": katran.stat(FALLBACK_LRU)}


def check_counters(pairs: list[Pair], katran: Katran, maps: DataPlaneMaps, before: dict, after: dict,
                   calls: int) -> dict:
    """Over the timed run: every hit was a hit, every new flow a new entry, in the right table."""
    new_cases = [p for p in pairs if p.path in PROBE_FLOWS]
    katran_new = {id(p.katran): p for p in new_cases}.values()
    lb_new = {f"{v[0]}:{v[1]}": after["lb_new_flows"][v] - before["lb_new_flows"][v] for v in before["lb_new_flows"]}
    syn = after["katran_miss"].v1 - before["katran_miss"].v1
    nonsyn = after["katran_miss"].v2 - before["katran_miss"].v2
    fallback = after["katran_fallback"].v1 - before["katran_fallback"].v1
    in_table, lb_in_table = [], []
    for p in katran_new:
        last = p.katran.flow_base + calls - 1
        src = ipaddress.ip_address(with_flow(p.katran.frame, last)[26:30] if p.family == "v4"
                                   else with_flow(p.katran.frame, last)[22:38])
        in_table.append(katran.lru_has(str(src), p.vip[0], last & 0xFFFF, p.vip[1]))
    for p in new_cases:
        if p.path == "new_entry":
            lb_in_table.append(lb_has_flow(maps, with_flow(p.lb.frame, p.lb.flow_base + calls - 1)))
    # lb counts no new flow at an ACK that misses: its cycled flows must still be in its table (a sample of
    # each VIP's; an entry evicted and opened again by a later hit would pass, so this bounds, not proves)
    cycled = [p for p in pairs if p.path == "hit_100k"]
    kept = sum(lb_has_flow(maps, with_flow(p.lb.frame, CYCLE_BASE + i)) for p in cycled for i in range(0, CYCLED, 97))
    sampled = len(cycled) * len(range(0, CYCLED, 97))
    checks = {"lb_new_flows": lb_new, "lb_new_flows_expected_each": calls, "katran_syns": syn,
              "katran_syns_expected": calls * len(katran_new), "katran_nonsyn_misses": nonsyn,
              "katran_fallback_used": fallback, "katran_last_new_flows_in_table": all(in_table),
              "lb_last_new_entries_in_table": all(lb_in_table), "lb_cycled_flows_kept": f"{kept}/{sampled}"}
    ok = (all(v == calls for v in lb_new.values()) and syn == calls * len(katran_new) and nonsyn == 0
          and fallback == 0 and all(in_table) and all(lb_in_table) and kept == sampled)
    if not ok:
        raise AssertionError(f"counters over the timed run do not match the cases: {checks}")
    return checks


def ratios(pairs: list[Pair], timed: dict) -> dict:
    """lb / Katran, per round (the same round's net figures), then median, min and max."""
    out = {}
    for p in pairs:
        lb_r, k_r = timed[p.lb.name]["net_ns_rounds"], timed[p.katran.name]["net_ns_rounds"]
        # A round whose net figure is not above the XDP_DROP floor gives no ratio (noise, not a speed-up);
        # without a ratio in most rounds the path has no ratio, only, when Katran's rounds are all above
        # the floor, a bound: lb's worst round over Katran's best (lb costs what XDP_DROP costs, give or take).
        per_round = [a / b for a, b in zip(lb_r, k_r) if a > 0 and b > 0]
        measured = len(per_round) * 2 > len(lb_r)
        name = f"{p.family}_{p.path}" if p.path == "not_vip" else f"{p.family}_{p.mode}_{p.path}"
        bound = max(max(lb_r), 0) / min(k_r) if not measured and lb_r and min(k_r) > 0 else None
        out[name] = {"lb_ns": timed[p.lb.name]["median_ns"], "katran_ns": timed[p.katran.name]["median_ns"],
                     "ratio": statistics.median(per_round) if measured else None,
                     "ratio_min": min(per_round, default=None), "ratio_max": max(per_round, default=None),
                     "ratio_bound": bound, "path": p.path}
    return out


def katran_key_size() -> int:
    from bench.katran import FlowKey
    return ctypes.sizeof(FlowKey)


def count_entries(fd: int, key_size: int, chunk: int = 8192) -> int:
    """Entries in a hash map, by batch lookup (values not kept)."""
    info = bpfsys.map_info(fd)
    keys = (ctypes.c_uint8 * (key_size * chunk))()
    values = (ctypes.c_uint8 * (info.value_size * chunk))()
    total, in_batch, out_batch = 0, None, ctypes.c_uint32()
    while True:
        n, done = bpfsys.map_lookup_batch(fd, keys, values, chunk, in_batch, out_batch)
        total += n
        if done:
            return total
        in_batch = ctypes.c_uint32(out_batch.value)


def verdicts(result: dict | None, targets: dict) -> list[tuple[str, float | None, str, float, bool]]:
    """One row per compared path: lb/Katran at most the target (a missing comparison is not a row);
    a path at the floor is judged by its bound."""
    if not result:
        return []
    rows = []
    for name, r in result["ratios"].items():
        limit = targets.get(r["path"])
        if limit is not None:
            v = r["ratio"] if r["ratio"] is not None else r.get("ratio_bound")
            what = f"lb/Katran {name}" + (" (bound: lb at the XDP_DROP floor)" if r["ratio"] is None and v is not None else "")
            rows.append((what, v, "<=", limit, v is not None and v <= limit))
    return rows


def print_table(result: dict, log: Callable[[str], None]) -> None:
    log(f"  lb beside Katran, one run, both tables full ({result['table_entries']:,} entries; after the fill "
        f"lb {result['occupancy_after_fill']['lb']:,}, Katran {result['occupancy_after_fill']['katran']:,}), "
        f"net ns, {result['calls_per_case']:,} calls per case:")
    for name, r in result["ratios"].items():
        if r["ratio"] is not None:
            ratio = f"{r['ratio']:.2f} [{r['ratio_min']:.2f}-{r['ratio_max']:.2f}]"
        elif r.get("ratio_bound") is not None:
            ratio = f"at the XDP_DROP floor, <= {r['ratio_bound']:.2f}"
        else:
            ratio = "within the floor's noise"
        log(f"    {name:<26} Katran {r['katran_ns']:>7.0f}  lb {r['lb_ns']:>7.0f}  lb/Katran {ratio}")
    steady = result.get("steady")
    if steady:
        c = steady["churn"]
        log(f"    ({STEADY}: after {c['flows']:,} newer flows, cycled flows kept between chunks: lb "
            f"{c['cycled_kept_between_chunks']['lb']}, Katran {c['cycled_kept_between_chunks']['katran']}; "
            f"churn {steady['churn_s']} s, timing {steady['timing_s']} s)")
    for name, r in result.get("floor", {}).items():
        if r["over_katran"] is not None:
            log(f"    floor {name:<20} Katran {r['katran_ns']:>7.0f}  one line of 64 MiB {r['floor_ns']:>5.0f}  "
                f"floor/Katran {r['over_katran']:.2f} [{r['over_katran_min']:.2f}-{r['over_katran_max']:.2f}]")
