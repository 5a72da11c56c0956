"""The data plane's two direct-mapped indexes, kept by the control plane beside the hash maps
they spare lookups in.

The address filter (bpf/consts.h LB_ADDR_FILTER_*): for each bucket of addresses, whether no
VIP address and no NAT backend endpoint falls in it, so that the data plane passes a packet
that is neither to a VIP nor from a backend without a hash lookup.

A bucket's word may only claim "none here" while it is true: the control plane opens the
buckets of addresses before they come into use (open_buckets) and closes what the maps no
longer hold after a change (write_words). A word of 0 claims nothing, so a new, empty filter is
merely slower, never wrong.

The VIP slots (LB_VIP_SLOTS): the id + 1 of the one VIP of a port whose (address, port,
protocol) falls in a slot, so that a packet to it finds it without a lookup in the vips map.
The data plane trusts a slot only when the VIP's record (vip_meta) names the packet's
address, port and protocol, so slots are written once a change is done (write_slots), and a
stale or empty one is merely slower."""
from __future__ import annotations

import array
import struct
from typing import Iterable

from lb.maps import U32, DataPlaneMaps
from lb.structs import ADDR_FILTER_BITS, ADDR_FILTER_SIZE, FILTER_NO_BACKEND, FILTER_NO_VIP, VIP_SLOT_BITS, VIP_SLOTS

_ALL = FILTER_NO_VIP | FILTER_NO_BACKEND


def bucket(addr: bytes) -> int:
    """hash.h addr_bucket of a 16-byte lb_addr (words as the CPU loads them)."""
    w0, w1, w2, w3 = struct.unpack("=4I", addr)
    return (((w0 ^ w1 ^ w2 ^ w3) * 0x9E3779B1) & 0xFFFFFFFF) >> (32 - ADDR_FILTER_BITS)


def vip_slot(addr: bytes, port: int, proto: int) -> int:
    """hash.h vip_slot: `port` as the C side stores it (be16), `addr` a 16-byte lb_addr."""
    w0, w1, w2, w3 = struct.unpack("=4I", addr)
    return (((w0 ^ w1 ^ w2 ^ w3 ^ (port << 8) ^ proto) * 0x9E3779B1) & 0xFFFFFFFF) >> (32 - VIP_SLOT_BITS)


def slots(vips: Iterable[tuple[bytes, int, int, int]]) -> list[int]:
    """The whole slot table for VIPs given as (address, be16 port, protocol, id); a VIP of every
    port (port 0) has none, and a slot two VIPs fall in holds neither."""
    return slot_table((vip_slot(addr, port, proto), vip_id) for addr, port, proto, vip_id in vips if port)


def slot_table(placed: Iterable[tuple[int, int]]) -> list[int]:
    """The whole slot table for VIPs given as (their slot, id), those of every port left out."""
    out = [0] * VIP_SLOTS
    crowded = set()
    for s, vip_id in placed:
        if out[s] or s in crowded:
            out[s] = 0
            crowded.add(s)
        else:
            out[s] = vip_id + 1
    return out


def write_slots(maps: DataPlaneMaps, want: list[int]) -> int:
    """After a change (the VIPs' records written): make the slot table `want` (slot_table's), the
    words that differ from what it holds."""
    have = maps.vip_slots.read_range(0, VIP_SLOTS)
    changed = {i: w for i, (w, h) in enumerate(zip(want, have)) if w != h}
    if changed:
        maps.vip_slots.set_many(array.array("I", changed), array.array("I", changed.values()))
    return len(changed)


def words(vip_addrs: Iterable[bytes], backend_addrs: Iterable[bytes]) -> list[int]:
    """The whole filter for these addresses."""
    return bucket_words(map(bucket, vip_addrs), map(bucket, backend_addrs))


def bucket_words(vip_buckets: Iterable[int], backend_buckets: Iterable[int]) -> list[int]:
    """The whole filter for addresses given as their buckets."""
    out = [_ALL] * ADDR_FILTER_SIZE
    for b in vip_buckets:
        out[b] &= ~FILTER_NO_VIP
    for b in backend_buckets:
        out[b] &= ~FILTER_NO_BACKEND
    return out


def _write(maps: DataPlaneMaps, changed: dict[int, int]) -> int:
    if changed:
        maps.addr_filter.set_many(array.array("I", changed), array.array("I", changed.values()))
    return len(changed)


def open_buckets(maps: DataPlaneMaps, vip_addrs: Iterable[bytes], backend_addrs: Iterable[bytes],
                 have: list[int] | None = None) -> int:
    """Before the maps name these addresses: their buckets claim nothing of their kind. `have`: the
    filter as read (read here when None); the words written go into it, so that a write_words()
    after this (the maps' lock held between: no one else writes the filter) need not read it again."""
    if have is None:
        have = maps.addr_filter.read_range(0, ADDR_FILTER_SIZE)
    changed: dict[int, int] = {}
    for kind, addrs in ((FILTER_NO_VIP, vip_addrs), (FILTER_NO_BACKEND, backend_addrs)):
        for addr in addrs:
            b = bucket(addr)
            word = changed.get(b, have[b])
            if word & kind:
                changed[b] = word & ~kind
    written = _write(maps, changed)
    for b, word in changed.items():
        have[b] = word
    return written


def write_words(maps: DataPlaneMaps, want: list[int], have: list[int] | None = None) -> int:
    """After a change: make the filter `want` (bucket_words' of every address the maps now name;
    buckets no address uses any more claim "none"), writing the words that differ from `have`, the
    filter as it stands (open_buckets', read here when None). Returns how many were written."""
    if have is None:
        have = maps.addr_filter.read_range(0, ADDR_FILTER_SIZE)
    return _write(maps, {i: w for i, (w, h) in enumerate(zip(want, have)) if w != h})
