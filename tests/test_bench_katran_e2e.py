"""The bench's one-armed end to end with Katran as the LB (bench/endtoend.py, netns/onearm.py), a few
packets: they reach the backends decapsulated by lb's decap program, the client's packet byte for byte.
Skipped without Katran's object (bench/katran.py says where it is looked for)."""
from __future__ import annotations

import contextlib
import select
import socket
import time

import pytest

from bench import endtoend, katran
from netns.nsenter import socket_in
from netns.onearm import BACKEND_IF, OneArm
from netns.topology import Lab, lab_mac
from netns.traffic import wait_for
from netns.xdptools import Generator, attach, detach

KATRAN = katran.reference_object()
pytestmark = pytest.mark.skipif(KATRAN is None, reason=katran.SKIPPED)
ETH_P_ALL = 0x0003
SENT = 3000


def captured(socks: list[socket.socket], deadline: float) -> list[bytes]:
    """IPv4 frames the backends' packet sockets saw (after XDP, before TC ingress drops them)."""
    frames = []
    while time.monotonic() < deadline:
        ready, _, _ = select.select(socks, [], [], 0.2)
        if not ready and frames:
            break
        for sock in ready:
            frame = sock.recv(2048)
            if frame[12:14] == b"\x08\x00":
                frames.append(frame)
    return frames


def test_katran_one_armed_delivers_decapsulated_packets_to_the_backends():
    with Lab.build(2, hosts_tx_checksum=False) as lab, contextlib.ExitStack() as stack:
        vip = lab.vip(endtoend.TUNNEL_VIP)
        arm = stack.enter_context(OneArm.build(lab, [vip]))
        k = stack.enter_context(endtoend.katran_on_arm(arm, KATRAN, 4096, vip))
        template = arm.frame(vip, endtoend.VIP_PORT)
        generator = Generator(arm.ns, arm.router_if, template, endtoend.FLOWS)
        socks = []
        for b in lab.backends:
            sock = stack.enter_context(socket_in(b.ns, socket.AF_PACKET, socket.SOCK_RAW, socket.htons(ETH_P_ALL)))
            sock.bind((BACKEND_IF, 0))
            socks.append(sock)
        attach(lab.lb_ns, arm.arm, k.prog)
        stack.callback(detach, lab.lb_ns, arm.arm)

        generator.send(SENT)
        wait_for(lambda: arm.arrived()[0] >= SENT, timeout=30, what="packets at the backends")
        frames = captured(socks, time.monotonic() + 10)

        plain, still_ipip = arm.arrived()
        assert (plain, still_ipip) == (SENT, 0)
        per_backend = arm.decapsulated()  # lb's decap program's own counters, per backend
        assert sum(per_backend) == SENT and all(n > 0 for n in per_backend), per_backend
        assert frames, "no frame seen on a backend's kt0"
        hops = {(lab_mac(200 + i, 2), lab_mac(200 + i, 1)) for i in range(1, len(lab.backends) + 1)}
        for frame in frames:
            assert (frame[:6].hex(":"), frame[6:12].hex(":")) in hops  # the router's hop to that backend
            sport = int.from_bytes(frame[34:36], "big")
            assert 1024 <= sport < 1024 + endtoend.FLOWS
            # The client's packet as the generator sent it, the flow's source port aside.
            assert frame[14:34] + frame[36:] == template[14:34] + template[36:]
