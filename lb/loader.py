"""Compile the data plane with bcc, pin it, attach it to interfaces, take it away.

bcc is imported only here, and only to compile: everything else reaches the
program and its maps through their pins."""
from __future__ import annotations

import errno
import hashlib
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
XDP_FLAGS_REPLACE = 1 << 4  # swap only if the attached program is the expected one
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


def program_digest(config: DataPlaneConfig, pin_dir: str) -> str:
    """What the program is built from: every source under bpf/ and the compiler flags.

    Equal digests mean an equal program, so a restarted daemon keeps the one attached."""
    h = hashlib.sha256()
    for path in sorted(BPF_DIR.glob("*.[ch]")):
        h.update(path.name.encode() + b"\0" + path.read_bytes() + b"\0")
    h.update("\0".join(config.cflags(pin_dir)).encode())
    return h.hexdigest()


def _compile(config: DataPlaneConfig, pin_dir: str) -> int:
    """Compile and load bpf/lb.c; its maps are the pins in pin_dir (bcc adopts pins that exist,
    entries and all, and creates and pins the others). Returns a program fd."""
    from bcc import BPF  # heavy: only attach and upgrades need the compiler

    os.makedirs(pin_dir, exist_ok=True)
    try:
        bpf = BPF(src_file=os.fsencode(BPF_DIR / "lb.c"), cflags=config.cflags(pin_dir))
        fn = bpf.load_func(b"xdp_lb", BPF.XDP)
    except Exception as e:  # bcc raises bare Exceptions; the verifier log went to stderr
        raise LoadError(f"the kernel refused the data plane program: {e}") from e
    fd = os.dup(fn.fd)
    bpf.cleanup()
    return fd


def load_and_pin(config: DataPlaneConfig, pin_dir: str) -> int:
    """Compile bpf/lb.c, create and pin its maps and program; returns a program fd."""
    try:
        fd = _compile(config, pin_dir)
    except LoadError:
        unpin_all(pin_dir)
        raise
    bpfsys.obj_pin(fd, os.path.join(pin_dir, PROGRAM_PIN))
    return fd


def replace_program(config: DataPlaneConfig, pin_dir: str, interfaces: list[tuple[int, str]]) -> int:
    """Build the program again on the pinned maps (every entry kept, the connection table too),
    swap it in on each (ifindex, mode) atomically and pin it in the old one's place.

    Packets see either the old program or the new one, never none. Returns the new program's id."""
    new_fd = _compile(config, pin_dir)
    old_fd = pinned_program(pin_dir)
    try:
        staged = os.path.join(pin_dir, PROGRAM_PIN + "_new")  # bpffs names take no dots
        if os.path.exists(staged):
            os.unlink(staged)
        bpfsys.obj_pin(new_fd, staged)
        for ifindex, mode in interfaces:
            _swap_xdp(ifindex, mode, new_fd, old_fd)
        os.rename(staged, os.path.join(pin_dir, PROGRAM_PIN))  # bpffs renames over the old pin atomically
        return bpfsys.prog_id(new_fd)
    finally:
        os.close(old_fd)
        os.close(new_fd)


def _swap_xdp(ifindex: int, mode: str, new_fd: int, old_fd: int) -> None:
    flags = XDP_MODES[mode]
    attrs = [("IFLA_XDP_FD", new_fd), ("IFLA_XDP_FLAGS", flags)]
    if attached_prog_id(ifindex) == bpfsys.prog_id(old_fd):
        # The kernel swaps only if our old program is still the one attached.
        attrs = [("IFLA_XDP_FD", new_fd), ("IFLA_XDP_EXPECTED_FD", old_fd), ("IFLA_XDP_FLAGS", flags | XDP_FLAGS_REPLACE)]
    try:
        with IPRoute() as ipr:
            ipr.link("set", index=ifindex, xdp={"attrs": attrs})
    except NetlinkError as e:
        raise LoadError(f"ifindex {ifindex}: replacing the XDP program failed: {os.strerror(e.code)}") from e


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
