"""Drive lbctl as an operator does, `ip netns exec NS lbctl ...`, for the tests, the demo and
the benchmarks. The lab knows lbctl only as a command: it imports nothing of the control plane."""
from __future__ import annotations

import contextlib
import json
import os
import subprocess
import sys
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Iterator

from netns.topology import Lab

LBCTL = str(Path(sys.executable).parent / "lbctl")
STATE_DIR = "/var/lib/lb"  # where lbctl keeps a namespace's state by default


@dataclass
class Result:
    returncode: int
    stdout: str
    stderr: str

    def json(self) -> Any:
        return json.loads(self.stdout)


def run_lbctl(ns: str, *args: str, check: bool = True) -> Result:
    proc = subprocess.run(["ip", "netns", "exec", ns, LBCTL, *args], capture_output=True, text=True, timeout=120)
    result = Result(proc.returncode, proc.stdout, proc.stderr)
    if check and proc.returncode != 0:
        raise RuntimeError(f"lbctl {' '.join(args)} failed ({proc.returncode}): {proc.stderr.strip()}")
    return result


def forget(ns: str) -> None:
    """Detach the namespace's data plane and delete its state file, whatever is left of them."""
    run_lbctl(ns, "detach", check=False)
    for suffix in ("", "-wal", "-shm"):
        with contextlib.suppress(FileNotFoundError):
            os.remove(os.path.join(STATE_DIR, f"{ns}.db{suffix}"))


@contextlib.contextmanager
def lab_with_lb(n_backends: int = 3, attach: bool = True, *attach_args: str,
                direct_return: bool = False) -> Iterator[Lab]:
    """A lab whose LB namespace has lb attached on every interface; all of it goes afterwards."""
    with Lab.build(n_backends, direct_return=direct_return) as lab:
        try:
            if attach:
                run_lbctl(lab.lb_ns, "attach", *lab.lb_interfaces, *attach_args)
            yield lab
        finally:
            forget(lab.lb_ns)
