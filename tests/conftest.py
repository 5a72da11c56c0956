"""Fixtures: a lab per test module, lbctl run as an operator runs it (ip netns exec)."""
from __future__ import annotations

import contextlib
import json
import os
import subprocess
import sys
from dataclasses import dataclass
from pathlib import Path
from typing import Iterator

import pytest

from netns.topology import Lab
from netns.traffic import Servers

LBCTL = str(Path(sys.executable).parent / "lbctl")
STATE_DIR = "/var/lib/lb"


@dataclass
class Result:
    returncode: int
    stdout: str
    stderr: str

    def json(self):
        return json.loads(self.stdout)


def run_lbctl(ns: str, *args: str, check: bool = True) -> Result:
    proc = subprocess.run(["ip", "netns", "exec", ns, LBCTL, *args], capture_output=True, text=True, timeout=120)
    result = Result(proc.returncode, proc.stdout, proc.stderr)
    if check and proc.returncode != 0:
        raise AssertionError(f"lbctl {' '.join(args)} failed ({proc.returncode}): {proc.stderr.strip()}")
    return result


def remove_state(ns: str) -> None:
    for suffix in ("", "-wal", "-shm"):
        with contextlib.suppress(FileNotFoundError):
            os.remove(os.path.join(STATE_DIR, f"{ns}.db{suffix}"))


@contextlib.contextmanager
def lab_with_lb(n_backends: int = 3, attach: bool = True, *attach_args: str) -> Iterator[Lab]:
    with Lab.build(n_backends) as lab:
        try:
            if attach:
                run_lbctl(lab.lb_ns, "attach", *lab.lb_interfaces, *attach_args)
            yield lab
        finally:
            run_lbctl(lab.lb_ns, "detach", check=False)
            remove_state(lab.lb_ns)


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
