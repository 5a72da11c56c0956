"""Small XDP programs for the lab: a live-frames traffic generator, counting sinks,
and a bare DEVMAP redirect (the ceiling any forwarder is compared with).

They are compiled with bcc and attached with pyroute2, inside lab namespaces."""
from __future__ import annotations

import ctypes
import os
import socket
from dataclasses import dataclass
from pathlib import Path


from lb import bpfsys
from lb.testrun import XdpMd
from netns.nsenter import in_netns, netlink_in

BPF_DIR = Path(__file__).parent / "bpf"
LIVE_FRAMES = 1 << 1
XDP_DRV_MODE = 1 << 2
XDP_DROP, XDP_PASS = 1, 2


def _compile(name: str, cflags: list[str] | None = None):
    from bcc import BPF  # the lab's tools need the compiler; the product's CLI does not
    return BPF(src_file=os.fsencode(BPF_DIR / name), cflags=cflags or [])


def _set_xdp(ns: str, ifname: str, prog_fd: int) -> None:
    # Netlink from this thread, moved into the namespace (see nsenter): a socket made there stays there.
    with netlink_in(ns) as ipr:
        found = ipr.link_lookup(ifname=ifname)
        if not found:
            raise LookupError(f"no interface {ifname} in namespace {ns}")
        ipr.link("set", index=found[0], xdp={"attrs": [("IFLA_XDP_FD", prog_fd), ("IFLA_XDP_FLAGS", XDP_DRV_MODE)]})


def attach(ns: str, ifname: str, prog_fd: int) -> None:
    _set_xdp(ns, ifname, prog_fd)


def detach(ns: str, ifname: str) -> None:
    _set_xdp(ns, ifname, -1)


class Sink:
    """Counts (and drops, or passes) every frame arriving on an interface."""

    def __init__(self, ns: str, ifname: str, drop: bool = True):
        self.ns, self.ifname = ns, ifname
        self.bpf = _compile("sink.c", [f"-DSINK_ACTION={XDP_DROP if drop else XDP_PASS}"])
        self.fn = self.bpf.load_func(b"xdp_sink", self.bpf.XDP)
        self.counter = self.bpf["sink_count"]
        self.attached = False

    def attach(self) -> "Sink":
        attach(self.ns, self.ifname, self.fn.fd)
        self.attached = True
        return self

    def detach(self) -> None:
        if self.attached:
            detach(self.ns, self.ifname)
            self.attached = False

    def count(self) -> int:
        return sum(self.counter[ctypes.c_int(0)])


class BareRedirect:
    """Rewrites MACs and redirects every frame to one interface: the forwarding ceiling."""

    def __init__(self, ns: str, in_ifname: str, out_ifname: str, dst_mac: str):
        self.ns, self.in_ifname = ns, in_ifname
        # A veth takes redirected frames only with an XDP program of its own (as lb's interfaces have).
        self.out_pass = Sink(ns, out_ifname, drop=False)
        self.bpf = _compile("redirect.c")
        self.fn = self.bpf.load_func(b"xdp_redirect_bare", self.bpf.XDP)
        with netlink_in(ns) as ipr:
            out_index = ipr.link_lookup(ifname=out_ifname)[0]
            src_mac = ipr.get_links(out_index)[0].get_attr("IFLA_ADDRESS")
        macs = self.bpf["redirect_macs"][ctypes.c_int(0)]
        ctypes.memmove(ctypes.addressof(macs), bytes.fromhex(dst_mac.replace(":", "") + src_mac.replace(":", "")), 12)
        self.bpf["redirect_macs"][ctypes.c_int(0)] = macs
        with in_netns(ns):  # a DEVMAP resolves ifindexes in the updating thread's namespace
            self.bpf["redirect_ports"][ctypes.c_int(0)] = ctypes.c_int(out_index)

    def attach(self) -> "BareRedirect":
        self.out_pass.attach()
        attach(self.ns, self.in_ifname, self.fn.fd)
        return self

    def detach(self) -> None:
        detach(self.ns, self.in_ifname)
        self.out_pass.detach()


@dataclass
class Generator:
    """Sends copies of a UDP template frame out of `ifname` at millions of packets per second."""

    ns: str
    ifname: str
    template: bytes  # at most 60 bytes used; UDP checksum must be 0
    flows: int = 1024
    batch: int = 64  # frames per flush (and so per wake-up of the receiver), at most 256

    def __post_init__(self) -> None:
        if len(self.template) < 60:
            self.template = self.template.ljust(60, b"\0")
        self.bpf = _compile("generator.c", [f"-DGEN_FLOWS={self.flows}"])
        self.fn = self.bpf.load_func(b"xdp_generate", self.bpf.XDP)
        table = self.bpf["gen_template"]
        tpl = table[ctypes.c_int(0)]
        ctypes.memmove(ctypes.addressof(tpl), self.template[:64].ljust(64, b"\0"), 64)
        table[ctypes.c_int(0)] = tpl
        with in_netns(self.ns):
            self.ifindex = socket.if_nametoindex(self.ifname)

    def send(self, count: int) -> int:
        """One live-frames test run of `count` frames; returns how many were sent."""
        frame = ctypes.create_string_buffer(self.template, len(self.template))
        ctx = XdpMd(data=0, data_end=len(self.template), ingress_ifindex=self.ifindex)
        attr = bpfsys.TestRunAttr(prog_fd=self.fn.fd, data_in=ctypes.addressof(frame),
                                  data_size_in=len(self.template), repeat=count, flags=LIVE_FRAMES,
                                  ctx_in=ctypes.addressof(ctx), ctx_size_in=ctypes.sizeof(ctx), batch_size=self.batch)
        with in_netns(self.ns):
            bpfsys.bpf(bpfsys.BPF_PROG_TEST_RUN, attr, "live-frames test run")
        return count
