"""A cluster lab: clients behind a BGP router that spreads flows by an L4 hash (ECMP) over three LB
nodes, each with its own `lbctl daemon` announcing the VIP over BGP (ExaBGP), its own data
plane, and the same backends behind them; one etcd holds the desired state.

    client 198.18.0.2 --- 198.18.0.1 [router: BIRD 2, ECMP, L4 hash, etcd on 198.18.50.1:2379]
                                      198.18.1i.1 --- 198.18.1i.2 up0 [LB node i] down0 198.18.50.1i
                                      br0 198.18.50.1 (bridge: nodes' down0, backends' eth0)
    backend j 198.18.50.(100+j), the VIP on its loopback (dsr), default route via 198.18.50.1
    node i also holds 198.18.50.3i on down0: its full NAT source (snat), and routes clients via the router
    IPv6 beside IPv4: 198.18.X.Y is also fd00:18:X::Y, and each node has a second BGP session, over IPv6
    (a session carries the VIPs of its own IP version)

The router learns the VIP's /32 from every node (next hop: the node's up0) and installs one
multipath route; clients reach the VIP through it. Backends answer clients directly through
the router (dsr). A full-NAT VIP's flows reach the backends from the source address of the node
that carries them, which that node alone answers ARP for on the bridge: the backends' replies come
back to it, and it sends them on to the client through the router. The lab knows lb only as commands (lbctl); nothing of the product imports it.
`with Cluster.build() as cluster:` always tears everything down: daemons, ExaBGP (it dies with
its daemon), BIRD, etcd, namespaces, files."""
from __future__ import annotations

import contextlib
import http.client
import ipaddress
import os
import shutil
import signal
import socket
import subprocess
import tempfile
import time
from dataclasses import dataclass, field
from typing import Iterator

from lb.maps import DataPlaneMaps
from lb.structs import FLOW_CLOSING, LbAddr
from netns.lbctl import STATE_DIR, DaemonProcess, run_lbctl
from netns.nsenter import in_netns, netlink_in, write_sysctl
from netns.topology import Lab, lab_mac, run_prefix
from netns.traffic import stop_process, wait_for

ROUTER_AS, NODE_AS = 65000, 65001
SERVICE_NET = 50  # 198.18.50.0/24: the bridge of nodes and backends
ETCD_PORT = 2379
RUN_DIR = "/run/lb"
BPFFS = "/run/lb/bpffs/lb"  # where lb pins each namespace's maps (bind mount of /sys/fs/bpf)
ROUTER_SERVICE_ADDRESS = ipaddress.ip_address(f"198.18.{SERVICE_NET}.1")


@dataclass
class Node:
    name: str
    ns: str
    up_address: ipaddress.IPv4Address  # on up0, towards the router: the BGP session and next hop
    router_address: ipaddress.IPv4Address  # the router's end of up0's link
    up_address6: ipaddress.IPv6Address  # the same for IPv6 VIPs: their own BGP session
    router_address6: ipaddress.IPv6Address
    down_address: ipaddress.IPv4Address  # on down0, the backends' bridge
    snat_address: ipaddress.IPv4Address  # on down0 too: full NAT's source, this node's own (lbctl snat add)
    store: str  # its --store URL
    daemon: DaemonProcess | None = None


@dataclass
class Backend:
    name: str
    ns: str
    address: ipaddress.IPv4Address
    address6: ipaddress.IPv6Address


def v6(address: str) -> ipaddress.IPv6Address:
    """The lab's IPv6 twin of one of its IPv4 addresses: 198.18.X.Y is fd00:18:X::Y."""
    _, _, x, y = address.split(".")
    return ipaddress.ip_address(f"fd00:18:{x}::{y}")


@dataclass
class Cluster:
    prefix: str
    workdir: str
    router_ns: str = ""
    client_ns: str = ""
    client_address: ipaddress.IPv4Address = ipaddress.ip_address("198.18.0.2")
    client_address6: ipaddress.IPv6Address = v6("198.18.0.2")
    nodes: list[Node] = field(default_factory=list)
    backends: list[Backend] = field(default_factory=list)
    namespaces: list[str] = field(default_factory=list)
    etcd: subprocess.Popen | None = None
    bird: subprocess.Popen | None = None

    # --- building -----------------------------------------------------------------------------

    @classmethod
    @contextlib.contextmanager
    def build(cls, n_nodes: int = 3, n_backends: int = 3, prefix: str | None = None) -> Iterator["Cluster"]:
        prefix = prefix or run_prefix()
        cluster = cls(prefix, tempfile.mkdtemp(prefix=f"{prefix}-cluster-"))
        try:
            cluster._create(n_nodes, n_backends)
            yield cluster
        finally:
            cluster.teardown()

    def _add_ns(self, role: str) -> str:
        ns = f"{self.prefix}-{role}"
        subprocess.run(["ip", "netns", "add", ns], check=True)
        self.namespaces.append(ns)
        for key in ("all", "default"):  # addresses usable at once (no duplicate detection in a lab)
            write_sysctl(ns, f"net.ipv6.conf.{key}.accept_dad", "0")
        with netlink_in(ns) as ipr:
            ipr.link("set", index=ipr.link_lookup(ifname="lo")[0], state="up")
        return ns

    @staticmethod
    def _veth(ns: str, ifname: str, peer_ns: str, peer_ifname: str, mac: str, peer_mac: str) -> None:
        with netlink_in(ns) as ipr:
            ipr.link("add", ifname=ifname, kind="veth", address=mac,
                     peer={"ifname": peer_ifname, "net_ns_fd": peer_ns, "address": peer_mac})

    @staticmethod
    def _address(ns: str, ifname: str, address: str, prefixlen: int = 24, master: int | None = None) -> int:
        """`address`/`prefixlen` and its IPv6 twin (/64) on the interface, brought up."""
        with netlink_in(ns) as ipr:
            idx = ipr.link_lookup(ifname=ifname)[0]
            if address:
                ipr.addr("add", index=idx, address=address, prefixlen=prefixlen)
                ipr.addr("add", index=idx, address=str(v6(address)), prefixlen=64)
            if master is not None:
                ipr.link("set", index=idx, master=master)
            ipr.link("set", index=idx, state="up")
            return idx

    def _create(self, n_nodes: int, n_backends: int) -> None:
        self.router_ns = self._add_ns("rtr")
        for key, value in (("net.ipv4.ip_forward", "1"), ("net.ipv4.fib_multipath_hash_policy", "1"),
                           ("net.ipv4.conf.all.rp_filter", "0"), ("net.ipv4.conf.default.rp_filter", "0"),
                           ("net.ipv6.conf.all.forwarding", "1"), ("net.ipv6.fib_multipath_hash_policy", "1")):
            write_sysctl(self.router_ns, key, value)
        # clients
        self.client_ns = self._add_ns("client")
        self._veth(self.router_ns, "to-client", self.client_ns, "eth0", lab_mac(0, 1), lab_mac(0, 2))
        self._address(self.router_ns, "to-client", "198.18.0.1")
        self._address(self.client_ns, "eth0", str(self.client_address))
        with netlink_in(self.client_ns) as ipr:
            ipr.route("add", dst="default", gateway="198.18.0.1")
            ipr.route("add", dst="default", gateway=str(v6("198.18.0.1")), family=socket.AF_INET6)
        # the backends' bridge, in the router's namespace (the router is their gateway back to clients)
        with netlink_in(self.router_ns) as ipr:
            ipr.link("add", ifname="br0", kind="bridge")
            bridge = ipr.link_lookup(ifname="br0")[0]
        self._address(self.router_ns, "br0", str(ROUTER_SERVICE_ADDRESS))
        for j in range(1, n_backends + 1):
            ns = self._add_ns(f"b{j}")
            address = ipaddress.ip_address(f"198.18.{SERVICE_NET}.{100 + j}")
            self._veth(self.router_ns, f"b{j}", ns, "eth0", lab_mac(SERVICE_NET, 200 + j), lab_mac(SERVICE_NET, 100 + j))
            self._address(self.router_ns, f"b{j}", "", master=bridge)
            self._address(ns, "eth0", str(address))
            with netlink_in(ns) as ipr:
                ipr.route("add", dst="default", gateway=str(ROUTER_SERVICE_ADDRESS))
                ipr.route("add", dst="default", gateway=str(v6(str(ROUTER_SERVICE_ADDRESS))), family=socket.AF_INET6)
            for key in ("all", "default", "eth0"):  # answers from the VIP (on lo) leave by eth0
                write_sysctl(ns, f"net.ipv4.conf.{key}.rp_filter", "0")
            self.backends.append(Backend(f"b{j}", ns, address, v6(str(address))))
        for i in range(1, n_nodes + 1):
            ns = self._add_ns(f"lb{i}")
            for key, value in (("net.ipv4.ip_forward", "1"), ("net.ipv4.conf.all.rp_filter", "0"),
                               ("net.ipv4.conf.default.rp_filter", "0"), ("net.ipv6.conf.all.forwarding", "1")):
                write_sysctl(ns, key, value)
            subnet = 10 + i
            self._veth(self.router_ns, f"to-lb{i}", ns, "up0", lab_mac(subnet, 1), lab_mac(subnet, 2))
            self._address(self.router_ns, f"to-lb{i}", f"198.18.{subnet}.1")
            self._address(ns, "up0", f"198.18.{subnet}.2")
            self._veth(self.router_ns, f"lb{i}d", ns, "down0", lab_mac(SERVICE_NET, 20 + i), lab_mac(SERVICE_NET, 10 + i))
            self._address(self.router_ns, f"lb{i}d", "", master=bridge)
            down = ipaddress.ip_address(f"198.18.{SERVICE_NET}.{10 + i}")
            self._address(ns, "down0", str(down))
            snat = ipaddress.ip_address(f"198.18.{SERVICE_NET}.{30 + i}")
            self._address(ns, "down0", str(snat))
            with netlink_in(ns) as ipr:  # full NAT's replies leave for the client through the router
                ipr.route("add", dst="default", gateway=f"198.18.{subnet}.1")
            for key in ("up0", "down0"):
                write_sysctl(ns, f"net.ipv4.conf.{key}.rp_filter", "0")
            # frames the node's XDP sends into these veths arrive only with an XDP program or GRO on the peer
            Lab._prepare_peer(self.router_ns, f"lb{i}d", True)
            Lab._prepare_peer(self.router_ns, f"to-lb{i}", True)
            # one shared state for all; each node's own part (named after its namespace) in its state file
            store = f"etcd://{ROUTER_SERVICE_ADDRESS}:{ETCD_PORT}/{self.prefix}"
            self.nodes.append(Node(f"lb{i}", ns, ipaddress.ip_address(f"198.18.{subnet}.2"),
                                   ipaddress.ip_address(f"198.18.{subnet}.1"), v6(f"198.18.{subnet}.2"),
                                   v6(f"198.18.{subnet}.1"), down, snat, store))
        self.start_etcd()
        self.start_bird()

    # --- etcd and BIRD ------------------------------------------------------------------------

    def start_etcd(self, timeout: float = 60.0) -> None:
        """One etcd member in the router's namespace, on the backends' bridge (data kept across restarts)."""
        data = os.path.join(self.workdir, "etcd")
        log = open(os.path.join(self.workdir, "etcd.log"), "a")
        url = f"http://{ROUTER_SERVICE_ADDRESS}:{ETCD_PORT}"
        try:
            self.etcd = subprocess.Popen(
                ["ip", "netns", "exec", self.router_ns, "etcd", "--name", "lab", "--data-dir", data,
                 "--listen-client-urls", url, "--advertise-client-urls", url,
                 "--listen-peer-urls", "http://127.0.0.1:2380", "--initial-advertise-peer-urls", "http://127.0.0.1:2380",
                 "--initial-cluster", "lab=http://127.0.0.1:2380"], stdout=log, stderr=subprocess.STDOUT)
        finally:
            log.close()
        wait_for(self.etcd_healthy, timeout, interval=0.2, what="etcd to answer")

    def etcd_healthy(self) -> bool:
        assert self.etcd is not None and self.etcd.poll() is None, f"etcd exited; see {self.workdir}/etcd.log"
        conn = http.client.HTTPConnection(str(ROUTER_SERVICE_ADDRESS), ETCD_PORT, timeout=2)
        try:
            with in_netns(self.router_ns):  # the socket is made at connect()
                conn.connect()
            conn.request("GET", "/health")
            return b'"true"' in conn.getresponse().read()
        except OSError:
            return False
        finally:
            conn.close()

    def stop_etcd(self) -> None:
        stop_process(self.etcd)
        self.etcd = None

    def bird_config(self) -> str:
        sessions = "".join(
            f"protocol bgp {n.name}{suffix} {{\n  local {router} as {ROUTER_AS};\n"
            f"  neighbor {up} as {NODE_AS};\n"
            f"  hold time 3; keepalive time 1; connect retry time 1; error wait time 1, 2;\n"
            f"  {family} {{ import all; export none; }};\n}}\n"
            for n in self.nodes for suffix, router, up, family in (("", n.router_address, n.up_address, "ipv4"),
                                                                 ("v6", n.router_address6, n.up_address6, "ipv6")))
        return (f"router id 198.18.0.1;\nlog \"{self.workdir}/bird.log\" all;\n"
                "protocol device { scan time 1; }\n"
                # ECMP: equal BGP routes from several nodes become one multipath kernel route
                "protocol kernel { ipv4 { export all; }; merge paths on; }\n"
                "protocol kernel { ipv6 { export all; }; merge paths on; }\n" + sessions)

    def start_bird(self) -> None:
        config = os.path.join(self.workdir, "bird.conf")
        with open(config, "w") as f:
            f.write(self.bird_config())
        self.bird_socket = os.path.join(self.workdir, "bird.ctl")
        log = open(os.path.join(self.workdir, "bird.out"), "a")
        try:  # -f: in the foreground, a child we can stop
            self.bird = subprocess.Popen(["ip", "netns", "exec", self.router_ns, "bird", "-f", "-c", config,
                                          "-s", self.bird_socket], stdout=log, stderr=subprocess.STDOUT)
        finally:
            log.close()
        wait_for(lambda: os.path.exists(self.bird_socket), 20, what="BIRD's control socket")

    def birdc(self, *command: str) -> str:
        return subprocess.run(["birdc", "-s", self.bird_socket, *command], capture_output=True, text=True,
                              timeout=10).stdout

    # --- LB nodes -----------------------------------------------------------------------------

    def lbctl(self, node: Node, *args: str, check: bool = True):
        """lbctl on a node, on its own state in etcd (through its daemon when one runs)."""
        return run_lbctl(node.ns, "--store", node.store, *args, check=check)

    def attach(self, node: Node) -> None:
        self.lbctl(node, "attach", "up0", "down0")

    def attach_all(self) -> None:
        """Every node's data plane, one after another: an attach holds the shared state's lock while
        it compiles (tens of seconds here), so side by side they would wait on each other anyway."""
        for n in self.nodes:
            self.attach(n)

    def prepare_backends_for(self, vip: ipaddress.IPv4Address | ipaddress.IPv6Address) -> None:
        """dsr: every backend holds the VIP on its loopback; every node routes the VIP towards a
        backend, for its health checks (the check's mark picks the backend)."""
        for b in self.backends:
            write_sysctl(b.ns, "net.ipv4.conf.all.arp_ignore", "1")
            write_sysctl(b.ns, "net.ipv4.conf.all.arp_announce", "2")
            with netlink_in(b.ns) as ipr:
                ipr.addr("add", index=ipr.link_lookup(ifname="lo")[0], address=str(vip), prefixlen=vip.max_prefixlen)
        first = self.backends[0].address if vip.version == 4 else self.backends[0].address6
        for n in self.nodes:
            with netlink_in(n.ns) as ipr:
                ipr.route("add", dst=f"{vip}/{vip.max_prefixlen}", gateway=str(first),
                          family=socket.AF_INET if vip.version == 4 else socket.AF_INET6)

    def start_daemon(self, node: Node, settle: float = 1.0, *extra: str) -> DaemonProcess:
        node.daemon = DaemonProcess(node.ns, os.path.join(self.workdir, f"{node.name}.log"),
                                    ("--store", node.store, "--bgp-peer", str(node.router_address),
                                     "--bgp-peer", str(node.router_address6),  # router ids: their default
                                     "--bgp-local-as", str(NODE_AS), "--bgp-peer-as", str(ROUTER_AS),
                                     "--bgp-settle", str(settle), *extra)).start()
        return node.daemon

    def kill_node(self, node: Node, vip: ipaddress.IPv4Address, detach: bool = True) -> float:
        """The node dies: kill -9 its daemon (its ExaBGP goes with it) and, once the router no longer
        sends it the VIP's flows, its data plane goes too (as a reboot would take it). Returns the
        seconds the router took to drop the node's route."""
        start = time.monotonic()
        node.daemon.kill9()
        wait_for(lambda: self.up_address(node, vip) not in self.next_hops(vip), 15, interval=0.02,
                 what=f"the router to drop {node.name}'s route")
        took = time.monotonic() - start
        if detach:
            self.lbctl(node, "detach")
        return took

    def signal_node(self, node: Node, sig: int) -> None:
        """`sig` to the node's daemon and every process under it (ExaBGP and its helper)."""
        for pid in _descendants(node.daemon.proc.pid):
            with contextlib.suppress(ProcessLookupError):
                os.kill(pid, sig)

    def freeze_node(self, node: Node, vip: ipaddress.IPv4Address) -> float:
        """The node hangs (SIGSTOP: no keepalive, no close): returns the seconds until the router
        drops its route, which only the BGP hold timer notices."""
        start = time.monotonic()
        self.signal_node(node, signal.SIGSTOP)
        wait_for(lambda: self.up_address(node, vip) not in self.next_hops(vip), 30, interval=0.02,
                 what=f"the router to drop frozen {node.name}'s route")
        return time.monotonic() - start

    # --- where connections are -----------------------------------------------------------------

    def ports_carried_by(self, node: Node, client_ports: list[int]) -> set[int]:
        """The client's ports whose connections the node's connection table holds (not closing)."""
        ports = set(client_ports)
        with DataPlaneMaps.open(os.path.join(BPFFS, node.ns)) as maps:
            return {socket.ntohs(key.sport) for key, entry in maps.conn_table.items()
                    if socket.ntohs(key.sport) in ports and not entry.flags & FLOW_CLOSING}

    def carried_by(self, node: Node, client_ports: list[int]) -> int:
        """How many of the client's connections (by port) the node's connection table holds. A closed
        connection's entry (closing, kept a few seconds) is not counted: the client may already have
        reused its port for one of these, carried by another node."""
        return len(self.ports_carried_by(node, client_ports))

    def backend_of_connections(self, port: int) -> dict[int, str]:
        """client port -> the backend holding the connection (from each backend's own sockets)."""
        owner = {}
        for b in self.backends:
            out = subprocess.run(["ip", "netns", "exec", b.ns, "ss", "-Htn", "state", "established",
                                  f"( sport = :{port} )"], capture_output=True, text=True, check=True).stdout
            for line in out.splitlines():
                host, _, peer_port = line.split()[-1].rpartition(":")
                if host.strip("[]").removeprefix("::ffff:") in (str(self.client_address), str(self.client_address6)):
                    owner[int(peer_port)] = b.name
        return owner

    def full_nat_sources(self, node: Node, vip: ipaddress.IPv4Address,
                         closing: bool = False) -> dict[int, tuple[str, int]]:
        """client port -> (source address, source port) of the node's full-NAT flows to `vip` (with
        `closing`, also those a FIN or RST closed)."""
        to = bytes(LbAddr.of(vip))
        with DataPlaneMaps.open(os.path.join(BPFFS, node.ns)) as maps:
            return {socket.ntohs(key.sport): (str(entry.snat_addr.address()), socket.ntohs(entry.snat_port))
                    for key, entry in maps.fullnat_flows.items()
                    if bytes(key.dst) == to and (closing or not entry.flow.flags & FLOW_CLOSING)}

    def peers_of_backends(self, port: int) -> set[tuple[str, int]]:
        """(address, port) of every established connection to `port` on the backends, as the backends see
        their peers (the client's own for dsr, a node's source for full NAT)."""
        peers = set()
        for b in self.backends:
            out = subprocess.run(["ip", "netns", "exec", b.ns, "ss", "-Htn", "state", "established",
                                  f"( sport = :{port} )"], capture_output=True, text=True, check=True).stdout
            for line in out.splitlines():
                host, _, peer_port = line.split()[-1].rpartition(":")
                peers.add((host.strip("[]").removeprefix("::ffff:"), int(peer_port)))
        return peers

    # --- what the router does -----------------------------------------------------------------

    @staticmethod
    def up_address(node: Node, vip: ipaddress.IPv4Address | ipaddress.IPv6Address) -> str:
        """The node's next hop for the VIP at the router: its up0 address of the VIP's IP version."""
        return str(node.up_address if vip.version == 4 else node.up_address6)

    def next_hops(self, vip: ipaddress.IPv4Address | ipaddress.IPv6Address) -> set[str]:
        """The next hops of the router's route to the VIP (empty: no route)."""
        with netlink_in(self.router_ns) as ipr:
            routes = [r for r in ipr.get_routes(family=socket.AF_INET if vip.version == 4 else socket.AF_INET6)
                      if r["dst_len"] == vip.max_prefixlen and r.get_attr("RTA_DST") == str(vip)]
        hops: set[str] = set()
        for r in routes:
            gateway = r.get_attr("RTA_GATEWAY")
            if gateway:
                hops.add(gateway)
            for nh in r.get_attr("RTA_MULTIPATH") or []:
                if nh.get_attr("RTA_GATEWAY"):
                    hops.add(nh.get_attr("RTA_GATEWAY"))
        return hops

    def wait_for_next_hops(self, vip: ipaddress.IPv4Address, nodes: list[Node], timeout: float = 30.0) -> float:
        """Poll until the router's route to the VIP goes exactly through `nodes`; returns the seconds taken."""
        want = {self.up_address(n, vip) for n in nodes}
        start = time.monotonic()
        wait_for(lambda: self.next_hops(vip) == want, timeout, interval=0.02,
                 what=f"the router's route to {vip} through {sorted(want)} (has {sorted(self.next_hops(vip))})")
        return time.monotonic() - start

    def diagnosis(self) -> str:
        """What to read when the cluster misbehaves: BIRD's sessions and routes, each daemon's last events."""
        parts = [self.birdc("show", "protocols"), self.birdc("show", "route")]
        for n in self.nodes:
            if n.daemon is not None:
                parts.append(f"--- {n.name} daemon log ---\n{n.daemon.log_tail()}")
        return "\n".join(parts)

    # --- teardown -----------------------------------------------------------------------------

    def teardown(self) -> None:
        for n in self.nodes:
            if n.daemon is not None:
                with contextlib.suppress(Exception):
                    n.daemon.stop()
            with contextlib.suppress(Exception):
                run_lbctl(n.ns, "--store", n.store, "detach", check=False)
            shutil.rmtree(os.path.join(BPFFS, n.ns), ignore_errors=True)  # pins, if etcd was gone
            for session in ("", "-2"):  # a killed daemon's ExaBGP files (its IPv4 and IPv6 sessions)
                shutil.rmtree(os.path.join(RUN_DIR, f"bgp-{n.ns}{session}"), ignore_errors=True)
            for name in (f"{n.ns}.db", f"{n.ns}.node.db"):  # a node's own part of the state, if kept in a file
                for suffix in ("", "-wal", "-shm"):
                    with contextlib.suppress(FileNotFoundError):
                        os.remove(os.path.join(STATE_DIR, name + suffix))
        stop_process(self.bird)
        stop_process(self.etcd)
        for ns in reversed(self.namespaces):
            subprocess.run(["ip", "netns", "del", ns], check=False, capture_output=True)
        self.namespaces.clear()
        shutil.rmtree(self.workdir, ignore_errors=True)


def _descendants(pid: int) -> list[int]:
    found, todo = [], [pid]
    while todo:
        p = todo.pop()
        found.append(p)
        with contextlib.suppress(OSError):
            for task in os.listdir(f"/proc/{p}/task"):
                with open(f"/proc/{p}/task/{task}/children") as f:
                    todo.extend(int(c) for c in f.read().split())
    return found
