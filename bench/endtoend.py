"""End to end through the lab: generator namespace -> LB namespace -> backend namespaces.

A live-frames generator (netns/xdptools.py) sends 60-byte UDP frames over 1,024
flows from the client namespace to the VIP; a counting XDP sink in each
backend namespace counts what arrives. In the same run and topology, the LB is
in turn: lb's XDP data plane; the kernel's nftables DNAT (numgen over the
backends, as kube-proxy's nftables mode does; lb's program detached); a bare
MAC-rewrite + DEVMAP redirect (the ceiling); and, for CPU accounting only, an
XDP program that counts and drops on the LB's ingress."""
from __future__ import annotations

import contextlib
import random
import statistics
import subprocess
import time
from dataclasses import dataclass
from typing import Callable, Iterator

from scapy.layers.inet import IP, UDP
from scapy.layers.l2 import Ether

from bench.busy import BusyClock
from lb import loader
from netns.topology import Lab
from netns.xdptools import BareRedirect, Generator, Sink, attach, detach

FLOWS = 1024
VIP_PORT, BACKEND_PORT = 53, 5353


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
class Bench:
    lab: Lab
    lb_prog_fd: int
    sinks: list[Sink]
    generator: Generator
    configs: dict[str, tuple[Callable[[], None], Callable[[], None]]]  # name -> (enable, disable)

    def close(self) -> None:
        """Take the sinks off the backends: afterwards they receive normally again."""
        for sink in self.sinks:
            sink.detach()

    def delivered(self) -> int:
        return sum(s.count() for s in self.sinks)

    @contextlib.contextmanager
    def config(self, name: str) -> Iterator[None]:
        enable, disable = self.configs[name]
        enable()
        try:
            yield
        finally:
            disable()

    def rate(self, name: str, packets: int) -> dict[str, float]:
        """Full speed: offered and delivered packets per second."""
        with self.config(name):
            self.generator.send(20_000)  # warm-up: neighbours, caches, conntrack
            before = self.delivered()
            start = time.monotonic()
            sent = self.generator.send(packets)
            elapsed = time.monotonic() - start
            delivered = self._settled(before)
        return {"offered_pps": sent / elapsed, "delivered_pps": delivered / elapsed, "lost": sent - delivered}

    def cpu_per_packet(self, name: str, pps: int, seconds: float) -> dict[str, float]:
        """At a fixed offered rate: busy CPU time over the window (bench/busy.py) and packets delivered."""
        per_call = pps // 10
        with self.config(name):
            self.generator.send(per_call)
            clock = BusyClock()
            before, mark = self.delivered(), clock.read()
            start = time.monotonic()
            sent = 0
            for tick in range(int(seconds * 10)):
                sent += self.generator.send(per_call)
                time.sleep(max(0.0, start + (tick + 1) / 10 - time.monotonic()))
            elapsed = time.monotonic() - start
            busy = clock.busy_since(mark)
            delivered = self._settled(before)
        return {"busy_s": busy, "delivered": delivered, "sent": sent, "elapsed_s": elapsed,
                "busy_source": clock.source}

    def _settled(self, before: int) -> int:
        """Delivered since `before`, once the sinks stop counting (bounded wait)."""
        last, deadline = -1, time.monotonic() + 2
        while time.monotonic() < deadline:
            now = self.delivered() - before
            if now == last:
                return now
            last = now
            time.sleep(0.05)
        return last


def build(lab: Lab, pin_dir: str) -> Bench:
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

    configs = {
        "xdp_lb": (lambda: None, lambda: None),
        "nftables": (lambda: (lb_off(), gro(True), nft(lab, ruleset)),
                     lambda: (nft(lab, "delete table ip lbbench\n"), gro(False), lb_on())),
        "bare_redirect": (lambda: (lb_off(), redirect.attach()), lambda: (redirect.detach(), lb_on())),
        "ingress_drop": (lambda: (lb_off(), drop.attach()), lambda: (drop.detach(), lb_on())),
    }
    return Bench(lab, lb_prog, sinks, generator, configs)


def run(bench: Bench, reps: int, rate_packets: int, cpu_pps: int, cpu_seconds: float, progress=print) -> dict:
    rng = random.Random(2)
    rates: dict[str, list[dict]] = {n: [] for n in ("xdp_lb", "nftables", "bare_redirect")}
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
    return out
