"""Typed access to the data plane's pinned maps."""
from __future__ import annotations

import array
import ctypes
import errno
import itertools
import os
import struct
from collections import Counter
from dataclasses import dataclass
from typing import Iterator, Sequence

from lb import bpfsys
from lb.structs import (AclKey, AclRule, Backend, EgressVlan, Endpoint, FlowEntry, FlowKey, LbAddr, LbConfig, LbCounters, LbState, NextHop, ReplySource,
                        RouteKey, FullnatFlow, FullnatOwner, SnatPool, VipAddr, VipInfo, VipKey, VipMeta)

U32 = ctypes.c_uint32
U64 = ctypes.c_uint64
I32 = ctypes.c_int32


# What bpf(BPF_MAP_LOOKUP_BATCH) fails with where it cannot serve a map: a kernel before 5.6 knows no
# such command (EINVAL); a map type without batch operations gives the kernel's ENOTSUPP (524).
BATCH_UNSUPPORTED = (errno.EINVAL, 524)


class MapLayoutError(RuntimeError):
    """A pinned map does not have the layout this version of lb expects."""


def _ctypes_array(ctype: type, items: Sequence) -> ctypes.Array:
    if isinstance(items, array.array):
        return (ctype * len(items)).from_buffer(items)
    return (ctype * len(items))(*items)


class BpfMap:
    """One pinned map, with ctypes key and value types checked against the kernel's view."""

    def __init__(self, path: str, key_type: type, value_type: type):
        self.path = path
        self.key_type = key_type
        self.value_type = value_type
        self.fd = bpfsys.obj_get(path)
        info = bpfsys.map_info(self.fd)
        self.max_entries = info.max_entries
        self.percpu = info.type in bpfsys.PERCPU_TYPES
        if info.key_size != ctypes.sizeof(key_type) or info.value_size != ctypes.sizeof(value_type):
            os.close(self.fd)
            raise MapLayoutError(
                f"{path}: key/value sizes {info.key_size}/{info.value_size} differ from this lb's "
                f"{ctypes.sizeof(key_type)}/{ctypes.sizeof(value_type)}; detach and attach again")
        self.ncpus = bpfsys.possible_cpus() if self.percpu else 1

    def memlock(self) -> int:
        """Bytes of kernel memory charged to this map (from /proc/self/fdinfo)."""
        with open(f"/proc/self/fdinfo/{self.fd}") as f:
            for line in f:
                if line.startswith("memlock:"):
                    return int(line.split()[1])
        return 0

    def close(self) -> None:
        if self.fd >= 0:
            os.close(self.fd)
            self.fd = -1

    def _value_buffer(self):
        if self.percpu:
            return (self.value_type * self.ncpus)()
        return self.value_type()

    def get(self, key):
        """The value, a list of per-CPU values for per-CPU maps, or None."""
        value = self._value_buffer()
        if not bpfsys.map_lookup(self.fd, key, value):
            return None
        return list(value) if self.percpu else value

    def set(self, key, value) -> None:
        bpfsys.map_update(self.fd, key, value)

    def delete(self, key) -> bool:
        return bpfsys.map_delete(self.fd, key)

    def keys(self) -> Iterator:
        key, next_key = None, self.key_type()
        while bpfsys.map_next_key(self.fd, key, next_key):
            yield next_key
            key, next_key = next_key, self.key_type()

    def items(self) -> Iterator[tuple]:
        for key in self.keys():
            value = self.get(key)
            if value is not None:
                yield key, value

    def set_many(self, keys: Sequence, values: Sequence) -> None:
        """Write many entries in one BPF_MAP_UPDATE_BATCH call. Keys and values are lists of the
        map's types, or array.arrays of the same layout (no per-entry object: a whole Maglev table)."""
        if not len(keys):
            return
        karr, varr = _ctypes_array(self.key_type, keys), _ctypes_array(self.value_type, values)
        bpfsys.map_update_batch(self.fd, karr, varr, len(keys))

    def _batches(self, chunk: int) -> Iterator[tuple[int, ctypes.Array, ctypes.Array]]:
        """A hash map read in batches: (entries got, the keys buffer, the values buffer), no
        per-entry syscalls. The buffers are reused by the next batch."""
        keys = (self.key_type * chunk)()
        values = (self.value_type * (chunk * self.ncpus))()
        cursor = None  # hash maps' batch cursor is a u32 bucket index
        while True:
            out_batch = U32()
            got, done = bpfsys.map_lookup_batch(self.fd, keys, values, chunk, cursor, out_batch)
            yield got, keys, values
            if done:
                return
            cursor = out_batch

    def count(self, chunk: int = 8192) -> int:
        """Entries of a hash map, read in batches (a 1M-entry table takes some 130 calls)."""
        return sum(got for got, _, _ in self._batches(chunk))

    def read_range(self, start: int, count: int) -> list[int]:
        """Values of keys start..start+count-1 of a u32-keyed array of scalars, batched."""
        out: list[int] = []
        chunk = 8192
        keys = (U32 * chunk)()
        values = (self.value_type * chunk)()
        for base in range(start, start + count, chunk):
            n = min(chunk, start + count - base)
            # The batch cursor is the last key already read: start after base - 1.
            in_batch = U32(base - 1) if base else None
            out_batch = U32()
            got, _ = bpfsys.map_lookup_batch(self.fd, keys, values, n, in_batch, out_batch)
            if got != n:
                raise bpfsys.BpfError(5, f"{self.path}: read {got} of {n} entries at {base}")
            out.extend(values[:n])  # ctypes gives plain ints for an array of scalars
        return out

    def raw_values(self, chunk: int = 8192) -> Iterator[bytes]:
        """The values of a hash map, a batch at a time, as packed bytes (no per-entry objects)."""
        size = ctypes.sizeof(self.value_type) * self.ncpus
        for got, _, values in self._batches(chunk):
            yield bytes(values)[:got * size]

    def raw_items(self, chunk: int = 8192) -> Iterator[tuple[bytes, bytes]]:
        """The keys and values of a hash map, a batch at a time, as packed bytes (no per-entry objects).
        Where the kernel has no batch lookup for the map, entry by entry (get_next_key), the same bytes."""
        key_size, value_size = ctypes.sizeof(self.key_type), ctypes.sizeof(self.value_type) * self.ncpus
        batches = self._batches(chunk)
        try:
            first = next(batches)
        except bpfsys.BpfError as e:
            if e.errno not in BATCH_UNSUPPORTED:
                raise
            yield from self._raw_items_by_key(chunk)
            return
        except StopIteration:
            return
        for got, keys, values in itertools.chain([first], batches):
            yield ctypes.string_at(keys, got * key_size), ctypes.string_at(values, got * value_size)

    def _raw_items_by_key(self, chunk: int) -> Iterator[tuple[bytes, bytes]]:
        keys, values = [], []
        for key, value in self.items():
            keys.append(bytes(key))
            values.append(b"".join(map(bytes, value)) if self.percpu else bytes(value))
            if len(keys) == chunk:
                yield b"".join(keys), b"".join(values)
                keys, values = [], []
        if keys:
            yield b"".join(keys), b"".join(values)


# Every map of bpf/maps.h: name -> (key type, value type).
MAP_TYPES: dict[str, tuple[type, type]] = {
    "vips": (VipKey, VipInfo),
    "vip_addrs": (LbAddr, VipAddr),
    "lb_config": (U32, LbConfig),
    "lb_state": (U32, LbState),
    "vip_meta": (U32, VipMeta),
    "maglev": (U32, U32),
    "backends": (U32, Backend),
    "backend_nh": (U32, NextHop),
    "addr_filter": (U32, U32),
    "vip_slots": (U32, U32),
    "reply_sources": (Endpoint, ReplySource),
    "conn_table": (FlowKey, FlowEntry),
    "routes": (RouteKey, NextHop),
    "acl": (AclKey, AclRule),
    "snat_pools": (U32, SnatPool),
    "fullnat_flows": (FlowKey, FullnatFlow),
    "fullnat_ports": (FlowKey, FullnatOwner),
    "nh_epoch": (U32, U32),
    "egress_vlans": (U32, EgressVlan),
    "tx_ports": (I32, I32),
    "vip_stats": (U32, LbCounters),
    "backend_stats": (U32, LbCounters),
    "reason_stats": (U32, U64),
}


# backend_id, vip_id, flags, generation of a FlowEntry (bpf/structs.h struct flow_entry), the rest skipped
_FLOW_HEAD = struct.Struct(f"<IHHI{ctypes.sizeof(FlowEntry) - 12}x")
_FULLNAT_HEAD = struct.Struct(f"<IHHI{ctypes.sizeof(FullnatFlow) - 12}x")  # a FullnatFlow starts with its FlowEntry


@dataclass
class DataPlaneMaps:
    """All pinned maps of one data plane, opened from its pin directory."""

    pin_dir: str
    maps: dict[str, BpfMap]

    @classmethod
    def open(cls, pin_dir: str) -> "DataPlaneMaps":
        opened: dict[str, BpfMap] = {}
        try:
            for name, (key_type, value_type) in MAP_TYPES.items():
                opened[name] = BpfMap(os.path.join(pin_dir, name), key_type, value_type)
        except BaseException:
            for m in opened.values():
                m.close()
            raise
        return cls(pin_dir, opened)

    def __getattr__(self, name: str) -> BpfMap:
        try:
            return self.__dict__["maps"][name]
        except KeyError:
            raise AttributeError(name) from None

    def close(self) -> None:
        for m in self.maps.values():
            m.close()

    def connections_per_backend(self) -> Counter[int]:
        """Connection-table entries (and full NAT's) per backend id, one per flow, of the backend as it is bound now
        (an entry of an earlier binding of the id, which the data plane no longer trusts, is left
        out). The table is an LRU hash: closed and idle flows count until they are evicted."""
        generations = {k.value: v.generation for k, v in self.backends.items() if v.flags}
        counts: Counter[int] = Counter()
        for table, head in ((self.conn_table, _FLOW_HEAD), (self.fullnat_flows, _FULLNAT_HEAD)):
            for chunk in table.raw_values():
                counts.update(bid for bid, _, _, gen in head.iter_unpack(chunk) if generations.get(bid) == gen)
        return counts

    def __enter__(self) -> "DataPlaneMaps":
        return self

    def __exit__(self, *exc) -> None:
        self.close()
