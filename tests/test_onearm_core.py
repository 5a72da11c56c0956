"""The one-armed lab's "LB on a core of its own" (netns/onearm.py, OneArm.own_core), as the bench's end
to end uses it: the arm's receive runs in a threaded-NAPI kthread pinned alone to CPU 1 at a real-time
priority, the router's in another on CPU 0 with the caller's thread; everything is undone on leaving."""
from __future__ import annotations

import contextlib
import os
import subprocess

import pytest

from netns.onearm import OneArm, _napi_threads
from netns.topology import Lab
from netns.traffic import wait_for
from netns.xdptools import Generator, Sink, attach, detach

pytestmark = pytest.mark.skipif(len(os.sched_getaffinity(0)) < 2, reason="needs two CPUs")
SENT = 3000


def threaded(ns: str, ifname: str) -> str:
    return subprocess.run(["ip", "netns", "exec", ns, "cat", f"/sys/class/net/{ifname}/threaded"],
                          capture_output=True, text=True, check=True).stdout.strip()


def test_the_lb_runs_alone_on_its_core_and_everything_is_undone_after():
    with Lab.build(1, hosts_tx_checksum=False) as lab, contextlib.ExitStack() as stack:
        vip = lab.vip(5)
        arm = stack.enter_context(OneArm.build(lab, [vip]))
        hairpin = arm.bare_tunnel_hairpin(len(arm.frame(vip, 53)))  # the cheapest tunnel LB: XDP_TX of all
        attach(lab.lb_ns, arm.arm, hairpin)
        stack.callback(detach, lab.lb_ns, arm.arm)
        generator = Generator(arm.ns, arm.router_if, arm.frame(vip, 53), 64)
        own = os.sched_getaffinity(0)
        sink = Sink(arm.ns, arm.router_if)
        before = _napi_threads(arm.arm)

        with arm.own_core(router_sink=sink) as core:
            assert core.pid not in before
            assert os.sched_getaffinity(core.pid) == {1}
            assert os.sched_getscheduler(core.pid) == os.SCHED_FIFO
            assert os.sched_getaffinity(0) == {0}  # the generator's thread, with the router
            seen, ran = arm.lb_received(), core.runtime_ns()
            generator.send(SENT)
            wait_for(lambda: sink.count() > 0 and arm.lb_received() > seen, timeout=10,
                     what="frames through the LB's core to the router's sink")
            assert core.runtime_ns() > ran  # the LB's work ran in its kthread
            # the router counted and dropped: nothing went on to the backend
            assert arm.arrived() == (0, 0)

        assert os.sched_getaffinity(0) == own
        for ns, ifname in ((lab.lb_ns, arm.arm), (arm.ns, arm.router_if)):  # threaded NAPI off again
            assert threaded(ns, ifname) == "0"
        # the router forwards again: the hairpin's frames reach the backend, decapsulated
        generator.send(SENT)
        wait_for(lambda: arm.arrived()[0] > 0, timeout=10, what="frames at the backend after own_core")
        assert arm.arrived()[1] == 0
