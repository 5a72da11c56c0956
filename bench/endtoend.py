"""End to end through the lab: generator namespace -> LB namespace -> backend namespaces.

A live-frames generator (netns/xdptools.py) sends 60-byte UDP frames over 1,024
flows from the client namespace to the VIP; a counting XDP sink in each
backend namespace counts what arrives. In the same run and topology, the LB is
in turn: lb's XDP data plane; the kernel's nftables DNAT (numgen over the
backends, as kube-proxy's nftables mode does; lb's program detached); a bare
MAC-rewrite + DEVMAP redirect (the ceiling); and, for CPU accounting only, an
XDP program that counts and drops on the LB's ingress.

In the same run, one-armed (netns/onearm.py, Katran's topology: the LB sends
every packet back to a router, which forwards it to the backends' second
links): Katran in tunnel mode, lb in tunnel mode on the same packets byte for
byte (same VIP, same backends), lb in NAT mode, and the one-armed ceiling: a
bare hairpin that puts one fixed IPIP header on every frame and sends it back
(netns/bpf/onearm.c). The backends strip the IPIP header with lb's decap
program and count, at TC ingress, the packets that reached their stack (those
still encapsulated apart). These rows share the router hop and the backends'
stack, so they compare with each other, not with the two-armed rows.

There the whole path runs in the generator's softirq on one CPU, so the lab's
shared cost (the router, the backends' stacks: several times the LB's) sets
the rate. The LB as a deployment sees it gets a core of its own
(OneArm.own_core): the arm's receive, and with it the LB's XDP program and
its XDP_TX, runs in a threaded-NAPI kthread pinned alone to CPU 1 at a
real-time priority; the router's receive, the backends' stacks and the
generator share CPU 0. The LB's core time per packet (the kthread's run time
over the packets its program saw) gives the rate one LB core sustains,
1/that, for each one-armed configuration in the same run."""
from __future__ import annotations

import contextlib
import ipaddress
import os
import random
import socket
import statistics
import subprocess
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable, Iterator

from scapy.layers.inet import IP, UDP
from scapy.layers.l2 import Ether

from bench.busy import BusyClock
from bench.katran import Katran
from lb import loader
from lb.maps import U32, DataPlaneMaps
from lb.structs import REASONS
from netns.lbctl import run_lbctl
from netns.onearm import OneArm
from netns.topology import Lab
from netns.xdptools import BareRedirect, Generator, Sink, attach, detach

FLOWS = 1024
VIP_PORT, BACKEND_PORT = 53, 5353
TUNNEL_VIP, NAT_VIP = 5, 6  # lab.vip(i) of the one-armed runs: lb's tunnel VIP (Katran's too), lb's NAT VIP
TWO_ARMED = ("xdp_lb", "nftables", "bare_redirect")
ONE_ARMED = ("lb_tunnel", "lb_nat_onearm", "katran_tunnel", "bare_hairpin")


def nft_ruleset(lab: Lab, proto: str = "udp", vip_port: int = VIP_PORT, backend_port: int = BACKEND_PORT,
                table: str = "lbbench") -> str:
    """kube-proxy-like: a vmap on numgen jumps to one DNAT chain per endpoint."""
    n = len(lab.backends)
    endpoints = "\n".join(f"  chain ep{i} {{\n    meta l4proto {proto} dnat to {b.address}:{backend_port}\n  }}"
                          for i, b in enumerate(lab.backends))
    vmap = ", ".join(f"{i} : goto ep{i}" for i in range(n))
    return (f"table ip {table} {{\n{endpoints}\n"
            f"  chain prerouting {{ type nat hook prerouting priority dstnat; policy accept;\n"
            f"    ip daddr {lab.vip(1)} {proto} dport {vip_port} numgen random mod {n} vmap {{ {vmap} }}\n  }}\n}}\n")


def nft(lab: Lab, script: str) -> None:
    subprocess.run(["ip", "netns", "exec", lab.lb_ns, "nft", "-f", "-"], input=script, text=True, check=True,
                   capture_output=True)


def switch_lb(lab: Lab, prog_fd: int | None) -> None:
    """Attach lb's program (a fd) on every LB interface, or detach it (None): the kernel forwards then."""
    for name in lab.lb_interfaces:
        if prog_fd is None:
            detach(lab.lb_ns, name)
        else:
            attach(lab.lb_ns, name, prog_fd)


@dataclass
class Config:
    """One LB set-up: how to switch it on and off, what sends its traffic, what counts its deliveries."""
    enable: Callable[[], None]
    disable: Callable[[], None]
    generator: Generator
    delivered: Callable[[], int]
    not_decapsulated: Callable[[], int] = lambda: 0  # packets that reached a backend's stack still in IPIP
    lb_reasons: Callable[[], dict[str, int]] | None = None  # lb's reason counters, where lb is the LB


def lb_reason_counters(pin_dir: str) -> dict[str, int]:
    """What lb's data plane did with the packets so far, by reason (as lbctl stats shows it)."""
    with DataPlaneMaps.open(pin_dir) as maps:
        return {name.removeprefix("LB_").lower(): sum(maps.reason_stats.get(U32(code)) or [])
                for code, name in enumerate(REASONS)}


@dataclass
class Bench:
    lab: Lab
    lb_prog_fd: int
    sinks: list[Sink]
    generator: Generator
    configs: dict[str, Config]
    closers: list[Callable[[], None]]  # last first
    arm: OneArm | None = None
    errors: dict[str, str] = field(default_factory=dict)  # part that could not be set up -> why (the rest runs)

    def close(self) -> None:
        """Take the sinks off the backends (afterwards they receive normally again), the one-armed set-up away."""
        for sink in self.sinks:
            sink.detach()
        while self.closers:
            self.closers.pop()()

    def delivered(self) -> int:
        return sum(s.count() for s in self.sinks)

    @contextlib.contextmanager
    def config(self, name: str) -> Iterator[Config]:
        c = self.configs[name]
        c.enable()
        try:
            yield c
        finally:
            c.disable()

    def rate(self, name: str, packets: int) -> dict[str, float]:
        """Full speed: offered and delivered packets per second."""
        with self.config(name) as c:
            reasons = c.lb_reasons() if c.lb_reasons else {}
            c.generator.send(20_000)  # warm-up: neighbours, caches, conntrack
            before, encapsulated = c.delivered(), c.not_decapsulated()
            start = time.monotonic()
            sent = c.generator.send(packets)
            elapsed = time.monotonic() - start
            delivered = _settled(c.delivered, before)
            encapsulated = c.not_decapsulated() - encapsulated
            # lb's path for these packets (warm-up included): forwarded as expected, none left to the kernel
            reasons = {k: n - reasons[k] for k, n in (c.lb_reasons() if c.lb_reasons else {}).items()
                       if n != reasons[k]}
        return {"offered_pps": sent / elapsed, "delivered_pps": delivered / elapsed, "lost": sent - delivered,
                "not_decapsulated": encapsulated, "lb_reasons": reasons}

    def cpu_per_packet(self, name: str, pps: int, seconds: float) -> dict[str, float]:
        """At a fixed offered rate: busy CPU time over the window (bench/busy.py) and packets delivered."""
        per_call = pps // 10
        with self.config(name) as c:
            c.generator.send(per_call)
            clock = BusyClock()
            before, mark = c.delivered(), clock.read()
            start = time.monotonic()
            sent = 0
            for tick in range(int(seconds * 10)):
                sent += c.generator.send(per_call)
                time.sleep(max(0.0, start + (tick + 1) / 10 - time.monotonic()))
            elapsed = time.monotonic() - start
            busy = clock.busy_since(mark)
            delivered = _settled(c.delivered, before)
        return {"busy_s": busy, "delivered": delivered, "sent": sent, "elapsed_s": elapsed,
                "busy_source": clock.source}


@contextlib.contextmanager
def _batch(generator: Generator, batch: int) -> Iterator[None]:
    own, generator.batch = generator.batch, batch
    try:
        yield
    finally:
        generator.batch = own


def lb_core(bench: Bench, names: list[str], reps: int, packets: int, progress=print, sink: bool = True,
            batch: int = 256) -> dict:
    """The one-armed configurations with the LB on a core of its own (module text): per repetition, in
    random order, one full-speed send; the LB core's ns per packet and the rate it sustains (1/that).
    With `sink` the router counts and drops what the LB sends (delivery is what the shared-core rows
    check): the rest of the path then costs less than the LB, the LB's core is saturated (its busy
    share says so) and "delivered" is what the LB sent; without, what the backends got."""
    rng = random.Random(4)
    rows: dict[str, list[dict]] = {n: [] for n in names}
    router_sink = Sink(bench.arm.ns, bench.arm.router_if) if sink else None
    with bench.arm.own_core(router_sink=router_sink) as core:
        for rep in range(reps):
            for name in rng.sample(names, len(names)):
                with bench.config(name) as c, _batch(c.generator, batch):
                    count = router_sink.count if router_sink else c.delivered
                    c.generator.send(20_000)  # warm-up
                    seen, ran, woken, delivered = bench.arm.lb_received(), core.runtime_ns(), core.wakeups(), count()
                    start = time.monotonic()
                    c.generator.send(packets)
                    elapsed = time.monotonic() - start
                    got = _settled(count, delivered)
                    seen, ran, woken = bench.arm.lb_received() - seen, core.runtime_ns() - ran, core.wakeups() - woken
                rows[name].append({"ns_per_packet": ran / max(1, seen), "lb_packets": seen, "delivered": got,
                                   "delivered_pps": got / elapsed, "lb_core_busy": ran / 1e9 / elapsed,
                                   "packets_per_wakeup": seen / max(1, woken)})
            progress(f"  LB on its own core, rep {rep + 1}/{reps}: " + ", ".join(
                f"{n} {v[-1]['ns_per_packet']:.0f} ns" for n, v in rows.items()))

    def med(values: list[float]) -> dict[str, float]:
        return {"median": statistics.median(values), "min": min(values), "max": max(values)}

    out: dict = {n: {"ns_per_packet": med([r["ns_per_packet"] for r in v]),
                     "mpps_per_core": statistics.median(1e3 / r["ns_per_packet"] for r in v),
                     "delivered_pps": statistics.median(r["delivered_pps"] for r in v),
                     "lb_core_busy": statistics.median(r["lb_core_busy"] for r in v),
                     "packets_per_wakeup": statistics.median(r["packets_per_wakeup"] for r in v)}
           for n, v in rows.items()}
    if "katran_tunnel" in rows:  # rate per core = 1/ns: lb's over Katran's is Katran's ns over lb's
        for name in ("lb_tunnel", "lb_nat_onearm"):
            if name in rows:
                out[f"{name}_over_katran"] = med([k["ns_per_packet"] / a["ns_per_packet"]
                                                  for a, k in zip(rows[name], rows["katran_tunnel"])])
    return out


def _summed(counts: list[dict[str, int]]) -> dict[str, int]:
    total: dict[str, int] = {}
    for c in counts:
        for k, n in c.items():
            total[k] = total.get(k, 0) + n
    return total


def _settled(delivered: Callable[[], int], before: int) -> int:
    """Delivered since `before`, once the counters stop counting (bounded wait)."""
    last, deadline = -1, time.monotonic() + 2
    while time.monotonic() < deadline:
        now = delivered() - before
        if now == last:
            return now
        last = now
        time.sleep(0.05)
    return last


def build(lab: Lab, pin_dir: str, katran_path: Path | None = None) -> Bench:
    """Every configuration; Katran's only with its object (katran_path)."""
    lb_prog = loader.pinned_program(pin_dir)
    c = lab.client
    template = bytes(Ether(src=c.mac, dst=c.lb_mac) / IP(src=str(c.address), dst=str(lab.vip(1)))
                     / UDP(sport=1024, dport=VIP_PORT, chksum=0) / (b"x" * 18))
    sinks = [Sink(b.ns, b.ifname).attach() for b in lab.backends]
    generator = Generator(c.ns, c.ifname, template, FLOWS)
    redirect = BareRedirect(lab.lb_ns, c.lb_ifname, lab.backends[0].lb_ifname, lab.backends[0].mac)
    drop = Sink(lab.lb_ns, c.lb_ifname)
    ruleset = nft_ruleset(lab)

    def lb_on() -> None:
        switch_lb(lab, lb_prog)

    def lb_off() -> None:
        switch_lb(lab, None)

    def gro(on: bool) -> None:
        # Without an XDP program, the LB's veth needs GRO to take the generator's XDP_TX frames.
        subprocess.run(["ip", "netns", "exec", lab.lb_ns, "ethtool", "-K", c.lb_ifname, "gro", "on" if on else "off"],
                       check=True, capture_output=True)

    def two_armed(enable: Callable[[], None], disable: Callable[[], None]) -> Config:
        return Config(enable, disable, generator, lambda: sum(s.count() for s in sinks))

    configs = {
        "xdp_lb": two_armed(lambda: None, lambda: None),
        "nftables": two_armed(lambda: (lb_off(), gro(True), nft(lab, ruleset)),
                              lambda: (nft(lab, "delete table ip lbbench\n"), gro(False), lb_on())),
        "bare_redirect": two_armed(lambda: (lb_off(), redirect.attach()), lambda: (redirect.detach(), lb_on())),
        "ingress_drop": two_armed(lambda: (lb_off(), drop.attach()), lambda: (drop.detach(), lb_on())),
    }
    bench = Bench(lab, lb_prog, sinks, generator, configs, [])
    try:
        one_armed(bench, pin_dir, katran_path)
    except Exception as e:  # noqa: BLE001 -- the two-armed runs go on; the results say what is missing
        bench.errors["one_armed"] = f"{type(e).__name__}: {e}"
    except BaseException:
        bench.close()
        raise
    return bench


def one_armed(bench: Bench, pin_dir: str, katran_path: Path | None) -> None:
    """The one-armed configurations (see the module's text); bench.close() removes them."""
    lab, stack = bench.lab, contextlib.ExitStack()
    bench.closers.append(stack.close)
    tunnel_vip, nat_vip = lab.vip(TUNNEL_VIP), lab.vip(NAT_VIP)
    arm = bench.arm = stack.enter_context(OneArm.build(lab, [tunnel_vip]))
    reals = [str(a) for a in arm.backend_addresses]
    # After the routes to the backends' kt0 addresses exist: each lbctl change refreshes lb's route mirror.
    for vip, mode, backends in ((f"{tunnel_vip}:{VIP_PORT}/udp", "tunnel", reals),
                                (f"{nat_vip}:{VIP_PORT}/udp", "nat", [f"{r}:{BACKEND_PORT}" for r in reals])):
        run_lbctl(lab.lb_ns, "add-vip", vip, "--mode", mode)
        stack.callback(run_lbctl, lab.lb_ns, "remove-vip", vip, check=False)
        for backend in backends:
            run_lbctl(lab.lb_ns, "add-backend", vip, backend)
    # Katran's and lb's tunnel runs send the very same frames.
    tunnel_gen = Generator(arm.ns, arm.router_if, arm.frame(tunnel_vip, VIP_PORT), FLOWS)
    nat_gen = Generator(arm.ns, arm.router_if, arm.frame(nat_vip, VIP_PORT), FLOWS)

    def on_arm(prog_fd: int) -> Callable[[], None]:
        return lambda: attach(lab.lb_ns, arm.arm, prog_fd)

    def off_arm() -> None:
        detach(lab.lb_ns, arm.arm)

    def config(prog_fd: int, generator: Generator, reasons=None) -> Config:
        return Config(on_arm(prog_fd), off_arm, generator, arm.delivered, lambda: arm.arrived()[1], reasons)

    reasons = lambda: lb_reason_counters(pin_dir)  # noqa: E731
    bench.configs["lb_tunnel"] = config(bench.lb_prog_fd, tunnel_gen, reasons)
    bench.configs["lb_nat_onearm"] = config(bench.lb_prog_fd, nat_gen, reasons)
    bench.configs["bare_hairpin"] = config(arm.bare_tunnel_hairpin(len(arm.frame(tunnel_vip, VIP_PORT))), tunnel_gen)
    if katran_path is not None:
        try:
            with DataPlaneMaps.open(pin_dir) as maps:
                table = maps.conn_table.max_entries  # Katran's table per CPU as large as lb's
            katran = stack.enter_context(katran_on_arm(arm, katran_path, table, tunnel_vip))
        except Exception as e:  # noqa: BLE001 -- lb's rows go on without Katran's; its target then fails
            bench.errors["katran"] = f"{type(e).__name__}: {e}"
            return
        bench.configs["katran_tunnel"] = config(katran.prog, tunnel_gen)


def katran_on_arm(arm: OneArm, path: Path, table: int, vip: ipaddress.IPv4Address) -> Katran:
    """Katran with vip:VIP_PORT/udp over the backends' kt0 addresses, sending to the arm's router."""
    katran = Katran(path, table, cpu=0, every_cpu=True, router_mac=bytes.fromhex(arm.router_mac.replace(":", "")))
    try:
        katran.add_vip(str(vip), VIP_PORT, socket.IPPROTO_UDP, [str(a) for a in arm.backend_addresses])
    except BaseException:
        katran.close()
        raise
    return katran


def run(bench: Bench, reps: int, rate_packets: int, cpu_pps: int, cpu_seconds: float, progress=print,
        core_packets: int = 2_000_000) -> dict:
    rng = random.Random(2)
    rates: dict[str, list[dict]] = {n: [] for n in TWO_ARMED + ONE_ARMED if n in bench.configs}
    cpu: dict[str, list[dict]] = {n: [] for n in ("xdp_lb", "nftables", "bare_redirect", "ingress_drop")}
    for rep in range(reps):
        for name in rng.sample(list(rates), len(rates)):
            rates[name].append(bench.rate(name, rate_packets))
        for name in rng.sample(list(cpu), len(cpu)):
            cpu[name].append(bench.cpu_per_packet(name, cpu_pps, cpu_seconds))
        progress(f"  rep {rep + 1}/{reps}: " + ", ".join(
            f"{n} {v[-1]['delivered_pps'] / 1e6:.2f} Mpps" for n, v in rates.items()))

    def med(values: list[float]) -> dict[str, float]:
        return {"median": statistics.median(values), "min": min(values), "max": max(values)}

    out: dict = {"rate": {n: med([r["delivered_pps"] for r in v]) | {"lost_max": max(r["lost"] for r in v)}
                          for n, v in rates.items()}}
    # Per repetition: (busy(config) - busy(ingress drop)) / delivered(config). A repetition where a
    # configuration was not busier than the drop floor measured noise (other load on the machine),
    # not a free LB: it gives no figure (None), and no ratio.
    ns_per_packet: dict[str, list[float | None]] = {"xdp_lb": [], "nftables": [], "bare_redirect": []}
    for i in range(reps):
        base = cpu["ingress_drop"][i]["busy_s"]
        for name in ns_per_packet:
            m = cpu[name][i]
            net = m["busy_s"] - base
            ns_per_packet[name].append(net / max(1, m["delivered"]) * 1e9 if net > 0 else None)
    ratios = [x / n for x, n in zip(ns_per_packet["xdp_lb"], ns_per_packet["nftables"]) if x and n]

    def med_or_none(values: list[float | None]) -> dict[str, float] | None:
        kept = [v for v in values if v is not None]
        return med(kept) | {"reps_below_floor": len(values) - len(kept)} if kept else None

    out["cpu"] = {n: med_or_none(v) for n, v in ns_per_packet.items()} | {
        "xdp_over_nft_ratio": med(ratios) if ratios else None,
        "offered_pps": cpu_pps, "window_s": cpu_seconds,
        "busy_source": sorted({m["busy_source"] for v in cpu.values() for m in v}),
        "loss": {n: max(m["sent"] - m["delivered"] for m in v) for n, v in cpu.items() if n != "ingress_drop"},
    }
    r = out["rate"]
    out["rate"]["xdp_over_nft"] = r["xdp_lb"]["median"] / r["nftables"]["median"]
    out["rate"]["xdp_over_redirect"] = r["xdp_lb"]["median"] / r["bare_redirect"]["median"]
    if "katran_tunnel" in rates:  # per repetition (the runs of one repetition are close in time), then the median
        for name in ("lb_tunnel", "lb_nat_onearm"):
            per_rep = [a["delivered_pps"] / k["delivered_pps"]
                       for a, k in zip(rates[name], rates["katran_tunnel"]) if k["delivered_pps"]]
            out["rate"][f"{name}_over_katran"] = med(per_rep) if per_rep else None
    if bench.errors:
        out["errors"] = dict(bench.errors)
    if bench.arm is not None:
        # Every packet the one-armed runs delivered reached a backend's stack decapsulated (tunnel) or
        # plain (NAT); these counted the ones that still carried an IPIP header (0 when all is well).
        out["onearm"] = {"not_decapsulated": {n: sum(x["not_decapsulated"] for x in rates[n])
                                              for n in ONE_ARMED if n in rates},
                         "lb_reasons": {n: _summed([x.get("lb_reasons", {}) for x in rates[n]])
                                        for n in ("lb_tunnel", "lb_nat_onearm") if n in rates},
                         "decapsulated_per_backend": bench.arm.decapsulated()}
        if "bare_hairpin" in rates:
            # Under live frames the whole path runs on the generator's CPU: 1/rate is the time per packet.
            # Above the bare hairpin's, it is the LB's own (beyond a fixed encapsulation), the lab's taken out.
            above = {n: [(1 / a["delivered_pps"] - 1 / b["delivered_pps"]) * 1e9
                         for a, b in zip(rates[n], rates["bare_hairpin"]) if a["delivered_pps"] and b["delivered_pps"]]
                     for n in ("lb_tunnel", "lb_nat_onearm", "katran_tunnel") if n in rates}
            out["onearm"]["ns_above_bare_hairpin"] = {n: med(v) if v else None for n, v in above.items()}
        if len(os.sched_getaffinity(0)) >= 2:
            out["lb_core"] = lb_core(bench, [n for n in ONE_ARMED if n in rates], reps, core_packets, progress)
    return out
