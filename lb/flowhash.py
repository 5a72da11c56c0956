"""The data plane's flow hash (bpf/hash.h) in Python: which Maglev slot a packet lands on."""
from __future__ import annotations

import struct

from lb.structs import IPAddress, LbAddr

SEED = 0x9747B28C
_M32 = 0xFFFFFFFF


def _rotl(x: int, r: int) -> int:
    return ((x << r) | (x >> (32 - r))) & _M32


def _mix(h: int, k: int) -> int:
    k = (k * 0xCC9E2D51) & _M32
    k = _rotl(k, 15)
    k = (k * 0x1B873593) & _M32
    h ^= k
    h = _rotl(h, 13)
    return (h * 5 + 0xE6546B64) & _M32


def _final(h: int, length: int) -> int:
    h ^= length
    h ^= h >> 16
    h = (h * 0x85EBCA6B) & _M32
    h ^= h >> 13
    h = (h * 0xC2B2AE35) & _M32
    return h ^ (h >> 16)


def flow_hash_raw(src: bytes, dst: bytes, sport: int, dport: int, proto: int) -> int:
    """src and dst as 16-byte lb_addr; words as a little-endian CPU loads them, as the C code does."""
    h = SEED
    for addr in (src, dst):
        for word in struct.unpack("<4I", addr):
            h = _mix(h, word)
    sport_le, dport_le = struct.unpack("<HH", struct.pack(">HH", sport, dport))
    h = _mix(h, (sport_le << 16) | dport_le)
    h = _mix(h, proto)
    return _final(h, 40)


def flow_hash(src: IPAddress, dst: IPAddress, sport: int, dport: int, proto: int) -> int:
    return flow_hash_raw(bytes(LbAddr.of(src)), bytes(LbAddr.of(dst)), sport, dport, proto)


def ring_index(client: bytes, vip_addr: bytes, sport: int, dport: int, proto: int, ring_size: int,
               by_source: bool = False) -> int:
    """lb.c maglev_slot without the VIP's ring_base: the slot of a VIP's Maglev table a new flow
    takes, hashed on the whole flow or, for session affinity, on the client's address alone.
    Addresses as 16-byte lb_addr. The one Python copy: the reference model and test-packet use it."""
    if by_source:
        return flow_hash_raw(client, bytes(16), 0, 0, 0) % ring_size
    return flow_hash_raw(client, vip_addr, sport, dport, proto) % ring_size


def maglev_slot(src: IPAddress, dst: IPAddress, sport: int, dport: int, proto: int, ring_size: int) -> int:
    return ring_index(bytes(LbAddr.of(src)), bytes(LbAddr.of(dst)), sport, dport, proto, ring_size)
