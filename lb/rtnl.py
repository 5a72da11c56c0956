"""Read the kernel's links, addresses, neighbours, routes and rules: rtnetlink dumps, parsed into
small records.

What a changing lbctl command reads on every run (the route mirror, the host's own addresses).
pyroute2 does the writes (attach, neighbour entries) and the daemon's notifications; importing it
takes about 150 ms of a one-shot lbctl's 250, and decoding its messages a few ms per dump, for a
handful of fixed headers and attributes read here with struct."""
from __future__ import annotations

import ipaddress
import os
import socket
import struct
from dataclasses import dataclass
from typing import Iterator

from lb.structs import IPAddress

NLMSG_ERROR, NLMSG_DONE = 2, 3
NLM_F_REQUEST, NLM_F_MULTI, NLM_F_DUMP_INTR, NLM_F_DUMP = 0x1, 0x2, 0x10, 0x300
RTM_NEWLINK, RTM_GETLINK = 16, 18
RTM_NEWADDR, RTM_GETADDR = 20, 22
RTM_NEWROUTE, RTM_GETROUTE = 24, 26
RTM_NEWNEIGH, RTM_GETNEIGH = 28, 30
RTM_NEWRULE, RTM_GETRULE = 32, 34
# multicast groups of notifications (a listener binds to them; control/routes.py KernelChanges)
RTMGRP_LINK, RTMGRP_NEIGH, RTMGRP_IPV4_ROUTE, RTMGRP_IPV6_ROUTE = 0x1, 0x4, 0x40, 0x400

# Fixed headers after nlmsghdr (their first byte is the family in every request)
_HEADER_LEN = {RTM_NEWLINK: 16, RTM_NEWADDR: 8, RTM_NEWROUTE: 12, RTM_NEWNEIGH: 12, RTM_NEWRULE: 12}
_NLMSGHDR = struct.Struct("=IHHII")
_NLA_TYPE_MASK = 0x3FFF  # without NLA_F_NESTED and NLA_F_NET_BYTEORDER

IFLA_ADDRESS, IFLA_LINK, IFLA_LINKINFO = 1, 5, 18
IFLA_INFO_KIND, IFLA_INFO_DATA = 1, 2
IFLA_VLAN_ID, IFLA_VLAN_PROTOCOL = 1, 5
IFA_ADDRESS = 1
NDA_DST, NDA_LLADDR = 1, 2
RTA_DST, RTA_OIF, RTA_GATEWAY, RTA_MULTIPATH, RTA_TABLE = 1, 4, 5, 9, 15
FRA_PRIORITY, FRA_TABLE = 6, 15

_DUMP_TRIES = 5  # a dump the kernel marks interrupted (the table changed meanwhile) is read again


@dataclass(frozen=True)
class Link:
    index: int
    address: bytes  # the MAC, b"" when the link has none
    lower: int  # IFLA_LINK: a VLAN's lower device (0: none, or in another namespace)
    kind: str | None  # IFLA_INFO_KIND: "vlan", "veth", ...
    vlan_id: int | None = None
    vlan_protocol: int | None = None  # ETH_P_8021Q or ETH_P_8021AD, host order


@dataclass(frozen=True)
class Neighbour:
    ifindex: int
    state: int  # NUD_*
    dst: IPAddress | None
    lladdr: bytes | None


@dataclass(frozen=True)
class Route:
    family: int
    table: int
    type: int  # RTN_*
    dst: ipaddress.IPv4Network | ipaddress.IPv6Network
    oif: int | None
    gateway: IPAddress | None
    multipath: bool


@dataclass(frozen=True)
class Rule:
    family: int
    priority: int
    table: int


def parse_attrs(data: bytes | memoryview, offset: int = 0, end: int | None = None) -> dict[int, memoryview]:
    """A message's attributes (struct rtattr / nlattr, 4-byte aligned): type -> payload; the last wins."""
    view = memoryview(data)
    end = len(view) if end is None else end
    out: dict[int, memoryview] = {}
    while offset + 4 <= end:
        length, kind = struct.unpack_from("=HH", view, offset)
        if length < 4 or offset + length > end:
            break  # malformed: what came before stands
        out[kind & _NLA_TYPE_MASK] = view[offset + 4:offset + length]
        offset += (length + 3) & ~3
    return out


def _u32(attr: memoryview | None) -> int | None:
    return None if attr is None or len(attr) < 4 else struct.unpack_from("=I", attr)[0]


def _string(attr: memoryview | None) -> str | None:
    return None if attr is None else bytes(attr).split(b"\0", 1)[0].decode(errors="replace")


def _ip(attr: memoryview | None) -> IPAddress | None:
    return None if attr is None or len(attr) not in (4, 16) else ipaddress.ip_address(bytes(attr))


def messages(data: bytes) -> Iterator[tuple[int, int, memoryview]]:
    """(type, flags, the message after its nlmsghdr) of each message in one read."""
    view, offset = memoryview(data), 0
    while offset + _NLMSGHDR.size <= len(view):
        length, kind, flags, _, _ = _NLMSGHDR.unpack_from(view, offset)
        if length < _NLMSGHDR.size or offset + length > len(view):
            break
        yield kind, flags, view[offset + _NLMSGHDR.size:offset + length]
        offset += (length + 3) & ~3


class DumpInterrupted(OSError):
    """The kernel's table changed during every try of a dump."""


def dump(request: int, family: int = socket.AF_UNSPEC) -> list[memoryview]:
    """The objects of one rtnetlink dump (RTM_GETx): each RTM_NEWx message, after its nlmsghdr."""
    header = bytes([family]) + bytes(_HEADER_LEN[request - 2] - 1)
    for _ in range(_DUMP_TRIES):
        got, interrupted = _dump_once(request, header)
        if not interrupted:
            return [body for kind, body in got if kind == request - 2]
    raise DumpInterrupted(f"rtnetlink dump {request}: interrupted {_DUMP_TRIES} times")


def _dump_once(request: int, header: bytes) -> tuple[list[tuple[int, memoryview]], bool]:
    seq = 1
    with socket.socket(socket.AF_NETLINK, socket.SOCK_RAW | socket.SOCK_CLOEXEC, socket.NETLINK_ROUTE) as sock:
        sock.bind((0, 0))
        sock.send(_NLMSGHDR.pack(_NLMSGHDR.size + len(header), request, NLM_F_REQUEST | NLM_F_DUMP, seq, 0) + header)
        out: list[tuple[int, memoryview]] = []
        interrupted = False
        while True:
            data = sock.recv(1 << 20)
            for kind, flags, body in messages(data):
                interrupted |= bool(flags & NLM_F_DUMP_INTR)
                if kind == NLMSG_DONE:
                    return out, interrupted
                if kind == NLMSG_ERROR:
                    code = -struct.unpack_from("=i", body)[0]
                    if code:
                        raise OSError(code, f"rtnetlink dump {request}: {os.strerror(code)}")
                    continue
                out.append((kind, body))


def links() -> list[Link]:
    return [link_of(msg) for msg in dump(RTM_GETLINK)]


def link_of(msg: bytes | memoryview) -> Link:
    """One RTM_NEWLINK message (after its nlmsghdr)."""
    index = struct.unpack_from("=i", msg, 4)[0]
    attrs = parse_attrs(msg, 16)
    info = parse_attrs(attrs[IFLA_LINKINFO]) if IFLA_LINKINFO in attrs else {}
    data = parse_attrs(info[IFLA_INFO_DATA]) if IFLA_INFO_DATA in info else {}
    kind = _string(info.get(IFLA_INFO_KIND))
    vlan_id = vlan_protocol = None
    if kind == "vlan":
        if len(data.get(IFLA_VLAN_ID, b"")) >= 2:
            vlan_id = struct.unpack_from("=H", data[IFLA_VLAN_ID])[0]
        if len(data.get(IFLA_VLAN_PROTOCOL, b"")) >= 2:
            vlan_protocol = struct.unpack_from("!H", data[IFLA_VLAN_PROTOCOL])[0]  # big-endian on the wire
    return Link(index, bytes(attrs.get(IFLA_ADDRESS, b"")), _u32(attrs.get(IFLA_LINK)) or 0, kind, vlan_id,
                vlan_protocol)


def addresses() -> set[IPAddress]:
    """Every address of the host's interfaces (IFA_ADDRESS), IPv4 and IPv6."""
    out = set()
    for msg in dump(RTM_GETADDR):
        if (address := _ip(parse_attrs(msg, 8).get(IFA_ADDRESS))) is not None:
            out.add(address)
    return out


def neighbours(family: int) -> list[Neighbour]:
    out = []
    for msg in dump(RTM_GETNEIGH, family):
        ifindex, state = struct.unpack_from("=iH", msg, 4)
        attrs = parse_attrs(msg, 12)
        lladdr = attrs.get(NDA_LLADDR)
        out.append(Neighbour(ifindex, state, _ip(attrs.get(NDA_DST)), None if lladdr is None else bytes(lladdr)))
    return out


def routes(family: int, table: int | None = None) -> list[Route]:
    """The routes of one family, of one table if given (RTA_TABLE, or the header's for tables below 256)."""
    out = []
    zero = ipaddress.ip_address(bytes(4 if family == socket.AF_INET else 16))
    for msg in dump(RTM_GETROUTE, family):
        msg_family, dst_len, _, _, header_table, _, _, route_type = struct.unpack_from("=8B", msg)
        attrs = parse_attrs(msg, 12)
        route_table = _u32(attrs.get(RTA_TABLE)) or header_table
        if msg_family != family or (table is not None and route_table != table):
            continue
        dst = _ip(attrs.get(RTA_DST)) or zero
        out.append(Route(family, route_table, route_type, ipaddress.ip_network(f"{dst}/{dst_len}", strict=False),
                         _u32(attrs.get(RTA_OIF)), _ip(attrs.get(RTA_GATEWAY)), RTA_MULTIPATH in attrs))
    return out


def rules(family: int) -> list[Rule]:
    out = []
    for msg in dump(RTM_GETRULE, family):
        attrs = parse_attrs(msg, 12)
        out.append(Rule(msg[0], _u32(attrs.get(FRA_PRIORITY)) or 0, _u32(attrs.get(FRA_TABLE)) or msg[4]))
    return out
