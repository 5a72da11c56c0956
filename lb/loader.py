"""Compile the data plane with bcc, pin it, attach it to interfaces, take it away.

bcc is imported only here, and only to compile: everything else reaches the
program and its maps through their pins."""
from __future__ import annotations

import errno
import os
from dataclasses import dataclass, asdict
from pathlib import Path

from pyroute2 import IPRoute
from pyroute2.netlink.exceptions import NetlinkError

from lb import bpfsys
from lb.maglev import DEFAULT_RING_SIZE, is_prime

BPF_DIR = Path(__file__).resolve().parent.parent / "bpf"
PROGRAM_PIN = "xdp_lb"  # the XDP build: attached with hook "xdp", and always the probe's engine
TC_PROGRAM_PIN = "tc_lb"  # the TC build (-DLB_HOOK_TC), with hook "tc"
HOOKS = ("xdp", "tc")

XDP_FLAGS_SKB_MODE = 1 << 1
XDP_FLAGS_DRV_MODE = 1 << 2
XDP_MODES = {"native": XDP_FLAGS_DRV_MODE, "generic": XDP_FLAGS_SKB_MODE}


class LoadError(RuntimeError):
    """The data plane could not be compiled, loaded or attached."""


@dataclass(frozen=True)
class DataPlaneConfig:
    """Compile-time sizes of the data plane."""

    ring_size: int = DEFAULT_RING_SIZE
    max_vips: int = 256
    max_backends: int = 4096
    conn_table_size: int = 1 << 20
    max_routes: int = 16384

    def __post_init__(self) -> None:
        if not is_prime(self.ring_size):
            raise ValueError(f"ring size must be a prime, got {self.ring_size}")
        if self.max_vips > 65536:
            raise ValueError("at most 65,536 VIPs (a flow records its VIP in 16 bits)")
        if self.max_vips * self.ring_size >= 2**32:
            raise ValueError("max VIPs x ring size must fit in 32 bits")

    def cflags(self, pin_dir: str) -> list[str]:
        return [
            f"-I{BPF_DIR}",
            f"-DLB_RING_SIZE={self.ring_size}",
            f"-DLB_MAX_VIPS={self.max_vips}",
            f"-DLB_MAX_BACKENDS={self.max_backends}",
            f"-DLB_CONN_TABLE_SIZE={self.conn_table_size}",
            f"-DLB_MAX_ROUTES={self.max_routes}",
            f'-DLB_PIN_DIR="{pin_dir}"',
        ]

    def as_dict(self) -> dict[str, int]:
        return asdict(self)


def load_and_pin(config: DataPlaneConfig, pin_dir: str, hook: str = "xdp") -> int:
    """Compile bpf/lb.c, create and pin its maps and the XDP program (lbctl test-packet runs it
    whatever the hook); for hook "tc" also the TC build, on the same maps. Returns an fd of the
    program to attach."""
    os.makedirs(pin_dir, exist_ok=True)
    try:
        fd = _compile_and_pin(config, pin_dir, "xdp")
        if hook == "tc":
            os.close(fd)
            fd = _compile_and_pin(config, pin_dir, "tc")
    except Exception as e:  # bcc raises bare Exceptions; the verifier log went to stderr
        unpin_all(pin_dir)
        raise LoadError(f"the kernel refused the data plane program: {e}") from e
    return fd


def _compile_and_pin(config: DataPlaneConfig, pin_dir: str, hook: str) -> int:
    from bcc import BPF  # heavy: only attach needs the compiler

    tc = hook == "tc"
    bpf = BPF(src_file=os.fsencode(BPF_DIR / "lb.c"), cflags=config.cflags(pin_dir) + (["-DLB_HOOK_TC"] if tc else []))
    try:
        fn = bpf.load_func(b"xdp_lb", BPF.SCHED_CLS if tc else BPF.XDP)
        fd = os.dup(fn.fd)
    finally:
        bpf.cleanup()
    bpfsys.obj_pin(fd, os.path.join(pin_dir, TC_PROGRAM_PIN if tc else PROGRAM_PIN))
    return fd


def pinned_program(pin_dir: str, hook: str = "xdp") -> int:
    return bpfsys.obj_get(os.path.join(pin_dir, TC_PROGRAM_PIN if hook == "tc" else PROGRAM_PIN))


def unpin_all(pin_dir: str) -> None:
    """Remove every pin of a data plane; programs and maps go when unused."""
    if not os.path.isdir(pin_dir):
        return
    for name in os.listdir(pin_dir):
        os.unlink(os.path.join(pin_dir, name))
    os.rmdir(pin_dir)


def attach_xdp(ifindex: int, ifname: str, prog_fd: int, mode: str) -> None:
    flags = XDP_MODES[mode]
    try:
        with IPRoute() as ipr:
            ipr.link("set", index=ifindex, xdp={"attrs": [("IFLA_XDP_FD", prog_fd), ("IFLA_XDP_FLAGS", flags)]})
    except NetlinkError as e:
        if mode == "native" and e.code in (errno.EOPNOTSUPP, errno.EINVAL):
            raise LoadError(f"{ifname}: native XDP is not supported by this interface's driver; "
                            f"use --xdp-mode generic") from e
        if e.code == errno.EBUSY:
            raise LoadError(f"{ifname}: another XDP program is attached in a different mode; detach it first") from e
        raise LoadError(f"{ifname}: attaching XDP failed: {os.strerror(e.code)}") from e


def attached_prog_id(ifindex: int) -> int:
    """The id of the XDP program attached to an interface, 0 for none."""
    with IPRoute() as ipr:
        links = ipr.link("get", index=ifindex)
    xdp = links[0].get_attr("IFLA_XDP") if links else None
    if not xdp:
        return 0
    return xdp.get_attr("IFLA_XDP_PROG_ID") or 0


def detach_xdp(ifindex: int, mode: str) -> None:
    with IPRoute() as ipr:
        ipr.link("set", index=ifindex, xdp={"attrs": [("IFLA_XDP_FD", -1), ("IFLA_XDP_FLAGS", XDP_MODES[mode])]})


# TC: a clsact qdisc's ingress hook, one direct-action bpf filter at lb's own priority and name.
TC_INGRESS = 0xFFFFFFF2
TC_EGRESS = 0xFFFFFFF3
TC_PRIO = 0x4C42
TC_FILTER_NAME = "lb"


def attach_tc(ifindex: int, ifname: str, prog_fd: int) -> None:
    try:
        with IPRoute() as ipr:
            try:
                ipr.tc("add", "clsact", ifindex)
            except NetlinkError as e:
                if e.code != errno.EEXIST:
                    raise
            ipr.tc("add-filter", "bpf", ifindex, ":1", fd=prog_fd, name=TC_FILTER_NAME, parent=TC_INGRESS,
                   prio=TC_PRIO, classid=1, direct_action=True)
    except NetlinkError as e:
        if e.code == errno.EEXIST:
            raise LoadError(f"{ifname}: a TC filter already sits at lb's priority; detach it first") from e
        raise LoadError(f"{ifname}: attaching at TC ingress failed: {os.strerror(e.code)}") from e


def tc_attached(ifindex: int) -> bool:
    """Does lb's filter sit on the interface's TC ingress?"""
    with IPRoute() as ipr:
        filters = ipr.get_filters(index=ifindex, parent=TC_INGRESS)
    return any(f["info"] >> 16 == TC_PRIO and f.get_nested("TCA_OPTIONS", "TCA_BPF_NAME") == TC_FILTER_NAME
               for f in filters)


def detach_tc(ifindex: int) -> None:
    """Remove lb's filter; and the clsact qdisc once no filter is left on it."""
    with IPRoute() as ipr:
        ipr.tc("del-filter", index=ifindex, parent=TC_INGRESS, prio=TC_PRIO)
        left = [f for parent in (TC_INGRESS, TC_EGRESS) for f in ipr.get_filters(index=ifindex, parent=parent)]
        if not left:
            ipr.tc("del", "clsact", ifindex)
