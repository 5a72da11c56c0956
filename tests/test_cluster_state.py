"""Three nodes of one cluster share one desired state in etcd, each with its own data plane and ids.

Each node is a network namespace with lb attached and its own daemon (`lbctl daemon --store
etcd://... --node NAME`), linked to an etcd in a namespace of its own. Changes made through any
node's lbctl reach every node's maps through the daemons' watches; a node whose daemon was down
catches up when it starts; and the Maglev tables read back from the three nodes' pinned maps are
the same byte for byte once each slot's backend id is translated to the backend's endpoint, although
the nodes number their backends differently."""
from __future__ import annotations

import contextlib
import ipaddress
import os
import socket
import subprocess
from dataclasses import dataclass, field
from typing import Iterator

import pytest

from lb.maps import DataPlaneMaps
from lb.pins import stable_bpffs
from lb.structs import NO_BACKEND, VIP_ACTIVE, LbAddr
from netns.etcd import CLIENT_PORT, Etcd, etcd_in
from netns.lbctl import DaemonProcess, forget, run_lbctl
from netns.topology import run_prefix, veth_pair
from netns.traffic import wait_for

pytestmark = pytest.mark.skipif(subprocess.run(["which", "etcd"], capture_output=True).returncode != 0,
                                reason="no etcd binary (Debian etcd-server; make setup installs it)")

NODES = 3
SUBNET = 230  # lab links 198.18.230.0/24 ... : etcd's end .1, the node's .2
V1, V2 = "10.77.0.1:80/tcp", "10.77.0.2:53/udp"
BACKENDS = [f"10.78.0.{i}" for i in range(1, 7)]


@dataclass
class Node:
    ns: str
    name: str
    url: str
    daemon: DaemonProcess

    def lbctl(self, *args: str, check: bool = True):
        return run_lbctl(self.ns, *args, check=check)

    def tables(self) -> dict[str, bytes]:
        """Each active VIP's Maglev table as its maps hold it, every slot's backend id replaced by the
        backend's endpoint (address and port as the data plane stores them, 18 bytes; zeros for none)."""
        with DataPlaneMaps.open(os.path.join(stable_bpffs(), "lb", self.ns)) as maps:
            endpoints = {k.value: bytes(v.addr) + int(v.port).to_bytes(2, "little") for k, v in maps.backends.items()}
            found = {}
            for _, meta in maps.vip_meta.items():
                if not meta.flags & VIP_ACTIVE:
                    continue
                slots = maps.maglev.read_range(meta.ring_base, meta.ring_size)
                found[f"{meta.addr.address()}:{socket.ntohs(meta.port)}"] = b"".join(
                    endpoints[s] if s != NO_BACKEND else bytes(18) for s in slots)
            return found

    def backend_ids(self) -> dict[str, int]:
        """backend address -> this node's id for it (of the configured backends)."""
        listed = self.lbctl("status", "--json").json()
        return {f'{v["vip"]} {b["backend"]}': b["id"] for v in listed["vips"] for b in v["backends"]}


@dataclass
class Cluster:
    etcd: Etcd | None = None
    nodes: list[Node] = field(default_factory=list)

    def agree(self) -> dict[str, bytes] | None:
        """The nodes' translated tables when all are equal, else None."""
        tables = [n.tables() for n in self.nodes]
        return tables[0] if all(t == tables[0] for t in tables) else None


def served(table: bytes) -> set[str]:
    """The backend addresses a translated table (Node.tables) sends flows to."""
    ends = {table[i:i + 18] for i in range(0, len(table), 18)}
    return {str(LbAddr.from_buffer_copy(e[:16]).address()) for e in ends if e != bytes(18)}


@pytest.fixture(scope="module")
def cluster(tmp_path_factory) -> Iterator[Cluster]:
    prefix = run_prefix()
    etcd_ns = f"{prefix}-etcd"
    spaces = [etcd_ns] + [f"{prefix}-n{i}" for i in range(NODES)]
    logs = tmp_path_factory.mktemp("cluster")
    built = Cluster()
    with contextlib.ExitStack() as stack:
        for ns in spaces:
            subprocess.run(["ip", "netns", "add", ns], check=True)
            stack.callback(subprocess.run, ["ip", "netns", "del", ns], check=False)
            subprocess.run(["ip", "-n", ns, "link", "set", "lo", "up"], check=True)
        for i, ns in enumerate(spaces[1:]):
            subnet = SUBNET + i
            veth_pair(subnet, (etcd_ns, f"n{i}", ipaddress.ip_address(f"198.18.{subnet}.1"),
                               ipaddress.ip_address(f"fd00:12:{subnet}::1")),
                      (ns, "eth0", ipaddress.ip_address(f"198.18.{subnet}.2"),
                       ipaddress.ip_address(f"fd00:12:{subnet}::2")))
        built.etcd = stack.enter_context(etcd_in(etcd_ns, listen="0.0.0.0"))
        for i, ns in enumerate(spaces[1:]):
            url = f"etcd://198.18.{SUBNET + i}.1:{CLIENT_PORT}/{prefix}"
            options = ("--store", url, "--node", f"node{i}")
            node = Node(ns, f"node{i}", url, DaemonProcess(ns, str(logs / f"node{i}.log"), options))
            stack.callback(forget, ns)
            stack.callback(run_lbctl, ns, *options, "detach", check=False)
            stack.callback(node.daemon.stop)
            node.daemon.start()
            node.lbctl("attach", "eth0")  # through its daemon
            built.nodes.append(node)
        yield built


def test_changes_through_any_node_reach_all_and_their_maglev_tables_agree(cluster):
    n0, n1, n2 = cluster.nodes
    n2.daemon.stop()  # down while the others change the state: it catches up when it starts
    n0.lbctl("add-vip", V1, "--mode", "tunnel")
    for b in reversed(BACKENDS[:3]):  # numbered on n0 (and n1, following) from the last address
        n0.lbctl("add-backend", V1, b)
    n1.lbctl("add-vip", V2, "--mode", "dsr")
    n1.lbctl("add-backend", V2, BACKENDS[3])
    n1.lbctl("add-backend", V2, BACKENDS[4], "--weight", "3")
    n0.lbctl("remove-backend", V1, BACKENDS[1])
    n1.lbctl("add-backend", V1, BACKENDS[5])
    agreed = wait_for(lambda: (t := cluster.nodes[0].tables()) == n1.tables() and len(t) == 2 and t,
                      timeout=20, what="n0 and n1 to agree")
    n2.daemon.start()
    tables = wait_for(lambda: cluster.agree() == agreed and agreed, timeout=30, what="n2 to catch up")

    v1, v2 = tables[V1.split("/")[0]], tables[V2.split("/")[0]]
    assert served(v1) == {BACKENDS[0], BACKENDS[2], BACKENDS[5]}  # the removed one takes no slot
    assert served(v2) == {BACKENDS[3], BACKENDS[4]}
    ids0, ids2 = n0.backend_ids(), n2.backend_ids()
    assert ids0.keys() == ids2.keys() and ids0 != ids2  # the same backends, numbered apart: the tables agree anyway

    # Two more changes in opposite orders on two nodes reach the same tables everywhere.
    n2.lbctl("set-weight", V1, BACKENDS[0], "2")
    n2.lbctl("drain", V2, BACKENDS[3])
    n1.lbctl("add-backend", V1, BACKENDS[1])  # back: on n0 and n1 it gets its old id again
    wait_for(lambda: (t := cluster.agree()) is not None and t[V1.split("/")[0]] != v1
             and served(t[V1.split("/")[0]]) == {*BACKENDS[:3], BACKENDS[5]}
             and served(t[V2.split("/")[0]]) == {BACKENDS[4]}, timeout=20, what="the changes everywhere")
    # How long the last change took to reach the other nodes' maps, from their daemons' logs.
    (made,) = [e["time"] for e in n1.daemon.events("command", n1.daemon.proc.pid)
               if e["command"] == "add-backend"][-1:]
    lags = {n.name: min(e["time"] for e in n.daemon.events("state changed in the store: maps reconciled",
                                                           n.daemon.proc.pid) if e["time"] >= made) - made
            for n in (n0, n2)}
    print(f"the change through node1 reached the maps of the others in {lags} s")
    assert all(lag < 2.0 for lag in lags.values()), lags


def test_plain_nat_is_refused_in_the_cluster_unless_replies_come_back_through_the_node(cluster):
    n0, n1, _ = cluster.nodes
    assert "\nnodes: node0 (last change " in n1.lbctl("status").stdout
    assert set(n1.lbctl("status", "--json").json()["store"]["nodes"]) == {"node0", "node1", "node2"}
    refused = n0.lbctl("add-vip", "10.77.0.9:80/tcp", check=False)
    assert refused.returncode == 2
    assert refused.stderr.strip().splitlines() == [
        "lbctl: error: VIP 10.77.0.9:80/tcp: plain nat in a cluster of 3 nodes (node0, node1, node2) would send "
        "replies back through whichever node the backends route to; use --mode tunnel or dsr, or route the "
        "replies through this node and say so: --replies-via-this-node"]
    assert "10.77.0.9:80/tcp" not in {v["vip"] for v in n1.lbctl("list", "--json").json()["vips"]}
    n0.lbctl("add-vip", "10.77.0.9:80/tcp", "--replies-via-this-node")
    wait_for(lambda: {v["vip"]: v.get("replies_via") for v in n1.lbctl("list", "--json").json()["vips"]}.get(
        "10.77.0.9:80/tcp") == "node0", timeout=20, what="the VIP on node1, with the node its replies go through")
    n0.lbctl("remove-vip", "10.77.0.9:80/tcp")


def test_a_node_starts_while_etcd_is_away_and_catches_up_when_it_returns(cluster):
    n0, _, n2 = cluster.nodes
    before = wait_for(cluster.agree, timeout=20, what="the nodes to agree")
    n2.daemon.stop()
    cluster.etcd.stop()
    try:
        n2.daemon.start()  # from its own part
        assert n2.tables() == before
        assert "UNREACHABLE since" in n2.lbctl("status").stdout
        refused = n0.lbctl("add-backend", V1, "10.78.0.9", check=False)
        assert refused.returncode == 1 and "unreachable; nothing was changed" in refused.stderr
    finally:
        cluster.etcd.restart()
    n0.lbctl("add-backend", V1, "10.78.0.9")  # once it is back, through another node
    key = V1.split("/")[0]
    wait_for(lambda: (t := cluster.agree()) is not None and "10.78.0.9" in served(t[key]),
             timeout=30, what="every node, n2 included, to take the new backend")
    assert ": reachable" in n2.lbctl("status").stdout
