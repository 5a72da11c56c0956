"""Compile the data plane with bcc, pin it, attach it to interfaces, take it away.

bcc is imported only here, and only to compile: everything else reaches the
program and its maps through their pins."""
from __future__ import annotations

import errno
import hashlib
import os
import socket
from dataclasses import dataclass, asdict
from pathlib import Path
from typing import TYPE_CHECKING, Callable

from lb import bpfsys, layout
from lb.maglev import DEFAULT_RING_SIZE, is_prime
from lb.private import private_dir

if TYPE_CHECKING:  # the functions that attach and detach import pyroute2 (150 ms) themselves: lbctl's
    from pyroute2 import IPRoute  # other commands need none of it

BPF_DIR = Path(__file__).resolve().parent.parent / "bpf"
PROGRAM_PIN = "xdp_lb"  # the XDP build: attached with hook "xdp", and always the probe's engine
TC_PROGRAM_PIN = "tc_lb"  # the TC build (-DLB_HOOK_TC), with hook "tc"
EGRESS_PROGRAM_PIN = "tc_egress"  # the TC build's egress program (steers marked local packets), with either hook
HOOKS = ("xdp", "tc")

XDP_FLAGS_SKB_MODE = 1 << 1
XDP_FLAGS_DRV_MODE = 1 << 2
XDP_FLAGS_REPLACE = 1 << 4  # swap only if the attached program is the expected one
XDP_MODES = {"native": XDP_FLAGS_DRV_MODE, "generic": XDP_FLAGS_SKB_MODE}


class LoadError(RuntimeError):
    """The data plane could not be compiled, loaded or attached."""


class UnknownInterface(LookupError):
    """No interface of that name in this network namespace (bad input, not a failure)."""


def interface_index(name: str) -> int:
    try:
        return socket.if_nametoindex(name)
    except OSError:
        raise UnknownInterface(f"unknown interface {name!r} in this network namespace") from None


@dataclass(frozen=True)
class DataPlaneConfig:
    """Compile-time sizes of the data plane."""

    ring_size: int = DEFAULT_RING_SIZE
    max_vips: int = 256
    max_backends: int = 4096
    conn_table_size: int = 1 << 20
    fullnat_table_size: int = 1 << 16  # full-NAT flows (and source ports) the data plane holds at once
    max_routes: int = 16384
    # Idle timeouts in seconds: not compiled in, the control plane writes them to lb_config.
    tcp_timeout: int = 900
    tcp_closing_timeout: int = 10
    udp_timeout: int = 30

    def __post_init__(self) -> None:
        if not is_prime(self.ring_size):
            raise ValueError(f"ring size must be a prime, got {self.ring_size}")
        if self.max_vips > 65536:
            raise ValueError("at most 65,536 VIPs (a flow records its VIP in 16 bits)")
        if self.max_vips * self.ring_size >= 2**32:
            raise ValueError("max VIPs x ring size must fit in 32 bits")
        for name in ("tcp_timeout", "tcp_closing_timeout", "udp_timeout"):
            if not 1 <= getattr(self, name) < 2**31:
                raise ValueError(f"{name.replace('_', ' ')} must be 1 to {2**31 - 1} seconds")

    def cflags(self, pin_dir: str) -> list[str]:
        return [
            f"-I{BPF_DIR}",
            f"-DLB_RING_SIZE={self.ring_size}",
            f"-DLB_MAX_VIPS={self.max_vips}",
            f"-DLB_MAX_BACKENDS={self.max_backends}",
            f"-DLB_CONN_TABLE_SIZE={self.conn_table_size}",
            f"-DLB_FULLNAT_TABLE_SIZE={self.fullnat_table_size}",
            f"-DLB_MAX_ROUTES={self.max_routes}",
            f'-DLB_PIN_DIR="{pin_dir}"',
        ]

    def as_dict(self) -> dict[str, int]:
        return asdict(self)


def program_digest(config: DataPlaneConfig, pin_dir: str) -> str:
    """What the programs are built from: every source under bpf/ and the compiler flags.

    Equal digests mean equal programs, so a restarted daemon keeps the ones attached."""
    h = hashlib.sha256()
    for path in sorted(BPF_DIR.glob("*.[ch]")):
        h.update(path.name.encode() + b"\0" + path.read_bytes() + b"\0")
    h.update("\0".join(config.cflags(pin_dir)).encode())
    return h.hexdigest()


# bpf/lb.c is built twice on the same maps: the XDP build (attached with hook "xdp", and always
# the probe's engine: lbctl test-packet) and the TC build (-DLB_HOOK_TC: ingress with hook "tc",
# and the egress program that steers marked local packets, with either hook).
BUILDS: tuple[tuple[list[str], dict[bytes, tuple[str, str]]], ...] = (
    ([], {b"xdp_lb": (PROGRAM_PIN, "XDP")}),
    (["-DLB_HOOK_TC"], {b"xdp_lb": (TC_PROGRAM_PIN, "SCHED_CLS"), b"lb_egress": (EGRESS_PROGRAM_PIN, "SCHED_CLS")}),
)


def compile_programs(source: Path, cflags: list[str], functions: dict[bytes, str], what: str) -> dict[bytes, int]:
    """Compile `source` with bcc and load `functions` (name -> program type, "XDP" or "SCHED_CLS");
    returns name -> an fd of our own (bcc's are closed). Maps declared pinned are adopted at their
    pins, entries and all, or created and pinned. LoadError names `what` the kernel refused."""
    from bcc import BPF  # heavy: only attach and upgrades need the compiler

    fds: dict[bytes, int] = {}
    try:
        bpf = BPF(src_file=os.fsencode(source), cflags=cflags)
        try:
            for function, prog_type in functions.items():
                fds[function] = os.dup(bpf.load_func(function, getattr(BPF, prog_type)).fd)
        finally:
            bpf.cleanup()
    except Exception as e:  # bcc raises bare Exceptions; the verifier log went to stderr
        for fd in fds.values():
            os.close(fd)
        raise LoadError(f"the kernel refused {what}: {e}") from e
    return fds


def _compile(config: DataPlaneConfig, pin_dir: str) -> dict[str, int]:
    """Compile and load every build of bpf/lb.c; their maps are the pins in pin_dir. Returns pin name -> fd."""
    fds: dict[str, int] = {}
    try:
        for cflags, functions in BUILDS:
            loaded = compile_programs(BPF_DIR / "lb.c", config.cflags(pin_dir) + cflags,
                                      {function: prog_type for function, (_, prog_type) in functions.items()},
                                      "the data plane program")
            fds.update((functions[function][0], fd) for function, fd in loaded.items())
    except LoadError:
        for fd in fds.values():
            os.close(fd)
        raise
    return fds


def load_and_pin(config: DataPlaneConfig, pin_dir: str, hook: str = "xdp") -> int:
    """Compile every build, create and pin maps and programs; returns an fd of the program the
    hook attaches at ingress."""
    private_dir(os.path.dirname(pin_dir))  # <bpffs>/lb: lb's own, root only like the pins in it
    private_dir(pin_dir)
    try:
        fds = _compile(config, pin_dir)
    except LoadError:
        unpin_all(pin_dir)
        raise
    try:
        layout.stamp(pin_dir)
        for pin, fd in fds.items():
            bpfsys.obj_pin(fd, os.path.join(pin_dir, pin))
    finally:
        for fd in fds.values():
            os.close(fd)
    return pinned_program(pin_dir, ingress_pin(hook))


def replace_program(config: DataPlaneConfig, pin_dir: str, interfaces: list[tuple[int, str]],
                    before_swap: Callable[[], None] | None = None) -> int:
    """Build the programs again on the pinned maps (every entry kept, the connection table too),
    swap them in on each (ifindex, mode) atomically (mode "tc": the TC build at ingress) and pin
    them in the old ones' places. Maps whose pins are gone are created; `before_swap` fills them
    while the old program still runs on its own.

    Packets see either the old program or the new one, never none. Returns the new XDP build's id."""
    new = _compile(config, pin_dir)
    old_xdp = pinned_program(pin_dir)
    try:
        layout.stamp(pin_dir)
        if before_swap is not None:
            before_swap()
        staged = {pin: os.path.join(pin_dir, pin + "_new") for pin in new}  # bpffs names take no dots
        for pin, path in staged.items():
            if os.path.exists(path):
                os.unlink(path)
            bpfsys.obj_pin(new[pin], path)
        for ifindex, mode in interfaces:
            if mode == "tc":
                replace_tc(ifindex, new[TC_PROGRAM_PIN], TC_INGRESS)
            else:
                _swap_xdp(ifindex, mode, new[PROGRAM_PIN], old_xdp)
            replace_tc(ifindex, new[EGRESS_PROGRAM_PIN], TC_EGRESS)
        for pin, path in staged.items():
            os.rename(path, os.path.join(pin_dir, pin))  # bpffs renames over the old pin atomically
        return bpfsys.prog_id(new[PROGRAM_PIN])
    finally:
        os.close(old_xdp)
        for fd in new.values():
            os.close(fd)


def _swap_xdp(ifindex: int, mode: str, new_fd: int, old_fd: int) -> None:
    from pyroute2 import IPRoute
    from pyroute2.netlink.exceptions import NetlinkError
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


def pinned_program(pin_dir: str, pin: str = PROGRAM_PIN) -> int:
    return bpfsys.obj_get(os.path.join(pin_dir, pin))


def unpin_all(pin_dir: str) -> None:
    """Remove every pin of a data plane; programs and maps go when unused."""
    if not os.path.isdir(pin_dir):
        return
    for name in os.listdir(pin_dir):
        os.unlink(os.path.join(pin_dir, name))
    os.rmdir(pin_dir)


def ingress_pin(hook: str) -> str:
    """The pin of the program a hook attaches at ingress."""
    return TC_PROGRAM_PIN if hook == "tc" else PROGRAM_PIN


def attach_pinned(pin: str, ifindex: int, ifname: str, prog_fd: int, xdp_mode: str) -> None:
    """Attach one of the data plane's programs where it goes: the XDP build at XDP (in xdp_mode),
    the TC build at TC ingress, the egress program at TC egress."""
    if pin == PROGRAM_PIN:
        attach_xdp(ifindex, ifname, prog_fd, xdp_mode)
    else:
        attach_tc(ifindex, ifname, prog_fd, TC_EGRESS if pin == EGRESS_PROGRAM_PIN else TC_INGRESS)


def attach_xdp(ifindex: int, ifname: str, prog_fd: int, mode: str) -> None:
    from pyroute2 import IPRoute
    from pyroute2.netlink.exceptions import NetlinkError
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
    from pyroute2 import IPRoute
    with IPRoute() as ipr:
        links = ipr.link("get", index=ifindex)
    xdp = links[0].get_attr("IFLA_XDP") if links else None
    if not xdp:
        return 0
    return xdp.get_attr("IFLA_XDP_PROG_ID") or 0


def detach_xdp(ifindex: int, mode: str) -> None:
    from pyroute2 import IPRoute
    with IPRoute() as ipr:
        ipr.link("set", index=ifindex, xdp={"attrs": [("IFLA_XDP_FD", -1), ("IFLA_XDP_FLAGS", XDP_MODES[mode])]})


# TC: a clsact qdisc's ingress hook, one direct-action bpf filter at lb's own priority and name.
TC_INGRESS = 0xFFFFFFF2
TC_EGRESS = 0xFFFFFFF3
TC_PRIO = 0x4C42
TC_FILTER_NAME = "lb"


def attach_tc(ifindex: int, ifname: str, prog_fd: int, parent: int = TC_INGRESS) -> None:
    from pyroute2 import IPRoute
    from pyroute2.netlink.exceptions import NetlinkError
    try:
        with IPRoute() as ipr:
            try:
                ipr.tc("add", "clsact", ifindex)
            except NetlinkError as e:
                if e.code != errno.EEXIST:
                    raise
            # lb's own filter left by a data plane no state knows of any more (pins gone) is replaced
            _tc_filter(ipr, "replace-filter" if tc_attached(ifindex, parent) else "add-filter", ifindex, prog_fd,
                       parent)
    except NetlinkError as e:
        if e.code == errno.EEXIST:
            raise LoadError(f"{ifname}: a TC filter already sits at lb's priority; detach it first") from e
        raise LoadError(f"{ifname}: attaching at TC failed: {os.strerror(e.code)}") from e


def replace_tc(ifindex: int, prog_fd: int, parent: int = TC_INGRESS) -> None:
    """Put another program in lb's filter in one step (the filter is created if it is missing)."""
    from pyroute2 import IPRoute
    from pyroute2.netlink.exceptions import NetlinkError
    try:
        with IPRoute() as ipr:
            _tc_filter(ipr, "replace-filter", ifindex, prog_fd, parent)
    except NetlinkError as e:
        raise LoadError(f"ifindex {ifindex}: replacing the TC program failed: {os.strerror(e.code)}") from e


def _tc_filter(ipr: IPRoute, command: str, ifindex: int, prog_fd: int, parent: int) -> None:
    ipr.tc(command, "bpf", ifindex, ":1", fd=prog_fd, name=TC_FILTER_NAME, parent=parent, prio=TC_PRIO, classid=1,
           direct_action=True)


def tc_attached(ifindex: int, parent: int = TC_INGRESS) -> bool:
    """Does lb's filter sit on the interface's TC ingress (or egress)?"""
    from pyroute2 import IPRoute
    with IPRoute() as ipr:
        filters = ipr.get_filters(index=ifindex, parent=parent)
    return any(f["info"] >> 16 == TC_PRIO and f.get_nested("TCA_OPTIONS", "TCA_BPF_NAME") == TC_FILTER_NAME
               for f in filters)


def detach_tc(ifindex: int, parent: int = TC_INGRESS) -> None:
    """Remove lb's filter; and the clsact qdisc once no filter is left on it."""
    from pyroute2 import IPRoute
    with IPRoute() as ipr:
        ipr.tc("del-filter", index=ifindex, parent=parent, prio=TC_PRIO)
        left = [f for parent in (TC_INGRESS, TC_EGRESS) for f in ipr.get_filters(index=ifindex, parent=parent)]
        if not left:
            ipr.tc("del", "clsact", ifindex)
