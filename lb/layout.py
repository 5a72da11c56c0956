"""The pinned maps' layout: what a program about to be loaded on them expects, what they are.

bcc adopts a pinned map whatever its layout, so a program built from newer sources
could read an older map's entries with another meaning. Before a program is loaded
on existing pins, its expectations (map type, key and value sizes, max entries, and
LB_LAYOUT_VERSION, the meaning of them all) are compared with the pins; the caller
(control/adopt.py) migrates the maps that differ. The version is recorded in the
lb_state map by whoever loads a program (stamp)."""
from __future__ import annotations

import ctypes
import os
from dataclasses import dataclass
from typing import Any

from lb import bpfsys
from lb.maps import MAP_TYPES, U32, BpfMap
from lb.structs import ADDR_FILTER_SIZE, LAYOUT_VERSION, MAX_ACL_RULES, MAX_IFINDEX, MAX_VLANS, REASONS, VIP_SLOTS, LbState

HASH, ARRAY, PERCPU_ARRAY, LRU_HASH, LPM_TRIE, DEVMAP = 1, 2, 6, 9, 11, 14
PREVIOUS_LAYOUT = 1  # the maps of a data plane that has no lb_state map

# Counters: kept across a version change when their own layout is unchanged (reason codes are append-only).
COUNTERS = ("vip_stats", "backend_stats", "reason_stats")


@dataclass(frozen=True)
class MapSpec:
    type: int
    key_size: int
    value_size: int
    max_entries: int

    def differences(self, other: "MapSpec") -> str:
        """What differs from `other` (this lb's expectation), in words."""
        return ", ".join(f"{name} {getattr(self, name)} (this lb: {getattr(other, name)})"
                         for name in ("type", "key_size", "value_size", "max_entries")
                         if getattr(self, name) != getattr(other, name))


def expected(config: Any) -> dict[str, MapSpec]:
    """Every map of bpf/maps.h as a program built with `config` (a loader.DataPlaneConfig) declares it."""
    types_and_sizes = {
        "vips": (HASH, config.max_vips), "vip_addrs": (HASH, config.max_vips), "lb_config": (ARRAY, 1),
        "lb_state": (ARRAY, 1), "vip_meta": (ARRAY, config.max_vips),
        "maglev": (ARRAY, config.max_vips * config.ring_size), "backends": (ARRAY, config.max_backends),
        "backend_nh": (ARRAY, config.max_backends), "reply_sources": (HASH, config.max_backends),
        "addr_filter": (ARRAY, ADDR_FILTER_SIZE), "vip_slots": (ARRAY, VIP_SLOTS),
        "conn_table": (LRU_HASH, config.conn_table_size), "acl": (LPM_TRIE, MAX_ACL_RULES),
        "routes": (LPM_TRIE, config.max_routes), "tx_ports": (DEVMAP, MAX_IFINDEX),
        "egress_vlans": (HASH, MAX_VLANS),
        "vip_stats": (PERCPU_ARRAY, config.max_vips), "backend_stats": (PERCPU_ARRAY, config.max_backends),
        "reason_stats": (PERCPU_ARRAY, len(REASONS)),
        "snat_pools": (ARRAY, config.max_vips), "fullnat_flows": (LRU_HASH, config.fullnat_table_size),
        "fullnat_ports": (HASH, config.fullnat_table_size),
    }
    return {name: MapSpec(kind, ctypes.sizeof(MAP_TYPES[name][0]), ctypes.sizeof(MAP_TYPES[name][1]), entries)
            for name, (kind, entries) in types_and_sizes.items()}


def pinned(path: str) -> MapSpec | None:
    """The layout of the map pinned at `path`, None if there is none."""
    try:
        fd = bpfsys.obj_get(path)
    except bpfsys.BpfError:
        return None
    try:
        info = bpfsys.map_info(fd)
    finally:
        os.close(fd)
    return MapSpec(info.type, info.key_size, info.value_size, info.max_entries)


def pinned_version(pin_dir: str) -> int:
    """LB_LAYOUT_VERSION of the program that made the pinned maps: PREVIOUS_LAYOUT without an
    lb_state map, 0 if one was made but never stamped (an interrupted load: trust nothing)."""
    path = os.path.join(pin_dir, "lb_state")
    if pinned(path) is None:
        return PREVIOUS_LAYOUT
    m = BpfMap(path, U32, LbState)
    try:
        return m.get(U32(0)).layout
    finally:
        m.close()


def incompatible(config: Any, pin_dir: str) -> dict[str, str]:
    """Pinned maps a program built with `config` must not be loaded on, and why. With another
    layout version every map but the counters is; else those whose type or sizes differ."""
    version = pinned_version(pin_dir)
    found = {}
    for name, want in expected(config).items():
        have = pinned(os.path.join(pin_dir, name))
        if have is None:
            continue  # loading creates it
        if have != want:
            found[name] = have.differences(want)
        elif version != LAYOUT_VERSION and name not in COUNTERS:
            found[name] = f"layout version {version} (this lb: {LAYOUT_VERSION})"
    return found


def stamp(pin_dir: str) -> None:
    """Record this lb's layout version in the pinned lb_state (its revision kept)."""
    m = BpfMap(os.path.join(pin_dir, "lb_state"), U32, LbState)
    try:
        state = m.get(U32(0)) or LbState()
        state.layout = LAYOUT_VERSION
        m.set(U32(0), state)
    finally:
        m.close()
