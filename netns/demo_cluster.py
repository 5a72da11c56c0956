"""make demo-cluster: three LB nodes behind a BGP router with ECMP (netns/cluster.py). Each
node's daemon announces a dsr VIP over BGP; long-lived TCP connections from a client spread
over the nodes by the router's L4 hash; one node is killed (kill -9 of its daemon, then its
data plane detached): its connections move to the other nodes and stay with their backends."""
from __future__ import annotations

import os
import subprocess
import time

from netns.cluster import Cluster
from netns.topology import VIP_NETWORK
from netns.traffic import EchoConnections, EchoServers

VIP = VIP_NETWORK[1]
PORT = 8080


def say(text: str) -> None:
    print(f"\n== {text}", flush=True)


def spread(cluster: Cluster, conns: EchoConnections, nodes) -> None:
    ports = conns.local_ports()
    for n in nodes:
        carried = cluster.carried_by(n, ports)
        print(f"  {n.name} ({n.up_address}): {carried:>4} connections  {'#' * round(40 * carried / len(ports))}")


def kernel_route(cluster: Cluster) -> str:
    out = subprocess.run(["ip", "-n", cluster.router_ns, "route", "show", f"{VIP}/32"], capture_output=True,
                         text=True).stdout.strip()
    return "  $ ip route show " + f"{VIP}/32 (router)\n  " + out.replace("\n", "\n  ")


def main() -> None:
    n_connections = int(os.environ.get("DEMO_CONNECTIONS", "150"))
    with Cluster.build(n_nodes=3, n_backends=3) as cluster:
        say(f"lab {cluster.prefix}: client {cluster.client_address} -> router (BIRD 2, ECMP, L4 hash) -> "
            f"3 LB nodes -> 3 dsr backends; etcd on the router's namespace")
        cluster.prepare_backends_for(VIP)
        servers = EchoServers([b.ns for b in cluster.backends], PORT, backlog=512)
        try:
            say("compiling and attaching the data plane on the three nodes (tens of seconds each)")
            cluster.attach_all()
            path = os.path.join(cluster.workdir, "lb.yaml")
            backends = ", ".join(str(b.address) for b in cluster.backends)
            with open(path, "w") as f:
                f.write(f"vips:\n  - vip: {VIP}:{PORT}/tcp\n    mode: dsr\n    min_healthy: 1\n"
                        f"    health: {{kind: tcp, interval: 1s, timeout: 500ms}}\n    backends: [{backends}]\n")
            print(open(path).read().rstrip())
            print(f"  $ lbctl apply -f lb.yaml (through {cluster.nodes[0].name}; the nodes share the state)")
            cluster.lbctl(cluster.nodes[0], "apply", "-f", path)
            for n in cluster.nodes:
                cluster.start_daemon(n, settle=2.0)
                print(f"  {n.name}: lbctl daemon --store {n.store} --bgp-peer {n.router_address} "
                      f"--bgp-local-as 65001 --bgp-peer-as 65000 --bgp-settle 2")
            took = cluster.wait_for_next_hops(VIP, cluster.nodes, timeout=60)
            say(f"the router's route to the VIP, {took:.1f}s later: BIRD merged the three nodes' routes into one")
            print(kernel_route(cluster))

            say(f"{n_connections} long-lived TCP connections from the client to {VIP}:{PORT}")
            conns = EchoConnections(cluster.client_ns, str(VIP), PORT, n_connections)
            try:
                print(f"  {conns.round()} of {n_connections} echo")
                spread(cluster, conns, cluster.nodes)
                owners = cluster.backend_of_connections(PORT)
                victim = cluster.nodes[0]
                say(f"kill -9 {victim.name}'s daemon (its ExaBGP dies with it), then detach its data plane")
                with conns.flowing(interval=0.1):
                    took = cluster.kill_node(victim, VIP)
                    time.sleep(1.0)  # the demo's traffic keeps flowing meanwhile
                print(f"  the router dropped {victim.name}'s route {took:.2f}s after the kill; its route now:")
                print(kernel_route(cluster))
                echoed = conns.round()
                after = cluster.backend_of_connections(PORT)
                same = sum(1 for port, b in owners.items() if after.get(port) == b)
                say("after the move (connection-table entries: a node keeps those of connections the router "
                    "moved away from it, between the survivors too, until they expire)")
                spread(cluster, conns, cluster.nodes[1:])
                print(f"  {echoed} of {n_connections} connections echo; broken: {len(conns.failed)}; "
                      f"{same} of {len(owners)} still on the backend they started on")
            finally:
                conns.close()
        finally:
            servers.close()
        say("cleaning up: daemons, ExaBGP, BIRD, etcd, namespaces")


if __name__ == "__main__":
    main()
