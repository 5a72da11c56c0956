"""Run one packet through a loaded XDP program with BPF_PROG_TEST_RUN."""
from __future__ import annotations

import ctypes
from dataclasses import dataclass

from lb import bpfsys

XDP_ACTIONS = ("XDP_ABORTED", "XDP_DROP", "XDP_PASS", "XDP_TX", "XDP_REDIRECT")
_HEADROOM = 512  # room for a program that grows the packet


class XdpMd(ctypes.Structure):
    _fields_ = [(name, ctypes.c_uint32) for name in
                ("data", "data_end", "data_meta", "ingress_ifindex", "rx_queue_index", "egress_ifindex")]


@dataclass(frozen=True)
class TestRunResult:
    action: str
    packet: bytes
    meta: bytes  # the XDP metadata area after the run


def action_name(retval: int) -> str:
    return XDP_ACTIONS[retval] if 0 <= retval < len(XDP_ACTIONS) else f"XDP_UNKNOWN({retval})"


def run_xdp(prog_fd: int, frame: bytes, ingress_ifindex: int = 0, meta: bytes = b"") -> TestRunResult:
    """One run (repeat=1) on a fresh copy of `frame`, as if it arrived on `ingress_ifindex`
    (an interface of the calling thread's network namespace; 0 for none), with `meta`
    (a multiple of 4 bytes, at most 32) in the XDP metadata area before the packet."""
    data_in = ctypes.create_string_buffer(meta + frame, len(meta) + len(frame))
    data_out = ctypes.create_string_buffer(len(meta) + len(frame) + _HEADROOM)
    ctx_in = XdpMd(data=len(meta), data_end=len(meta) + len(frame), ingress_ifindex=ingress_ifindex)
    ctx_out = XdpMd()
    attr = bpfsys.TestRunAttr(
        prog_fd=prog_fd, data_in=ctypes.addressof(data_in), data_size_in=len(meta) + len(frame),
        data_out=ctypes.addressof(data_out), data_size_out=len(data_out), repeat=1,
        ctx_in=ctypes.addressof(ctx_in), ctx_size_in=ctypes.sizeof(ctx_in),
        ctx_out=ctypes.addressof(ctx_out), ctx_size_out=ctypes.sizeof(ctx_out),
    )
    bpfsys.bpf(bpfsys.BPF_PROG_TEST_RUN, attr, "BPF_PROG_TEST_RUN")
    out = data_out.raw[:attr.data_size_out]
    return TestRunResult(action_name(attr.retval), out[ctx_out.data:], out[:ctx_out.data])
