"""The bpf() system call through ctypes: map access on pinned maps without bcc.

lbctl's everyday commands (add a backend, read counters) use this path: no
compiler, no heavy import. Only the loader needs bcc."""
from __future__ import annotations

import ctypes
import errno
import os
import platform
import struct

from lb import fault

_NR_BPF = {"x86_64": 321, "aarch64": 280, "armv7l": 386, "riscv64": 280, "ppc64le": 361, "s390x": 351}

BPF_PROG_LOAD = 5
BPF_PROG_TYPE_XDP = 6
BPF_MAP_LOOKUP_ELEM = 1
BPF_MAP_UPDATE_ELEM = 2
BPF_MAP_DELETE_ELEM = 3
BPF_MAP_GET_NEXT_KEY = 4
BPF_OBJ_PIN = 6
BPF_OBJ_GET = 7
BPF_PROG_TEST_RUN = 10
BPF_OBJ_GET_INFO_BY_FD = 15
BPF_MAP_LOOKUP_BATCH = 24
BPF_MAP_UPDATE_BATCH = 26

BPF_ANY = 0
BPF_NOEXIST = 1

BPF_MAP_TYPE_PERCPU_HASH = 5
BPF_MAP_TYPE_PERCPU_ARRAY = 6
BPF_MAP_TYPE_LRU_PERCPU_HASH = 10
PERCPU_TYPES = {BPF_MAP_TYPE_PERCPU_HASH, BPF_MAP_TYPE_PERCPU_ARRAY, BPF_MAP_TYPE_LRU_PERCPU_HASH}


class BpfError(OSError):
    """A bpf() call failed; errno and the operation are in the message."""


class _ElemAttr(ctypes.Structure):
    _fields_ = [
        ("map_fd", ctypes.c_uint32),
        ("pad", ctypes.c_uint32),
        ("key", ctypes.c_uint64),
        ("value", ctypes.c_uint64),
        ("flags", ctypes.c_uint64),
    ]


class _BatchAttr(ctypes.Structure):
    _fields_ = [
        ("in_batch", ctypes.c_uint64),
        ("out_batch", ctypes.c_uint64),
        ("keys", ctypes.c_uint64),
        ("values", ctypes.c_uint64),
        ("count", ctypes.c_uint32),
        ("map_fd", ctypes.c_uint32),
        ("elem_flags", ctypes.c_uint64),
        ("flags", ctypes.c_uint64),
    ]


class _ObjAttr(ctypes.Structure):
    _fields_ = [("pathname", ctypes.c_uint64), ("bpf_fd", ctypes.c_uint32), ("file_flags", ctypes.c_uint32)]


class _InfoAttr(ctypes.Structure):
    _fields_ = [("bpf_fd", ctypes.c_uint32), ("info_len", ctypes.c_uint32), ("info", ctypes.c_uint64)]


class MapInfo(ctypes.Structure):
    """The head of struct bpf_map_info."""

    _fields_ = [
        ("type", ctypes.c_uint32),
        ("id", ctypes.c_uint32),
        ("key_size", ctypes.c_uint32),
        ("value_size", ctypes.c_uint32),
        ("max_entries", ctypes.c_uint32),
        ("map_flags", ctypes.c_uint32),
        ("name", ctypes.c_char * 16),
    ]


class TestRunAttr(ctypes.Structure):
    _fields_ = [
        ("prog_fd", ctypes.c_uint32),
        ("retval", ctypes.c_uint32),
        ("data_size_in", ctypes.c_uint32),
        ("data_size_out", ctypes.c_uint32),
        ("data_in", ctypes.c_uint64),
        ("data_out", ctypes.c_uint64),
        ("repeat", ctypes.c_uint32),
        ("duration", ctypes.c_uint32),
        ("ctx_size_in", ctypes.c_uint32),
        ("ctx_size_out", ctypes.c_uint32),
        ("ctx_in", ctypes.c_uint64),
        ("ctx_out", ctypes.c_uint64),
        ("flags", ctypes.c_uint32),
        ("cpu", ctypes.c_uint32),
        ("batch_size", ctypes.c_uint32),
        ("pad", ctypes.c_uint32),
    ]


_libc = ctypes.CDLL(None, use_errno=True)


def bpf(cmd: int, attr: ctypes.Structure, what: str) -> int:
    nr = _NR_BPF.get(platform.machine())
    if nr is None:
        raise BpfError(errno.ENOSYS, f"bpf(): unsupported architecture {platform.machine()}")
    ret = _libc.syscall(nr, cmd, ctypes.byref(attr), ctypes.sizeof(attr))
    if ret < 0:
        err = ctypes.get_errno()
        raise BpfError(err, f"{what}: {os.strerror(err)}")
    return ret


def _addr(buf: ctypes.Array | ctypes.Structure | None) -> int:
    return ctypes.addressof(buf) if buf is not None else 0


def obj_get(path: str) -> int:
    raw = os.fsencode(path) + b"\0"
    buf = ctypes.create_string_buffer(raw, len(raw))
    return bpf(BPF_OBJ_GET, _ObjAttr(pathname=ctypes.addressof(buf)), f"open pinned object {path}")


def obj_pin(fd: int, path: str) -> None:
    raw = os.fsencode(path) + b"\0"
    buf = ctypes.create_string_buffer(raw, len(raw))
    bpf(BPF_OBJ_PIN, _ObjAttr(pathname=ctypes.addressof(buf), bpf_fd=fd), f"pin {path}")


def map_info(fd: int) -> MapInfo:
    info = MapInfo()
    attr = _InfoAttr(bpf_fd=fd, info_len=ctypes.sizeof(info), info=ctypes.addressof(info))
    bpf(BPF_OBJ_GET_INFO_BY_FD, attr, "map info")
    return info


def map_lookup(fd: int, key, value) -> bool:
    try:
        bpf(BPF_MAP_LOOKUP_ELEM, _ElemAttr(map_fd=fd, key=_addr(key), value=_addr(value)), "map lookup")
    except BpfError as e:
        if e.errno == errno.ENOENT:
            return False
        raise
    return True


def map_update(fd: int, key, value, flags: int = BPF_ANY) -> None:
    fault.point("map_write")
    bpf(BPF_MAP_UPDATE_ELEM, _ElemAttr(map_fd=fd, key=_addr(key), value=_addr(value), flags=flags), "map update")


def map_delete(fd: int, key) -> bool:
    fault.point("map_write")
    try:
        bpf(BPF_MAP_DELETE_ELEM, _ElemAttr(map_fd=fd, key=_addr(key)), "map delete")
    except BpfError as e:
        if e.errno == errno.ENOENT:
            return False
        raise
    return True


def map_next_key(fd: int, key, next_key) -> bool:
    try:
        bpf(BPF_MAP_GET_NEXT_KEY, _ElemAttr(map_fd=fd, key=_addr(key), value=_addr(next_key)), "map next key")
    except BpfError as e:
        if e.errno == errno.ENOENT:
            return False
        raise
    return True


def map_update_batch(fd: int, keys: ctypes.Array, values: ctypes.Array, count: int) -> None:
    fault.point("map_write")
    attr = _BatchAttr(keys=_addr(keys), values=_addr(values), count=count, map_fd=fd)
    bpf(BPF_MAP_UPDATE_BATCH, attr, "map batch update")
    if attr.count != count:
        raise BpfError(errno.EIO, f"map batch update wrote {attr.count} of {count} entries")


def map_lookup_batch(fd: int, keys: ctypes.Array, values: ctypes.Array, count: int, in_batch: ctypes.c_uint32 | None,
                     out_batch: ctypes.c_uint32) -> tuple[int, bool]:
    """One BPF_MAP_LOOKUP_BATCH call; returns (entries read, whether the map is exhausted)."""
    attr = _BatchAttr(in_batch=_addr(in_batch), out_batch=_addr(out_batch), keys=_addr(keys),
                      values=_addr(values), count=count, map_fd=fd)
    try:
        bpf(BPF_MAP_LOOKUP_BATCH, attr, "map batch lookup")
    except BpfError as e:
        if e.errno == errno.ENOENT:
            return attr.count, True
        raise
    return attr.count, False


def possible_cpus() -> int:
    """Per-CPU map values have one slot per possible CPU."""
    with open("/sys/devices/system/cpu/possible") as f:
        text = f.read().strip()
    total = 0
    for part in text.split(","):
        lo, _, hi = part.partition("-")
        total += int(hi or lo) - int(lo) + 1
    return total


class _ProgLoadAttr(ctypes.Structure):
    _fields_ = [
        ("prog_type", ctypes.c_uint32),
        ("insn_cnt", ctypes.c_uint32),
        ("insns", ctypes.c_uint64),
        ("license", ctypes.c_uint64),
        ("log_level", ctypes.c_uint32),
        ("log_size", ctypes.c_uint32),
        ("log_buf", ctypes.c_uint64),
        ("kern_version", ctypes.c_uint32),
        ("prog_flags", ctypes.c_uint32),
        ("prog_name", ctypes.c_char * 16),
    ]


def load_xdp_return(action: int, name: bytes = b"xdp_return") -> int:
    """Load the smallest XDP program, `return action;` (no compiler needed); returns its fd."""
    # r0 = action (BPF_ALU64 | BPF_MOV | BPF_K); exit (BPF_JMP | BPF_EXIT)
    insns = struct.pack("<BBhi", 0xB7, 0, 0, action) + struct.pack("<BBhi", 0x95, 0, 0, 0)
    code = ctypes.create_string_buffer(insns, len(insns))
    license = ctypes.create_string_buffer(b"GPL")
    attr = _ProgLoadAttr(prog_type=BPF_PROG_TYPE_XDP, insn_cnt=2, insns=ctypes.addressof(code),
                         license=ctypes.addressof(license), prog_name=name[:15])
    return bpf(BPF_PROG_LOAD, attr, "load XDP program")


class ProgInfo(ctypes.Structure):
    """The head of struct bpf_prog_info."""

    _fields_ = [("type", ctypes.c_uint32), ("id", ctypes.c_uint32), ("tag", ctypes.c_uint8 * 8)]


def prog_id(fd: int) -> int:
    info = ProgInfo()
    attr = _InfoAttr(bpf_fd=fd, info_len=ctypes.sizeof(info), info=ctypes.addressof(info))
    bpf(BPF_OBJ_GET_INFO_BY_FD, attr, "program info")
    return info.id
