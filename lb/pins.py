"""Where a data plane's pinned maps live, and which data plane this process talks to.

`ip netns exec` gives each command a fresh /sys, so a pin under /sys/fs/bpf made
in one call is invisible to the next. lb therefore reaches bpffs through
/run/lb/bpffs, a bind mount of the host's /sys/fs/bpf: /run is not remounted,
so every `ip netns exec` call sees the same pins, and bpftool on the host sees
them under /sys/fs/bpf/lb/. Each network namespace has its own data plane,
named after the namespace ("default" outside any named one)."""
from __future__ import annotations

import ctypes
import os
from dataclasses import dataclass

from lb.private import private_dir

BPFFS_MAGIC = 0xCAFE4A11
HOST_BPFFS = "/sys/fs/bpf"
STABLE_BPFFS = "/run/lb/bpffs"
NETNS_RUN_DIR = "/run/netns"
STATE_DIR = "/var/lib/lb"
MS_BIND = 4096


class BpffsUnavailable(RuntimeError):
    """No bpffs that outlives this process can be reached."""


class _Statfs(ctypes.Structure):
    _fields_ = [("f_type", ctypes.c_long), ("rest", ctypes.c_byte * 120)]


_libc = ctypes.CDLL(None, use_errno=True)


def is_bpffs(path: str) -> bool:
    buf = _Statfs()
    if _libc.statfs(os.fsencode(path), ctypes.byref(buf)) != 0:
        return False
    return (buf.f_type & 0xFFFFFFFF) == BPFFS_MAGIC


def stable_bpffs() -> str:
    """The bpffs mount lb pins into, bind-mounting the host's on first use."""
    private_dir(os.path.dirname(STABLE_BPFFS))  # /run/lb: lb's own (the API sockets too), root only
    if is_bpffs(STABLE_BPFFS):
        return STABLE_BPFFS
    if not is_bpffs(HOST_BPFFS):
        raise BpffsUnavailable(
            f"bpffs is not reachable: neither {STABLE_BPFFS} nor {HOST_BPFFS} is a bpffs mount here "
            f"(inside 'ip netns exec', /sys is replaced). On the host, run 'make setup' or "
            f"'mount -t bpf bpf {HOST_BPFFS}' and any lbctl command once")
    os.makedirs(STABLE_BPFFS, exist_ok=True)
    if _libc.mount(os.fsencode(HOST_BPFFS), os.fsencode(STABLE_BPFFS), None, MS_BIND, None) != 0:
        err = ctypes.get_errno()
        raise BpffsUnavailable(f"cannot bind-mount {HOST_BPFFS} at {STABLE_BPFFS}: {os.strerror(err)}")
    return STABLE_BPFFS


@dataclass(frozen=True)
class Instance:
    """The data plane of one network namespace."""

    name: str      # the namespace's name in /run/netns, or "default"
    netns_ino: int  # identity of the network namespace this process is in

    @classmethod
    def current(cls) -> "Instance":
        # thread-self: setns(2) moves one thread (netns/nsenter.py), /proc/self names the main one
        ino = os.stat("/proc/thread-self/ns/net").st_ino
        try:
            names = sorted(os.listdir(NETNS_RUN_DIR))
        except FileNotFoundError:
            names = []
        for name in names:
            try:
                if os.stat(os.path.join(NETNS_RUN_DIR, name)).st_ino == ino:
                    return cls(name, ino)
            except OSError:
                continue
        return cls("default", ino)

    def pin_dir(self, bpffs: str | None = None) -> str:
        return os.path.join(bpffs or stable_bpffs(), "lb", self.name)

    def state_path(self) -> str:
        return os.path.join(STATE_DIR, f"{self.name}.db")
