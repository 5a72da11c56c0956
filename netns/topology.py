"""A lab network: one client, one load balancer and N backends, each in its own
network namespace, joined by veth pairs (client <-> LB, LB <-> each backend).

    client 198.18.0.2 --- 198.18.0.1 [LB] 198.18.i.1 --- 198.18.i.2 backend i
           2001:2:0:0::2   2001:2:0:0::1   2001:2:0:i::1   2001:2:0:i::2

The client reaches the VIP ranges (198.19.0.0/24, 2001:2:0:ff::/64) through
the LB; backends reply through it.

With direct_return (for dsr and tunnel VIPs, whose backends answer clients
themselves), each backend also gets a link of its own to the client that
bypasses the LB, and its route to the client goes there:

    client ret-b<i> 198.18.<100+i>.1 --- 198.18.<100+i>.2 ret0 backend i
                    2001:2:0:<64+i>::1    2001:2:0:<64+i>::2

Replies to NAT VIPs then bypass the LB too: such a lab is for dsr and tunnel. Addresses are from the ranges set aside for
benchmarks: 198.18.0.0/15 (RFC 2544) and 2001:2::/48 (RFC 5180). Names carry a per-run prefix; `with Lab.build(...)`
always tears everything down."""
from __future__ import annotations

import contextlib
import ipaddress
import os
import secrets
import socket
import time
from dataclasses import dataclass, field
from typing import Iterator

from pyroute2 import netns
from pyroute2.ethtool import Ethtool

from lb import bpfsys
from netns.nsenter import in_netns, netlink_in, socket_in, write_sysctl

VIP_NETWORK = ipaddress.ip_network("198.19.0.0/24")
VIP6_NETWORK = ipaddress.ip_network("2001:2:0:ff::/64")
IFA_F_NODAD = 0x02  # lab addresses are usable at once
XDP_PASS = 2
XDP_DRV_MODE = 1 << 2


def lab_mac(subnet: int, host: int) -> str:
    """MAC of host .<host> on lab link 198.18.<subnet>.0/24."""
    return f"02:00:00:00:{subnet:02x}:{host:02x}"


End = tuple[str, str, ipaddress.IPv4Address, ipaddress.IPv6Address]  # namespace, interface, addresses


def veth_pair(subnet: int, end: End, peer: End) -> None:
    """A veth pair on lab link 198.18.<subnet>.0/24, `end` being host .1 and `peer` host .2, each up
    with its IPv4 /24 and IPv6 /64 address (no DAD: usable at once). Fixed MACs (02: locally
    administered, lab_mac) make packet fixtures literal."""
    (ns, ifname, _, _), (peer_ns, peer_ifname, _, _) = end, peer
    with netlink_in(ns) as ipr:
        ipr.link("add", ifname=ifname, kind="veth", address=lab_mac(subnet, 1),
                 peer={"ifname": peer_ifname, "net_ns_fd": peer_ns, "address": lab_mac(subnet, 2)})
    for where, name, address, address6 in (end, peer):
        with netlink_in(where) as ipr:
            idx = ipr.link_lookup(ifname=name)[0]
            ipr.addr("add", index=idx, address=str(address), prefixlen=24)
            ipr.addr("add", index=idx, address=str(address6), prefixlen=64, flags=IFA_F_NODAD)
            ipr.link("set", index=idx, state="up")


def set_tx_checksum(ns: str, ifname: str, on: bool) -> None:
    """TX checksum offload of a veth end (`ethtool -K IFNAME tx on|off`)."""
    with in_netns(ns):
        with contextlib.closing(Ethtool()) as ethtool:
            features = ethtool.get_features(ifname)
            for name in ("tx-checksum-ip-generic", "tx-checksum-sctp"):  # what `tx off` switches on a veth
                if name in features.features:
                    features.features[name].enable = on
            ethtool.set_features(ifname, features)


def run_prefix() -> str:
    """Unique per run: two runs on one machine never share a name. LB_LAB_PREFIX (short: namespace
    names carry it) tells apart the labs of several checkouts working on one machine."""
    return f"{os.environ.get('LB_LAB_PREFIX', 'lb')}{os.getpid() % 100000}{secrets.token_hex(2)}"


@dataclass(frozen=True)
class Host:
    """One end of a lab link: a namespace, its interface and address, and its side of the LB."""

    ns: str
    ifname: str
    address: ipaddress.IPv4Address
    mac: str
    lb_ifname: str  # the LB's interface on this link
    lb_address: ipaddress.IPv4Address
    lb_mac: str
    address6: ipaddress.IPv6Address
    lb_address6: ipaddress.IPv6Address


@dataclass(frozen=True)
class DirectLink:
    """A backend's own link to the client (direct return), bypassing the LB."""

    backend: Host
    client_ifname: str  # its end in the client's namespace
    backend_ifname: str = "ret0"


@dataclass
class Lab:
    prefix: str
    lb_ns: str
    client: Host
    backends: list[Host]
    namespaces: list[str] = field(default_factory=list)
    direct_links: list[DirectLink] = field(default_factory=list)  # with direct_return: one per backend
    hosts_tx_checksum: bool = True  # the hosts' veths offload TX checksums (Lab.build)
    lb_tx_checksum: bool = True  # the LB's veths offload TX checksums

    @property
    def lb_interfaces(self) -> list[str]:
        return [self.client.lb_ifname] + [b.lb_ifname for b in self.backends]

    def vip(self, index: int = 1) -> ipaddress.IPv4Address:
        return VIP_NETWORK[index]

    def vip6(self, index: int = 1) -> ipaddress.IPv6Address:
        return VIP6_NETWORK[index]

    @classmethod
    @contextlib.contextmanager
    def build(cls, n_backends: int = 3, prefix: str | None = None, direct_return: bool = False,
              hosts_tx_checksum: bool = True, lb_tx_checksum: bool = True) -> Iterator["Lab"]:
        """hosts_tx_checksum: the hosts keep the kernel's default, TX checksum offload on, so their
        frames reach the LB with partial checksums, as a container's or a VM's do (lbctl attach then
        picks generic XDP); False: full checksums, as from a NIC's wire (native XDP: the bench).
        lb_tx_checksum False: the LB's own interfaces compute checksums in software, as a NIC
        without checksum offload does (what reveals a TC rewrite wrong for a partial checksum)."""
        prefix = prefix or run_prefix()
        lab = cls(prefix, f"{prefix}-lb", None, [])  # type: ignore[arg-type]
        lab.hosts_tx_checksum, lab.lb_tx_checksum = hosts_tx_checksum, lb_tx_checksum
        try:
            lab._create(n_backends)
            if direct_return:
                lab._add_direct_return()
            yield lab
        finally:
            lab.teardown()

    def _create(self, n_backends: int) -> None:
        self._add_ns(self.lb_ns)
        write_sysctl(self.lb_ns, "net.ipv4.ip_forward", "1")
        write_sysctl(self.lb_ns, "net.ipv6.conf.all.forwarding", "1")
        # Replies leave the LB with the VIP as source, which no LB route points back to.
        for key in ("net.ipv4.conf.all.rp_filter", "net.ipv4.conf.default.rp_filter"):
            write_sysctl(self.lb_ns, key, "0")
        self.client = self._link("client", "to-client", 0)
        self.backends = [self._link(f"b{i}", f"to-b{i}", i) for i in range(1, n_backends + 1)]
        with netlink_in(self.client.ns) as ipr:
            ipr.route("add", dst=str(VIP_NETWORK), gateway=str(self.client.lb_address))
            ipr.route("add", dst=str(VIP6_NETWORK), gateway=str(self.client.lb_address6))

    def _add_direct_return(self) -> None:
        """A link from each backend straight to the client; the backend's route to the client uses it."""
        for key in ("all", "default"):  # answers from a VIP arrive on links the VIP's route does not use
            write_sysctl(self.client.ns, f"net.ipv4.conf.{key}.rp_filter", "0")
        for i, backend in enumerate(self.backends, start=1):
            subnet = 100 + i
            client_ip, host_ip = (ipaddress.ip_address(f"198.18.{subnet}.{h}") for h in (1, 2))
            client_ip6, host_ip6 = (ipaddress.ip_address(f"2001:2:0:{subnet:x}::{h}") for h in (1, 2))
            ret = f"ret-b{i}"
            veth_pair(subnet, (self.client.ns, ret, client_ip, client_ip6), (backend.ns, "ret0", host_ip, host_ip6))
            write_sysctl(self.client.ns, f"net.ipv4.conf.{ret}.rp_filter", "0")
            for key in ("all", "default", "eth0"):  # clients' packets arrive on eth0, their route is ret0
                write_sysctl(backend.ns, f"net.ipv4.conf.{key}.rp_filter", "0")
            with netlink_in(backend.ns) as ipr:
                ipr.route("add", dst=f"{self.client.address}/32", gateway=str(client_ip))
                ipr.route("add", dst=f"{self.client.address6}/128", gateway=str(client_ip6), family=socket.AF_INET6)
            self.direct_links.append(DirectLink(backend, ret))

    def hold_vip(self, backend: Host, address: ipaddress.IPv4Address | ipaddress.IPv6Address) -> None:
        """Put a VIP on a backend's loopback, as dsr and tunnel backends need, without announcing it:
        the backend answers ARP/ND only for addresses of the interface asked on. Where the backend
        decapsulates, it then serves the VIP (lbctl decap attach again)."""
        write_sysctl(backend.ns, "net.ipv4.conf.all.arp_ignore", "1")
        write_sysctl(backend.ns, "net.ipv4.conf.all.arp_announce", "2")
        with netlink_in(backend.ns) as ipr:
            lo = ipr.link_lookup(ifname="lo")[0]
            plen = 32 if address.version == 4 else 128
            ipr.addr("add", index=lo, address=str(address), prefixlen=plen,
                     **({} if address.version == 4 else {"flags": IFA_F_NODAD}))
        # As an operator does: decapsulation takes the VIPs held on lo when attached (again).
        from netns.lbctl import run_lbctl  # here: netns.lbctl imports this module
        attached = run_lbctl(backend.ns, "decap", "stats", "--json").json()["interfaces"]
        for ifname, hook in list(attached.items())[:1]:  # one set of VIPs serves every interface
            run_lbctl(backend.ns, "decap", "attach", ifname, "--hook", hook)

    @staticmethod
    def remove_pass_program(host: Host) -> None:
        """Take the lab's XDP_PASS program off a host's link, to make room for another (lbctl decap attach).
        Frames the LB redirects still arrive: GRO stays on."""
        with netlink_in(host.ns) as ipr:
            idx = ipr.link_lookup(ifname=host.ifname)[0]
            ipr.link("set", index=idx, xdp={"attrs": [("IFLA_XDP_FD", -1), ("IFLA_XDP_FLAGS", XDP_DRV_MODE)]})

    def _add_ns(self, name: str) -> None:
        netns.create(name)
        self.namespaces.append(name)
        with netlink_in(name) as ipr:
            ipr.link("set", index=ipr.link_lookup(ifname="lo")[0], state="up")

    def _link(self, role: str, lb_ifname: str, subnet: int) -> Host:
        """A namespace for `role`, linked to the LB by a veth pair on 198.18.<subnet>.0/24."""
        ns = f"{self.prefix}-{role}"
        self._add_ns(ns)
        host_ip = ipaddress.ip_address(f"198.18.{subnet}.2")
        lb_ip = ipaddress.ip_address(f"198.18.{subnet}.1")
        host_ip6 = ipaddress.ip_address(f"2001:2:0:{subnet:x}::2")
        lb_ip6 = ipaddress.ip_address(f"2001:2:0:{subnet:x}::1")
        veth_pair(subnet, (self.lb_ns, lb_ifname, lb_ip, lb_ip6), (ns, "eth0", host_ip, host_ip6))
        write_sysctl(self.lb_ns, f"net.ipv4.conf.{lb_ifname}.rp_filter", "0")
        with netlink_in(ns) as ipr:
            ipr.route("add", dst="default", gateway=str(lb_ip))
            ipr.route("add", dst="::/0", gateway=str(lb_ip6), family=socket.AF_INET6)
        self._prepare_peer(ns, "eth0", self.hosts_tx_checksum)
        if not self.lb_tx_checksum:
            set_tx_checksum(self.lb_ns, lb_ifname, False)
        return Host(ns, "eth0", host_ip, lab_mac(subnet, 2), lb_ifname, lb_ip, lab_mac(subnet, 1), host_ip6, lb_ip6)

    @staticmethod
    def _prepare_peer(ns: str, ifname: str, tx_checksum: bool) -> None:
        """A veth end takes frames that XDP sends into it only with GRO on (XDP_REDIRECT) or an
        XDP program of its own (XDP_TX): the lab's hosts get both, a program that passes all.
        TX checksum offload stays as the kernel made it unless tx_checksum is False."""
        prog = bpfsys.load_xdp_return(XDP_PASS, b"lab_pass")
        try:
            with netlink_in(ns) as ipr:
                idx = ipr.link_lookup(ifname=ifname)[0]
                ipr.link("set", index=idx, xdp={"attrs": [("IFLA_XDP_FD", prog), ("IFLA_XDP_FLAGS", XDP_DRV_MODE)]})
        finally:
            os.close(prog)
        with in_netns(ns):
            with contextlib.closing(Ethtool()) as ethtool:
                features = ethtool.get_features(ifname)
                features.features["rx-gro"].enable = True
                ethtool.set_features(ifname, features)
        if not tx_checksum:
            set_tx_checksum(ns, ifname, False)

    def pin_neighbours(self) -> None:
        """Make the LB's neighbour entries (learned by resolve_neighbours) permanent: a long test run on a
        loaded machine must not see one go stale, get garbage-collected and the packet go to the kernel."""
        with netlink_in(self.lb_ns) as ipr:
            for family in (socket.AF_INET, socket.AF_INET6):
                for n in ipr.get_neighbours(family=family):
                    mac, dst = n.get_attr("NDA_LLADDR"), n.get_attr("NDA_DST")
                    if mac and dst and n["state"] & 0x1E:  # reachable, stale, delay, probe
                        ipr.neigh("replace", dst=dst, lladdr=mac, ifindex=n["ifindex"], family=family,
                                  state=0x80)  # NUD_PERMANENT

    def resolve_neighbours(self, timeout: float = 5.0) -> None:
        """Have the LB learn every host's MAC, IPv4 and IPv6 (as traffic would), polling until it has."""
        wanted = {str(a) for h in (self.client, *self.backends) for a in (h.address, h.address6)}
        socks = {4: socket_in(self.lb_ns, socket.AF_INET, socket.SOCK_DGRAM),
                 6: socket_in(self.lb_ns, socket.AF_INET6, socket.SOCK_DGRAM)}
        deadline = time.monotonic() + timeout
        try:
            while True:
                with netlink_in(self.lb_ns) as ipr:
                    known = {str(ipaddress.ip_address(n.get_attr("NDA_DST")))
                             for family in (socket.AF_INET, socket.AF_INET6)
                             for n in ipr.get_neighbours(family=family)
                             if n.get_attr("NDA_LLADDR") and n["state"] & 0x9E}  # a usable MAC (NUD_VALID but NOARP)
                missing = sorted(wanted - known)
                if not missing:
                    return
                if time.monotonic() > deadline:
                    raise TimeoutError(f"LB did not resolve {missing}")
                for address in missing:
                    with contextlib.suppress(OSError):  # a route still coming up: try again next round
                        socks[ipaddress.ip_address(address).version].sendto(b"resolve", (address, 9))
                time.sleep(0.05)
        finally:
            for sock in socks.values():
                sock.close()

    def teardown(self) -> None:
        for name in reversed(self.namespaces):
            with contextlib.suppress(Exception):
                netns.remove(name)
        self.namespaces.clear()
