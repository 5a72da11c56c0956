"""A cluster of three LB nodes behind a BGP router with ECMP (netns/cluster.py), with real packets:
long-lived TCP connections spread over the nodes by the router's L4 hash, a node killed, etcd
restarted, a backend down on one node only, and a node change together with a backend change.

One lab for the module (three data-plane compiles); the tests run in file order, the node kills
last. The nodes share one desired state in etcd; each keeps its own part (data plane, ids, health)."""
from __future__ import annotations

import ipaddress
import os
import shutil
import signal
import subprocess
import time
from typing import Iterator

import pytest

from lb.maps import DataPlaneMaps
from lb.structs import LbAddr
from netns.cluster import BPFFS, Cluster, Node
from netns.topology import VIP6_NETWORK, VIP_NETWORK
from netns.traffic import EchoConnections, EchoServers, wait_for

pytestmark = pytest.mark.skipif(not all(shutil.which(b) for b in ("etcd", "bird", "exabgp")),
                                reason="needs etcd, bird and exabgp (make setup installs them)")

VIP = VIP_NETWORK[1]
VIP6 = VIP6_NETWORK[1]
PORT = 8080
CONNECTIONS = 200
RING = 1601  # the Maglev table of a VIP of up to 16 backends (lb.maglev.ring_size_for)


def config(backends: list[str], min_healthy: int = 1) -> str:
    return (f"vips:\n  - vip: {VIP}:{PORT}/tcp\n    mode: dsr\n    min_healthy: {min_healthy}\n"
            f"    health: {{kind: tcp, interval: 500ms, timeout: 400ms, rise: 2, fall: 2}}\n"
            f"    backends: [{', '.join(backends)}]\n")


@pytest.fixture(scope="module")
def cluster() -> Iterator[Cluster]:
    with Cluster.build(n_nodes=3, n_backends=4) as c:
        c.prepare_backends_for(VIP)
        c.prepare_backends_for(VIP6)
        servers = EchoServers([b.ns for b in c.backends], PORT, backlog=512)
        try:
            c.attach_all()
            apply(c, c.nodes[0], [str(b.address) for b in c.backends[:3]])  # the others catch up on start
            for n in c.nodes:
                c.start_daemon(n, settle=2.0)
            try:
                c.wait_for_next_hops(VIP, c.nodes, timeout=60)
            except TimeoutError:
                print(c.diagnosis())
                raise
            yield c
        finally:
            servers.close()


def apply(c: Cluster, node: Node, backends: list[str], min_healthy: int = 1) -> None:
    """`lbctl apply` of the VIP's file through one node (the state is shared: every node follows)."""
    path = os.path.join(c.workdir, "lb.yaml")
    with open(path, "w") as f:
        f.write(config(backends, min_healthy))
    c.lbctl(node, "apply", "-f", path)


def maglev_table(node: Node) -> list[int]:
    with DataPlaneMaps.open(os.path.join(BPFFS, node.ns)) as maps:
        return maps.maglev.read_range(0, RING)


@pytest.fixture
def connections(cluster: Cluster) -> Iterator[EchoConnections]:
    conns = EchoConnections(cluster.client_ns, str(VIP), PORT, CONNECTIONS)
    try:
        assert conns.round() == CONNECTIONS, conns.failed
        yield conns
    finally:
        conns.close()


def test_the_router_spreads_connections_over_every_node(cluster: Cluster, connections: EchoConnections):
    held = {n.name: cluster.ports_carried_by(n, connections.local_ports()) for n in cluster.nodes}
    per_node = {name: len(ports) for name, ports in held.items()}
    assert set().union(*held.values()) == set(connections.local_ports())  # every connection on a node
    # each on one node: the router's L4 hash pins a flow (a BGP session that flapped under a loaded
    # machine's 3 s hold time moves a few, which then have entries on two nodes)
    assert sum(per_node.values()) <= CONNECTIONS * 1.1, per_node
    assert all(n >= CONNECTIONS // 10 for n in per_node.values()), per_node
    assert set(cluster.backend_of_connections(PORT).values()) == {"b1", "b2", "b3"}


def test_an_ipv6_vip_is_spread_over_every_node_by_the_routers_ecmp_for_its_128(cluster: Cluster):
    """Each node announces the IPv6 VIP over its IPv6 session; the router's /128 takes all three as next hops."""
    target = f"[{VIP6}]:{PORT}/tcp"
    cluster.lbctl(cluster.nodes[0], "add-vip", target, "--mode", "dsr")
    conns = None
    try:
        for b in cluster.backends[:3]:
            cluster.lbctl(cluster.nodes[0], "add-backend", target, f"[{b.address6}]")
        took = cluster.wait_for_next_hops(VIP6, cluster.nodes, timeout=30)
        print(f"the router's route to {VIP6}/128 went through all three nodes {took:.2f}s after the last change")
        conns = EchoConnections(cluster.client_ns, str(VIP6), PORT, CONNECTIONS)
        assert conns.round() == CONNECTIONS, conns.failed
        held = {n.name: cluster.ports_carried_by(n, conns.local_ports()) for n in cluster.nodes}
        assert set().union(*held.values()) == set(conns.local_ports())
        assert all(len(ports) >= CONNECTIONS // 10 for ports in held.values()), {k: len(v) for k, v in held.items()}
        assert set(cluster.backend_of_connections(PORT).values()) == {"b1", "b2", "b3"}
        print(f"IPv6: {CONNECTIONS} connections over the nodes: {', '.join(f'{k} {len(v)}' for k, v in held.items())}")
    finally:
        if conns is not None:
            conns.close()
        cluster.lbctl(cluster.nodes[1], "remove-vip", target)
    cluster.wait_for_next_hops(VIP6, [], timeout=30)


def test_an_etcd_restart_under_traffic_breaks_nothing_and_loses_nothing(cluster: Cluster,
                                                                       connections: EchoConnections):
    before = [cluster.lbctl(n, "export").stdout for n in cluster.nodes]
    with connections.flowing(interval=0.1):
        cluster.stop_etcd()
        rounds = connections.rounds
        wait_for(lambda: connections.rounds >= rounds + 10, 30, what="traffic while etcd is down")
        assert cluster.next_hops(VIP) == {str(n.up_address) for n in cluster.nodes}  # nobody withdrew
        cluster.start_etcd()
        rounds = connections.rounds
        wait_for(lambda: connections.rounds >= rounds + 5, 30, what="traffic after etcd is back")
    assert connections.failed == {}
    assert [cluster.lbctl(n, "export").stdout for n in cluster.nodes] == before
    # and changes go through again
    apply(cluster, cluster.nodes[1], [str(b.address) for b in cluster.backends[:3]], min_healthy=1)


def backend_ids_in_table(node: Node, address: str) -> set[int]:
    """The ids of `address`'s backends that the node's Maglev table of the VIP holds."""
    key = bytes(LbAddr.of(ipaddress.ip_address(address)))
    with DataPlaneMaps.open(os.path.join(BPFFS, node.ns)) as maps:
        ids = {k.value for k, v in maps.backends.items() if v.flags and bytes(v.addr) == key}
        return ids & set(maps.maglev.read_range(0, RING))


def test_a_backend_added_through_one_node_is_served_by_every_node_within_a_second(cluster: Cluster):
    b4 = str(cluster.backends[3].address)
    cluster.lbctl(cluster.nodes[0], "add-backend", f"{VIP}:{PORT}/tcp", b4)
    added = time.monotonic()
    try:
        for n in cluster.nodes:
            wait_for(lambda: backend_ids_in_table(n, b4), 5, interval=0.01, what=f"{n.name} to serve {b4}")
        took = time.monotonic() - added
        print(f"a backend added through lb1 was in every node's Maglev table {took:.2f}s later")
        assert took <= 1.0
    finally:
        cluster.lbctl(cluster.nodes[0], "remove-backend", f"{VIP}:{PORT}/tcp", b4)
    for n in cluster.nodes:
        wait_for(lambda: not backend_ids_in_table(n, b4), 5, what=f"{n.name} to drop {b4}")


def test_a_backend_down_on_one_node_moves_only_that_nodes_share_of_its_slots(cluster: Cluster):
    lb1, lb2, lb3 = cluster.nodes
    b3 = cluster.backends[2]
    before = {n.name: maglev_table(n) for n in cluster.nodes}
    ids = {s["backend"]: s["id"] for v in cluster.lbctl(lb2, "status", "--json").json()["vips"] for s in v["backends"]}
    b3_id = ids[f"{b3.address}:{PORT}"]
    # b3 stops answering lb2's health checks only (they come from lb2's own address)
    subprocess.run(["ip", "netns", "exec", b3.ns, "ip", "route", "add", "blackhole", f"{lb2.down_address}/32"], check=True)
    try:
        wait_for(lambda: b3_id not in maglev_table(lb2), 20, what="lb2 to take b3 out")
        after = {n.name: maglev_table(n) for n in cluster.nodes}
        assert after["lb1"] == before["lb1"] and after["lb3"] == before["lb3"]
        moved = [i for i in range(RING) if before["lb2"][i] != after["lb2"][i]]
        of_b3 = before["lb2"].count(b3_id)
        others = sum(1 for i in moved if before["lb2"][i] != b3_id)
        # every slot of b3 moves on lb2; Maglev moves a few others with them (its disruption is small, not nil)
        assert b3_id not in after["lb2"] and len(moved) - others == of_b3
        assert others <= RING // 20, (others, of_b3)
        print(f"b3 down on lb2 only: {len(moved)} of lb2's {RING} slots moved ({of_b3} of b3's, {others} others); "
              f"lb1's and lb3's tables unchanged")
        # lb2 still announces (2 healthy >= min_healthy 1) ...
        assert cluster.next_hops(VIP) == {str(n.up_address) for n in cluster.nodes}
        # ... until the VIP needs all three: then lb2 alone withdraws (the others see three up)
        apply(cluster, lb1, [str(b.address) for b in cluster.backends[:3]], min_healthy=3)
        took = cluster.wait_for_next_hops(VIP, [lb1, lb3], timeout=15)
        print(f"lb2 withdrew the VIP {took:.2f}s after min_healthy rose above its healthy backends")
    finally:
        subprocess.run(["ip", "netns", "exec", b3.ns, "ip", "route", "del", "blackhole", f"{lb2.down_address}/32"],
                       check=False)
    wait_for(lambda: maglev_table(lb2) == before["lb2"], 20, what="lb2 to take b3 back")
    apply(cluster, lb1, [str(b.address) for b in cluster.backends[:3]], min_healthy=1)
    cluster.wait_for_next_hops(VIP, cluster.nodes, timeout=15)


def test_a_frozen_node_loses_its_route_within_the_hold_time_and_gets_it_back(cluster: Cluster):
    lb3 = cluster.nodes[2]
    try:
        took = cluster.freeze_node(lb3, VIP)
    finally:
        cluster.signal_node(lb3, signal.SIGCONT)
    print(f"the router dropped frozen lb3's route after {took:.2f}s (hold time 3 s)")
    assert took <= 3 + 1.5
    took = cluster.wait_for_next_hops(VIP, cluster.nodes, timeout=30)
    print(f"lb3 announced the VIP again {took:.2f}s after it thawed")


def test_a_stopping_daemon_withdraws_while_its_data_plane_forwards_and_a_restart_settles_first(
        cluster: Cluster, connections: EchoConnections):
    lb3 = cluster.nodes[2]
    with connections.flowing(interval=0.1):
        assert lb3.daemon.stop() == 0  # SIGTERM
        assert str(lb3.up_address) not in cluster.next_hops(VIP)  # withdrawn before the daemon exited
        withdrawn = [p for e in lb3.daemon.events("bgp: withdrawn all", lb3.daemon.proc.pid) for p in e["withdrawn"]]
        assert withdrawn == [f"{VIP}/32"]  # by its IPv4 session; its IPv6 one had nothing to withdraw
        rounds = connections.rounds
        wait_for(lambda: connections.rounds >= rounds + 5, 30, what="traffic while lb3's daemon is away")
        start = time.monotonic()
        cluster.start_daemon(lb3, settle=2.0)
        cluster.wait_for_next_hops(VIP, cluster.nodes, timeout=30)
        took = time.monotonic() - start
    assert connections.failed == {}
    assert took >= 2.0  # not before the settle time
    print(f"lb3's daemon restarted: the VIP announced again {took:.2f}s after its start (settle 2 s)")


FULLNAT_VIP = VIP_NETWORK[2]
FULLNAT_CONNECTIONS = 150


def moved_between(c: Cluster, before: dict[str, dict[int, tuple[str, int]]], nodes: list[Node]) -> set[int]:
    """Client ports of full-NAT connections one of `nodes` carried in `before` that another of them now
    has an entry of (a packet of theirs reached it since: the router moved them)."""
    now = {n.name: c.full_nat_sources(n, FULLNAT_VIP, closing=True) for n in nodes}
    return {p for n in nodes for p in before.get(n.name, {})
            if any(p in now[m.name] and now[m.name][p] != before[n.name][p] for m in nodes if m is not n)}


def test_full_nat_leaves_each_node_from_its_own_source_and_only_a_dead_nodes_flows_break(cluster: Cluster):
    """Measured, beside what must hold: full NAT's connections carried by a node reach the backends from
    that node's source address, so a connection the router moves to another node reaches its backend
    from another source, and the backend resets it (tunnel and dsr connections move unbroken). A dead
    node's connections move; so do some of the survivors' (the kernel's ECMP is hash-threshold: removing
    or adding a next hop moves flows between the others too). Those that stay on their node echo on."""
    lb1 = cluster.nodes[0]
    target = f"{FULLNAT_VIP}:{PORT}/tcp"
    for n in cluster.nodes:  # each node's own source, in its own part of the state
        cluster.lbctl(n, "snat", "add", str(n.snat_address))
    cluster.lbctl(lb1, "add-vip", target, "--mode", "fullnat")
    conns = None
    try:
        for b in cluster.backends[:3]:
            cluster.lbctl(lb1, "add-backend", target, str(b.address))
        cluster.wait_for_next_hops(FULLNAT_VIP, cluster.nodes, timeout=30)
        conns = EchoConnections(cluster.client_ns, str(FULLNAT_VIP), PORT, FULLNAT_CONNECTIONS)
        assert conns.round() == FULLNAT_CONNECTIONS, conns.failed
        sources = {n.name: cluster.full_nat_sources(n, FULLNAT_VIP) for n in cluster.nodes}
        ports = conns.local_ports()
        assert sorted(p for s in sources.values() for p in s) == sorted(ports)  # each on exactly one node
        for n in cluster.nodes:
            assert len(sources[n.name]) >= FULLNAT_CONNECTIONS // 10, {k: len(v) for k, v in sources.items()}
            assert {address for address, _ in sources[n.name].values()} == {str(n.snat_address)}
        # the backends hold every connection from the source its node gave it
        assert {src for s in sources.values() for src in s.values()} <= cluster.peers_of_backends(PORT)

        on_lb1 = set(sources["lb1"])
        with conns.flowing(interval=0.1):
            took = cluster.kill_node(lb1, FULLNAT_VIP, detach=False)  # its data plane stays: no recompile
            rounds = conns.rounds
            wait_for(lambda: conns.rounds >= rounds + 5, 30, what="full-NAT traffic after the kill")
        broken = {ports[i] for i in conns.failed}
        moved = moved_between(cluster, sources, cluster.nodes[1:])
        print(f"full NAT: lb1 killed (route dropped in {took:.2f}s) carrying {len(on_lb1)} of "
              f"{FULLNAT_CONNECTIONS} connections; the router also moved {len(moved)} of the survivors'; broken: "
              f"{len(broken & on_lb1)} of lb1's, {len(broken & moved)} of the moved, {len(broken - on_lb1 - moved)} "
              f"others ({'; '.join(sorted(set(conns.failed.values()))[:2])})")
        assert broken <= on_lb1 | moved  # only connections that changed node break
        assert conns.round() == FULLNAT_CONNECTIONS - len(conns.failed)

        # connections opened while lb1 is away; then lb1 comes back and the router's hash moves some flows to it
        during = EchoConnections(cluster.client_ns, str(FULLNAT_VIP), PORT, FULLNAT_CONNECTIONS)
        try:
            assert during.round() == FULLNAT_CONNECTIONS, during.failed
            survivors = {n.name: cluster.full_nat_sources(n, FULLNAT_VIP) for n in cluster.nodes[1:]}
            cluster.start_daemon(lb1, settle=2.0)
            cluster.wait_for_next_hops(FULLNAT_VIP, cluster.nodes, timeout=30)
            cluster.wait_for_next_hops(VIP, cluster.nodes, timeout=30)
            for _ in range(3):
                conns.round()
                during.round()
            moved = moved_between(cluster, survivors, cluster.nodes)
            old_broken = {ports[i] for i in conns.failed} - broken
            new_ports = during.local_ports()
            new_broken = {new_ports[i] for i in during.failed}
            print(f"full NAT: lb1 back: of the {FULLNAT_CONNECTIONS - len(broken)} connections from before its death "
                  f"{len(old_broken)} broke ({len(moved & (set(ports) - broken))} moved); of the {FULLNAT_CONNECTIONS} opened "
                  f"while it was away {len(new_broken)} broke ({len(moved & set(new_ports))} moved)")
            assert old_broken | new_broken <= moved  # again only connections that changed node
            assert during.round() == FULLNAT_CONNECTIONS - len(during.failed)
        finally:
            during.close()
    finally:
        if conns is not None:
            conns.close()
        if lb1.daemon is None or lb1.daemon.proc.poll() is not None:  # the later tests need all three nodes
            cluster.start_daemon(lb1, settle=2.0)
        cluster.lbctl(cluster.nodes[1], "remove-vip", target)
        for n in cluster.nodes:
            cluster.lbctl(n, "snat", "remove", str(n.snat_address))
        cluster.wait_for_next_hops(VIP, cluster.nodes, timeout=30)


def test_a_killed_nodes_connections_move_to_the_others_with_their_backends(cluster: Cluster,
                                                                          connections: EchoConnections):
    lb1 = cluster.nodes[0]
    owners = cluster.backend_of_connections(PORT)
    on_lb1 = cluster.carried_by(lb1, connections.local_ports())
    assert on_lb1 >= CONNECTIONS // 10
    with connections.flowing(interval=0.1):
        took = cluster.kill_node(lb1, VIP)
        rounds = connections.rounds
        wait_for(lambda: connections.rounds >= rounds + 5, 30, what="traffic after the kill")
    print(f"the router dropped lb1's route {took:.2f}s after its daemon was killed; "
          f"{on_lb1} of {CONNECTIONS} connections were on lb1")
    assert connections.failed == {}
    assert connections.round() == CONNECTIONS
    assert cluster.backend_of_connections(PORT) == owners
    assert cluster.next_hops(VIP) == {str(n.up_address) for n in cluster.nodes[1:]}


def test_share_of_connections_broken_by_a_node_and_a_backend_change_together(cluster: Cluster,
                                                                           connections: EchoConnections):
    """Measured, not a limit: lb2 dies while b4 joins. A flow moved to lb3 whose slot now
    points at b4 has no entry there and goes to b4, which resets it (Maglev paper, section 3.4)."""
    lb2, lb3 = cluster.nodes[1], cluster.nodes[2]
    on_lb2 = cluster.carried_by(lb2, connections.local_ports())
    before = maglev_table(lb3)
    # lb2 dies first (a node that dies in the middle of a change of the shared state would hold its lock),
    # then b4 joins before the moved connections' next packets reach lb3
    took = cluster.kill_node(lb2, VIP, detach=False)
    apply(cluster, lb3, [str(b.address) for b in cluster.backends])
    cluster.lbctl(lb2, "detach")
    slots_moved = sum(1 for a, b in zip(before, maglev_table(lb3)) if a != b) / RING
    for _ in range(3):
        connections.round()
    broken = len(connections.failed)
    print(f"node lb2 killed ({on_lb2} of {CONNECTIONS} connections on it, route dropped in {took:.2f}s) while "
          f"b4 joined ({100 * slots_moved:.1f}% of slots moved): {broken} broken "
          f"({100 * broken / CONNECTIONS:.1f}%; expected about {100 * on_lb2 / CONNECTIONS * slots_moved:.1f}%)")
    # only connections that moved node can break, and only those whose slot changed
    assert broken <= on_lb2
    assert connections.round() == CONNECTIONS - broken
