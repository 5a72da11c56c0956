"""A SYN flood does not take the connection table from established flows (issue 13 item 5).

100 TCP connections stream through a NAT VIP while at least 1M spoofed SYNs (a live-frames
generator in the client's namespace, 60,000 source ports) hit the same VIP; the table is small
(8,192 entries), so SYNs that opened entries would evict every established flow many times over.
None of the connections breaks, their entries stay, a new client connects during the flood, and
everything is counted."""
from __future__ import annotations

import socket
import threading
import time
from typing import Iterator

import pytest
from scapy.layers.inet import IP, TCP
from scapy.layers.l2 import Ether

from lb.maps import U32, DataPlaneMaps
from lb.structs import REASONS
from netns.lbctl import lab_with_lb, run_lbctl
from netns.nsenter import socket_in
from netns.topology import Lab
from netns.traffic import EchoServers, echo_once, wait_for
from netns.xdptools import Generator

PORT = 7000
CONNECTIONS = 100
SPOOFED = 1_000_000
SPOOFED_PORTS = 60_000
TABLE = 8192


@pytest.fixture(scope="module")
def lab() -> Iterator[Lab]:
    # native XDP on the LB (hosts send full checksums): the generator's XDP_TX frames need it
    with lab_with_lb(2, True, "--conn-table-size", str(TABLE), hosts_tx_checksum=False) as lab:
        lab.resolve_neighbours()
        yield lab


def exchange(sock: socket.socket, n: int) -> None:
    echo_once(sock, f"{n:08d}".encode() * 8)


def connect(lab: Lab, timeout: float = 10.0) -> socket.socket:
    sock = socket_in(lab.client.ns, socket.AF_INET)
    sock.settimeout(timeout)
    sock.connect((str(lab.vip(1)), PORT))
    return sock


def reasons(maps: DataPlaneMaps) -> dict[str, int]:
    counts = {}
    for i, name in enumerate(REASONS):
        per_cpu = maps.reason_stats.get(U32(i)) or []
        counts[name.removeprefix("LB_").lower()] = sum(getattr(v, "value", v) for v in per_cpu)
    return counts


def connections_started(maps: DataPlaneMaps) -> int:
    """new_flows over every VIP: a TCP connection counts at its SYN."""
    return sum(c.new_flows for i in range(maps.vip_stats.max_entries) for c in maps.vip_stats.get(U32(i)) or [])


def test_spoofed_syns_do_not_evict_established_flows(lab: Lab):
    vip = f"{lab.vip(1)}:{PORT}/tcp"
    run_lbctl(lab.lb_ns, "add-vip", vip)
    for b in lab.backends:
        run_lbctl(lab.lb_ns, "add-backend", vip, f"{b.address}:{PORT}")
    pin_dir = run_lbctl(lab.lb_ns, "list", "--json").json()["dataplane"]["pin_dir"]
    servers = EchoServers([b.ns for b in lab.backends], PORT)
    clients: list[socket.socket] = []
    errors: list[str] = []
    rounds = [0]
    stop = threading.Event()
    try:
        for _ in range(CONNECTIONS):
            clients.append(connect(lab))
        for i, sock in enumerate(clients):
            exchange(sock, i)
        own_ports = {s.getsockname()[1] for s in clients}

        def stream() -> None:  # every connection exchanges a message, round after round
            try:
                while not stop.is_set():
                    for i, sock in enumerate(clients):
                        exchange(sock, rounds[0] * CONNECTIONS + i)
                    rounds[0] += 1
            except OSError as e:
                errors.append(f"{type(e).__name__}: {e}")

        streamer = threading.Thread(target=stream, daemon=True)
        streamer.start()
        template = bytes(Ether(src=lab.client.mac, dst=lab.client.lb_mac)
                         / IP(src="198.18.0.77", dst=str(lab.vip(1))) / TCP(sport=1024, dport=PORT, flags="S"))
        generator = Generator(lab.client.ns, lab.client.ifname, template, SPOOFED_PORTS)
        with DataPlaneMaps.open(pin_dir) as maps:
            before, started_before = reasons(maps), connections_started(maps)
            sent, newcomer, started = 0, None, time.monotonic()
            # Until the LB has balanced SPOOFED of them (the veth drops some the generator sends).
            while connections_started(maps) - started_before < SPOOFED and sent < 4 * SPOOFED:
                sent += generator.send(100_000)
                if newcomer is None and sent >= SPOOFED // 2:  # a real new client, mid-flood
                    newcomer = connect(lab)
                    exchange(newcomer, 1)
            flood_seconds = time.monotonic() - started
            wait_for(lambda: rounds[0] >= 3, timeout=60, what="the streams to go on after the flood")
            stop.set()
            streamer.join(timeout=30)
            after, syns = reasons(maps), connections_started(maps) - started_before
            entries = [(k, v) for k, v in maps.conn_table.items()]
        exchange(newcomer, 2)
        delta = {name: after[name] - before[name] for name in after if after[name] != before[name]}
        print(f"\n{sent} spoofed SYNs sent in {flood_seconds:.1f} s, {syns} SYNs balanced; {rounds[0]} rounds of {CONNECTIONS} exchanges; "
              f"reasons moved: {delta}; conn_table entries: {len(entries)}")
        assert not errors, errors
        assert syns >= SPOOFED  # the LB balanced (forwarded) at least SPOOFED SYNs: none refused for load
        client_ports = {socket.ntohs(k.sport) for k, _ in entries if bytes(k.src)[12:] == lab.client.address.packed}
        assert own_ports <= client_ports  # every established flow kept its entry
        spoofed = [k for k, _ in entries if bytes(k.src)[12:] == bytes([198, 18, 0, 77])]
        assert not spoofed, f"{len(spoofed)} spoofed SYNs occupy the table"
    finally:
        stop.set()
        for s in clients:
            s.close()
        servers.close()
        run_lbctl(lab.lb_ns, "remove-vip", vip, check=False)
