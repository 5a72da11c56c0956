"""Turn a change of desired State into the minimal set of map updates.

The maps hold what the old State describes; apply(old, new) writes only what
differs, in an order that never lets a packet see a half-built VIP: backends
and metadata first, then the Maglev table, then the VIP key itself (and the
reverse when removing). If any write fails, the maps are brought back to `old`."""
from __future__ import annotations

import array
import ctypes
import itertools
import ipaddress
import operator
import socket
from dataclasses import dataclass, field

from control.errors import InputError
from control.model import BackendState, State, VipState
from lb.maglev import MaglevBackend, build_table
from lb.maps import U32, DataPlaneMaps
from lb.structs import (ACL_ALLOW, ACL_DENY, VIP_ACL, VIP_ACL_ALLOWLIST, AclKey, AclRule, BACKEND_IN_USE, BACKEND_NO_NEW, BACKEND_SHARED, CFG_ANY_PORT, MODE_DSR, MODE_NAT, MODE_TUNNEL, NO_BACKEND, PROTOCOLS, REPLY_VIPS,
                        VIP_ACTIVE, VIP_META_HASH_SOURCE, VIP_DSR, VIP_HASH_SOURCE, VIP_TUNNEL, Backend, Endpoint, LbAddr, LbConfig, LbCounters, NextHop,
                        ReplySource, VipAddr, seconds_to_ticks, VipInfo, VipKey, VipMeta, be16)

MODE_CODES = {"nat": MODE_NAT, "dsr": MODE_DSR, "tunnel": MODE_TUNNEL}
MODE_FLAGS = {"nat": 0, "dsr": VIP_DSR, "tunnel": VIP_TUNNEL}  # what the data plane reads, in the VIP's key lookup


def _key(struct: ctypes.Structure) -> bytes:
    return bytes(struct)


def vip_key(v: VipState) -> VipKey:
    return VipKey(addr=LbAddr.of(v.vip.address), port=be16(v.vip.port), proto=PROTOCOLS[v.vip.proto])


def vip_flags(v: VipState) -> int:
    flags = (VIP_HASH_SOURCE if v.hash == "source" else 0) | MODE_FLAGS[v.mode]
    if v.acl:
        flags |= VIP_ACL
    if "allow" in v.acl.values():
        flags |= VIP_ACL_ALLOWLIST
    return flags


def backend_record(b: BackendState, vip_id: int, ep: "Endpoint") -> Backend:
    """What the data plane knows of a backend: its endpoint, the binding (generation, VIP) its flows
    must still match, and whether a new connection may reach it (removed, drained, down: not)."""
    flags = BACKEND_IN_USE | (0 if b.serving else BACKEND_NO_NEW)
    return Backend(addr=ep.addr, port=ep.port, flags=flags, generation=b.generation, vip_id=vip_id)


def acl_key(vip_id: int, network: ipaddress.IPv4Network | ipaddress.IPv6Network) -> AclKey:
    """LPM key: the VIP id's 32 bits, then the prefix of the (IPv4-mapped) address."""
    bits = network.prefixlen + (96 if network.version == 4 else 0)
    return AclKey(prefixlen=32 + bits, vip_id=vip_id, addr=LbAddr.of(network.network_address))


@dataclass
class MapContents:
    """What the small maps hold for one State (the Maglev tables are built on demand)."""

    vips: dict[bytes, tuple[VipKey, VipInfo]] = field(default_factory=dict)
    vip_addrs: dict[bytes, tuple[LbAddr, VipAddr]] = field(default_factory=dict)
    config: LbConfig = field(default_factory=LbConfig)
    vip_meta: dict[int, VipMeta] = field(default_factory=dict)
    backends: dict[int, Backend] = field(default_factory=dict)
    reply_sources: dict[bytes, tuple[Endpoint, ReplySource]] = field(default_factory=dict)
    acl: dict[bytes, tuple[AclKey, AclRule]] = field(default_factory=dict)

    @classmethod
    def of(cls, state: State) -> "MapContents":
        c = cls()
        dp_config = state.dataplane.config if state.dataplane is not None else {}
        for name in ("tcp_timeout", "tcp_closing_timeout", "udp_timeout"):  # absent: 0, the data plane's default
            setattr(c.config, name, seconds_to_ticks(dp_config[name]) if name in dp_config else 0)
        # Which VIPs each backend endpoint's replies may belong to. A backend of a VIP of
        # every port (port 0) overlaps with every port of its address.
        by_host: dict[tuple[bytes, int], list[tuple[int, int]]] = {}  # (addr, proto) -> [(port, VIP id)]
        members: list[tuple[int, Endpoint]] = []  # backend id -> its endpoint
        for v in state.vips:
            key = vip_key(v)
            c.vips[_key(key)] = (key, VipInfo(id=v.id, flags=vip_flags(v)))
            for prefix, action in v.acl.items():
                rule_key = acl_key(v.id, ipaddress.ip_network(prefix))
                c.acl[_key(rule_key)] = (rule_key, AclRule(ACL_ALLOW if action == "allow" else ACL_DENY))
            addr = c.vip_addrs.get(_key(key.addr), (key.addr, VipAddr(0)))
            c.vip_addrs[_key(key.addr)] = (key.addr, VipAddr(addr[1].vips + 1))
            if v.vip.any_port:
                c.config.flags |= CFG_ANY_PORT
            c.vip_meta[v.id] = VipMeta(addr=key.addr, port=key.port, proto=key.proto, mode=MODE_CODES[v.mode],
                                       flags=VIP_ACTIVE | (VIP_META_HASH_SOURCE if v.hash == "source" else 0))
            for b in v.backends:  # retired ones too: their established flows go on
                ep = Endpoint(addr=LbAddr.of(b.address.address), port=be16(b.address.port), proto=key.proto)
                c.backends[b.id] = backend_record(b, v.id, ep)
                if v.replies_through_lb:  # dsr and tunnel: the LB never sees the replies
                    by_host.setdefault((bytes(ep.addr), ep.proto), []).append((b.address.port, v.id))
                    members.append((b.id, ep))
        for bid, ep in members:
            port = socket.ntohs(ep.port)
            vip_ids = sorted({vid for p, vid in by_host[(bytes(ep.addr), ep.proto)] if p == port or not p or not port})
            if len(vip_ids) > REPLY_VIPS:
                raise InputError(f"backend {ep.addr.address()}:{port}/{'tcp' if ep.proto == 6 else 'udp'} would serve "
                                 f"{len(vip_ids)} NAT VIPs; at most {REPLY_VIPS} may share one backend endpoint")
            source = ReplySource(count=len(vip_ids))
            source.vip_ids[:len(vip_ids)] = vip_ids
            c.reply_sources[_key(ep)] = (ep, source)
            if len(vip_ids) > 1:  # its SYN-ACKs cannot name their VIP: SYNs keep their entries
                c.backends[bid].flags |= BACKEND_SHARED
        return c


def _endpoint(entry: Backend | VipMeta) -> tuple[bytes, int]:
    """Whom a backends or vip_meta entry counts for (its flags may change, the owner stays)."""
    return bytes(entry.addr), entry.port


def maglev_table(v: VipState | None, ring_size: int,
                 built: dict[tuple, list[int]] | None = None) -> list[int]:
    """Backend ids of a VIP's Maglev table (NO_BACKEND where none). `built` caches the slot
    layout by backend addresses and weights: VIPs with the same backends share it."""
    if v is None:
        return [NO_BACKEND] * ring_size
    members = v.maglev_backends()
    inputs = tuple((str(b.address), b.weight) for b in members)
    index = built.get(inputs) if built is not None else None
    if index is None:
        index = build_table([MaglevBackend(key, weight) for key, weight in inputs], ring_size)
        if built is not None:
            built[inputs] = index
    ids = [b.id for b in members] + [NO_BACKEND]  # build_table's -1 (no backend) picks the last
    return list(map(ids.__getitem__, index))


def maglev_inputs(v: VipState | None) -> list[tuple[str, int, int]]:
    """What a VIP's Maglev table is built from: equal inputs, equal tables."""
    return sorted((str(b.address), b.weight, b.id) for b in v.maglev_backends()) if v else []


def slots_moved(old: VipState | None, new: VipState | None, ring_size: int) -> int:
    """How many Maglev slots name a different backend in `new` than in `old`."""
    if maglev_inputs(old) == maglev_inputs(new):
        return 0
    before, after = maglev_table(old, ring_size), maglev_table(new, ring_size)
    return sum(map(operator.ne, before, after))


@dataclass
class ApplyReport:
    writes: dict[str, int] = field(default_factory=dict)
    slots_changed: dict[str, int] = field(default_factory=dict)  # per VIP

    def count(self, map_name: str, n: int = 1) -> None:
        self.writes[map_name] = self.writes.get(map_name, 0) + n


class Reconciler:
    def __init__(self, maps: DataPlaneMaps, ring_size: int):
        self.maps = maps
        self.ring_size = ring_size
        self.built_tables: dict[tuple, list[int]] = {}  # Maglev layouts built during this reconciler's life

    def apply(self, old: State, new: State) -> ApplyReport:
        report = ApplyReport()
        MapContents.of(new)  # refuses what the maps cannot hold before anything is written
        try:
            self._apply(old, new, report)
        except BaseException:
            self._apply(new, old, ApplyReport())
            raise
        return report

    def _apply(self, old: State, new: State, report: ApplyReport) -> None:
        before, after = MapContents.of(old), MapContents.of(new)
        m = self.maps

        for k in before.vips.keys() - after.vips.keys():
            m.vips.delete(before.vips[k][0])
            report.count("vips")
        self._write_by_id("backends", "backend_stats", before.backends, after.backends, report)
        self._write_keyed("reply_sources", before.reply_sources, after.reply_sources, report)
        self._write_keyed("acl", before.acl, after.acl, report)
        self._write_by_id("vip_meta", "vip_stats", before.vip_meta, after.vip_meta, report)
        self._write_keyed("vip_addrs", before.vip_addrs, after.vip_addrs, report)
        if bytes(before.config) != bytes(after.config) and after.config.flags & ~before.config.flags:
            m.lb_config.set(U32(0), after.config)  # switches on before the VIPs that need them
            report.count("lb_config")

        old_vips = {v.id: v for v in old.vips}
        new_vips = {v.id: v for v in new.vips}
        for vid in sorted(old_vips.keys() | new_vips.keys()):
            o, n = old_vips.get(vid), new_vips.get(vid)
            if o is not None and n is not None and o.vip == n.vip and maglev_inputs(o) == maglev_inputs(n):
                continue
            changed = self._write_table(vid, n)
            report.count("maglev", changed)
            report.slots_changed[str((n or o).vip)] = changed

        for k, (key, info) in after.vips.items():
            if k not in before.vips or bytes(before.vips[k][1]) != bytes(info):
                m.vips.set(key, info)
                report.count("vips")
        if bytes(before.config) != bytes(after.config) and not after.config.flags & ~before.config.flags:
            m.lb_config.set(U32(0), after.config)  # switches off after the VIPs that needed them
            report.count("lb_config")
        for k in before.vip_addrs.keys() - after.vip_addrs.keys():
            m.vip_addrs.delete(before.vip_addrs[k][0])
            report.count("vip_addrs")
        for k in before.acl.keys() - after.acl.keys():
            m.acl.delete(before.acl[k][0])
            report.count("acl")
        for k in before.reply_sources.keys() - after.reply_sources.keys():
            m.reply_sources.delete(before.reply_sources[k][0])
            report.count("reply_sources")
        for bid in before.backends.keys() - after.backends.keys():
            m.backends.set(U32(bid), Backend())
            report.count("backends")
        for vid in before.vip_meta.keys() - after.vip_meta.keys():
            m.vip_meta.set(U32(vid), VipMeta())
            report.count("vip_meta")

    def repair(self, state: State) -> dict[str, int]:
        """Make the maps hold exactly what `state` describes, whatever they hold now (after a crash,
        or a hand edit); returns the entries corrected per map. Same order as apply: stale VIP keys
        go first, then what a VIP needs is written, its key last, and other stale entries after."""
        want = MapContents.of(state)
        fixed: dict[str, int] = {}

        def count(map_name: str, n: int) -> None:
            if n:
                fixed[map_name] = fixed.get(map_name, 0) + n

        count("vips", self._delete_extra("vips", want.vips))
        count("backends", self._repair_array("backends", want.backends, Backend))
        count("reply_sources", self._write_missing("reply_sources", want.reply_sources))
        count("acl", self._write_missing("acl", want.acl))
        count("vip_meta", self._repair_array("vip_meta", want.vip_meta, VipMeta))
        count("vip_addrs", self._write_missing("vip_addrs", want.vip_addrs))
        if bytes(self.maps.lb_config.get(U32(0)) or LbConfig()) != bytes(want.config):
            self.maps.lb_config.set(U32(0), want.config)
            count("lb_config", 1)
        for v in state.vips:  # a table no VIP uses is rewritten by whichever VIP takes its id next
            count("maglev", self._write_table(v.id, v))
        count("vips", self._write_missing("vips", want.vips))
        for map_name in ("vip_addrs", "acl", "reply_sources"):
            count(map_name, self._delete_extra(map_name, getattr(want, map_name)))
        return fixed

    def _write_missing(self, map_name: str, want: dict[bytes, tuple]) -> int:
        """Hash map: write the entries that are missing or differ."""
        m = self.maps.maps[map_name]
        have = {bytes(k): bytes(v) for k, v in m.items()}
        wrong = [(key, value) for k, (key, value) in want.items() if have.get(k) != bytes(value)]
        for key, value in wrong:
            m.set(key, value)
        return len(wrong)

    def _delete_extra(self, map_name: str, want: dict[bytes, tuple]) -> int:
        """Hash map: delete the entries `want` does not have."""
        m = self.maps.maps[map_name]
        extra = [bytes(k) for k in m.keys() if bytes(k) not in want]
        for k in extra:
            m.delete(m.key_type.from_buffer_copy(k))
        return len(extra)

    def _repair_array(self, map_name: str, want: dict[int, ctypes.Structure], empty: type) -> int:
        """Array map: entries of `want` as given, every other index empty."""
        m = self.maps.maps[map_name]
        n = 0
        for index in range(m.max_entries):
            value = want.get(index, empty())
            if bytes(m.get(U32(index))) != bytes(value):
                if map_name == "backends":
                    self.maps.backend_nh.set(U32(index), NextHop())
                m.set(U32(index), value)
                n += 1
        return n

    def _write_keyed(self, map_name: str, before: dict[bytes, tuple], after: dict[bytes, tuple],
                     report: ApplyReport) -> None:
        """Write the hash entries that are new or changed."""
        for k, (key, value) in after.items():
            if k not in before or bytes(before[k][1]) != bytes(value):
                self.maps.maps[map_name].set(key, value)
                report.count(map_name)

    def _write_by_id(self, map_name: str, stats_name: str, before: dict[int, ctypes.Structure],
                     after: dict[int, ctypes.Structure], report: ApplyReport) -> None:
        """Write the array entries that are new or changed; counters start from zero at an id that is
        new or now names another address (a reused id)."""
        for index, value in after.items():
            if index in before and bytes(before[index]) == bytes(value):
                continue
            if index not in before or _endpoint(before[index]) != _endpoint(value):
                self._reset_counters(stats_name, index)
            if map_name == "backends":  # a new or moved backend: its cached next hop is stale
                self.maps.backend_nh.set(U32(index), NextHop())
            self.maps.maps[map_name].set(U32(index), value)
            report.count(map_name)

    def _write_table(self, vip_id: int, v: VipState | None) -> int:
        """Write the slots of one VIP's Maglev table that differ from the map; returns how many."""
        base = vip_id * self.ring_size
        current = self.maps.maglev.read_range(base, self.ring_size)
        wanted = maglev_table(v, self.ring_size, self.built_tables)
        if current == wanted:
            return 0
        diff = list(itertools.compress(range(self.ring_size), map(operator.ne, current, wanted)))
        self.maps.maglev.set_many(array.array("I", [base + i for i in diff]),
                                  array.array("I", map(wanted.__getitem__, diff)))
        return len(diff)

    def _reset_counters(self, map_name: str, index: int) -> None:
        """A reused id starts from zero."""
        m = self.maps.maps[map_name]
        zeros = (LbCounters * m.ncpus)()
        m.set(U32(index), zeros)
