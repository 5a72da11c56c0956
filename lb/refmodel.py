"""An executable specification of the data plane (bpf/lb.c) in pure Python.

Given the same tables (a snapshot of the maps) and the same packet, it returns
the same action, output bytes and reason as the BPF program; the conformance
tests and the fuzzer hold the program to it. It follows the C step for step,
checksum arithmetic included (incremental, RFC 1624, as csum.h does it)."""
from __future__ import annotations

import socket
import struct
import time
from dataclasses import dataclass, field, replace
from typing import Callable

from lb import structs
from lb.flowhash import flow_hash_raw, ring_index
from lb.maps import U32, DataPlaneMaps

V4_MAPPED = bytes(10) + b"\xff\xff"
ETH_P_IP, ETH_P_IPV6, ETH_P_8021Q, ETH_P_8021AD = 0x0800, 0x86DD, 0x8100, 0x88A8
TCP, UDP, ICMP, ICMPV6 = socket.IPPROTO_TCP, socket.IPPROTO_UDP, socket.IPPROTO_ICMP, 58
IPV6_FRAGMENT, IPV6_OPTION_HEADERS = 44, (0, 43, 60)  # hop-by-hop, routing, destination options


@dataclass(frozen=True)
class NextHop:
    ifindex: int = 0
    smac: bytes = bytes(6)
    dmac: bytes = bytes(6)
    epoch: int = 0  # a cached copy is good while it equals Tables.nh_epoch


@dataclass
class Flow:
    backend_id: int
    vip_id: int
    flags: int
    reply_nh: NextHop = field(default_factory=NextHop)
    generation: int = 0
    last_seen: int = 0


@dataclass
class FullnatFlow(Flow):
    """A full-NAT flow (fullnat_flows): the entry as conn_table's, and the source it took."""

    snat_addr: bytes = bytes(16)
    snat_port: int = 0


@dataclass(frozen=True)
class SnatPool:
    """A full-NAT VIP's source addresses, each with ports port_min .. port_min + port_count - 1."""

    addrs: tuple[bytes, ...]
    port_min: int
    port_count: int


@dataclass
class Parsed:
    l3: int        # offset of the IP header
    l4: int        # offset of the TCP/UDP/ICMP header
    src: bytes     # 16-byte lb_addr
    dst: bytes
    sport: int
    dport: int
    proto: int
    check_off: int | None  # offset of the L4 checksum, None for UDP without one
    version: int = 4
    tcp_flags: int = 0


# fib(dst lb_addr, packet, ingress ifindex) -> ("found", NextHop) | ("kernel", None) | ("none", None)
FibLookup = Callable[[bytes, Parsed, bytes, int], tuple[str, NextHop | None]]
FlowKey = tuple[bytes, bytes, int, int, int]


@dataclass
class Tables:
    """The maps' contents, in plain Python. Ports are host-order ints of the wire value."""

    ring_size: int
    max_vips: int
    max_backends: int
    vips: dict[tuple[bytes, int, int], tuple[int, int]]     # (addr, port, proto) -> (VIP id, flags)
    vip_addrs: dict[bytes, int]                             # addresses of VIPs -> flags (ADDR_PASS_UNSERVED)
    any_port: bool                                          # some VIP takes every port
    vip_meta: dict[int, tuple[bytes, int, int, int]]        # id -> (addr, port, flags, mode)
    maglev: dict[int, list[int]]                            # VIP id -> its ring of backend ids (its own size)
    backends: dict[int, tuple[bytes, int, int, int, int]]   # id -> (addr, port, flags, generation, VIP id); absent = zeroed
    backend_nh: dict[int, NextHop]                          # id -> cached next hop; absent = none yet
    reply_sources: dict[tuple[bytes, int, int], tuple[int, ...]]  # endpoint -> the VIP ids it serves
    conn: dict[FlowKey, Flow]
    routes: list[tuple[int, bytes, NextHop]]                # (prefixlen, addr, next hop)
    acl: list[tuple[int, int, bytes, int]]                  # (prefixlen, VIP id, addr, action)
    tx_ports: set[int]                                      # ifindexes the DEVMAP redirects to
    nh_epoch: int = 0                                       # bumped when the kernel's routes change
    timeouts: tuple[int, int, int] = (0, 0, 0)              # lb_config: TCP, TCP closing, UDP (0: default)
    clock_offset: int = 0                                   # lb_config: ticks added to the kernel's clock
    egress_vlans: dict[int, tuple[int, int, int]] = field(default_factory=dict)  # VLAN device -> (lower, proto, tci)
    fullnat: bool = False                                   # lb_config: some VIP is full NAT
    snat_pools: dict[int, SnatPool] = field(default_factory=dict)      # VIP id -> its source pool
    fullnat_flows: dict[FlowKey, FullnatFlow] = field(default_factory=dict)  # client tuple -> flow
    fullnat_ports: dict[FlowKey, tuple[bytes, int, int, int]] = field(default_factory=dict)
    # reply tuple (backend -> source address, port) -> (client, client port, VIP port, VIP id)

    @classmethod
    def snapshot(cls, maps: DataPlaneMaps, ring_size: int) -> "Tables":
        ntohs = socket.ntohs
        vips = {(bytes(k.addr), ntohs(k.port), k.proto): (v.id, v.flags) for k, v in maps.vips.items()}
        ids = {vid for vid, _ in vips.values()}
        meta = {}
        for vid in ids:
            m = maps.vip_meta.get(U32(vid))
            meta[vid] = (bytes(m.addr), ntohs(m.port), m.flags, m.mode)
        maglev = {v.id: maps.maglev.read_range(v.ring_base, v.ring_size) for _, v in maps.vips.items()}
        config = maps.lb_config.get(U32(0))
        backends = {k.value: (bytes(v.addr), ntohs(v.port), v.flags, v.generation, v.vip_id)
                    for k, v in maps.backends.items() if v.flags}
        backend_nh = {k.value: _nh(v) for k, v in maps.backend_nh.items() if v.ifindex}
        return cls(
            ring_size=ring_size, max_vips=maps.vip_meta.max_entries, max_backends=maps.backends.max_entries,
            vips=vips, vip_addrs={bytes(k): v.flags for k, v in maps.vip_addrs.items()},
            any_port=bool(config.flags & structs.CFG_ANY_PORT), vip_meta=meta, maglev=maglev, backends=backends, backend_nh=backend_nh,
            reply_sources={(bytes(k.addr), ntohs(k.port), k.proto): tuple(v.vip_ids[:min(v.count, structs.REPLY_VIPS)])
                           for k, v in maps.reply_sources.items()},
            conn={(bytes(k.src), bytes(k.dst), ntohs(k.sport), ntohs(k.dport), k.proto):
                  Flow(v.backend_id, v.vip_id, v.flags, _nh(v.reply_nh), v.generation, v.last_seen)
                  for k, v in maps.conn_table.items()},
            routes=[(k.prefixlen, bytes(k.addr), _nh(v)) for k, v in maps.routes.items()],
            acl=[(k.prefixlen, k.vip_id, bytes(k.addr), v.action) for k, v in maps.acl.items()],
            tx_ports={v.value for _, v in maps.tx_ports.items() if v.value},
            nh_epoch=maps.maps["nh_epoch"].get(U32(0)).value,
            timeouts=(config.tcp_timeout, config.tcp_closing_timeout, config.udp_timeout),
            clock_offset=config.clock_offset,
            egress_vlans={k.value: (v.lower_ifindex, ntohs(v.proto), ntohs(v.tci)) for k, v in maps.egress_vlans.items()},
            fullnat=bool(config.flags & structs.CFG_FULLNAT),
            snat_pools={k.value: SnatPool(tuple(bytes(a) for a in v.addrs[:v.count]), v.port_min, v.port_count)
                        for k, v in maps.snat_pools.items() if v.count},
            fullnat_flows={_flow_key(k): FullnatFlow(v.flow.backend_id, v.flow.vip_id, v.flow.flags, _nh(v.flow.reply_nh), v.flow.generation, v.flow.last_seen,
                                                     bytes(v.snat_addr), ntohs(v.snat_port))
                           for k, v in maps.fullnat_flows.items()},
            fullnat_ports={_flow_key(k): (bytes(v.client), ntohs(v.client_port), ntohs(v.vip_port), v.vip_id)
                           for k, v in maps.fullnat_ports.items()},
        )


def _flow_key(k: structs.FlowKey) -> FlowKey:
    return bytes(k.src), bytes(k.dst), socket.ntohs(k.sport), socket.ntohs(k.dport), k.proto


def _nh(nh: structs.NextHop) -> NextHop:
    return NextHop(nh.ifindex, bytes(nh.smac), bytes(nh.dmac), nh.epoch)


@dataclass(frozen=True)
class ModelResult:
    action: str
    packet: bytes
    reason: str
    backend: tuple[bytes, int] | None = None


# --- checksums, as bpf/csum.h computes them ------------------------------------------

def _fold(s: int) -> int:
    s = (s & 0xFFFF) + (s >> 16)
    return (s & 0xFFFF) + (s >> 16)


def csum_replace(check: int, old: bytes, new: bytes) -> int:
    """RFC 1624 eqn. 3 over 16-bit words (byte-order independent)."""
    s = ~check & 0xFFFF
    for i in range(0, len(old), 2):
        s += ~int.from_bytes(old[i:i + 2], "big") & 0xFFFF
    for i in range(0, len(new), 2):
        s += int.from_bytes(new[i:i + 2], "big")
    return ~_fold(s) & 0xFFFF


def ipv4_header_checksum(header: bytes) -> int:
    s = sum(int.from_bytes(header[i:i + 2], "big") for i in range(0, len(header), 2))
    return ~_fold(s) & 0xFFFF


# --- tunnel.h --------------------------------------------------------------------------

def encap_source(p: Parsed) -> bytes:
    """The outer source: a fixed prefix plus the client's low address bits XOR its source port."""
    if p.version == 6:
        low = int.from_bytes(p.src[12:], "big") ^ p.sport
        return structs.ENCAP_SRC6_PREFIX.to_bytes(4, "big") + bytes(8) + low.to_bytes(4, "big")
    low = (int.from_bytes(p.src[12:], "big") ^ p.sport) & 0xFFFF
    return (structs.ENCAP_SRC4_PREFIX | low).to_bytes(4, "big")


def encapsulate(frame: bytes, p: Parsed, backend: bytes) -> bytes:
    """The L2 header, then an outer IPv4 (IPIP) or IPv6 (IPv6-in-IPv6) header to the backend, then the packet."""
    l2, inner = frame[:p.l3], frame[p.l3:]
    if p.version == 6:
        payload_len = int.from_bytes(inner[4:6], "big") + 40
        outer = inner[:4] + struct.pack(">HBB", payload_len & 0xFFFF, 41, structs.ENCAP_TTL) + encap_source(p) + backend
        return l2 + outer + inner
    tot_len = (int.from_bytes(inner[2:4], "big") + 20) & 0xFFFF
    frag_off = int.from_bytes(inner[6:8], "big") & 0x4000  # DF copied
    header = bytearray(struct.pack(">BBHHHBBH4s4s", 0x45, inner[1], tot_len, 0, frag_off, structs.ENCAP_TTL, 4, 0,
                                   encap_source(p), backend[12:]))
    header[10:12] = ipv4_header_checksum(bytes(header)).to_bytes(2, "big")
    return l2 + bytes(header) + inner


def decapsulated(frame: bytes) -> tuple[bytes, bytes] | None:
    """(outer destination as an lb_addr, the inner frame) of an IPIP or IPv6-in-IPv6 frame, else None."""
    off = 18 if frame[12:14] in (b"\x81\x00", b"\x88\xa8") else 14
    ethertype = frame[off - 2:off]
    if ethertype == b"\x08\x00" and len(frame) >= off + 40 and frame[off] == 0x45 and frame[off + 9] == 4:
        return V4_MAPPED + frame[off + 16:off + 20], frame[:off] + frame[off + 20:]
    if ethertype == b"\x86\xdd" and len(frame) >= off + 80 and frame[off + 6] == 41:
        return frame[off + 24:off + 40], frame[:off] + frame[off + 40:]
    return None


def _reason(name: str) -> str:
    return name.removeprefix("LB_").lower()


CLOCK_MONOTONIC_COARSE = 6  # Linux's clock id (the time module does not name it)


def kernel_ticks() -> int:
    """The clock bpf_ktime_get_coarse_ns() reads (CLOCK_MONOTONIC_COARSE), in ticks of 2^30 ns."""
    return time.clock_gettime_ns(CLOCK_MONOTONIC_COARSE) >> structs.TICK_SHIFT


class DataPlaneModel:
    def __init__(self, tables: Tables, fib: FibLookup, clock: Callable[[], int] = kernel_ticks):
        self.t = tables
        self.fib = fib
        self.clock = clock  # the kernel's ticks; the tables' clock_offset is added as the program does

    def now(self) -> int:
        """conn.h lb_clock: 32-bit ticks."""
        return ((self.clock() & 0xFFFFFFFF) + self.t.clock_offset) & 0xFFFFFFFF

    # --- parse.h ------------------------------------------------------------------------
    @staticmethod
    def parse(frame: bytes) -> Parsed | tuple[str, bytes | None]:
        """A Parsed packet, or (the reason it cannot be balanced, its destination if known)."""
        if len(frame) < 14:
            return "LB_PASS_MALFORMED", None
        proto = int.from_bytes(frame[12:14], "big")
        off = 14
        if proto in (ETH_P_8021Q, ETH_P_8021AD):
            if len(frame) < 18:
                return "LB_PASS_MALFORMED", None
            proto = int.from_bytes(frame[16:18], "big")
            off = 18
        if proto == ETH_P_IPV6:
            return DataPlaneModel._parse_ipv6(frame, off)
        if proto != ETH_P_IP:
            return "LB_PASS_NOT_IP", None
        if len(frame) < off + 20:
            return "LB_PASS_MALFORMED", None
        src, dst = V4_MAPPED + frame[off + 12:off + 16], V4_MAPPED + frame[off + 16:off + 20]
        version, ihl = frame[off] >> 4, frame[off] & 0xF
        if version != 4 or ihl < 5:
            return "LB_PASS_MALFORMED", dst
        if ihl != 5:
            return "LB_PASS_IP_OPTIONS", dst
        if int.from_bytes(frame[off + 6:off + 8], "big") & 0x3FFF:
            return "LB_PASS_FRAGMENT", dst
        return DataPlaneModel._parse_l4(frame, off, off + 20, frame[off + 9], src, dst, 4)

    @staticmethod
    def _parse_ipv6(frame: bytes, off: int) -> Parsed | tuple[str, bytes | None]:
        if len(frame) < off + 40:
            return "LB_PASS_MALFORMED", None
        src, dst = frame[off + 8:off + 24], frame[off + 24:off + 40]
        nexthdr = frame[off + 6]
        if frame[off] >> 4 != 6:
            return "LB_PASS_MALFORMED", dst
        if src[:12] == V4_MAPPED or dst[:12] == V4_MAPPED:  # would pass for IPv4 (parse.h)
            return "LB_PASS_V4_MAPPED", dst
        if nexthdr == IPV6_FRAGMENT:
            return "LB_PASS_FRAGMENT", dst
        if nexthdr in IPV6_OPTION_HEADERS:
            return "LB_PASS_IP_OPTIONS", dst
        return DataPlaneModel._parse_l4(frame, off, off + 40, nexthdr, src, dst, 6)

    @staticmethod
    def _parse_l4(frame: bytes, l3: int, l4: int, proto: int, src: bytes, dst: bytes,
                  version: int) -> Parsed | tuple[str, bytes | None]:
        icmp = ICMP if version == 4 else ICMPV6
        need = {TCP: 20, UDP: 8, icmp: 8}.get(proto)
        if need is None:
            return "LB_PASS_UNSUPPORTED_L4", dst
        if len(frame) < l4 + need:
            return "LB_PASS_MALFORMED", dst
        if proto == icmp:
            return Parsed(l3, l4, src, dst, 0, 0, proto, l4 + 2, version)
        check_off: int | None = l4 + 16 if proto == TCP else l4 + 6
        if proto == UDP and frame[l4 + 6:l4 + 8] == b"\0\0":
            check_off = None
        sport, dport = struct.unpack_from(">HH", frame, l4)
        return Parsed(l3, l4, src, dst, sport, dport, proto, check_off, version, frame[l4 + 13] if proto == TCP else 0)

    # --- lb.c -----------------------------------------------------------------------------
    def process(self, frame: bytes, ingress_ifindex: int) -> ModelResult:
        p = self.parse(frame)
        if isinstance(p, tuple):
            return self._unbalanceable(frame, *p)
        pkt = bytearray(frame)
        if p.proto in (ICMP, ICMPV6):
            return self._icmp(pkt, p, ingress_ifindex)
        vip = self.t.vips.get((p.dst, p.dport, p.proto))
        if vip is None and self.t.any_port:
            vip = self.t.vips.get((p.dst, 0, p.proto))
        if vip is not None:
            return self._to_backend(pkt, p, vip, ingress_ifindex)
        if self.t.fullnat:  # a reply to a full-NAT source address and port?
            owner = self.t.fullnat_ports.get((p.src, p.dst, p.sport, p.dport, p.proto))
            if owner is not None:
                return self._fullnat_to_client(pkt, p, owner, ingress_ifindex)
        from_backend = False
        for port in (p.sport, 0) if self.t.any_port else (p.sport,):
            source = self.t.reply_sources.get((p.src, port, p.proto))
            if source is None:
                continue
            from_backend = True
            found = self._reply_flow(p, source)
            if found is not None:
                return self._to_client(pkt, p, found, ingress_ifindex)
        # lb.c would_forward: what a backend sends the LB host itself (a health check's answer) is no VIP flow's
        if not from_backend or self.fib(p.dst, p, frame, ingress_ifindex)[0] == "none":
            return self._unserved(frame, p.dst, "drop_unserved")
        for port in (p.sport, 0) if self.t.any_port else (p.sport,):
            handshake = self._handshake_reply(pkt, p, self.t.reply_sources.get((p.src, port, p.proto)),
                                              ingress_ifindex)
            if handshake is not None:
                return handshake
        # a NAT backend's answer of no flow never leaves with the backend's address
        return ModelResult("XDP_DROP", frame, "drop_reply_no_flow")

    def _unserved(self, frame: bytes, dst: bytes, drop: str) -> ModelResult:
        """lb.c unserved: to a VIP's address, for no VIP of it: dropped, unless its address passes it."""
        flags = self.t.vip_addrs.get(dst)
        if flags is None:
            return ModelResult("XDP_PASS", frame, "pass_not_vip")
        if flags & structs.ADDR_PASS_UNSERVED:
            return ModelResult("XDP_PASS", frame, "pass_unserved")
        return ModelResult("XDP_DROP", frame, drop)

    def _unbalanceable(self, frame: bytes, reason: str, dst: bytes | None) -> ModelResult:
        if dst is None or dst not in self.t.vip_addrs:
            return ModelResult("XDP_PASS", frame, _reason(reason))
        if reason == "LB_PASS_UNSUPPORTED_L4":  # no VIP serves another protocol
            return self._unserved(frame, dst, "drop_unsupported_l4")
        drop = {"LB_PASS_IP_OPTIONS": "drop_ip_options", "LB_PASS_FRAGMENT": "drop_fragment",
                "LB_PASS_V4_MAPPED": "drop_v4_mapped"}.get(reason, "drop_malformed")
        return ModelResult("XDP_DROP", frame, drop)

    def _icmp(self, pkt: bytearray, p: Parsed, ingress: int) -> ModelResult:
        """icmp.h: echo requests to a VIP address are answered; a "too big" error about a flow
        goes to its backend; other ICMP to a VIP is dropped; IPv6 neighbour discovery is the kernel's."""
        v6 = p.version == 6
        if v6 and 133 <= pkt[p.l4] <= 137:
            return ModelResult("XDP_PASS", bytes(pkt), "pass_not_vip")
        if p.dst not in self.t.vip_addrs:
            if self.t.fullnat and pkt[p.l4] in ((1, 2, 3) if v6 else (3, 11)):  # an error, maybe full NAT's
                handled = self._fullnat_icmp_to_client(pkt, p, ingress)
                if handled is not None:
                    return handled
            return ModelResult("XDP_PASS", bytes(pkt), "pass_not_vip")
        if (pkt[p.l4], pkt[p.l4 + 1]) == ((2, 0) if v6 else (3, 4)):  # packet too big / fragmentation needed
            return self._icmp_error_to_backend(pkt, p, ingress)
        if pkt[p.l4] != (128 if v6 else 8):
            return self._unserved(bytes(pkt), p.dst, "drop_unsupported_l4")
        pkt[0:6], pkt[6:12] = pkt[6:12], pkt[0:6]
        ip = p.l3
        if v6:
            pkt[ip + 8:ip + 24], pkt[ip + 24:ip + 40] = pkt[ip + 24:ip + 40], pkt[ip + 8:ip + 24]
            pkt[ip + 7] = structs.ICMP_TTL
        else:
            pkt[ip + 12:ip + 16], pkt[ip + 16:ip + 20] = pkt[ip + 16:ip + 20], pkt[ip + 12:ip + 16]
            old_ttl = bytes(pkt[ip + 8:ip + 10])
            pkt[ip + 8] = structs.ICMP_TTL
            self._replace_check(pkt, ip + 10, old_ttl, bytes(pkt[ip + 8:ip + 10]), udp_zero_fix=False)
        old_type = bytes(pkt[p.l4:p.l4 + 2])
        pkt[p.l4] = 129 if v6 else 0  # echo reply
        self._replace_check(pkt, p.l4 + 2, old_type, bytes(pkt[p.l4:p.l4 + 2]), udp_zero_fix=False)
        return ModelResult("XDP_TX", bytes(pkt), "tx_icmp_echo")

    @staticmethod
    def _parse_quote(frame: bytes | bytearray, p: Parsed) -> Parsed | str:
        """icmp.h icmp_parse_inner: the packet an ICMP error quotes, up to its ports, or why not."""
        off = p.l4 + 8
        if p.version == 6:
            if len(frame) < off + 40 or frame[off] >> 4 != 6:
                return "LB_PASS_MALFORMED"
            proto = frame[off + 6]
            if proto == IPV6_FRAGMENT:
                return "LB_PASS_FRAGMENT"
            if proto in IPV6_OPTION_HEADERS:
                return "LB_PASS_IP_OPTIONS"
            src, dst, l4 = bytes(frame[off + 8:off + 24]), bytes(frame[off + 24:off + 40]), off + 40
        else:
            if len(frame) < off + 20 or frame[off] >> 4 != 4 or frame[off] & 0xF < 5:
                return "LB_PASS_MALFORMED"
            if frame[off] & 0xF != 5:
                return "LB_PASS_IP_OPTIONS"
            if int.from_bytes(frame[off + 6:off + 8], "big") & 0x1FFF:
                return "LB_PASS_FRAGMENT"
            proto, l4 = frame[off + 9], off + 20
            src, dst = V4_MAPPED + bytes(frame[off + 12:off + 16]), V4_MAPPED + bytes(frame[off + 16:off + 20])
        if proto not in (TCP, UDP):
            return "LB_PASS_UNSUPPORTED_L4"
        if len(frame) < l4 + 8:
            return "LB_PASS_MALFORMED"
        sport, dport = struct.unpack_from(">HH", frame, l4)
        return Parsed(off, l4, src, dst, sport, dport, proto, None, p.version)

    @classmethod
    def client_flow(cls, frame: bytes) -> Parsed | None:
        """The client's packet whose flow `frame` belongs to: the frame itself, or for an ICMP error
        the packet it quotes (a reply), reversed; None if there is none."""
        p = cls.parse(frame)
        if not isinstance(p, Parsed):
            return None
        if p.proto not in (ICMP, ICMPV6):
            return p
        q = cls._parse_quote(frame, p)
        if not isinstance(q, Parsed):
            return None
        return replace(q, src=q.dst, dst=q.src, sport=q.dport, dport=q.sport)

    def _icmp_error_to_backend(self, pkt: bytearray, p: Parsed, ingress: int) -> ModelResult:
        """lb.c icmp_error_to_backend: the quote, reversed, is the client's flow."""
        q = self._parse_quote(pkt, p)
        if isinstance(q, str):
            return self._unbalanceable(bytes(pkt), q, p.dst)
        if p.version == 6 and V4_MAPPED in (q.src[:12], q.dst[:12]):  # it would name an IPv4 flow
            return ModelResult("XDP_DROP", bytes(pkt), "drop_v4_mapped")
        flow = self.t.conn.get((q.dst, q.src, q.dport, q.sport, q.proto))
        if flow is None and self.t.fullnat:
            handled = self._fullnat_icmp_to_backend(pkt, p, q, ingress)
            if handled is not None:
                return handled
        if flow is None:  # maybe about the host's own connection
            return self._unserved(bytes(pkt), p.dst, "drop_icmp_no_flow")
        meta = self.t.vip_meta.get(flow.vip_id)
        if meta is None or not meta[2] & structs.VIP_ACTIVE or meta[0] != q.src or meta[1] not in (q.sport, 0):
            return self._unserved(bytes(pkt), p.dst, "drop_icmp_no_flow")
        be = self._backend(flow.backend_id)
        if be is None or be[3] != flow.generation or be[4] != flow.vip_id:
            return ModelResult("XDP_DROP", bytes(pkt), "drop_icmp_no_flow")
        resolved, nh = self._backend_next_hop(flow.backend_id, be, p, pkt, ingress)
        if meta[3] == structs.MODE_DSR:
            return self._send_direct(pkt, nh, resolved, ingress, "fwd_icmp_error", None)
        if meta[3] == structs.MODE_TUNNEL:
            return self._send_encapsulated(pkt, p, be, nh, resolved, ingress, "fwd_icmp_error")
        self._icmp_error_rewrite_to_backend(pkt, p, q, be)
        return self._send(pkt, nh, resolved, ingress, "fwd_icmp_error", None)

    def _icmp_error_rewrite_to_backend(self, pkt: bytearray, p: Parsed, q: Parsed,
                                       be: tuple[bytes, int, int]) -> None:
        """icmp.h: outer destination (ICMPv6's checksum covers it, ICMP's not), then the quote's
        source address (and its IPv4 header checksum) and port; the quote's L4 checksum stays."""
        icmp_check = p.l4 + 2
        self._nat(pkt, replace(p, check_off=icmp_check if p.version == 6 else None), self._addr_off(p, "dst"), 0,
                  be[0], 0)
        src = self._addr_off(q, "src")
        if q.version == 4:
            old_check = bytes(pkt[q.l3 + 10:q.l3 + 12])
            self._replace_check(pkt, q.l3 + 10, bytes(pkt[src:src + 4]), be[0][12:], udp_zero_fix=False)
            self._replace_check(pkt, icmp_check, bytes(pkt[src:src + 4]), be[0][12:], udp_zero_fix=False)
            pkt[src:src + 4] = be[0][12:]
            self._replace_check(pkt, icmp_check, old_check, bytes(pkt[q.l3 + 10:q.l3 + 12]), udp_zero_fix=False)
        else:
            for i in range(0, 16, 4):
                self._replace_check(pkt, icmp_check, bytes(pkt[src + i:src + i + 4]), be[0][i:i + 4],
                                    udp_zero_fix=False)
                pkt[src + i:src + i + 4] = be[0][i:i + 4]
        if be[1]:  # 0: the backend kept the VIP's port
            old_port = bytes(pkt[q.l4:q.l4 + 2])
            pkt[q.l4:q.l4 + 2] = be[1].to_bytes(2, "big")
            self._replace_check(pkt, icmp_check, old_port, pkt[q.l4:q.l4 + 2], udp_zero_fix=False)

    def _backend(self, backend_id: int) -> tuple[bytes, int, int, int, int] | None:
        if backend_id >= self.t.max_backends:
            return None
        return self.t.backends.get(backend_id, (bytes(16), 0, 0, 0, 0))

    # --- conn.h ---------------------------------------------------------------------------------
    @staticmethod
    def _is_syn(p: Parsed) -> bool:
        return p.proto == TCP and p.tcp_flags & 0x12 == 0x02

    @staticmethod
    def _is_closing(p: Parsed) -> bool:
        return p.proto == TCP and bool(p.tcp_flags & 0x05)

    def _idle_timeout(self, flow: Flow, proto: int) -> int:
        tcp, closing, udp = self.t.timeouts
        if proto != TCP:
            return udp or structs.UDP_TIMEOUT
        if flow.flags & structs.FLOW_CLOSING:
            return closing or structs.TCP_CLOSING_TIMEOUT
        return tcp or structs.TCP_TIMEOUT

    def _trusted(self, flow: Flow, be: tuple[bytes, int, int, int, int], vip_id: int, p: Parsed, now: int) -> bool:
        """conn.h flow_trusted: same binding, not idle too long, no SYN to a backend taking no new connections."""
        if be[3] != flow.generation or be[4] != vip_id or flow.vip_id != vip_id:
            return False
        if not be[2] & structs.BACKEND_IN_USE:
            return False
        if be[2] & structs.BACKEND_NO_NEW and self._is_syn(p):
            return False
        return (now - flow.last_seen) & 0xFFFFFFFF <= self._idle_timeout(flow, p.proto)

    def _answers_reply(self, flow: Flow, p: Parsed) -> bool:
        """conn.h flow_answers_reply: not idle past its timeout; a SYN-ACK not on a closing entry."""
        if flow.flags & structs.FLOW_CLOSING and p.proto == TCP and p.tcp_flags & 0x02:
            return False
        return (self.now() - flow.last_seen) & 0xFFFFFFFF <= self._idle_timeout(flow, p.proto)

    def _opens_entry(self, p: Parsed, be: tuple[bytes, int, int, int, int]) -> bool:
        """lb.c opens_entry: not an RST; a SYN only to an endpoint shared by several VIPs."""
        if p.proto == TCP and p.tcp_flags & 0x04:
            return False
        return not self._is_syn(p) or bool(be[2] & structs.BACKEND_SHARED)

    def _maglev_pick(self, vip_id: int, by_source: bool, client: bytes, vip_addr: bytes, sport: int, dport: int,
                     proto: int) -> int:
        """lb.c maglev_slot, then the slot's backend id (each VIP's ring has its own size)."""
        ring = self.t.maglev.get(vip_id)
        if not ring or vip_id >= self.t.max_vips:
            return structs.NO_BACKEND
        return ring[ring_index(client, vip_addr, sport, dport, proto, len(ring), by_source)]

    def _handshake_reply(self, pkt: bytearray, p: Parsed, vip_ids: tuple[int, ...] | None,
                         ingress: int) -> ModelResult | None:
        """lb.c handshake_backend and handshake_reply: a SYN-ACK whose SYN opened no entry."""
        if vip_ids is None or len(vip_ids) != 1 or p.proto != TCP or p.tcp_flags & 0x12 != 0x12:
            return None
        meta = self.t.vip_meta.get(vip_ids[0])
        if meta is None or not meta[2] & structs.VIP_ACTIVE:
            return None
        backend_id = self._maglev_pick(vip_ids[0], bool(meta[2] & structs.VIP_META_HASH_SOURCE), p.dst, meta[0],
                                       p.dport, meta[1] or p.sport, p.proto)
        be = self._backend(backend_id)
        if be is None or be[0] != p.src or be[1] not in (p.sport, 0) or be[4] != vip_ids[0]:
            return None
        self._nat(pkt, p, self._addr_off(p, "src"), p.l4, meta[0], meta[1])
        resolved, nh = self._ensure_next_hop(NextHop(), p.dst, p, pkt, ingress)
        return self._send(pkt, nh, resolved, ingress, "fwd_reply", (p.src, p.sport))

    def _touch(self, flow: Flow, p: Parsed, now: int) -> None:
        """conn.h flow_touch."""
        flow.last_seen = now
        if self._is_closing(p):
            flow.flags |= structs.FLOW_CLOSING
        elif self._is_syn(p):
            flow.flags &= ~structs.FLOW_CLOSING

    def _source_allowed(self, p: Parsed, vip: tuple[int, int]) -> bool:
        """lb.c source_allowed: the longest matching (VIP id, source prefix) rule decides."""
        vip_id, flags = vip
        if not flags & structs.VIP_ACL:
            return True
        target = (vip_id << 128) | int.from_bytes(p.src, "big")
        best = None
        for plen, rule_vip, addr, action in self.t.acl:
            mask = ((1 << plen) - 1) << (160 - plen) if plen else 0
            if target & mask == ((rule_vip << 128) | int.from_bytes(addr, "big")) & mask:
                if best is None or plen > best[0]:
                    best = (plen, action)
        if best is not None:
            return best[1] == structs.ACL_ALLOW
        return not flags & structs.VIP_ACL_ALLOWLIST

    def _to_backend(self, pkt: bytearray, p: Parsed, vip: tuple[int, int], ingress: int) -> ModelResult:
        if not self._source_allowed(p, vip):
            return ModelResult("XDP_DROP", bytes(pkt), "drop_acl")
        if vip[1] & structs.VIP_FULLNAT:
            return self._fullnat_to_backend(pkt, p, vip, ingress)
        key = (p.src, p.dst, p.sport, p.dport, p.proto)
        flow = self.t.conn.get(key)
        now = self.now()
        if flow is None:
            return self._new_flow(pkt, p, key, vip, ingress, now)
        be = self._backend(flow.backend_id)
        if be is None or not self._trusted(flow, be, vip[0], p, now):
            return self._new_flow(pkt, p, key, vip, ingress, now)
        self._start_over_at_shared_endpoint(p, be, vip[0])
        self._touch(flow, p, now)
        resolved, nh = self._backend_next_hop(flow.backend_id, be, p, pkt, ingress)
        return self._forward(pkt, p, vip[1], be, nh, resolved, ingress)

    def _backend_next_hop(self, backend_id: int, be: tuple, p: Parsed, pkt: bytearray,
                          ingress: int) -> tuple[str, NextHop]:
        """The backend's cached next hop (backend_nh), resolved again when stale."""
        resolved, nh = self._ensure_next_hop(self.t.backend_nh.get(backend_id, NextHop()), be[0], p, pkt, ingress)
        if nh.ifindex:
            self.t.backend_nh[backend_id] = nh
        else:
            self.t.backend_nh.pop(backend_id, None)
        return resolved, nh

    def _start_over_at_shared_endpoint(self, p: Parsed, be: tuple, vip_id: int) -> None:
        """lb.c start_over_at_shared_endpoint: a SYN to a shared endpoint forgets the client tuple's
        entries towards the endpoint's other VIPs."""
        if not be[2] & structs.BACKEND_SHARED or not self._is_syn(p):
            return
        port = be[1] or p.dport
        vip_ids = self.t.reply_sources.get((be[0], port, p.proto))
        if vip_ids is None:
            vip_ids = self.t.reply_sources.get((be[0], 0, p.proto))
            if vip_ids is None:
                return
        for other in vip_ids:
            meta = self.t.vip_meta.get(other)
            if other == vip_id or meta is None:
                continue
            self.t.conn.pop((p.src, meta[0], p.sport, meta[1] or port, p.proto), None)

    def _new_flow(self, pkt: bytearray, p: Parsed, key: FlowKey, vip: tuple[int, int], ingress: int,
                  now: int) -> ModelResult:
        vip_id, flags = vip
        backend_id = self._maglev_pick(vip_id, bool(flags & structs.VIP_HASH_SOURCE), p.src, p.dst, p.sport,
                                       p.dport, p.proto)
        be = self._backend(backend_id) if backend_id != structs.NO_BACKEND else None
        if be is None:
            return ModelResult("XDP_DROP", bytes(pkt), "drop_no_backend")
        resolved, nh = self._backend_next_hop(backend_id, be, p, pkt, ingress)
        if self._opens_entry(p, be):
            self._start_over_at_shared_endpoint(p, be, vip_id)
            self.t.conn[key] = Flow(backend_id, vip_id, structs.FLOW_CLOSING if self._is_closing(p) else 0,
                                    generation=be[3], last_seen=now)
        return self._forward(pkt, p, flags, be, nh, resolved, ingress)

    def _forward(self, pkt: bytearray, p: Parsed, vip_flags: int, be: tuple[bytes, int, int], nh: NextHop,
                 resolved: str, ingress: int) -> ModelResult:
        """lb.c forward: the VIP's mode. DSR changes only the MACs, so no rewrite names the backend."""
        if vip_flags & structs.VIP_DSR:
            return self._send_direct(pkt, nh, resolved, ingress, "fwd_dsr", None)
        if vip_flags & structs.VIP_TUNNEL:
            return self._send_encapsulated(pkt, p, be, nh, resolved, ingress, "fwd_tunnel")
        self._nat(pkt, p, self._addr_off(p, "dst"), p.l4 + 2, be[0], be[1])
        return self._send(pkt, nh, resolved, ingress, "fwd_nat", (be[0], be[1] or p.dport))

    def _send_direct(self, pkt: bytearray, nh: NextHop, resolved: str, ingress: int, ok: str,
                     backend: tuple[bytes, int] | None) -> ModelResult:
        """lb.c send_direct: a packet still to the VIP is dropped, not left to the kernel, while the MAC is unknown."""
        if resolved == "kernel":
            return ModelResult("XDP_DROP", bytes(pkt), "drop_neigh_unresolved", backend)
        return self._send(pkt, nh, resolved, ingress, ok, backend, direct=True)

    def _send_encapsulated(self, pkt: bytearray, p: Parsed, be: tuple[bytes, int, int], nh: NextHop,
                           resolved: str, ingress: int, ok: str) -> ModelResult:
        """lb.c send_encapsulated. (The program drops (drop_no_headroom) when XDP leaves no room in front
        of the packet; XDP, test runs included, leaves 256 bytes, so the model never does.)"""
        pkt[:] = encapsulate(bytes(pkt), p, be[0])
        return self._send(pkt, nh, resolved, ingress, ok, (be[0], p.dport))

    def _reply_flow(self, p: Parsed, vip_ids: tuple[int, ...]) -> tuple[Flow, tuple[bytes, int, int]] | None:
        """lb.c reply_flow: each VIP the endpoint serves, the client's flow towards it, if its entry is
        still true and names this backend."""
        for vip_id in vip_ids:
            meta = self.t.vip_meta.get(vip_id)
            if meta is None or not meta[2] & structs.VIP_ACTIVE:
                continue
            flow = self.t.conn.get((p.dst, meta[0], p.dport, meta[1] or p.sport, p.proto))
            if flow is None:
                continue
            be = self._backend(flow.backend_id)
            if be is None or be[0] != p.src or be[1] not in (p.sport, 0):
                continue
            if be[3] != flow.generation or be[4] != vip_id or flow.vip_id != vip_id:
                continue
            if not self._answers_reply(flow, p):
                continue
            return flow, meta
        return None

    def _to_client(self, pkt: bytearray, p: Parsed, found: tuple[Flow, tuple[bytes, int, int]],
                   ingress: int) -> ModelResult:
        flow, meta = found
        self._touch(flow, p, self.now())
        self._nat(pkt, p, self._addr_off(p, "src"), p.l4, meta[0], meta[1])
        if flow.flags & structs.FLOW_LOCAL:  # the LB host's own connection (steered at TC egress)
            return ModelResult("XDP_PASS", bytes(pkt), "pass_local_reply", (p.src, p.sport))
        resolved, flow.reply_nh = self._ensure_next_hop(flow.reply_nh, p.dst, p, pkt, ingress)
        return self._send(pkt, flow.reply_nh, resolved, ingress, "fwd_reply", (p.src, p.sport))

    # --- full NAT (lb.c's full-NAT section, fullnat.h) --------------------------------------------
    def _fullnat_to_backend(self, pkt: bytearray, p: Parsed, vip: tuple[int, int], ingress: int) -> ModelResult:
        """lb.c fullnat_to_backend: the flow's entry while true, else a new flow with a source port."""
        vip_id, flags = vip
        key = (p.src, p.dst, p.sport, p.dport, p.proto)
        now = self.now()
        flow = self.t.fullnat_flows.get(key)
        be = self._backend(flow.backend_id) if flow is not None else None
        if flow is not None and be is not None and self._trusted(flow, be, vip_id, p, now):
            self._touch(flow, p, now)
            resolved, nh = self._backend_next_hop(flow.backend_id, be, p, pkt, ingress)
        else:
            backend_id = self._maglev_pick(vip_id, bool(flags & structs.VIP_HASH_SOURCE), p.src, p.dst, p.sport,
                                           p.dport, p.proto)
            be = self._backend(backend_id) if backend_id != structs.NO_BACKEND else None
            if be is None:
                return ModelResult("XDP_DROP", bytes(pkt), "drop_no_backend")
            source = self._snat_allocate(p, be, vip_id, now)
            if source is None:
                return ModelResult("XDP_DROP", bytes(pkt), "drop_snat_exhausted")
            resolved, nh = self._backend_next_hop(backend_id, be, p, pkt, ingress)
            flow = FullnatFlow(backend_id, vip_id, structs.FLOW_CLOSING if self._is_closing(p) else 0,
                               generation=be[3], last_seen=now, snat_addr=source[0], snat_port=source[1])
            self.t.fullnat_flows[key] = flow
        self._nat(pkt, p, self._addr_off(p, "dst"), p.l4 + 2, be[0], be[1])
        self._nat(pkt, p, self._addr_off(p, "src"), p.l4, flow.snat_addr, flow.snat_port, always_port=True)
        # from the LB's own address: never left to the kernel to forward (lb.c send_direct)
        return self._send_direct(pkt, nh, resolved, ingress, "fwd_fullnat", (be[0], be[1] or p.dport))

    def _snat_allocate(self, p: Parsed, be: tuple, vip_id: int, now: int) -> tuple[bytes, int] | None:
        """lb.c snat_allocate: the first of SNAT_PROBES slots from the tuple's hash that is free or
        reclaimable; the reverse entry is written there."""
        pool = self.t.snat_pools.get(vip_id)
        if pool is None or not pool.addrs or not pool.port_count:
            return None
        count, slots = len(pool.addrs), len(pool.addrs) * pool.port_count
        mine = (p.src, p.sport, p.dport, vip_id)
        h = flow_hash_raw(p.src, p.dst, p.sport, p.dport, p.proto)
        for i in range(structs.SNAT_PROBES):
            slot = ((h + i * ((h >> 16) | 1)) & 0xFFFFFFFF) % slots
            addr, port = pool.addrs[slot % count], (pool.port_min + slot // count) & 0xFFFF
            rkey = (be[0], addr, be[1] or p.dport, port, p.proto)
            owner = self.t.fullnat_ports.get(rkey)
            if owner is None or self._snat_reclaimable(owner, mine, rkey, now):
                self.t.fullnat_ports[rkey] = mine
                return addr, port
        return None

    def _snat_reclaimable(self, owner: tuple[bytes, int, int, int], mine: tuple[bytes, int, int, int],
                          rkey: FlowKey, now: int) -> bool:
        """lb.c snat_port_reclaimable: the owner is this flow, or its flow is over."""
        if owner == mine:
            return True
        meta = self.t.vip_meta.get(owner[3])
        if meta is None or not meta[2] & structs.VIP_ACTIVE:
            return True
        flow = self.t.fullnat_flows.get((owner[0], meta[0], owner[1], owner[2], rkey[4]))
        if flow is None or (flow.snat_addr, flow.snat_port) != (rkey[1], rkey[3]):
            return True
        be = self._backend(flow.backend_id)
        if be is None or be[0] != rkey[0] or be[3] != flow.generation:
            return True
        return (now - flow.last_seen) & 0xFFFFFFFF > self._idle_timeout(flow, rkey[4])

    def _port_owner_flow(self, owner: tuple[bytes, int, int, int], snat_addr: bytes, snat_port: int,
                         proto: int) -> tuple[FullnatFlow, tuple] | None:
        """The full-NAT flow that owns a source port: its VIP still active, and the flow still holding
        that very address and port (with its VIP's record)."""
        client, client_port, vip_port, vip_id = owner
        meta = self.t.vip_meta.get(vip_id)
        if meta is None or not meta[2] & structs.VIP_ACTIVE:
            return None
        flow = self.t.fullnat_flows.get((client, meta[0], client_port, vip_port, proto))
        if flow is None or (flow.snat_addr, flow.snat_port) != (snat_addr, snat_port) or flow.vip_id != vip_id:
            return None
        return flow, meta

    def _fullnat_to_client(self, pkt: bytearray, p: Parsed, owner: tuple[bytes, int, int, int],
                           ingress: int) -> ModelResult:
        """lb.c fullnat_to_client: the owner's flow, if it still holds the port and names this backend."""
        client, client_port, vip_port, _ = owner
        found = self._port_owner_flow(owner, p.dst, p.dport, p.proto)
        if found is None:
            return ModelResult("XDP_DROP", bytes(pkt), "drop_reply_no_flow")
        flow, meta = found
        be = self._backend(flow.backend_id)
        if be is None or be[3] != flow.generation or be[0] != p.src:
            return ModelResult("XDP_DROP", bytes(pkt), "drop_reply_no_flow")
        self._touch(flow, p, self.now())
        self._nat(pkt, p, self._addr_off(p, "dst"), p.l4 + 2, client, client_port, always_port=True)
        self._nat(pkt, p, self._addr_off(p, "src"), p.l4, meta[0], vip_port, always_port=True)
        resolved, flow.reply_nh = self._ensure_next_hop(flow.reply_nh, client, p, pkt, ingress)
        result = self._send(pkt, flow.reply_nh, resolved, ingress, "fwd_fullnat_reply", (p.src, p.sport))
        if result.reason != "fwd_fullnat_reply":  # lb/probe.py cannot tell such a reply from a client's packet
            result = replace(result, backend=(client, client_port))
        return result

    def _fullnat_icmp_to_backend(self, pkt: bytearray, p: Parsed, q: Parsed, ingress: int) -> ModelResult | None:
        """lb.c fullnat_icmp_to_backend: "too big" about a full-NAT flow's reply, to its backend."""
        flow = self.t.fullnat_flows.get((q.dst, q.src, q.dport, q.sport, q.proto))
        if flow is None:
            return None
        meta = self.t.vip_meta.get(flow.vip_id)
        be = self._backend(flow.backend_id)
        if meta is None or not meta[2] & structs.VIP_ACTIVE or meta[0] != q.src or meta[1] not in (q.sport, 0) or \
                be is None or be[3] != flow.generation or be[4] != flow.vip_id:
            return ModelResult("XDP_DROP", bytes(pkt), "drop_icmp_no_flow")
        resolved, nh = self._backend_next_hop(flow.backend_id, be, p, pkt, ingress)
        self._fullnat_icmp_rewrite(pkt, p, q, flow.snat_addr, be[0], be[0], be[1] or q.sport, flow.snat_addr,
                                   flow.snat_port)
        return self._send_direct(pkt, nh, resolved, ingress, "fwd_icmp_error", None)

    def _fullnat_icmp_to_client(self, pkt: bytearray, p: Parsed, ingress: int) -> ModelResult | None:
        """lb.c fullnat_icmp_to_client: an error about a packet sent from a full-NAT source port,
        to the client that owns the port."""
        q = self._parse_quote(pkt, p)
        if isinstance(q, str) or (p.version == 6 and V4_MAPPED in (q.src[:12], q.dst[:12])):
            return None
        owner = self.t.fullnat_ports.get((q.dst, q.src, q.dport, q.sport, q.proto))
        if owner is None:
            return None
        client, client_port, vip_port, _ = owner
        found = self._port_owner_flow(owner, q.src, q.sport, q.proto)
        if found is None:
            return ModelResult("XDP_DROP", bytes(pkt), "drop_icmp_no_flow")
        flow, meta = found
        self._fullnat_icmp_rewrite(pkt, p, q, meta[0], client, client, client_port, meta[0], vip_port)
        resolved, flow.reply_nh = self._ensure_next_hop(flow.reply_nh, client, p, pkt, ingress)
        return self._send(pkt, flow.reply_nh, resolved, ingress, "fwd_icmp_error", None)

    def _fullnat_icmp_rewrite(self, pkt: bytearray, p: Parsed, q: Parsed, outer_src: bytes, outer_dst: bytes,
                              quote_src: bytes, quote_sport: int, quote_dst: bytes, quote_dport: int) -> None:
        """fullnat.h fullnat_icmp_rewrite: outer destination and source (ICMPv6's checksum covers them,
        ICMP's not), the quote's addresses (its IPv4 header checksum in place) and ports; the ICMP
        checksum told of the quote's address words, its header checksum, then its ports."""
        icmp_check = p.l4 + 2
        outer = replace(p, check_off=icmp_check if p.version == 6 else None)
        self._nat(pkt, outer, self._addr_off(p, "dst"), 0, outer_dst, 0)
        self._nat(pkt, outer, self._addr_off(p, "src"), 0, outer_src, 0)
        src, dst = self._addr_off(q, "src"), self._addr_off(q, "dst")
        size = 16 if q.version == 6 else 4
        new_src, new_dst = (quote_src, quote_dst) if q.version == 6 else (quote_src[12:], quote_dst[12:])
        old_src, old_dst = bytes(pkt[src:src + size]), bytes(pkt[dst:dst + size])
        old_check = bytes(pkt[q.l3 + 10:q.l3 + 12])
        if q.version == 4:
            self._replace_check(pkt, q.l3 + 10, old_src, new_src, udp_zero_fix=False)
            self._replace_check(pkt, q.l3 + 10, old_dst, new_dst, udp_zero_fix=False)
        pkt[src:src + size], pkt[dst:dst + size] = new_src, new_dst
        old_ports = bytes(pkt[q.l4:q.l4 + 4])
        pkt[q.l4:q.l4 + 4] = quote_sport.to_bytes(2, "big") + quote_dport.to_bytes(2, "big")
        for i in range(0, size, 4):
            self._replace_check(pkt, icmp_check, old_src[i:i + 4], new_src[i:i + 4], udp_zero_fix=False)
        for i in range(0, size, 4):
            self._replace_check(pkt, icmp_check, old_dst[i:i + 4], new_dst[i:i + 4], udp_zero_fix=False)
        if q.version == 4:
            self._replace_check(pkt, icmp_check, old_check, bytes(pkt[q.l3 + 10:q.l3 + 12]), udp_zero_fix=False)
        self._replace_check(pkt, icmp_check, old_ports[:2], pkt[q.l4:q.l4 + 2], udp_zero_fix=False)
        self._replace_check(pkt, icmp_check, old_ports[2:], pkt[q.l4 + 2:q.l4 + 4], udp_zero_fix=False)

    # --- nat.h: address first, then port, checksums after each ---------------------------------
    @staticmethod
    def _addr_off(p: Parsed, which: str) -> int:
        if p.version == 6:
            return p.l3 + (8 if which == "src" else 24)
        return p.l3 + (12 if which == "src" else 16)

    def _nat(self, pkt: bytearray, p: Parsed, addr_off: int, port_off: int, new_addr: bytes, new_port: int,
             always_port: bool = False) -> None:
        """nat.h: the address (IPv4: IP checksum, then L4; IPv6: L4 word by word), then the port (port 0:
        the port stays, unless `always_port`: full NAT writes its ports whatever they are)."""
        udp_fix = p.proto == UDP
        if p.version == 6:
            for i in range(0, 16, 4):
                old_word = bytes(pkt[addr_off + i:addr_off + i + 4])
                pkt[addr_off + i:addr_off + i + 4] = new_addr[i:i + 4]
                if p.check_off is not None:
                    self._replace_check(pkt, p.check_off, old_word, new_addr[i:i + 4], udp_zero_fix=udp_fix)
        else:
            old_addr = bytes(pkt[addr_off:addr_off + 4])
            pkt[addr_off:addr_off + 4] = new_addr[12:]
            self._replace_check(pkt, p.l3 + 10, old_addr, new_addr[12:], udp_zero_fix=False)
            if p.check_off is not None:
                self._replace_check(pkt, p.check_off, old_addr, new_addr[12:], udp_zero_fix=udp_fix)
        if not new_port and not always_port:  # port 0: the VIP takes every port, the port stays
            return
        old_port = bytes(pkt[port_off:port_off + 2])
        new_port_b = new_port.to_bytes(2, "big")
        pkt[port_off:port_off + 2] = new_port_b
        if p.check_off is not None:
            self._replace_check(pkt, p.check_off, old_port, new_port_b, udp_zero_fix=udp_fix)

    @staticmethod
    def _replace_check(pkt: bytearray, off: int, old: bytes, new: bytes, udp_zero_fix: bool) -> None:
        check = csum_replace(int.from_bytes(pkt[off:off + 2], "big"), old, new)
        if udp_zero_fix and check == 0:
            check = 0xFFFF
        pkt[off:off + 2] = check.to_bytes(2, "big")

    # --- nexthop.h and transmit -----------------------------------------------------------------
    def _ensure_next_hop(self, nh: NextHop, dst: bytes, p: Parsed, pkt: bytearray,
                         ingress: int) -> tuple[str, NextHop]:
        """A cached next hop of this epoch, or a freshly resolved one (the cache is empty unless found)."""
        if nh.ifindex and nh.epoch == self.t.nh_epoch:
            return "found", nh
        verdict, found = self._resolve(dst, p, bytes(pkt), ingress)
        return verdict, replace(found, epoch=self.t.nh_epoch) if verdict == "found" else NextHop()

    def _send(self, pkt: bytearray, nh: NextHop, resolved: str, ingress: int, ok: str,
              backend: tuple[bytes, int] | None, direct: bool = False) -> ModelResult:
        """lb.c send_to; `direct`: still addressed to the VIP (dsr)."""
        if resolved == "kernel":
            return ModelResult("XDP_PASS", bytes(pkt), "pass_neigh_unresolved", backend)
        if resolved == "none":
            return ModelResult("XDP_DROP", bytes(pkt), "drop_no_route", backend)
        tagged = _tagged(pkt)
        if not tagged and (nh.ifindex == ingress or nh.ifindex in self.t.tx_ports):  # transmit, untagged
            pkt[0:6], pkt[6:12] = nh.dmac, nh.smac
            return ModelResult("XDP_TX" if nh.ifindex == ingress else "XDP_REDIRECT", bytes(pkt), ok, backend)
        vlan = self.t.egress_vlans.get(nh.ifindex)  # transmit_vlan
        out = vlan[0] if vlan else nh.ifindex
        if out != ingress and out not in self.t.tx_ports:
            if vlan:
                return ModelResult("XDP_PASS", bytes(pkt), "pass_vlan_unmanaged", backend)
            if not direct:  # unmanaged_egress: the kernel forwards it, as it arrived
                return ModelResult("XDP_PASS", bytes(pkt), "pass_egress_unmanaged", backend)
            _retag(pkt, None)
            pkt[0:6], pkt[6:12] = nh.dmac, nh.smac
            return ModelResult("XDP_REDIRECT", bytes(pkt), "fwd_egress_unmanaged", backend)
        _retag(pkt, vlan)
        pkt[0:6], pkt[6:12] = nh.dmac, nh.smac
        return ModelResult("XDP_TX" if out == ingress else "XDP_REDIRECT", bytes(pkt), ok, backend)

    def _resolve(self, dst: bytes, p: Parsed, pkt: bytes, ingress: int) -> tuple[str, NextHop | None]:
        best: tuple[int, NextHop] | None = None
        target = int.from_bytes(dst, "big")
        for plen, addr, nh in self.t.routes:
            mask = ((1 << plen) - 1) << (128 - plen) if plen else 0
            if target & mask == int.from_bytes(addr, "big") & mask and (best is None or plen > best[0]):
                best = (plen, nh)
        if best is not None and best[1].ifindex:
            return "found", best[1]
        return self.fib(dst, p, pkt, ingress)


def _tagged(frame: bytes | bytearray) -> bool:
    return int.from_bytes(frame[12:14], "big") in (ETH_P_8021Q, ETH_P_8021AD)


def _retag(pkt: bytearray, vlan: tuple[int, int, int] | None) -> None:
    """vlan.h vlan_retag: the egress VLAN's tag pushed or put in place of the client's, or the client's stripped."""
    tagged = _tagged(pkt)
    if vlan is not None:
        pkt[12:16 if tagged else 12] = vlan[1].to_bytes(2, "big") + vlan[2].to_bytes(2, "big")
    elif tagged:
        del pkt[12:16]


def kernel_fib(ipr) -> FibLookup:
    """The kernel's FIB as bpf_fib_lookup() sees it, read with pyroute2 (an IPRoute in the LB's namespace)."""
    from pyroute2.netlink.exceptions import NetlinkError

    nud_valid = 0x80 | 0x40 | 0x02 | 0x10 | 0x04 | 0x08

    def lookup(dst: bytes, p: Parsed, pkt: bytes, ingress: int) -> tuple[str, NextHop | None]:
        family = socket.AF_INET6 if p.version == 6 else socket.AF_INET
        address = socket.inet_ntop(family, dst if p.version == 6 else dst[12:])
        try:
            route = ipr.route("get", dst=address, family=family)[0]
        except NetlinkError:
            return "none", None
        if route["type"] != 1:  # RTN_UNICAST
            return "none", None
        oif = route.get_attr("RTA_OIF")
        link = ipr.get_links(oif)[0]
        if p.version == 6:
            tot_len = int.from_bytes(pkt[p.l3 + 4:p.l3 + 6], "big") + 40
        else:
            tot_len = int.from_bytes(pkt[p.l3 + 2:p.l3 + 4], "big")
        if tot_len > link.get_attr("IFLA_MTU"):
            return "none", None
        hop = route.get_attr("RTA_GATEWAY") or address
        for n in ipr.get_neighbours(family=family, ifindex=oif):
            if n.get_attr("NDA_DST") == hop and n["state"] & nud_valid and n.get_attr("NDA_LLADDR"):
                smac = bytes.fromhex(link.get_attr("IFLA_ADDRESS").replace(":", ""))
                dmac = bytes.fromhex(n.get_attr("NDA_LLADDR").replace(":", ""))
                return "found", NextHop(oif, smac, dmac)
        return "kernel", None

    return lookup
