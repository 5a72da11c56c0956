"""The decapsulation program of tunnel-mode backends (bpf/decap.c): compile, attach, detach, count.

Per network namespace, its pins live in <bpffs>/lb-decap/<netns>/: the counters,
the host's addresses the program decapsulates for, the VIPs it serves (a tunnel
packet whose inner destination is another address is dropped), the outer
sources it accepts, and one pin of the program per interface it is attached to
(named HOOK@IFACE), which is how detach knows the hook and when the last
interface is gone."""
from __future__ import annotations

import contextlib
import errno
import ipaddress
import os
import socket
from dataclasses import dataclass
from typing import Iterable, Sequence

from pyroute2 import IPRoute
from pyroute2.netlink.exceptions import NetlinkError

from lb import bpfsys
from lb.loader import (BPF_DIR, XDP_FLAGS_DRV_MODE, LoadError, attached_prog_id, compile_programs,
                       interface_index)
from lb.maps import U32, U64, BpfMap
from lb.pins import Instance, stable_bpffs
from lb.private import private_dir
from lb.structs import IPAddress, LbAddr, RouteKey

HOOKS = ("xdp", "tc")
FAMILIES = ("ipv4", "ipv6")  # decap_stats keys 0 and 1
REFUSALS = ("not_a_vip", "source")  # decap_stats keys 2 and 3: tunnel packets dropped, by reason
IPNetwork = ipaddress.IPv4Network | ipaddress.IPv6Network
TC_INGRESS = "ffff:fff2"
TC_HANDLE = 0xDECA  # our filter on the interface's clsact ingress
TC_PRIO = 0xDECA


class DecapError(ValueError):
    """A request the decapsulation program cannot do (unknown interface, nothing attached)."""


def pin_dir(bpffs: str | None = None) -> str:
    return os.path.join(bpffs or stable_bpffs(), "lb-decap", Instance.current().name)


def _marker(directory: str, hook: str, ifname: str) -> str:
    return os.path.join(directory, f"{hook}@{ifname}")


def attached_interfaces(directory: str | None = None) -> dict[str, str]:
    """Interface -> hook, of this namespace."""
    directory = directory or pin_dir()
    if not os.path.isdir(directory):
        return {}
    return {name.split("@", 1)[1]: name.split("@", 1)[0] for name in os.listdir(directory) if "@" in name}


def load(directory: str, hook: str) -> int:
    """A fresh program fd; the maps are created, or adopted, at their pins."""
    private_dir(os.path.dirname(directory))  # <bpffs>/lb-decap
    private_dir(directory)
    function = b"xdp_decap" if hook == "xdp" else b"tc_decap"
    fds = compile_programs(BPF_DIR / "decap.c", [f"-I{BPF_DIR}", f'-DDECAP_PIN_DIR="{directory}"'],
                           {function: "XDP" if hook == "xdp" else "SCHED_CLS"}, "the decapsulation program")
    return fds[function]


def local_addresses(ipr: IPRoute) -> set[ipaddress.IPv4Address | ipaddress.IPv6Address]:
    return {ipaddress.ip_address(a.get_attr("IFA_ADDRESS")) for family in (socket.AF_INET, socket.AF_INET6)
            for a in ipr.get_addr(family=family)}


def loopback_vips(ipr: IPRoute) -> set[IPAddress]:
    """The addresses held on lo besides the loopback ones: where tunnel backends hold their VIPs."""
    lo = ipr.link_lookup(ifname="lo")
    if not lo:
        return set()
    found = {ipaddress.ip_address(a.get_attr("IFA_ADDRESS")) for family in (socket.AF_INET, socket.AF_INET6)
             for a in ipr.get_addr(family=family, index=lo[0])}
    return {a for a in found if not a.is_loopback}


def parse_addresses(texts: Iterable[str]) -> list[IPAddress]:
    try:
        found = [ipaddress.ip_address(t) for t in texts]
    except ValueError as e:
        raise DecapError(f"--vip: {e}") from None
    if any(a.is_unspecified for a in found):
        raise DecapError("--vip: an unspecified address (0.0.0.0 or ::) is not a VIP")
    return found


def parse_prefixes(texts: Iterable[str]) -> list[IPNetwork]:
    try:
        return [ipaddress.ip_network(t) for t in texts]
    except ValueError as e:
        raise DecapError(f"--source: {e}") from None


def _route_key(prefix: IPNetwork) -> RouteKey:
    """IPv4 prefixes sit under ::ffff:0:0/96, like the addresses the program looks up."""
    return RouteKey(prefix.prefixlen + (96 if prefix.version == 4 else 0), LbAddr.of(prefix.network_address))


def _make_set(path: str, key_type: type, wanted: Sequence) -> None:
    """Make a pinned map's keys exactly these (value 1): new keys first, then the old ones go."""
    table = BpfMap(path, key_type, U32)
    try:
        keep = {bytes(k) for k in wanted}
        for key in wanted:
            table.set(key, U32(1))
        for key in list(table.keys()):
            if bytes(key) not in keep:
                table.delete(key)
    finally:
        table.close()


def sync_addresses(directory: str, vips: Sequence[IPAddress] | None = None,
                   sources: Sequence[IPNetwork] | None = None) -> dict[str, int]:
    """Make the program's sets this namespace's addresses, the VIPs served (given, or those held on
    lo) and the accepted outer sources (given, or any); returns how many of each."""
    with IPRoute() as ipr:
        addresses = local_addresses(ipr)
        served = set(vips) if vips else loopback_vips(ipr)
    prefixes = list(sources) if sources else [ipaddress.ip_network("::/0")]
    if not os.path.exists(os.path.join(directory, "decap_vips")):
        raise DecapError("the decapsulation program attached here predates VIP filtering; "
                         "lbctl decap detach, then attach, on each interface")
    _make_set(os.path.join(directory, "decap_addrs"), LbAddr, [LbAddr.of(a) for a in addresses])
    _make_set(os.path.join(directory, "decap_vips"), LbAddr, [LbAddr.of(a) for a in served])
    _make_set(os.path.join(directory, "decap_sources"), RouteKey, [_route_key(p) for p in prefixes])
    return {"addresses": len(addresses), "vips": len(served), "sources": len(sources or [])}


def attach(ifname: str, hook: str = "xdp", vips: Sequence[IPAddress] | None = None,
           sources: Sequence[IPNetwork] | None = None) -> dict:
    """Decapsulate on an interface, for the VIPs given (default: those held on lo) and from the
    outer sources given (default: any). Already attached with this hook: only take the host's
    addresses, VIPs and sources again (after one was added or removed)."""
    if hook not in HOOKS:
        raise DecapError(f"unknown hook {hook!r} (expected xdp or tc)")
    directory = pin_dir()
    with IPRoute() as ipr:
        ifindex = interface_index(ifname)
        current = attached_interfaces(directory).get(ifname)
        if current is not None and current != hook:
            raise DecapError(f"{ifname}: decapsulation is attached with {current}; detach it first to use {hook}")
        if current is not None:
            return {"interface": ifname, "hook": hook, **sync_addresses(directory, vips, sources), "resynced": True}
        other = attached_prog_id(ifindex) if hook == "xdp" else 0
        if other:  # never replace someone else's program (the load balancer's, say)
            raise DecapError(f"{ifname}: another XDP program (id {other}) is attached; detach it first or use --hook tc")
        try:
            fd = load(directory, hook)
            try:
                counts = sync_addresses(directory, vips, sources)  # before the program sees a packet
                if hook == "xdp":
                    _attach_xdp(ipr, ifindex, ifname, fd)
                else:
                    _attach_tc(ipr, ifindex, fd)
                bpfsys.obj_pin(fd, _marker(directory, hook, ifname))
            finally:
                os.close(fd)
        except BaseException:
            _remove_if_unused(directory)  # the maps were pinned by the compile
            raise
    return {"interface": ifname, "hook": hook, **counts}


def _attach_xdp(ipr: IPRoute, ifindex: int, ifname: str, fd: int) -> None:
    try:
        ipr.link("set", index=ifindex, xdp={"attrs": [("IFLA_XDP_FD", fd), ("IFLA_XDP_FLAGS", XDP_FLAGS_DRV_MODE)]})
    except NetlinkError as e:
        if e.code in (errno.EOPNOTSUPP, errno.EINVAL):
            raise LoadError(f"{ifname}: no native XDP on this interface; use --hook tc") from e
        raise LoadError(f"{ifname}: attaching XDP failed: {os.strerror(e.code)}") from e


def _attach_tc(ipr: IPRoute, ifindex: int, fd: int) -> None:
    try:
        ipr.tc("add", "clsact", index=ifindex)
    except NetlinkError as e:
        if e.code != errno.EEXIST:  # an existing clsact qdisc is shared
            raise LoadError(f"adding the clsact qdisc failed: {os.strerror(e.code)}") from e
    try:
        ipr.tc("add-filter", "bpf", index=ifindex, handle=TC_HANDLE, prio=TC_PRIO, fd=fd, name="lb_decap",
               parent=TC_INGRESS, classid=1, direct_action=True)
    except NetlinkError as e:
        raise LoadError(f"adding the TC ingress filter failed: {os.strerror(e.code)}") from e


def detach(ifname: str) -> dict:
    directory = pin_dir()
    hook = attached_interfaces(directory).get(ifname)
    if hook is None:
        raise DecapError(f"{ifname}: decapsulation is not attached (see: lbctl decap stats)")
    marker = _marker(directory, hook, ifname)
    with IPRoute() as ipr:
        ifindex = ipr.link_lookup(ifname=ifname)
        if ifindex and hook == "xdp" and attached_prog_id(ifindex[0]) == _pinned_prog_id(marker):
            ipr.link("set", index=ifindex[0], xdp={"attrs": [("IFLA_XDP_FD", -1),
                                                             ("IFLA_XDP_FLAGS", XDP_FLAGS_DRV_MODE)]})
        elif ifindex:
            with contextlib.suppress(NetlinkError):  # already gone with its qdisc: nothing to remove
                ipr.tc("del-filter", "bpf", index=ifindex[0], handle=TC_HANDLE, prio=TC_PRIO, parent=TC_INGRESS)
    os.unlink(marker)
    _remove_if_unused(directory)
    return {"interface": ifname, "hook": hook}


def _remove_if_unused(directory: str) -> None:
    """Without an interface left, the counters and addresses go too."""
    if os.path.isdir(directory) and not attached_interfaces(directory):
        for name in os.listdir(directory):
            os.unlink(os.path.join(directory, name))
        os.rmdir(directory)


def _pinned_prog_id(path: str) -> int:
    fd = bpfsys.obj_get(path)
    try:
        return bpfsys.prog_id(fd)
    finally:
        os.close(fd)


@dataclass
class DecapStats:
    interfaces: dict[str, str]
    packets: dict[str, int]  # "ipv4" / "ipv6" -> decapsulated packets
    refused: dict[str, int]  # reason -> tunnel packets dropped


def stats() -> DecapStats:
    directory = pin_dir()
    interfaces = attached_interfaces(directory)
    if not interfaces:
        return DecapStats({}, {f: 0 for f in FAMILIES}, {r: 0 for r in REFUSALS})
    counters = BpfMap(os.path.join(directory, "decap_stats"), U32, U64)
    try:
        def count(key: int) -> int:
            return sum(counters.get(U32(key)) or [])
        return DecapStats(interfaces, {f: count(i) for i, f in enumerate(FAMILIES)},
                          {r: count(len(FAMILIES) + i) for i, r in enumerate(REFUSALS)})
    finally:
        counters.close()
