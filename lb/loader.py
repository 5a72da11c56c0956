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
PROGRAM_PIN = "xdp_lb"

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


def load_and_pin(config: DataPlaneConfig, pin_dir: str) -> int:
    """Compile bpf/lb.c, create and pin its maps and program; returns a program fd."""
    from bcc import BPF  # heavy: only attach needs the compiler

    os.makedirs(pin_dir, exist_ok=True)
    try:
        bpf = BPF(src_file=os.fsencode(BPF_DIR / "lb.c"), cflags=config.cflags(pin_dir))
        fn = bpf.load_func(b"xdp_lb", BPF.XDP)
    except Exception as e:  # bcc raises bare Exceptions; the verifier log went to stderr
        unpin_all(pin_dir)
        raise LoadError(f"the kernel refused the data plane program: {e}") from e
    fd = os.dup(fn.fd)
    bpfsys.obj_pin(fd, os.path.join(pin_dir, PROGRAM_PIN))
    bpf.cleanup()
    return fd


def pinned_program(pin_dir: str) -> int:
    return bpfsys.obj_get(os.path.join(pin_dir, PROGRAM_PIN))


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
