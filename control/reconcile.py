"""Turn a change of desired State into the minimal set of map updates.

The maps hold what the old State describes; apply(old, new) writes only what
differs, in an order that never lets a packet see a half-built VIP: backends
and metadata first, then the Maglev table, then the VIP key itself (and the
reverse when removing). If any write fails, the maps are brought back to `old`.

Crash safety: the lb_state map records the store revision the maps hold. A change
holding the store's lock writes there the revision it is about to commit BEFORE its
first map write, then the maps, then commits. A process killed anywhere in between
leaves a revision that differs from the store's, so the next command repairs the maps
to the stored state (old or new, whichever was committed) before it acts; when they
are equal the maps are known to match and nothing is read."""
from __future__ import annotations

import array
import collections
import ctypes
import itertools
import ipaddress
import operator
import socket
from dataclasses import dataclass, field

from control.errors import InputError
from control.model import BackendAddress, BackendState, Edits, State, VipAddress, VipState
from lb import addrfilter
from lb.maglev import MaglevBackend, build_table, ring_size_for
from lb.maps import U32, DataPlaneMaps
from lb.structs import (ADDR_FILTER_SIZE, CFG_FULLNAT, MODE_FULLNAT, SNAT_ADDRS, VIP_FULLNAT, SnatPool, ACL_ALLOW, ACL_DENY, VIP_ACL, VIP_ACL_ALLOWLIST, AclKey, AclRule, BACKEND_IN_USE, BACKEND_NO_NEW, BACKEND_SHARED, CFG_ANY_PORT, MODE_DSR, MODE_NAT, MODE_TUNNEL, NO_BACKEND, PROTOCOLS, REPLY_VIPS,
                        ADDR_PASS_UNSERVED, VIP_ACTIVE, VIP_META_HASH_SOURCE, VIP_DSR, VIP_HASH_SOURCE, VIP_TUNNEL, Backend, Endpoint, LbAddr, LbConfig, LbCounters, LbState, NextHop,
                        ReplySource, VipAddr, seconds_to_ticks, VipInfo, VipKey, VipMeta, be16)

MODE_CODES = {"nat": MODE_NAT, "dsr": MODE_DSR, "tunnel": MODE_TUNNEL, "fullnat": MODE_FULLNAT}
# what the data plane reads, in the VIP's key lookup
MODE_FLAGS = {"nat": 0, "dsr": VIP_DSR, "tunnel": VIP_TUNNEL, "fullnat": VIP_FULLNAT}


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
    snat_pools: dict[int, SnatPool] = field(default_factory=dict)  # full-NAT VIPs' source pools, by VIP id

    @classmethod
    def of(cls, state: State, max_ring: int, hosts: BackendHosts | None = None) -> "MapContents":
        """`hosts`: backend_hosts() of a State that `state` is part of (the sharing it decides)."""
        c = cls()
        c.config = lb_config_of(state)
        by_host = backend_hosts(state) if hosts is None else hosts
        members: list[tuple[int, Endpoint, tuple]] = []  # (backend id, its endpoint, its host)
        for v in state.vips:
            key = vip_key(v)
            c.vips[_key(key)] = (key, VipInfo(id=v.id, flags=vip_flags(v), ring_base=ring_base(v.id, max_ring),
                                              ring_size=ring_size_of(v, max_ring)))
            for prefix, action in v.acl.items():
                rule_key = acl_key(v.id, ipaddress.ip_network(prefix))
                c.acl[_key(rule_key)] = (rule_key, AclRule(ACL_ALLOW if action == "allow" else ACL_DENY))
            addr = c.vip_addrs.get(_key(key.addr), (key.addr, VipAddr(0)))
            unserved = ADDR_PASS_UNSERVED if v.vip.address in state.pass_unserved else 0
            c.vip_addrs[_key(key.addr)] = (key.addr, VipAddr(addr[1].vips + 1, unserved))
            c.vip_meta[v.id] = VipMeta(addr=key.addr, port=key.port, proto=key.proto, mode=MODE_CODES[v.mode],
                                       info_flags=c.vips[_key(key)][1].flags,
                                       flags=VIP_ACTIVE | (VIP_META_HASH_SOURCE if v.hash == "source" else 0),
                                       ring_base=c.vips[_key(key)][1].ring_base, ring_size=c.vips[_key(key)][1].ring_size)
            if v.mode == "fullnat":
                c.snat_pools[v.id] = snat_pool(state, v)
            for b in v.backends:  # retired ones too: their established flows go on
                ep = Endpoint(addr=LbAddr.of(b.address.address), port=be16(b.address.port), proto=key.proto)
                c.backends[b.id] = backend_record(b, v.id, ep)
                if v.replies_through_lb:  # (dsr and tunnel: the LB never sees the replies)
                    members.append((b.id, ep, (b.address.packed, v.vip.proto)))
        serving: dict[tuple, list[int]] = {}  # endpoint -> its VIPs, once per endpoint
        for bid, ep, host in members:
            port = socket.ntohs(ep.port)
            vip_ids = serving.get((*host, port))
            if vip_ids is None:
                vip_ids = serving[(*host, port)] = sorted({vid for p, vid in by_host[host]
                                                           if p == port or not p or not port})
            if len(vip_ids) > REPLY_VIPS:
                raise InputError(f"backend {ep.addr.address()}:{port}/{'tcp' if ep.proto == 6 else 'udp'} would serve "
                                 f"{len(vip_ids)} NAT VIPs; at most {REPLY_VIPS} may share one backend endpoint")
            source = ReplySource(count=len(vip_ids))
            source.vip_ids[:len(vip_ids)] = vip_ids
            c.reply_sources[_key(ep)] = (ep, source)
            if len(vip_ids) > 1:  # its SYN-ACKs cannot name their VIP: SYNs keep their entries
                c.backends[bid].flags |= BACKEND_SHARED
        return c


def filter_members(state: State) -> tuple[list[VipAddress], list[BackendAddress]]:
    """What the address filter must leave open (lb/addrfilter.py): every VIP's address (vips,
    vip_addrs) and every NAT or full-NAT backend's, retired ones too (reply_sources; a full-NAT
    backend's replies, to a source of the pool, are looked up by the data plane only from these)."""
    vips = [v.vip for v in state.vips]
    backends = [b.address for v in state.vips if v.backends and (v.replies_through_lb or v.mode == "fullnat")
                for b in v.backends]
    return vips, backends


def filter_addresses(state: State) -> tuple[list[bytes], list[bytes]]:
    """filter_members() as lb_addr bytes."""
    vips, backends = filter_members(state)
    return [a.packed for a in vips], [a.packed for a in backends]


def filter_buckets(state: State) -> tuple[list[int], list[int]]:
    """filter_members() as the address filter's buckets (cached on the addresses)."""
    vips, backends = filter_members(state)
    return [a.bucket for a in vips], [a.bucket for a in backends]


def vip_slot_table(state: State) -> list[int]:
    """The VIP slots of the state's VIPs of one port (lb/addrfilter.py; slots cached on the addresses)."""
    return addrfilter.slot_table((v.vip.slot, v.id) for v in state.vips if v.vip.port)


def snat_pool(state: State, v: VipState) -> SnatPool:
    """A full-NAT VIP's source addresses and ports as the data plane reads them (none: an empty pool,
    whose new flows are dropped as exhausted; the service refuses such a state before it is written)."""
    sources = state.snat_sources(v)[:SNAT_ADDRS]
    first, last = state.snat_ports
    pool = SnatPool(count=len(sources), port_min=first, port_count=last - first + 1)
    for i, address in enumerate(sources):
        pool.addrs[i] = LbAddr.of(address)
    return pool


def applied_revision(maps: DataPlaneMaps) -> int:
    """The store revision the maps hold, as last marked (0: never marked)."""
    return maps.lb_state.get(U32(0)).revision


def mark_applied(maps: DataPlaneMaps, revision: int) -> None:
    """Record the store revision the maps hold (or will once a change in progress commits)."""
    mark = maps.lb_state.get(U32(0)) or LbState()
    mark.revision = revision
    maps.lb_state.set(U32(0), mark)


BackendHosts = dict[tuple, set[tuple[int, int]]]


def backend_hosts(state: State) -> BackendHosts:
    """(backend address (packed), protocol) -> {(backend port, VIP id)}, over the VIPs whose replies
    come back through the LB: which VIPs a backend endpoint's replies may belong to (a backend of a
    VIP of every port, port 0, overlaps with every port of its address)."""
    hosts: BackendHosts = {}
    for v in state.vips:
        if v.backends and v.replies_through_lb:
            for b in v.backends:  # retired ones too: their established flows go on
                hosts.setdefault((b.address.packed, v.vip.proto), set()).add((b.address.port, v.id))
    return hosts


def kept_backend_hosts(state: State) -> BackendHosts:
    """backend_hosts(state), worked out once for a State no one edits (kept in State.derived). Never
    to be changed: a change's State shares the sets of the hosts it leaves alone."""
    derived = state.derived()
    if derived is None:
        return backend_hosts(state)
    hosts = derived.get("backend_hosts")
    if hosts is None:
        hosts = derived["backend_hosts"] = backend_hosts(state)
    return hosts


def backend_hosts_after(before: BackendHosts, edits: Edits) -> tuple[BackendHosts, set[tuple]]:
    """backend_hosts of a draft's State from those of the State under it (`before`, left as it is)
    and its edits: the hosts of the VIPs it changed are copied and brought up to date, the others
    shared. Returns them and the hosts whose VIPs changed."""
    after = dict(before)
    copied: set[tuple] = set()
    pairs = edits.changed()
    for side, adding in ((0, False), (1, True)):  # every VIP's entries out, then in (an id may be taken anew)
        for pair in pairs:
            v = pair[side]
            if v is None or not v.backends or not v.replies_through_lb:
                continue
            for b in v.backends:  # retired ones too, as backend_hosts
                key = (b.address.packed, v.vip.proto)
                if key not in copied:
                    after[key] = set(after.get(key, ()))
                    copied.add(key)
                if adding:
                    after[key].add((b.address.port, v.id))
                else:
                    after[key].discard((b.address.port, v.id))
    for key in copied:
        if not after[key]:
            del after[key]
    return after, {key for key in copied if after.get(key) != before.get(key)}


def refuse_overshared(hosts: BackendHosts) -> None:
    """A backend endpoint's replies find their flows through the VIPs it serves, REPLY_VIPS at most.
    Each host's VIPs are counted once per port, grouped by port (not once per port over all of its
    ports: a host behind 1,000 VIPs on ports of their own took a million steps)."""
    for (address, proto), ports in hosts.items():
        if len(ports) <= REPLY_VIPS:
            continue  # no endpoint of it can serve more VIPs than it has entries
        by_port: dict[int, set[int]] = {}
        for p, vid in ports:
            by_port.setdefault(p, set()).add(vid)
        every = by_port.get(0, set())  # a VIP of every port's backend overlaps with every port of its address
        for port in {p for p, _ in ports}:  # (the order the check has always gone in: the same first refusal)
            vip_ids = (by_port[port] | every) if port else {vid for _, vid in ports}
            if len(vip_ids) > REPLY_VIPS:
                raise InputError(f"backend {LbAddr.from_buffer_copy(address).address()}:{port}/{proto} would serve "
                                 f"{len(vip_ids)} NAT VIPs; at most {REPLY_VIPS} may share one backend endpoint")


def touched(old: State, new: State, hosts_before: BackendHosts, hosts_after: BackendHosts) -> tuple[State, State]:
    """The part of `old` and `new` a change touches, so that a change costs what it changes: the VIPs
    that differ, every VIP on an address of one of them (a VIP address's count depends on them all),
    and every VIP on a backend host of one of them whose VIPs change (the shared flags of its
    endpoints depend on them; with `hosts_*`, the whole states' backend_hosts, MapContents gets
    them right for the VIPs it sees). What is left out is the same on both sides, so MapContents of
    the two parts differ exactly where those of the whole states do (lb_config excepted: it
    depends on every VIP, see lb_config_of). A draft's change (new.edits(old)) names the VIPs
    that may differ: the others are not compared."""
    flipped = old.pass_unserved ^ new.pass_unserved  # an address's unserved traffic now passed, or dropped
    pools = (old.snat, old.snat_ports) != (new.snat, new.snat_ports)  # every full-NAT VIP's pool may change
    edits = None if flipped or pools else new.edits(old)
    if edits is not None:
        pairs = edits.changed()
        reached = [v for pair in pairs for v in pair if v is not None]
        changed = {v.id for v in reached}
        scanned = itertools.chain(new.vips, (o for o, _ in edits.pairs if o is not None))  # old's others are new's
    else:
        olds, news = {v.id: v for v in old.vips}, {v.id: v for v in new.vips}
        changed = {vid for vid in olds.keys() | news.keys()
                   if olds.get(vid) is not news.get(vid) and olds.get(vid) != news.get(vid)}  # is: shared, unchanged
        if flipped:
            changed |= {v.id for v in itertools.chain(old.vips, new.vips) if v.vip.address in flipped}
        if pools:
            changed |= {v.id for v in itertools.chain(old.vips, new.vips) if v.mode == "fullnat"}
        reached = [v for vid in changed for v in (olds.get(vid), news.get(vid)) if v is not None]
        scanned = itertools.chain(old.vips, new.vips)

    moved = {h for h in hosts_before.keys() | hosts_after.keys()
             if hosts_before.get(h) is not hosts_after.get(h) and hosts_before.get(h) != hosts_after.get(h)}

    def hosts_of(v: VipState) -> set[tuple]:
        return {(b.address.packed, v.vip.proto) for b in v.backends}

    addresses: set = set()  # the changed VIPs' addresses, and their backend hosts whose VIPs change
    hosts: set[tuple] = set()
    for v in reached:
        addresses.add(v.vip.packed)
        if moved:
            hosts |= hosts_of(v) & moved
    ids = set(changed)
    for v in scanned:  # one pass, no index of every VIP's links
        if v.vip.packed in addresses or (hosts and not hosts.isdisjoint(hosts_of(v))):
            ids.add(v.id)
    return (State(old.dataplane, [v for v in old.vips if v.id in ids], pass_unserved=old.pass_unserved,
                  snat=old.snat, snat_ports=old.snat_ports),
            State(new.dataplane, [v for v in new.vips if v.id in ids], pass_unserved=new.pass_unserved,
                  snat=new.snat, snat_ports=new.snat_ports))


def lb_config_of(state: State, flags: int | None = None) -> LbConfig:
    """lb_config: the switches that depend on every VIP, and the data plane's idle timeouts.
    `flags`: the switches, when the caller knows them (a change that can have left them as they were)."""
    if flags is None:
        flags = 0
        for v in state.vips:  # (one pass, no call per VIP)
            if not v.vip.port:  # any_port
                flags |= CFG_ANY_PORT
            if v.mode == "fullnat":
                flags |= CFG_FULLNAT
    config = LbConfig(flags=flags)
    dp_config = state.dataplane.config if state.dataplane is not None else {}
    for name in ("tcp_timeout", "tcp_closing_timeout", "udp_timeout"):  # absent: 0, the data plane's default
        setattr(config, name, seconds_to_ticks(dp_config[name]) if name in dp_config else 0)
    return config


def _endpoint(entry: Backend | VipMeta) -> tuple[bytes, int]:
    """Whom a backends or vip_meta entry counts for (its flags may change, the owner stays)."""
    return bytes(entry.addr), entry.port


def ring_base(vip_id: int, max_ring: int) -> int:
    """Where a VIP's Maglev table starts in the maglev map: each VIP id has room for the largest table,
    so a VIP's place follows from its id alone (nodes with the same state hold the same map)."""
    return vip_id * max_ring


def ring_size_of(v: VipState | None, max_ring: int) -> int:
    """A VIP's Maglev table size, from its count of configured backends (not from health or weights:
    a backend going down changes slots, not the size); 0 for no VIP."""
    return ring_size_for(len(v.active_backends()), max_ring) if v is not None else 0


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


def slots_moved(old: VipState, new: VipState, max_ring: int) -> tuple[int, float]:
    """How many of `new`'s Maglev slots send a flow to another backend than `old`'s did, and the
    share of new flows that do."""
    old_size, new_size = ring_size_of(old, max_ring), ring_size_of(new, max_ring)
    if maglev_inputs(old) == maglev_inputs(new) and old_size == new_size:
        return 0, 0.0
    before, after = maglev_table(old, old_size), maglev_table(new, new_size)
    if old_size == new_size:
        moved = sum(map(operator.ne, before, after))
        return moved, moved / new_size
    # Tables of two sizes (distinct primes): a flow's slot in one says nothing of its slot in the
    # other, so it keeps its backend with the product of that backend's shares of both tables.
    old_counts, new_counts = collections.Counter(before), collections.Counter(after)
    kept = sum(n * old_counts[b] for b, n in new_counts.items()) / (old_size * new_size)
    return round((1 - kept) * new_size), 1 - kept


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
        self.slot_keys, self.slot_values = array.array("I"), array.array("I")  # maglev writes not yet made

    def apply(self, old: State, new: State) -> ApplyReport:
        report = ApplyReport()
        edits = new.edits(old)
        if edits is not None:  # a draft's change: the hosts of `old`, brought up to date for the VIPs it changed
            hosts_before = kept_backend_hosts(old)
            hosts_after, moved = backend_hosts_after(hosts_before, edits)
            derived = new.derived()
            if derived is not None:
                derived["backend_hosts"] = hosts_after
            checked = {h: hosts_after[h] for h in moved if h in hosts_after}  # (the others are as in `old`,
        else:                                                                  # which passed this when saved)
            hosts_before, hosts_after = None, backend_hosts(new)
            checked = hosts_after
        refuse_overshared(checked)  # what the maps cannot hold, before anything is written
        try:
            self._apply(old, new, report, hosts_before, hosts_after)
        except BaseException:
            self.slot_keys, self.slot_values = array.array("I"), array.array("I")  # never made
            self._apply(new, old, ApplyReport())
            raise
        return report

    def _apply(self, old: State, new: State, report: ApplyReport, hosts_before: BackendHosts | None = None,
               hosts_after: BackendHosts | None = None) -> None:
        """`hosts_before`, `hosts_after`: backend_hosts(old), backend_hosts(new), when the caller has them."""
        config_before = lb_config_of(old)
        edits = new.edits(old)  # a draft's change: the VIPs it did not reach cannot switch lb_config
        unswitched = edits is not None and not any(v.vip.any_port or v.mode == "fullnat"
                                                   for pair in edits.pairs for v in pair if v is not None)
        config_after = lb_config_of(new, config_before.flags if unswitched else None)
        hosts_before = backend_hosts(old) if hosts_before is None else hosts_before
        hosts_after = backend_hosts(new) if hosts_after is None else hosts_after
        whole_new = new
        old, new = touched(old, new, hosts_before, hosts_after)  # what the change leaves alone is written by nobody
        before = MapContents.of(old, self.ring_size, hosts_before)
        after = MapContents.of(new, self.ring_size, hosts_after)
        before.config, after.config = config_before, config_after
        m = self.maps
        # addresses coming into use first: the filter must never claim "none here" for one the maps name
        filter_words = m.addr_filter.read_range(0, ADDR_FILTER_SIZE)  # read once: open_buckets keeps it current
        opened = addrfilter.open_buckets(m, *filter_addresses(new), have=filter_words)

        for k in before.vips.keys() - after.vips.keys():
            m.vips.delete(before.vips[k][0])
            report.count("vips")
        self._write_by_id("backends", "backend_stats", before.backends, after.backends, report)
        self._write_keyed("reply_sources", before.reply_sources, after.reply_sources, report)
        self._write_keyed("acl", before.acl, after.acl, report)
        self._write_by_id("vip_meta", "vip_stats", before.vip_meta, after.vip_meta, report)
        self._write_pools(before.snat_pools, after.snat_pools, report)
        self._write_keyed("vip_addrs", before.vip_addrs, after.vip_addrs, report)
        if bytes(before.config) != bytes(after.config) and after.config.flags & ~before.config.flags:
            m.lb_config.set(U32(0), after.config)  # switches on before the VIPs that need them
            report.count("lb_config")

        old_vips = {v.id: v for v in old.vips}
        new_vips = {v.id: v for v in new.vips}
        shrunk = []  # tables left smaller: their old tails are cleared once no VIP key points at them
        for vid in sorted(old_vips.keys() | new_vips.keys()):
            o, n = old_vips.get(vid), new_vips.get(vid)
            old_size, new_size = ring_size_of(o, self.ring_size), ring_size_of(n, self.ring_size)
            same_vip = o is not None and n is not None and o.vip == n.vip
            if same_vip and maglev_inputs(o) == maglev_inputs(n) and old_size == new_size:
                continue
            changed = self._write_table(vid, o if same_vip else None, n)  # an id taken anew: written whole
            if old_size > new_size:
                shrunk.append((vid, new_size, old_size))
            report.count("maglev", changed)
            report.slots_changed[str((n or o).vip)] = changed
        self._flush_slots()  # every table in one batch, before the VIP keys that point at them

        for k, (key, info) in after.vips.items():
            if k not in before.vips or bytes(before.vips[k][1]) != bytes(info):
                m.vips.set(key, info)
                report.count("vips")
        if bytes(before.config) != bytes(after.config) and not after.config.flags & ~before.config.flags:
            m.lb_config.set(U32(0), after.config)  # switches off after the VIPs that needed them
            report.count("lb_config")
        for vid, start, end in shrunk:
            report.count("maglev", self._clear_slots(vid, start, end))
        self._flush_slots()
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
        closed = addrfilter.write_words(m, addrfilter.bucket_words(*filter_buckets(whole_new)),
                                        filter_words)  # and those no longer in use, last
        if opened + closed:
            report.count("addr_filter", opened + closed)
        slotted = addrfilter.write_slots(m, vip_slot_table(whole_new))
        if slotted:
            report.count("vip_slots", slotted)
        for vid in before.snat_pools.keys() - after.snat_pools.keys():
            m.snat_pools.set(U32(vid), SnatPool())
            report.count("snat_pools")

    def _write_pools(self, before: dict[int, SnatPool], after: dict[int, SnatPool], report: ApplyReport) -> None:
        """Full-NAT VIPs' source pools that are new or changed (before the VIP keys that use them)."""
        for vid, pool in after.items():
            if vid not in before or bytes(before[vid]) != bytes(pool):
                self.maps.snat_pools.set(U32(vid), pool)
                report.count("snat_pools")

    def repair(self, state: State) -> dict[str, int]:
        """Make the maps hold exactly what `state` describes, whatever they hold now (after a crash,
        or a hand edit); returns the entries corrected per map. Same order as apply: stale VIP keys
        go first, with the Maglev tables of VIP ids the state lacks, then what a VIP needs is written,
        its key last, and other stale entries after."""
        want = MapContents.of(state, self.ring_size)
        fixed: dict[str, int] = {}

        def count(map_name: str, n: int) -> None:
            if n:
                fixed[map_name] = fixed.get(map_name, 0) + n

        count("addr_filter", addrfilter.open_buckets(self.maps, *filter_addresses(state)))

        count("vips", self._delete_extra("vips", want.vips))
        # A VIP's metadata is written before its table and emptied after it: ids that have metadata
        # the state lacks are the only ones whose tables may hold stale slots (an interrupted change).
        for vid in self._extra_ids("vip_meta", want.vip_meta, VipMeta):
            count("maglev", self._clear_slots(vid, 0, self.ring_size))
        count("backends", self._repair_array("backends", want.backends, Backend))
        count("reply_sources", self._write_missing("reply_sources", want.reply_sources))
        count("acl", self._write_missing("acl", want.acl))
        count("vip_meta", self._repair_array("vip_meta", want.vip_meta, VipMeta))
        count("snat_pools", self._repair_array("snat_pools", want.snat_pools, SnatPool))
        count("vip_addrs", self._write_missing("vip_addrs", want.vip_addrs))
        if bytes(self.maps.lb_config.get(U32(0)) or LbConfig()) != bytes(want.config):
            self.maps.lb_config.set(U32(0), want.config)
            count("lb_config", 1)
        for v in state.vips:  # a table no VIP uses is rewritten by whichever VIP takes its id next
            count("maglev", self._repair_table(v))
        self._flush_slots()
        count("vips", self._write_missing("vips", want.vips))
        for map_name in ("vip_addrs", "acl", "reply_sources"):
            count(map_name, self._delete_extra(map_name, getattr(want, map_name)))
        count("addr_filter", addrfilter.write_words(self.maps, addrfilter.bucket_words(*filter_buckets(state))))
        count("vip_slots", addrfilter.write_slots(self.maps, vip_slot_table(state)))
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

    def _extra_ids(self, map_name: str, want: dict[int, ctypes.Structure], empty: type) -> list[int]:
        """Array map: the indexes holding an entry `want` does not have."""
        m, blank = self.maps.maps[map_name], bytes(empty())
        return [i for i in range(m.max_entries) if i not in want and bytes(m.get(U32(i))) != blank]

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

    def _table(self, v: VipState | None) -> list[int]:
        return maglev_table(v, ring_size_of(v, self.ring_size), self.built_tables) if v is not None else []

    def _write_table(self, vip_id: int, old: VipState | None, new: VipState | None) -> int:
        """Write one VIP's Maglev table for `new`, over what `old` wrote there (the maps hold what the
        old state describes: nothing is read). A new VIP's table is written whole, whatever an earlier
        VIP of its id left. A table that grows is written in place before its VIP key switches to
        the new size (until then new flows find old or new backends, all valid); the tail a
        smaller table leaves is cleared by _clear_slots after the switch. Returns the slots written."""
        wanted = self._table(new)
        if old is None:
            indexes = range(len(wanted))
        else:
            current = self._table(old)[:len(wanted)]
            current += [NO_BACKEND] * (len(wanted) - len(current))
            indexes = list(itertools.compress(range(len(wanted)), map(operator.ne, current, wanted)))
        return self._set_slots(ring_base(vip_id, self.ring_size), indexes, wanted)

    def _set_slots(self, base: int, indexes, table: list[int]) -> int:
        """Queue writes of table[i] to slot base + i, for each i of `indexes`."""
        self.slot_keys.extend([base + i for i in indexes])
        self.slot_values.extend(map(table.__getitem__, indexes))
        return len(indexes)

    def _flush_slots(self) -> None:
        keys, values = self.slot_keys, self.slot_values
        self.slot_keys, self.slot_values = array.array("I"), array.array("I")
        self.maps.maglev.set_many(keys, values)

    def _clear_slots(self, vip_id: int, start: int, end: int) -> int:
        """Empty slots start..end-1 of a VIP's room (a larger table's tail, or a removed VIP's table):
        unread by the data plane, cleared so that equal states give equal maps."""
        return self._set_slots(ring_base(vip_id, self.ring_size), range(start, end), [NO_BACKEND] * end)

    def _repair_table(self, v: VipState) -> int:
        """Write the slots of one VIP's table that differ from what the map holds (read, not assumed)."""
        wanted = self._table(v)
        base = ring_base(v.id, self.ring_size)
        current = self.maps.maglev.read_range(base, len(wanted))
        return self._set_slots(base, list(itertools.compress(range(len(wanted)), map(operator.ne, current, wanted))),
                               wanted)

    def _reset_counters(self, map_name: str, index: int) -> None:
        """A reused id starts from zero."""
        m = self.maps.maps[map_name]
        zeros = (LbCounters * m.ncpus)()
        m.set(U32(index), zeros)
