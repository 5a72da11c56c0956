"""Reading the connection table (bpf/conn.h) as an operator sees it: each entry's client, VIP and
backend, its TCP state, its age by the data plane's own clock, and whether the data plane would
still trust it (lb/refmodel.py and conn.h's flow_trusted decide the same way).

The table is read in batches (BPF_MAP_LOOKUP_BATCH, some 130 calls for 1M entries) and decoded
from raw bytes; only entries that pass the filter become objects, and reading stops once `limit`
of them are found, so memory stays bounded whatever the table's size."""
from __future__ import annotations

import ctypes
import ipaddress
import socket
import struct
from dataclasses import dataclass
from typing import Iterator

from lb import structs
from lb.maps import U32, DataPlaneMaps
from lb.refmodel import V4_MAPPED, kernel_ticks
from lb.structs import FlowEntry, FlowKey, IPAddress, LbAddr

# struct flow_key: addresses as stored (16 bytes, IPv4-mapped), ports in network order
_KEY = struct.Struct("!16s16sHHB3x")
# struct flow_entry: backend_id, vip_id, flags, generation, last_seen (the cached next hops skipped)
_ENTRY = struct.Struct(f"<IHHII{ctypes.sizeof(FlowEntry) - 16}x")
# struct fullnat_flow: a flow_entry, then the source address and port (network order) it took
_FULLNAT_ENTRY = struct.Struct(f"<IHHII{ctypes.sizeof(FlowEntry) - 16}x16sH2x")
assert _KEY.size == ctypes.sizeof(FlowKey) and _FULLNAT_ENTRY.size == ctypes.sizeof(structs.FullnatFlow)
_SORT_TAIL, _SORT_PORT = struct.Struct(">HB"), struct.Struct(">H")

SECONDS_PER_TICK = (1 << structs.TICK_SHIFT) / 1e9
PROTOCOL_NAMES = {number: name for name, number in structs.PROTOCOLS.items()}

# Why the data plane would no longer trust an entry (a packet of its flow picks a backend again)
STALE_BACKEND_GONE = "backend gone"          # the backend record was cleared (its VIP removed, say)
STALE_BACKEND_REBOUND = "backend rebound"    # the id now names another binding (new generation)
STALE_VIP_CHANGED = "VIP changed"            # the VIP the tuple reaches is not the one the entry names
EXPIRED = "idle"                             # idle longer than its protocol's timeout


def raw_address(address: IPAddress) -> bytes:
    return bytes(LbAddr.of(address))


def address_text(raw: bytes) -> str:
    """The text of LbAddr.address() from raw bytes, some ten times faster (a listing writes a million
    of them). libc's inet_ntop writes IPv6 as ipaddress does (RFC 5952) except below ::/80, where
    it may write a dotted quad: those go through ipaddress."""
    if raw[:12] == V4_MAPPED:
        return socket.inet_ntop(socket.AF_INET, raw[12:])
    if raw[:10] == bytes(10):
        return str(ipaddress.IPv6Address(raw))
    return socket.inet_ntop(socket.AF_INET6, raw)


def endpoint_text(raw: bytes, port: int) -> str:
    """ADDR:PORT with IPv6 in brackets (control.model.format_endpoint, from raw bytes)."""
    if raw[:12] == V4_MAPPED:
        return f"{socket.inet_ntop(socket.AF_INET, raw[12:])}:{port}"
    return f"[{address_text(raw)}]:{port}"


@dataclass(frozen=True)
class ConnectionFilter:
    """Entries to keep: towards a VIP address (and port, protocol), and of certain backend bindings.
    A binding is a generation (never reused, so it names one backend of one VIP even after its id
    is taken by another): `generations` maps each wanted one to the destination port its flows
    must have (None: any; a backend of an any-port VIP keeps the client's port). None matches anything."""
    vip_address: IPAddress | None = None
    vip_port: int | None = None
    proto: int | None = None
    generations: dict[int, int | None] | None = None


@dataclass(slots=True)
class Connection:
    """One connection-table entry, decoded. Addresses stay raw 16-byte lb_addr (IPv4-mapped):
    endpoint_text writes them (LbAddr.from_buffer_copy(raw).address() makes an address)."""
    proto: int
    client: tuple[bytes, int]
    vip: tuple[bytes, int]        # what the client sent to (an any-port VIP: the port it used)
    vip_id: int
    backend_id: int
    generation: int
    backend: tuple[bytes, int] | None  # from the backend record, while it still holds the entry's binding
    flags: int
    age_ticks: int
    idle_timeout_ticks: int
    stale: str | None             # None: the data plane trusts it; else one of the reasons above
    via: tuple[bytes, int] | None = None  # full NAT: the source address and port towards the backend

    @property
    def state(self) -> str:
        """TCP: ESTABLISHED until a FIN or an RST is seen (the handshake's last ACK opened the
        entry: a SYN opens none), then CLOSING. UDP has no state: ACTIVE."""
        if self.proto != socket.IPPROTO_TCP:
            return "ACTIVE"
        return "CLOSING" if self.flags & structs.FLOW_CLOSING else "ESTABLISHED"

    @property
    def local(self) -> bool:
        """A connection of the LB host itself (a health check), steered at TC egress."""
        return bool(self.flags & structs.FLOW_LOCAL)

    @property
    def age_seconds(self) -> float:
        return self.age_ticks * SECONDS_PER_TICK

    @property
    def expires_in_seconds(self) -> float:
        """Seconds of idleness left before the data plane stops trusting the entry (0: already)."""
        return max(0, self.idle_timeout_ticks - self.age_ticks) * SECONDS_PER_TICK

    def sort_key(self) -> bytes:
        """By VIP, protocol, then client; IPv4 before IPv6. One bytes object: a million of them sort
        several times faster than tuples."""
        (vip, vport), (client, cport) = self.vip, self.client
        return b"".join((b"\0" if vip[:12] == V4_MAPPED else b"\1", vip, _SORT_TAIL.pack(vport, self.proto),
                         b"\0" if client[:12] == V4_MAPPED else b"\1", client, _SORT_PORT.pack(cport)))


class _Context:
    """What deciding an entry's validity needs besides the entry, read once per listing: the data
    plane's clock and timeouts, its VIPs, and the backend records the entries name (cached)."""

    def __init__(self, maps: DataPlaneMaps, now: int | None):
        config = maps.lb_config.get(U32(0))
        offset = config.clock_offset if config is not None else 0
        self.now = ((kernel_ticks() if now is None else now) + offset) & 0xFFFFFFFF
        self.timeouts = {
            "tcp": (config.tcp_timeout if config else 0) or structs.TCP_TIMEOUT,
            "closing": (config.tcp_closing_timeout if config else 0) or structs.TCP_CLOSING_TIMEOUT,
            "udp": (config.udp_timeout if config else 0) or structs.UDP_TIMEOUT,
        }
        # vips: (address, port in host order, proto) -> id; port 0 serves every port
        self.vip_ids = {(bytes(k.addr.b), socket.ntohs(k.port), k.proto): v.id for k, v in maps.vips.items()}
        self.maps = maps
        self.backends: dict[int, structs.Backend | None] = {}

    def backend(self, backend_id: int) -> structs.Backend | None:
        if backend_id not in self.backends:
            record = None
            if backend_id < self.maps.backends.max_entries:
                record = self.maps.backends.get(U32(backend_id))
            self.backends[backend_id] = record if record is not None and record.flags else None
        return self.backends[backend_id]

    def vip_id(self, dst: bytes, dport: int, proto: int) -> int | None:
        found = self.vip_ids.get((dst, dport, proto))
        return found if found is not None else self.vip_ids.get((dst, 0, proto))

    def timeout(self, proto: int, flags: int) -> int:
        if proto != socket.IPPROTO_TCP:
            return self.timeouts["udp"]
        return self.timeouts["closing" if flags & structs.FLOW_CLOSING else "tcp"]


def _binding(ctx: _Context, backend_id: int, generation: int, vip_id: int, dst: bytes, dport: int,
             proto: int) -> tuple[str | None, tuple[bytes, int] | None]:
    """conn.h flow_trusted's checks of the binding (any packet of the flow but a SYN; idle time is
    the caller's): why the entry is no longer trusted (None: it is), and the backend's endpoint
    while its record still holds the entry's binding."""
    be = ctx.backend(backend_id)
    if be is None or not be.flags & structs.BACKEND_IN_USE:
        return STALE_BACKEND_GONE, None
    if be.generation != generation:
        return STALE_BACKEND_REBOUND, None
    endpoint = (bytes(be.addr.b), socket.ntohs(be.port) or dport)
    if be.vip_id != vip_id or ctx.vip_id(dst, dport, proto) != vip_id:
        return STALE_VIP_CHANGED, endpoint
    return None, endpoint


def connections(maps: DataPlaneMaps, match: ConnectionFilter = ConnectionFilter(), limit: int | None = None,
                now: int | None = None, chunk: int = 8192) -> Iterator[Connection]:
    """The table's entries that `match` keeps, at most `limit` of them, in the table's order.
    `now`: the kernel's ticks (default: its clock now; the table's clock_offset is added)."""
    ctx = _Context(maps, now)
    vip_raw = raw_address(match.vip_address) if match.vip_address is not None else None
    filtering = match != ConnectionFilter()
    bindings: dict[tuple, tuple[str | None, tuple[bytes, int] | None]] = {}  # few: one per backend and VIP port
    timeouts = {(p, closing): ctx.timeout(p, closing) for p in structs.PROTOCOLS.values()
                for closing in (0, structs.FLOW_CLOSING)}
    now, closing_flag = ctx.now, structs.FLOW_CLOSING
    found = 0
    for (src, dst, sport, dport, proto), (backend_id, vip_id, flags, generation, last_seen, *source) in _entries(
            maps, chunk):
        if filtering and not _matches(match, vip_raw, dst, dport, proto, generation):
            continue
        binding = (backend_id, generation, vip_id, dst, dport, proto)
        known = bindings.get(binding)
        if known is None:
            known = bindings[binding] = _binding(ctx, *binding)
        stale, backend = known
        age = (now - last_seen) & 0xFFFFFFFF
        timeout = timeouts.get((proto, flags & closing_flag)) or ctx.timeout(proto, flags)
        if stale is None and age > timeout:
            stale = EXPIRED
        via = (source[0], socket.ntohs(source[1])) if source else None
        yield Connection(proto, (src, sport), (dst, dport), vip_id, backend_id, generation,
                         backend, flags, age, timeout, stale, via)
        found += 1
        if limit is not None and found >= limit:
            return


def _entries(maps: DataPlaneMaps, chunk: int) -> Iterator[tuple[tuple, tuple]]:
    """(key, value) of the connection table's entries, then full NAT's (their values end with the
    source address and port: a seventh and eighth field)."""
    for table, entry in ((maps.conn_table, _ENTRY), (maps.fullnat_flows, _FULLNAT_ENTRY)):
        for keys, values in table.raw_items(chunk):
            yield from zip(_KEY.iter_unpack(keys), entry.iter_unpack(values))


def _matches(match: ConnectionFilter, vip_raw: bytes | None, dst: bytes, dport: int, proto: int,
             generation: int) -> bool:
    if vip_raw is not None and dst != vip_raw:
        return False
    if (match.vip_port is not None and dport != match.vip_port) or (match.proto is not None and proto != match.proto):
        return False
    if match.generations is not None:
        if generation not in match.generations:
            return False
        port = match.generations[generation]
        if port is not None and dport != port:
            return False
    return True
