"""ctypes mirrors of bpf/structs.h and the reason codes of bpf/consts.h.

tests/test_structs.py compiles the C header and checks every size and offset here."""
from __future__ import annotations

import ctypes
import ipaddress
import socket

IPAddress = ipaddress.IPv4Address | ipaddress.IPv6Address


def lb_addr_bytes(address: IPAddress) -> bytes:
    """An address as struct lb_addr holds it: IPv6, or IPv4 mapped into IPv6 (::ffff:a.b.c.d)."""
    return b"\0" * 10 + b"\xff\xff" + address.packed if address.version == 4 else address.packed


class LbAddr(ctypes.Structure):
    """union lb_addr: 16 bytes, IPv4 stored IPv4-mapped (::ffff:a.b.c.d)."""

    _fields_ = [("b", ctypes.c_uint8 * 16)]

    @classmethod
    def of(cls, address: IPAddress) -> "LbAddr":
        return cls.from_buffer_copy(lb_addr_bytes(address))

    def address(self) -> IPAddress:
        v6 = ipaddress.IPv6Address(bytes(self.b))
        return v6.ipv4_mapped or v6


class VipKey(ctypes.Structure):
    _fields_ = [("addr", LbAddr), ("port", ctypes.c_uint16), ("proto", ctypes.c_uint8), ("pad", ctypes.c_uint8)]


class VipInfo(ctypes.Structure):
    _fields_ = [("id", ctypes.c_uint32), ("flags", ctypes.c_uint32), ("ring_base", ctypes.c_uint32),
                ("ring_size", ctypes.c_uint32)]


class VipMeta(ctypes.Structure):
    _fields_ = [
        ("addr", LbAddr),
        ("port", ctypes.c_uint16),
        ("proto", ctypes.c_uint8),
        ("mode", ctypes.c_uint8),
        ("flags", ctypes.c_uint32),
        ("ring_base", ctypes.c_uint32),
        ("ring_size", ctypes.c_uint32),
        ("info_flags", ctypes.c_uint32),
    ]


class Backend(ctypes.Structure):
    _fields_ = [("addr", LbAddr), ("port", ctypes.c_uint16), ("pad", ctypes.c_uint16), ("flags", ctypes.c_uint32),
                ("generation", ctypes.c_uint32), ("vip_id", ctypes.c_uint32)]


class Endpoint(ctypes.Structure):
    _fields_ = [("addr", LbAddr), ("port", ctypes.c_uint16), ("proto", ctypes.c_uint8), ("pad", ctypes.c_uint8)]


ADDR_FILTER_SIZE = 4096  # LB_ADDR_FILTER_SIZE, LB_ADDR_FILTER_BITS: the address filter's buckets
ADDR_FILTER_BITS = 12
VIP_SLOTS = 4096  # LB_VIP_SLOTS, LB_VIP_SLOT_BITS: the direct-mapped index of the VIPs of one port
VIP_SLOT_BITS = 12
FILTER_NO_VIP = 1 << 0  # LB_FILTER_*: what a bucket of the address filter holds none of
FILTER_NO_BACKEND = 1 << 1
REPLY_VIPS = 6  # LB_REPLY_VIPS: how many NAT VIPs one backend endpoint may serve


class ReplySource(ctypes.Structure):
    _fields_ = [("count", ctypes.c_uint32), ("vip_ids", ctypes.c_uint16 * REPLY_VIPS)]


class NextHop(ctypes.Structure):
    _fields_ = [("ifindex", ctypes.c_uint32), ("smac", ctypes.c_uint8 * 6), ("dmac", ctypes.c_uint8 * 6),
                ("epoch", ctypes.c_uint32)]


class EgressVlan(ctypes.Structure):
    """struct egress_vlan: proto and tci in network byte order."""

    _fields_ = [("lower_ifindex", ctypes.c_uint32), ("proto", ctypes.c_uint16), ("tci", ctypes.c_uint16)]


class RouteKey(ctypes.Structure):
    _fields_ = [("prefixlen", ctypes.c_uint32), ("addr", LbAddr)]


class FlowKey(ctypes.Structure):
    _fields_ = [
        ("src", LbAddr),
        ("dst", LbAddr),
        ("sport", ctypes.c_uint16),
        ("dport", ctypes.c_uint16),
        ("proto", ctypes.c_uint8),
        ("pad", ctypes.c_uint8 * 3),
    ]


class FlowEntry(ctypes.Structure):
    _fields_ = [
        ("backend_id", ctypes.c_uint32),
        ("vip_id", ctypes.c_uint16),
        ("flags", ctypes.c_uint16),
        ("generation", ctypes.c_uint32),
        ("last_seen", ctypes.c_uint32),
        ("reply_nh", NextHop),
    ]


SNAT_ADDRS = 8  # LB_SNAT_ADDRS: source addresses in one full-NAT VIP's pool
SNAT_PROBES = 8  # LB_SNAT_PROBES: (address, port) slots a new full-NAT flow tries


class SnatPool(ctypes.Structure):
    """port_min and port_count in host order (the data plane computes with them)."""

    _fields_ = [("count", ctypes.c_uint32), ("port_min", ctypes.c_uint16), ("port_count", ctypes.c_uint16),
                ("addrs", LbAddr * SNAT_ADDRS)]


class FullnatFlow(ctypes.Structure):
    _fields_ = [("flow", FlowEntry), ("snat_addr", LbAddr), ("snat_port", ctypes.c_uint16),
                ("pad", ctypes.c_uint16)]


class FullnatOwner(ctypes.Structure):
    _fields_ = [("client", LbAddr), ("client_port", ctypes.c_uint16), ("vip_port", ctypes.c_uint16),
                ("vip_id", ctypes.c_uint32)]


class LbCounters(ctypes.Structure):
    _fields_ = [
        ("packets", ctypes.c_uint64),
        ("bytes", ctypes.c_uint64),
        ("reply_packets", ctypes.c_uint64),
        ("reply_bytes", ctypes.c_uint64),
        ("new_flows", ctypes.c_uint64),
    ]


class AclKey(ctypes.Structure):
    _fields_ = [("prefixlen", ctypes.c_uint32), ("vip_id", ctypes.c_uint32), ("addr", LbAddr)]


class AclRule(ctypes.Structure):
    _fields_ = [("action", ctypes.c_uint32)]


class LbConfig(ctypes.Structure):
    _fields_ = [("flags", ctypes.c_uint32), ("tcp_timeout", ctypes.c_uint32), ("tcp_closing_timeout", ctypes.c_uint32),
                ("udp_timeout", ctypes.c_uint32), ("clock_offset", ctypes.c_uint32)]


class LbState(ctypes.Structure):
    _fields_ = [("revision", ctypes.c_uint64), ("layout", ctypes.c_uint32), ("pad", ctypes.c_uint32)]


class VipAddr(ctypes.Structure):
    _fields_ = [("vips", ctypes.c_uint32), ("flags", ctypes.c_uint32)]


class ProbeMeta(ctypes.Structure):
    _fields_ = [("magic", ctypes.c_uint32), ("reason", ctypes.c_uint32)]


# Every struct above and the C name it mirrors.
C_STRUCTS: dict[str, type[ctypes.Structure]] = {
    "union lb_addr": LbAddr,
    "struct vip_key": VipKey,
    "struct vip_info": VipInfo,
    "struct vip_meta": VipMeta,
    "struct backend": Backend,
    "struct endpoint": Endpoint,
    "struct reply_source": ReplySource,
    "struct next_hop": NextHop,
    "struct route_key": RouteKey,
    "struct egress_vlan": EgressVlan,
    "struct flow_key": FlowKey,
    "struct flow_entry": FlowEntry,
    "struct lb_counters": LbCounters,
    "struct probe_meta": ProbeMeta,
    "struct lb_config": LbConfig,
    "struct lb_state": LbState,
    "struct acl_key": AclKey,
    "struct acl_rule": AclRule,
    "struct vip_addr": VipAddr,
    "struct snat_pool": SnatPool,
    "struct fullnat_flow": FullnatFlow,
    "struct fullnat_owner": FullnatOwner,
}

# enum lb_reason, in order: the index is the member's explicit value in bpf/consts.h (append only).
REASONS: tuple[str, ...] = (
    "LB_FWD_NAT",
    "LB_FWD_REPLY",
    "LB_TX_ICMP_ECHO",
    "LB_PASS_NOT_IP",
    "LB_PASS_NOT_VIP",
    "LB_PASS_IP_OPTIONS",
    "LB_PASS_FRAGMENT",
    "LB_PASS_UNSUPPORTED_L4",
    "LB_PASS_NEIGH_UNRESOLVED",
    "LB_PASS_EGRESS_UNMANAGED",
    "LB_PASS_MALFORMED",
    "LB_DROP_NO_BACKEND",
    "LB_DROP_NO_ROUTE",
    "LB_DROP_IP_OPTIONS",
    "LB_DROP_FRAGMENT",
    "LB_DROP_UNSUPPORTED_L4",
    "LB_DROP_MALFORMED",
    "LB_DROP_ACL",
    "LB_FWD_DSR",
    "LB_FWD_TUNNEL",
    "LB_DROP_NO_HEADROOM",
    "LB_FWD_ICMP_ERROR",
    "LB_DROP_ICMP_NO_FLOW",
    "LB_FWD_STEERED",
    "LB_PASS_LOCAL_REPLY",
    "LB_DROP_NEIGH_UNRESOLVED",
    "LB_DROP_UNSERVED",
    "LB_PASS_UNSERVED",
    "LB_PASS_V4_MAPPED",
    "LB_DROP_V4_MAPPED",
    "LB_FWD_EGRESS_UNMANAGED",
    "LB_DROP_REPLY_NO_FLOW",
    "LB_PASS_VLAN_UNMANAGED",
    "LB_FWD_FULLNAT",
    "LB_FWD_FULLNAT_REPLY",
    "LB_DROP_SNAT_EXHAUSTED",
)

# Flags and constants of bpf/consts.h used from Python.
VIP_ACTIVE = 1 << 0
VIP_HASH_SOURCE = 1 << 0
VIP_ACL = 1 << 1
VIP_ACL_ALLOWLIST = 1 << 2
VIP_DSR = 1 << 3
VIP_TUNNEL = 1 << 4
VIP_FULLNAT = 1 << 5
ACL_ALLOW = 1
ACL_DENY = 2
CFG_ANY_PORT = 1 << 0
CFG_FULLNAT = 1 << 1
ADDR_PASS_UNSERVED = 1 << 0
ICMP_TTL = 64
FLOW_CLOSING = 1 << 0
FLOW_LOCAL = 1 << 1
MARK_MAGIC = 0x4C000000
MARK_MAGIC_MASK = 0xFF000000
MARK_BACKEND_MASK = 0x00FFFFFF
BACKEND_IN_USE = 1 << 0
BACKEND_NO_NEW = 1 << 1
BACKEND_SHARED = 1 << 2
VIP_META_HASH_SOURCE = 1 << 1
TICK_SHIFT = 30  # LB_TICK_SHIFT: the connection table's clock ticks every 2^30 ns
TCP_TIMEOUT = 839  # LB_TCP_TIMEOUT and the others: the idle timeouts (ticks) when lb_config leaves them 0
TCP_CLOSING_TIMEOUT = 10
UDP_TIMEOUT = 28


def seconds_to_ticks(seconds: int) -> int:
    """A timeout in the data plane's ticks, rounded up (never shorter than asked)."""
    return -((-seconds * 1_000_000_000) // (1 << TICK_SHIFT))
MODE_NAT = 0
MODE_DSR = 1
MODE_TUNNEL = 2
MODE_FULLNAT = 3
ENCAP_TTL = 64
ENCAP_SRC4_PREFIX = 0xAC100000  # 172.16.0.0/16
ENCAP_SRC6_PREFIX = 0xFD006C62  # fd00:6c62::/96
NO_BACKEND = 0
LAYOUT_VERSION = 4  # LB_LAYOUT_VERSION: the pinned maps' layout (lb/layout.py)
PROBE_MAGIC = 0x6C627072
MAX_IFINDEX = 65536
MAX_ACL_RULES = 16384
MAX_VLANS = 4096  # LB_MAX_VLANS: VLAN devices the egress_vlans map holds

PROTOCOLS = {"tcp": socket.IPPROTO_TCP, "udp": socket.IPPROTO_UDP}
HASHES = ("flow", "source")


def backend_mark(backend_id: int) -> int:
    """The SO_MARK that has the TC egress program steer a connection of the LB host to a VIP to
    this backend (health checks)."""
    return MARK_MAGIC | (backend_id & MARK_BACKEND_MASK)


def be16(port: int) -> int:
    """A port as the C side stores it: network byte order in a __be16."""
    return socket.htons(port)
