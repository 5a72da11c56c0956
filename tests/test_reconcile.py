"""The Reconciler's bookkeeping of counters, on maps kept in dicts (no kernel needed)."""
from __future__ import annotations

import ipaddress

from control.reconcile import ApplyReport, Reconciler
from lb.maps import U32
from lb.structs import BACKEND_IN_USE, BACKEND_NO_NEW, Backend, LbAddr, be16


class DictMap(dict):
    """What the Reconciler uses of a BpfMap: set() by u32 index, one CPU."""

    ncpus = 1

    def set(self, key: U32, value) -> None:
        self[key.value] = value


class DictMaps:
    def __init__(self) -> None:
        self.maps = {"backends": DictMap(), "backend_stats": DictMap()}
        self.backend_nh = DictMap()


def backend(addr: str, port: int, flags: int = BACKEND_IN_USE) -> Backend:
    return Backend(addr=LbAddr.of(ipaddress.ip_address(addr)), port=be16(port), flags=flags)


def write_backends(before: dict[int, Backend], after: dict[int, Backend]) -> DictMaps:
    maps = DictMaps()
    Reconciler(maps, 251)._write_by_id("backends", "backend_stats", before, after, ApplyReport())
    return maps


def test_counters_restart_when_an_id_is_reused_for_another_address():
    maps = write_backends({3: backend("198.18.1.2", 8080)}, {3: backend("198.18.9.2", 8080)})
    assert 3 in maps.maps["backend_stats"]  # zeroed: the new backend does not inherit the old one's counts
    assert maps.maps["backends"][3].port == be16(8080)


def test_counters_go_on_when_only_a_backends_flags_change():
    maps = write_backends({3: backend("198.18.1.2", 8080)},
                          {3: backend("198.18.1.2", 8080, BACKEND_IN_USE | BACKEND_NO_NEW)})
    assert 3 in maps.maps["backends"] and 3 not in maps.maps["backend_stats"]
