"""Run a block of code in another network namespace, on this thread only.

setns(2) changes the calling thread's namespace: a socket created inside the
block belongs to that namespace for its whole life, whichever thread uses it."""
from __future__ import annotations

import contextlib
import ctypes
import os
import socket
import threading
from typing import Iterator

from pyroute2 import IPRoute

CLONE_NEWNET = 0x40000000
NETNS_RUN_DIR = "/run/netns"
_libc = ctypes.CDLL(None, use_errno=True)


def _setns(fd: int) -> None:
    if _libc.setns(fd, CLONE_NEWNET) != 0:
        err = ctypes.get_errno()
        raise OSError(err, f"setns: {os.strerror(err)}")


@contextlib.contextmanager
def in_netns(name: str) -> Iterator[None]:
    own = os.open(f"/proc/self/task/{threading.get_native_id()}/ns/net", os.O_RDONLY)
    target = os.open(os.path.join(NETNS_RUN_DIR, name), os.O_RDONLY)
    try:
        _setns(target)
        try:
            yield
        finally:
            _setns(own)
    finally:
        os.close(target)
        os.close(own)


@contextlib.contextmanager
def netlink_in(name: str) -> Iterator[IPRoute]:
    """An IPRoute whose netlink socket lives in namespace `name` (made from this thread, moved there)."""
    with in_netns(name):
        ipr = IPRoute()
    try:
        yield ipr
    finally:
        ipr.close()


def socket_in(name: str, family: int = socket.AF_INET, kind: int = socket.SOCK_STREAM, proto: int = 0) -> socket.socket:
    with in_netns(name):
        return socket.socket(family, kind, proto)


def write_sysctl(name: str, key: str, value: str) -> None:
    """Set a net.* sysctl of namespace `name` (procfs shows the opening thread's namespace)."""
    with in_netns(name):
        with open("/proc/sys/" + key.replace(".", "/"), "w") as f:
            f.write(value)
