"""Fixtures: a lab per test module, lbctl run as an operator runs it (ip netns exec)."""
from __future__ import annotations

from typing import Iterator

import pytest

from netns.lbctl import lab_with_lb, run_lbctl
from netns.topology import Lab
from netns.traffic import Servers

__all__ = ["lab_with_lb", "run_lbctl"]


@pytest.fixture(scope="module")
def lab() -> Iterator[Lab]:
    """A lab with the data plane attached on every LB interface."""
    with lab_with_lb(3) as lab:
        yield lab


@pytest.fixture(scope="module")
def servers(lab: Lab) -> Iterator[Servers]:
    """HTTP on 8080 and UDP echo on 5353 in every backend, answering with the backend's name."""
    with Servers.running({b.ns: backend_name(b.ns) for b in lab.backends}) as s:
        yield s


def backend_name(ns: str) -> str:
    return ns.rsplit("-", 1)[1]


def add_vip_with_backends(lab: Lab, vip: str, backend_port: int) -> str:
    """Add `vip` with every lab backend behind it on `backend_port`; returns the VIP."""
    run_lbctl(lab.lb_ns, "add-vip", vip)
    for b in lab.backends:
        run_lbctl(lab.lb_ns, "add-backend", vip, f"{b.address}:{backend_port}")
    return vip


def lbctl(lab: Lab):
    return lambda *args, check=True: run_lbctl(lab.lb_ns, *args, check=check)
