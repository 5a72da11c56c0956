"""Maglev lookup table population (Eisenbud et al., NSDI 2016, section 3.4), with weights.

Deterministic across processes and hosts: a backend's permutation depends only on
its key (for example "10.0.0.2:80") and the table size, never on Python's hash()."""
from __future__ import annotations

import ctypes
import functools
import hashlib
from dataclasses import dataclass
from pathlib import Path
from typing import Callable

DEFAULT_RING_SIZE = 65537  # the largest table of a VIP (the room each VIP id has in the maglev map)
SLOTS_PER_BACKEND = 100    # Maglev needs many more slots than backends for even shares (the paper's M > 100 N)
MIN_RING_BACKENDS = 16     # tables are sized for at least this many backends, then in steps of powers of two


@dataclass(frozen=True)
class MaglevBackend:
    key: str  # stable identity, hashed for the permutation
    weight: int = 1


def _offset_skip(key: str, size: int) -> tuple[int, int]:
    digest = hashlib.blake2b(key.encode(), digest_size=16, person=b"lb-maglev").digest()
    h1 = int.from_bytes(digest[:8], "little")
    h2 = int.from_bytes(digest[8:], "little")
    return h1 % size, h2 % (size - 1) + 1


def is_prime(n: int) -> bool:
    if n < 2:
        return False
    if n % 2 == 0:
        return n == 2
    f = 3
    while f * f <= n:
        if n % f == 0:
            return False
        f += 2
    return True


@functools.cache
def ring_size_for(backends: int, max_size: int = DEFAULT_RING_SIZE) -> int:
    """The Maglev table size of a VIP with `backends` backends: the smallest prime of at least
    SLOTS_PER_BACKEND slots for each of a power of two >= max(backends, MIN_RING_BACKENDS), at most
    `max_size`. Powers of two: a VIP changes size (every new flow is placed anew) only when its
    backend count crosses one, not on every added backend. Deterministic: the count alone decides."""
    room = MIN_RING_BACKENDS
    while room < backends:
        room *= 2
    size = SLOTS_PER_BACKEND * room
    while size < max_size and not is_prime(size):
        size += 1
    return min(size, max_size)


def build_table(backends: list[MaglevBackend], size: int = DEFAULT_RING_SIZE) -> list[int]:
    """Fill `size` slots with indexes into `backends` (-1 when there is none to use).

    Each backend walks its own permutation of the slots and claims the next free one
    in turn; a backend of weight w takes w turns for every max-weight turn, so its
    share of slots is proportional to its weight. Weight 0 takes no slots."""
    if not is_prime(size):
        raise ValueError(f"Maglev table size must be a prime, got {size}")
    used = [i for i, b in enumerate(backends) if b.weight > 0]
    if not used:
        return [-1] * size
    order = sorted(used, key=lambda i: backends[i].key)
    perms = [_offset_skip(backends[i].key, size) for i in order]
    weights = [backends[i].weight for i in order]
    max_weight = max(weights)
    fill = _native_fill()
    if fill is not None:
        return fill(size, order, perms, weights, max_weight)
    return _fill(size, order, perms, weights, max_weight)


def _fill(size: int, order: list[int], perms: list[tuple[int, int]], weights: list[int],
          max_weight: int) -> list[int]:
    """The fill loop in Python (lb/maglev_fill.c does the same, faster)."""
    table = [-1] * size
    credit = [0] * len(order)
    slots = [offset for offset, _ in perms]  # each backend's next candidate slot
    skips = [skip for _, skip in perms]
    filled = 0
    while True:
        for j, i in enumerate(order):
            credit[j] += weights[j]
            if credit[j] < max_weight:
                continue
            credit[j] -= max_weight
            slot, skip = slots[j], skips[j]
            while table[slot] >= 0:  # walk this backend's permutation to a free slot
                slot += skip
                if slot >= size:
                    slot -= size
            table[slot] = i
            slot += skip
            slots[j] = slot - size if slot >= size else slot
            filled += 1
            if filled == size:
                return table


NATIVE_FILL = Path(__file__).with_name("_maglev_fill.so")  # built by setup.sh from maglev_fill.c
FillFunction = Callable[[int, list[int], list[tuple[int, int]], list[int], int], list[int]]


@functools.cache
def _native_fill() -> FillFunction | None:
    """The C fill loop, when setup.sh has built it; None otherwise (Python does the same)."""
    source = NATIVE_FILL.with_name("maglev_fill.c")
    if not NATIVE_FILL.exists() or NATIVE_FILL.stat().st_mtime < source.stat().st_mtime:
        return None
    lib = ctypes.CDLL(str(NATIVE_FILL))
    lib.maglev_fill.restype = None
    u32p, i32p = ctypes.POINTER(ctypes.c_uint32), ctypes.POINTER(ctypes.c_int32)
    lib.maglev_fill.argtypes = [i32p, ctypes.c_uint32, ctypes.c_uint32, i32p, u32p, u32p, u32p, ctypes.c_uint32, u32p]

    def fill(size: int, order: list[int], perms: list[tuple[int, int]], weights: list[int],
             max_weight: int) -> list[int]:
        n = len(order)
        table, per_backend = (ctypes.c_int32 * size)(), ctypes.c_uint32 * n
        lib.maglev_fill(table, size, n, (ctypes.c_int32 * n)(*order), per_backend(*(o for o, _ in perms)),
                        per_backend(*(skip for _, skip in perms)), per_backend(*weights), max_weight, per_backend())
        return table[:]

    return fill
