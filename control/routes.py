"""Mirror the kernel's routes and neighbours into the data plane's routes map, and follow them
(every changing command refreshes the mirror; the daemon also on every netlink notification).

For the interfaces the LB uses: every resolved neighbour becomes a host route
(/32) carrying its MAC; every route via a resolved gateway becomes a prefix
route carrying the gateway's MAC. What is not here (an unresolved neighbour) the
data plane asks the kernel FIB for, or hands to the kernel to resolve."""
from __future__ import annotations

import contextlib
import ipaddress
import select
import socket

from pyroute2 import IPRoute
from pyroute2.netlink.rtnl import RTMGRP_IPV4_ROUTE, RTMGRP_IPV6_ROUTE, RTMGRP_LINK, RTMGRP_NEIGH

from lb.maps import U32, DataPlaneMaps
from lb.structs import LbAddr, NextHop, RouteKey

# NUD states whose lladdr can be used to send
_USABLE_NUD = 0x02 | 0x04 | 0x08 | 0x10 | 0x80  # REACHABLE, STALE, DELAY, PROBE, PERMANENT


def _mac(text: str) -> bytes:
    return bytes.fromhex(text.replace(":", ""))


def _route_key(network: ipaddress.IPv4Network | ipaddress.IPv6Network) -> RouteKey:
    plen = network.prefixlen + (96 if network.version == 4 else 0)
    return RouteKey(prefixlen=plen, addr=LbAddr.of(network.network_address))


def _next_hop(ifindex: int, smac: bytes, dmac: bytes) -> NextHop:
    nh = NextHop(ifindex=ifindex)
    nh.smac[:] = list(smac)
    nh.dmac[:] = list(dmac)
    return nh


def kernel_next_hops(ifindexes: set[int]) -> dict[bytes, tuple[RouteKey, NextHop]]:
    """What the routes map should hold, read from the kernel over netlink."""
    out: dict[bytes, tuple[RouteKey, NextHop]] = {}
    with IPRoute() as ipr:
        link_macs = {link["index"]: _mac(link.get_attr("IFLA_ADDRESS") or "00:00:00:00:00:00")
                     for link in ipr.get_links() if link["index"] in ifindexes}
        neighbours: dict[tuple[int, str], bytes] = {}
        for family in (socket.AF_INET, socket.AF_INET6):
            for n in ipr.get_neighbours(family=family):
                dst, lladdr = n.get_attr("NDA_DST"), n.get_attr("NDA_LLADDR")
                if n["ifindex"] in ifindexes and dst and lladdr and n["state"] & _USABLE_NUD:
                    neighbours[(n["ifindex"], dst)] = _mac(lladdr)
                    key = _route_key(ipaddress.ip_network(dst))
                    out[bytes(key)] = (key, _next_hop(n["ifindex"], link_macs[n["ifindex"]], _mac(lladdr)))
            for r in ipr.get_routes(family=family, table=254):
                oif, gw = r.get_attr("RTA_OIF"), r.get_attr("RTA_GATEWAY")
                if oif not in ifindexes or not gw or (oif, gw) not in neighbours:
                    continue
                dst = r.get_attr("RTA_DST") or ("0.0.0.0" if family == socket.AF_INET else "::")
                key = _route_key(ipaddress.ip_network(f"{dst}/{r['dst_len']}"))
                # a more specific neighbour entry wins over a route to the same prefix
                out.setdefault(bytes(key), (key, _next_hop(oif, link_macs[oif], neighbours[(oif, gw)])))
    return out


def sync_routes(maps: DataPlaneMaps, ifindexes: set[int]) -> int:
    """Make the routes map equal to the kernel's view; returns the number of writes.

    When anything changed, the next-hop epoch moves on: every cached next hop (a
    backend's, a flow's, both directions) is resolved again on its next packet."""
    wanted = kernel_next_hops(ifindexes)
    current = {bytes(k): (RouteKey.from_buffer_copy(k), v) for k, v in maps.routes.items()}
    writes = 0
    for k, (key, _) in current.items():
        if k not in wanted:
            maps.routes.delete(key)
            writes += 1
    for k, (key, nh) in wanted.items():
        if k not in current or bytes(current[k][1]) != bytes(nh):
            maps.routes.set(key, nh)
            writes += 1
    if writes:
        bump_nh_epoch(maps)
    return writes


def bump_nh_epoch(maps: DataPlaneMaps) -> None:
    epoch = maps.maps["nh_epoch"]
    epoch.set(U32(0), U32((epoch.get(U32(0)).value + 1) & 0xFFFFFFFF))


def solicit_neighbour(address: ipaddress.IPv4Address | ipaddress.IPv6Address) -> None:
    """Have the kernel resolve a directly connected host's MAC now: one empty datagram to its discard port.

    A DSR backend needs it: a NAT or tunnel packet whose next hop is unresolved is handed to the
    kernel, which resolves the neighbour as it forwards the packet (addressed to the backend); a
    DSR packet, addressed to the VIP, cannot be forwarded so and is dropped
    (drop_neigh_unresolved) until the MAC is known."""
    family = socket.AF_INET6 if address.version == 6 else socket.AF_INET
    with socket.socket(family, socket.SOCK_DGRAM) as sock, contextlib.suppress(OSError):
        sock.sendto(b"", (str(address), 9))


class KernelChanges:
    """Netlink notifications of the kernel's links, neighbours and routes (IPv4 and IPv6), as a
    context manager: wait() says whether any came, after letting a burst settle."""

    GROUPS = RTMGRP_LINK | RTMGRP_NEIGH | RTMGRP_IPV4_ROUTE | RTMGRP_IPV6_ROUTE

    def __enter__(self) -> "KernelChanges":
        self.ipr = IPRoute()
        self.ipr.bind(groups=self.GROUPS)
        return self

    def __exit__(self, *exc: object) -> None:
        self.ipr.close()

    def wait(self, timeout: float, settle: float = 0.1) -> bool:
        """True once notifications arrived (within `timeout`), drained until `settle` passes quietly."""
        if not self._ready(timeout):
            return False
        while True:
            self.ipr.get()  # the messages themselves do not matter: the mirror is read again whole
            if not self._ready(settle):
                return True

    def _ready(self, timeout: float) -> bool:
        return bool(select.select([self.ipr.fileno()], [], [], timeout)[0])
