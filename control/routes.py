"""Mirror the kernel's routes and neighbours into the data plane's routes map, and follow them
(every changing command refreshes the mirror; the daemon also on every netlink notification).

For the interfaces the LB uses: every resolved neighbour becomes a host route
(/32) carrying its MAC; every route via a resolved gateway becomes a prefix
route carrying the gateway's MAC. Every other route of the main table (ECMP,
blackhole, unreachable, on-link, via another interface or an unresolved
gateway) becomes an entry without a next hop, which sends the data plane to the
kernel FIB (bpf_fib_lookup), so a less specific mirrored route never stands in
for it. With policy routing (ip rules beyond the defaults), or more routes than
the map holds, nothing is mirrored: the FIB decides everything."""
from __future__ import annotations

import contextlib
import ipaddress
import select
import socket

from lb import rtnl
from lb.maps import U32, DataPlaneMaps
from lb.structs import EgressVlan, IPAddress, LbAddr, NextHop, RouteKey

ETH_P_8021Q = 0x8100
# NUD states whose lladdr can be used to send
_USABLE_NUD = 0x02 | 0x04 | 0x08 | 0x10 | 0x80  # REACHABLE, STALE, DELAY, PROBE, PERMANENT


def _route_key(network: ipaddress.IPv4Network | ipaddress.IPv6Network) -> RouteKey:
    plen = network.prefixlen + (96 if network.version == 4 else 0)
    return RouteKey(prefixlen=plen, addr=LbAddr.of(network.network_address))


def _next_hop(ifindex: int, smac: bytes, dmac: bytes) -> NextHop:
    nh = NextHop(ifindex=ifindex)
    nh.smac[:] = list(smac)
    nh.dmac[:] = list(dmac)
    return nh


# ip rules every namespace starts with: (priority, table) of local, main, default
_DEFAULT_RULES = {(0, 255), (32766, 254), (32767, 253)}
_RTN_UNICAST = 1


def policy_routing() -> bool:
    """Does any rule beyond the defaults choose the table (so the main table is not the whole story)?"""
    return any((r.priority, r.table) not in _DEFAULT_RULES
               for family in (socket.AF_INET, socket.AF_INET6) for r in rtnl.rules(family))


def kernel_next_hops(ifindexes: set[int]) -> dict[bytes, tuple[RouteKey, NextHop]]:
    """What the routes map should hold, read from the kernel over netlink."""
    out: dict[bytes, tuple[RouteKey, NextHop]] = {}
    if policy_routing():
        return out
    link_macs = {link.index: link.address.ljust(6, b"\0")[:6] for link in rtnl.links() if link.index in ifindexes}
    neighbours: dict[tuple[int, IPAddress], bytes] = {}
    for family in (socket.AF_INET, socket.AF_INET6):
        for n in rtnl.neighbours(family):
            if n.ifindex in ifindexes and n.dst and n.lladdr and n.state & _USABLE_NUD:
                neighbours[(n.ifindex, n.dst)] = n.lladdr
                key = _route_key(ipaddress.ip_network(n.dst))
                out[bytes(key)] = (key, _next_hop(n.ifindex, link_macs[n.ifindex], n.lladdr))
        for r in rtnl.routes(family, table=254):
            key = _route_key(r.dst)
            if r.type != _RTN_UNICAST:  # blackhole, unreachable, prohibit: the FIB says so, whatever else
                out[bytes(key)] = (key, NextHop())
            elif r.oif in ifindexes and r.gateway and (r.oif, r.gateway) in neighbours and not r.multipath:
                # a more specific neighbour entry wins over a route to the same prefix
                out.setdefault(bytes(key), (key, _next_hop(r.oif, link_macs[r.oif], neighbours[(r.oif, r.gateway)])))
            else:  # ECMP, on-link, another interface, an unresolved gateway: the FIB decides
                out.setdefault(bytes(key), (key, NextHop()))
    return out


def sync_routes(maps: DataPlaneMaps, ifindexes: set[int]) -> int:
    """Make the routes map (and egress_vlans) equal to the kernel's view; returns the number of writes.

    When anything changed, the next-hop epoch moves on: every cached next hop (a
    backend's, a flow's, both directions) is resolved again on its next packet."""
    wanted = kernel_next_hops(ifindexes)
    if len(wanted) > maps.routes.max_entries:  # a partial mirror would be wrong: the FIB decides everything
        wanted = {}
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
    return writes + sync_vlans(maps)


def vlan_devices(links: list[rtnl.Link]) -> dict[int, EgressVlan]:
    """The VLAN devices among the kernel's links: ifindex -> lower device and tag."""
    out: dict[int, EgressVlan] = {}
    for link in links:
        if link.kind != "vlan":
            continue
        if not link.lower or link.vlan_id is None:  # a VLAN in another namespace's device, or malformed: the kernel's
            continue
        proto = link.vlan_protocol or ETH_P_8021Q
        out[link.index] = EgressVlan(lower_ifindex=link.lower, proto=socket.htons(proto),
                                     tci=socket.htons(link.vlan_id & 0xFFF))
    return out


def sync_vlans(maps: DataPlaneMaps) -> int:
    """Make the egress_vlans map equal to the kernel's VLAN devices; returns the number of writes."""
    wanted = vlan_devices(rtnl.links())
    if len(wanted) > maps.egress_vlans.max_entries:  # the rest are sent as any unmanaged egress is
        wanted = dict(sorted(wanted.items())[:maps.egress_vlans.max_entries])
    current = {k.value: bytes(v) for k, v in maps.egress_vlans.items()}
    writes = 0
    for ifindex in current.keys() - wanted.keys():
        maps.egress_vlans.delete(U32(ifindex))
        writes += 1
    for ifindex, vlan in wanted.items():
        if current.get(ifindex) != bytes(vlan):
            maps.egress_vlans.set(U32(ifindex), vlan)
            writes += 1
    return writes


def bump_nh_epoch(maps: DataPlaneMaps) -> None:
    epoch = maps.maps["nh_epoch"]
    epoch.set(U32(0), U32((epoch.get(U32(0)).value + 1) & 0xFFFFFFFF))


NTF_EXT_MANAGED = 1 << 0  # NDA_FLAGS_EXT: the kernel keeps the entry resolved (Linux 5.16+)
_NUD_REACHABLE = 0x02
_NUD_PERMANENT = 0x80


def keep_resolved(address: ipaddress.IPv4Address | ipaddress.IPv6Address) -> bool:
    """Make a directly connected host's neighbour entry "managed": the kernel resolves it and keeps
    it resolved, though the kernel itself never sends to it (otherwise it would garbage-collect the
    entry, and lb drops DSR packets to an unresolved backend). False if that could not be done (the
    host is not on a link, or the kernel predates managed neighbours)."""
    from pyroute2 import IPRoute  # writes go through pyroute2 (lb/rtnl.py only reads)

    family = socket.AF_INET6 if address.version == 6 else socket.AF_INET
    with IPRoute() as ipr:
        try:
            route = ipr.route("get", dst=str(address), family=family)[0]
        except Exception:  # noqa: BLE001 (no route: nothing to keep)
            return False
        oif = route.get_attr("RTA_OIF")
        if route["type"] != _RTN_UNICAST or route.get_attr("RTA_GATEWAY") or not oif:
            return False
        current = next((n for n in ipr.get_neighbours(family=family, ifindex=oif)
                        if n.get_attr("NDA_DST") == str(address)), None)
        if current is not None and ((current.get_attr("NDA_FLAGS_EXT") or 0) & NTF_EXT_MANAGED
                                    or current["state"] & _NUD_PERMANENT):  # the operator's: left alone
            return True
        known = {}
        if current is not None and current.get_attr("NDA_LLADDR") and current["state"] & _USABLE_NUD:
            known = {"lladdr": current.get_attr("NDA_LLADDR"), "state": _NUD_REACHABLE}  # keep what it knows
        try:
            ipr.neigh("replace", dst=str(address), ifindex=oif, family=family, NDA_FLAGS_EXT=NTF_EXT_MANAGED,
                      **({"state": 0} | known))
        except Exception:  # noqa: BLE001 (an older kernel: soliciting remains)
            return False
    return True


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

    GROUPS = rtnl.RTMGRP_LINK | rtnl.RTMGRP_NEIGH | rtnl.RTMGRP_IPV4_ROUTE | rtnl.RTMGRP_IPV6_ROUTE

    def __enter__(self) -> "KernelChanges":
        from pyroute2 import IPRoute
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
