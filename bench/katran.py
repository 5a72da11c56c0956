"""Katran's XDP program (the reference lb is measured against), loaded and configured for the bench.

The object is Katran's own build (see /work/shared/reference/katran/README.md), never part of
lb: the bench finds it at LB_BENCH_KATRAN or the shared path, and skips the comparison
without it. This module writes Katran's maps the way its user-space library does for one
VIP: the VIP, its reals, a 65,537-slot consistent-hash ring (filled with lb's own Maglev:
which real a slot holds does not change the cost), the default router MAC, and one LRU
connection table for the bench's CPU, or one per CPU (Katran's production set-up) for live traffic.

Map layouts (katran/lib/bpf/balancer_structs.h), as ctypes structures below."""
from __future__ import annotations

import ctypes
import ipaddress
import os
import socket
from pathlib import Path

from bench.bpfobj import BpfObject
from lb import bpfsys
from lb.maglev import MaglevBackend, build_table

SHARED_OBJECT = Path("/work/shared/reference/katran/balancer.bpf.o")
SKIPPED = ("no Katran object (set LB_BENCH_KATRAN=PATH to Katran's balancer.bpf.o, "
           f"or put it at {SHARED_OBJECT})")
PROGRAM = "balancer_ingress"
RING_SIZE = 65537
ROUTER_MAC = bytes.fromhex("0000deadbeaf")
BPF_MAP_TYPE_LRU_HASH = 9
REAL_IPV6 = 1 << 0          # real_definition.flags
# stats map: counters after the per-VIP ones (balancer_consts.h)
LRU_MISS, NEW_CONN_RATE, FALLBACK_LRU = 1, 2, 3


def reference_object() -> Path | None:
    """Katran's object, if this machine has it."""
    configured = os.environ.get("LB_BENCH_KATRAN")
    if configured:
        if not Path(configured).is_file():
            raise FileNotFoundError(f"LB_BENCH_KATRAN={configured}: no such file")
        return Path(configured)
    return SHARED_OBJECT if SHARED_OBJECT.is_file() else None


class Addr(ctypes.Structure):
    _fields_ = [("bytes", ctypes.c_uint8 * 16)]  # IPv4 in the first 4 bytes

    @classmethod
    def of(cls, addr: ipaddress.IPv4Address | ipaddress.IPv6Address) -> "Addr":
        a = cls()
        ctypes.memmove(a.bytes, addr.packed, len(addr.packed))
        return a


class VipDefinition(ctypes.Structure):
    _fields_ = [("addr", Addr), ("port", ctypes.c_uint16), ("proto", ctypes.c_uint8), ("pad", ctypes.c_uint8)]


class VipMeta(ctypes.Structure):
    _fields_ = [("flags", ctypes.c_uint32), ("vip_num", ctypes.c_uint32)]


class RealDefinition(ctypes.Structure):
    _fields_ = [("addr", Addr), ("flags", ctypes.c_uint8), ("pad", ctypes.c_uint8 * 3)]


class FlowKey(ctypes.Structure):
    _fields_ = [("src", Addr), ("dst", Addr), ("ports", ctypes.c_uint8 * 4), ("proto", ctypes.c_uint8),
                ("pad", ctypes.c_uint8 * 3)]


class RealPosLru(ctypes.Structure):
    _fields_ = [("pos", ctypes.c_uint32), ("pad", ctypes.c_uint32), ("atime", ctypes.c_uint64)]


class Stat(ctypes.Structure):
    _fields_ = [("v1", ctypes.c_uint64), ("v2", ctypes.c_uint64)]


U32 = ctypes.c_uint32


class Katran:
    """Katran's program with its maps filled: `with Katran(path, lru_entries, cpu) as k:`.
    every_cpu: a connection table for every CPU, not only `cpu` (live traffic runs where the kernel
    puts it); router_mac: where Katran sends every packet (its default gateway)."""

    def __init__(self, path: Path, lru_entries: int, cpu: int, every_cpu: bool = False,
                 router_mac: bytes = ROUTER_MAC) -> None:
        self.obj = BpfObject(str(path))
        try:
            self.prog = self.obj.program_fd(PROGRAM)
            self.max_vips = self.obj.max_entries("vip_map")
            self.ncpus = bpfsys.possible_cpus()
            self.cpu = cpu
            self.reals: dict[ipaddress._BaseAddress, int] = {}
            self.vips = 0
            bpfsys.map_update(self.obj.map_fd("ctl_array"), U32(0), (ctypes.c_uint8 * 8)(*router_mac))
            # One connection table on the bench's CPU (without every_cpu, the others fall back to Katran's
            # small shared one: the checks say if one was used).
            for c in range(self.ncpus) if every_cpu else (cpu,):
                lru = self.obj.create_map(BPF_MAP_TYPE_LRU_HASH, "kb_lru", ctypes.sizeof(FlowKey),
                                          ctypes.sizeof(RealPosLru), lru_entries)
                bpfsys.map_update(self.obj.map_fd("lru_mapping"), U32(c), U32(lru))
                if c == cpu:
                    self.lru = lru
            self.lru_entries = lru_entries
        except BaseException:
            self.obj.close()
            raise

    def add_vip(self, addr: str, port: int, proto: int, reals: list[str]) -> None:
        """A VIP with its reals (Katran encapsulates to them: IPIP, or IPv6-in-IPv6 for IPv6 reals)."""
        vip_num = self.vips
        self.vips += 1
        ids = [self._real(ipaddress.ip_address(r)) for r in reals]
        ring = build_table([MaglevBackend(r) for r in reals], RING_SIZE)
        keys = (U32 * RING_SIZE)(*range(vip_num * RING_SIZE, (vip_num + 1) * RING_SIZE))
        values = (U32 * RING_SIZE)(*(ids[i] for i in ring))
        bpfsys.map_update_batch(self.obj.map_fd("ch_rings"), keys, values, RING_SIZE)
        key = VipDefinition(Addr.of(ipaddress.ip_address(addr)), socket.htons(port), proto)
        bpfsys.map_update(self.obj.map_fd("vip_map"), key, VipMeta(0, vip_num))

    def _real(self, addr: ipaddress.IPv4Address | ipaddress.IPv6Address) -> int:
        if addr not in self.reals:
            real_id = len(self.reals) + 1  # Katran never hands out real id 0
            flags = REAL_IPV6 if addr.version == 6 else 0
            bpfsys.map_update(self.obj.map_fd("reals"), U32(real_id), RealDefinition(Addr.of(addr), flags))
            self.reals[addr] = real_id
        return self.reals[addr]

    def stat(self, index: int) -> Stat:
        """One of Katran's global counters on the bench's CPU."""
        values = (Stat * self.ncpus)()
        bpfsys.map_lookup(self.obj.map_fd("stats"), U32(self.max_vips + index), values)
        return values[self.cpu]

    def reset_conn_rate(self) -> None:
        """Start a new one-second quantum of Katran's new-connection rate limit: above 125k new flows a
        second per CPU it stops inserting into its table, so a tight loop of new flows would time a
        cheaper path than a real new flow's. Called before every batch of new flows (untimed)."""
        bpfsys.map_update(self.obj.map_fd("stats"), U32(self.max_vips + NEW_CONN_RATE), (Stat * self.ncpus)())

    def lru_has(self, src: str, dst: str, sport: int, dport: int, proto: int = socket.IPPROTO_TCP) -> bool:
        key = FlowKey(Addr.of(ipaddress.ip_address(src)), Addr.of(ipaddress.ip_address(dst)),
                      (ctypes.c_uint8 * 4)(*sport.to_bytes(2, "big"), *dport.to_bytes(2, "big")), proto)
        return bpfsys.map_lookup(self.lru, key, RealPosLru())

    def close(self) -> None:
        self.obj.close()

    def __enter__(self) -> "Katran":
        return self

    def __exit__(self, *exc) -> None:
        self.close()
