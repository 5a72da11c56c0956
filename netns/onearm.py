"""A one-armed load balancer in the lab, as Katran is deployed: beside a router, not in the path.

    router (generator) to-lb   198.18.199.1 --- 198.18.199.2 arm0 [LB]
                       to-b<i> 198.18.<200+i>.1 --- 198.18.<200+i>.2 kt0 backend i

The generator in the router's namespace sends to a VIP out of to-lb; the LB sends each packet back out
of the interface it came in by (XDP_TX), to the router's MAC (Katran's default gateway, and the next hop
of the LB namespace's routes to the backends' kt0 addresses); the router (netns/bpf/onearm.c,
xdp_router) forwards it by destination address to a backend's kt0. There lb's decapsulation program
(lbctl decap attach) strips the IPIP header of tunnel VIPs' packets, and a TC ingress counter
(tc_arrived) counts what reached the backend's stack, decapsulated or not, and drops it.

Built inside an existing Lab (its LB and backend namespaces); `with OneArm.build(lab, vips) as arm:`
removes it all again, and the Lab's own teardown covers a run that dies half way.

`arm.own_core()` gives the LB a core of its own, as a deployed LB has: the arm's receive (and with it
the LB's XDP program and its XDP_TX) runs in a threaded-NAPI kthread alone on one CPU, the router's
receive (the router, the backends' stacks) in another on the other CPU; `LbCore.runtime_ns()` is the
CPU time the LB's kthread has run."""
from __future__ import annotations

import contextlib
import ctypes
import ipaddress
import os
import socket
import subprocess
from dataclasses import dataclass, field
from typing import Iterator

from pyroute2 import netns
from pyroute2.ethtool import Ethtool
from scapy.layers.inet import IP, UDP
from scapy.layers.l2 import Ether

from lb import bpfsys
from netns.lbctl import run_lbctl
from netns.nsenter import in_netns, netlink_in
from netns.topology import Lab, lab_mac, veth_pair
from netns.xdptools import XDP_PASS, Sink, _compile, attach, detach

ARM_SUBNET = 199  # router <-> LB's arm; 200 + i: router <-> backend i
ARM, ROUTER_ARM, BACKEND_IF = "arm0", "to-lb", "kt0"
NUD_PERMANENT = 0x80
TC_INGRESS = "ffff:fff2"
ARRIVED_PLAIN, ARRIVED_IPIP = 0, 1


def _v4(subnet: int, host: int) -> ipaddress.IPv4Address:
    return ipaddress.IPv4Address(f"198.18.{subnet}.{host}")


def _v6(subnet: int, host: int) -> ipaddress.IPv6Address:
    return ipaddress.IPv6Address(f"2001:2:0:{subnet:x}::{host}")


def _napi_threads(ifname: str) -> set[int]:
    """Pids of the threaded-NAPI kthreads of interfaces named ifname, in any namespace (napi/IFNAME-ID)."""
    pids = set()
    for entry in os.listdir("/proc"):
        if entry.isdigit():
            with contextlib.suppress(OSError):
                with open(f"/proc/{entry}/comm") as f:
                    if f.read().startswith(f"napi/{ifname}-"):
                        pids.add(int(entry))
    return pids


def _set_threaded(ns: str, ifname: str, on: bool) -> None:
    # sysfs shows a namespace's devices to a mount made in it: ip netns exec makes one
    subprocess.run(["ip", "netns", "exec", ns, "sh", "-c", f"echo {int(on)} > /sys/class/net/{ifname}/threaded"],
                   check=True, capture_output=True)


@dataclass
class LbCore:
    """A veth's receive in a threaded-NAPI kthread of its own, pinned to one CPU at a real-time priority
    (a dedicated core: nothing else on the machine takes its CPU from it while it has packets)."""
    ns: str
    ifname: str
    cpu: int
    pid: int = 0

    def start(self) -> "LbCore":
        before = _napi_threads(self.ifname)
        _set_threaded(self.ns, self.ifname, True)
        new = _napi_threads(self.ifname) - before
        if len(new) != 1:  # another lab's interface of the same name went threaded at the same moment
            raise RuntimeError(f"{self.ns}/{self.ifname}: expected one new NAPI kthread, found {sorted(new)}")
        self.pid = new.pop()
        os.sched_setaffinity(self.pid, {self.cpu})
        os.sched_setscheduler(self.pid, os.SCHED_FIFO, os.sched_param(10))
        return self

    def stop(self) -> None:
        if self.pid:
            with contextlib.suppress(Exception):
                _set_threaded(self.ns, self.ifname, False)
            self.pid = 0

    def runtime_ns(self) -> int:
        """CPU time the kthread has run (its receive, the XDP program, its XDP_TX), in ns."""
        return self.schedstat()[0]

    def wakeups(self) -> int:
        """Times the kthread was scheduled in (a sleeping receiver is woken per flush of frames)."""
        return self.schedstat()[2]

    def schedstat(self) -> tuple[int, int, int]:
        """(run time ns, wait time ns, times scheduled in) of the kthread (/proc/PID/schedstat)."""
        with open(f"/proc/{self.pid}/schedstat") as f:
            run, wait, slices = f.read().split()[:3]
        return int(run), int(wait), int(slices)


def _gro(ns: str, ifname: str) -> None:
    """GRO on a veth end: it takes XDP_TX'd frames even while no XDP program is attached."""
    with in_netns(ns), contextlib.closing(Ethtool()) as ethtool:
        features = ethtool.get_features(ifname)
        features.features["rx-gro"].enable = True
        ethtool.set_features(ifname, features)


@dataclass
class OneArm:
    lab: Lab
    ns: str  # the router's namespace
    backend_addresses: list[ipaddress.IPv4Address] = field(default_factory=list)
    router_mac: str = lab_mac(ARM_SUBNET, 1)
    arm_mac: str = lab_mac(ARM_SUBNET, 2)
    arm: str = ARM
    router_if: str = ROUTER_ARM
    decapsulating: list[str] = field(default_factory=list)  # backend namespaces with lbctl decap attached
    bpf: object = None

    @classmethod
    @contextlib.contextmanager
    def build(cls, lab: Lab, tunnel_vips: list[ipaddress.IPv4Address]) -> Iterator["OneArm"]:
        """The router, its links, and on each backend lb's decapsulation (for `tunnel_vips`) and the counter."""
        arm = cls(lab, f"{lab.prefix}-rt")
        lab._add_ns(arm.ns)  # the Lab's teardown removes it, whatever happens here
        try:
            arm._links()
            arm._programs(tunnel_vips)
            yield arm
        finally:
            arm._remove()

    def _links(self) -> None:
        lab = self.lab
        veth_pair(ARM_SUBNET, (self.ns, ROUTER_ARM, _v4(ARM_SUBNET, 1), _v6(ARM_SUBNET, 1)),
                  (lab.lb_ns, ARM, _v4(ARM_SUBNET, 2), _v6(ARM_SUBNET, 2)))
        for i, backend in enumerate(lab.backends, start=1):
            veth_pair(200 + i, (self.ns, f"to-b{i}", _v4(200 + i, 1), _v6(200 + i, 1)),
                      (backend.ns, BACKEND_IF, _v4(200 + i, 2), _v6(200 + i, 2)))
            self.backend_addresses.append(_v4(200 + i, 2))
        router = _v4(ARM_SUBNET, 1)
        with netlink_in(lab.lb_ns) as ipr:
            idx = ipr.link_lookup(ifname=ARM)[0]
            # The router's MAC is known, as a gateway's is: no neighbour resolution in the timed path.
            ipr.neigh("add", dst=str(router), lladdr=self.router_mac, ifindex=idx, state=NUD_PERMANENT)
            for address in self.backend_addresses:
                ipr.route("add", dst=f"{address}/32", gateway=str(router), oif=idx)
        _gro(lab.lb_ns, ARM)

    def _programs(self, tunnel_vips: list[ipaddress.IPv4Address]) -> None:
        self.bpf = _compile("onearm.c")
        router = self.bpf.load_func(b"xdp_router", self.bpf.XDP)
        counter = self.bpf.load_func(b"tc_arrived", self.bpf.SCHED_CLS)
        routes, ports = self.bpf["router_routes"], self.bpf["router_ports"]
        pass_prog = bpfsys.load_xdp_return(XDP_PASS, b"lab_pass")
        try:
            for i, address in enumerate(self.backend_addresses, start=1):
                out = f"to-b{i}"
                with in_netns(self.ns):  # a DEVMAP resolves ifindexes in the updating thread's namespace
                    ports[ctypes.c_int(i)] = ctypes.c_int(socket.if_nametoindex(out))
                hop = routes.Leaf()
                hop.slot = i
                ctypes.memmove(hop.dst, bytes.fromhex(lab_mac(200 + i, 2).replace(":", "")), 6)
                ctypes.memmove(hop.src, bytes.fromhex(lab_mac(200 + i, 1).replace(":", "")), 6)
                routes[routes.Key(int.from_bytes(address.packed, "little"))] = hop
                attach(self.ns, out, pass_prog)  # as the lab's other redirect targets have
        finally:
            os.close(pass_prog)
        attach(self.ns, ROUTER_ARM, router.fd)
        vip_args = [a for v in tunnel_vips for a in ("--vip", str(v))]
        for backend in self.lab.backends:
            run_lbctl(backend.ns, "decap", "attach", BACKEND_IF, *vip_args)
            self.decapsulating.append(backend.ns)
            with netlink_in(backend.ns) as ipr:
                idx = ipr.link_lookup(ifname=BACKEND_IF)[0]
                ipr.tc("add", "clsact", index=idx)
                ipr.tc("add-filter", "bpf", index=idx, handle=1, prio=1, fd=counter.fd, name="tc_arrived",
                       parent=TC_INGRESS, classid=1, direct_action=True)

    def _remove(self) -> None:
        for ns in self.decapsulating:
            with contextlib.suppress(Exception):
                run_lbctl(ns, "decap", "detach", BACKEND_IF)
        self.decapsulating.clear()
        with contextlib.suppress(Exception):
            detach(self.lab.lb_ns, ARM)
        # Removing the namespace removes its veths, and with them arm0, the kt0s and what was on them.
        if self.ns in self.lab.namespaces:
            with contextlib.suppress(Exception):
                netns.remove(self.ns)
            self.lab.namespaces.remove(self.ns)
        if self.bpf is not None:
            self.bpf.cleanup()
            self.bpf = None

    @contextlib.contextmanager
    def own_core(self, lb_cpu: int = 1, rest_cpu: int = 0, router_sink: Sink | None = None) -> Iterator[LbCore]:
        """The LB's receive alone on lb_cpu; the router's receive (and the backends' stacks, which run in
        it), and the caller's thread (the generator's test runs), on rest_cpu. With router_sink, the
        router counts and drops what the LB sends instead of forwarding it: the rest then costs less
        than the LB, whose core becomes the bottleneck. Undone on leaving."""
        _gro(self.ns, self.router_if)  # a veth's NAPI (and so its kthread) exists with GRO or XDP on
        lb, rest = LbCore(self.lab.lb_ns, self.arm, lb_cpu), LbCore(self.ns, self.router_if, rest_cpu)
        own = os.sched_getaffinity(0)
        try:
            if router_sink is not None:
                router_sink.attach()
            lb.start()
            rest.start()
            os.sched_setaffinity(0, {rest_cpu})
            yield lb
        finally:
            os.sched_setaffinity(0, own)
            rest.stop()
            lb.stop()
            if router_sink is not None:
                attach(self.ns, self.router_if, self.bpf.load_func(b"xdp_router", self.bpf.XDP).fd)

    def frame(self, vip: ipaddress.IPv4Address, port: int, payload: bytes = b"x" * 18) -> bytes:
        """A UDP frame from the client's address to vip:port, as the router hands it to the LB (checksum 0)."""
        return bytes(Ether(src=self.router_mac, dst=self.arm_mac) / IP(src=str(self.lab.client.address), dst=str(vip))
                     / UDP(sport=1024, dport=port, chksum=0) / payload)

    def bare_tunnel_hairpin(self, frame_len: int = 60) -> int:
        """The fd of xdp_hairpin_ipip (onearm.c), set to send every frame of `frame_len` bytes to the first
        backend in IPIP, as a tunnel LB would: the one-armed ceiling. Attach it on the arm."""
        inner_len = frame_len - 14
        outer = bytes(Ether(src=self.arm_mac, dst=self.router_mac)
                      / IP(src="172.16.0.1", dst=str(self.backend_addresses[0]), proto=4, len=inner_len + 20,
                           flags="DF", id=0, ttl=64))[:34]
        table = self.bpf["hairpin_header"]
        header = table[ctypes.c_int(0)]
        ctypes.memmove(ctypes.addressof(header), outer, len(outer))
        table[ctypes.c_int(0)] = header
        return self.bpf.load_func(b"xdp_hairpin_ipip", self.bpf.XDP).fd

    def lb_received(self) -> int:
        """Frames the LB's arm took in (its XDP program saw each one): the veth's own count."""
        out = subprocess.run(["ip", "netns", "exec", self.lab.lb_ns, "ethtool", "-S", self.arm],
                             capture_output=True, text=True, check=True).stdout
        return sum(int(value) for name, value in (line.split(":") for line in out.splitlines()[1:])
                   if name.strip().endswith("xdp_packets"))

    def arrived(self) -> tuple[int, int]:
        """(plain IPv4, still IPIP) packets that reached the backends' stacks, over all backends."""
        table = self.bpf["arrived"]
        return sum(table[ctypes.c_int(ARRIVED_PLAIN)]), sum(table[ctypes.c_int(ARRIVED_IPIP)])

    def delivered(self) -> int:
        return self.arrived()[0]

    def decapsulated(self) -> list[int]:
        """Per backend, the IPIP packets lb's decapsulation program stripped (lbctl decap stats)."""
        return [run_lbctl(b.ns, "decap", "stats", "--json").json()["packets"]["ipv4"] for b in self.lab.backends]
