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
from netns.traffic import wait_for

LBCTL = str(Path(sys.executable).parent / "lbctl")
STATE_DIR = "/var/lib/lb"  # where lbctl keeps a namespace's state by default


@dataclass
class Result:
    returncode: int
    stdout: str
    stderr: str

    def json(self) -> Any:
        return json.loads(self.stdout)


def run_lbctl(ns: str, *args: str, check: bool = True, env: dict[str, str] | None = None) -> Result:
    proc = subprocess.run(["ip", "netns", "exec", ns, LBCTL, *args], capture_output=True, text=True, timeout=120,
                          env=None if env is None else {**os.environ, **env})
    result = Result(proc.returncode, proc.stdout, proc.stderr)
    if check and proc.returncode != 0:
        raise RuntimeError(f"lbctl {' '.join(args)} failed ({proc.returncode}): {proc.stderr.strip()}")
    return result


def forget(ns: str) -> None:
    """Detach the namespace's data plane and delete its state file, whatever is left of them."""
    run_lbctl(ns, "detach", check=False)
    for name in (f"{ns}.db", f"{ns}.node.db"):  # .node.db: its own part as a node of a cluster (--store)
        for suffix in ("", "-wal", "-shm"):
            with contextlib.suppress(FileNotFoundError):
                os.remove(os.path.join(STATE_DIR, name + suffix))


@dataclass
class DaemonProcess:
    """`lbctl daemon` running in a lab namespace, its JSON log in a file."""

    ns: str
    log_path: str
    args: tuple[str, ...]
    proc: subprocess.Popen | None = None

    def start(self, timeout: float = 60.0) -> "DaemonProcess":
        log = open(self.log_path, "a")
        try:
            self.proc = subprocess.Popen(["ip", "netns", "exec", self.ns, LBCTL, "daemon", "--log-format", "json",
                                          *self.args], stdout=log, stderr=log)
        finally:
            log.close()
        wait_for(lambda: self.proc.poll() is not None or self.events("ready", self.proc.pid),
                 timeout, what="the daemon to be ready")
        if self.proc.poll() is not None:
            raise RuntimeError(f"the daemon exited with {self.proc.returncode}: {self.log_tail()}")
        return self

    def events(self, msg: str | None = None, pid: int | None = None) -> list[dict[str, Any]]:
        """The log's events, of one kind (msg) and one run (pid) if given."""
        found = []
        with open(self.log_path) as f:
            for text in f:
                try:
                    event = json.loads(text)
                except ValueError:
                    continue  # not an event (the compiler's warnings)
                if (msg is None or event.get("msg") == msg) and (pid is None or event.get("pid") == pid):
                    found.append(event)
        return found

    def log_tail(self) -> str:
        with open(self.log_path) as f:
            return f.read()[-2000:]

    def kill9(self) -> None:
        self.proc.kill()
        self.proc.wait(timeout=10)

    def stop(self) -> int:
        """SIGTERM, then SIGKILL if it does not stop in 20 s; returns its exit code."""
        if self.proc is None or self.proc.poll() is not None:
            return self.proc.returncode if self.proc else 0
        self.proc.terminate()
        try:
            return self.proc.wait(timeout=20)
        except subprocess.TimeoutExpired:
            self.proc.kill()
            self.proc.wait(timeout=10)
            raise


@contextlib.contextmanager
def lab_with_lb(n_backends: int = 3, attach: bool = True, *attach_args: str,
                direct_return: bool = False, **build_options: bool) -> Iterator[Lab]:
    """A lab whose LB namespace has lb attached on every interface; all of it goes afterwards.
    build_options: Lab.build's offload settings."""
    with Lab.build(n_backends, direct_return=direct_return, **build_options) as lab:
        try:
            if attach:
                run_lbctl(lab.lb_ns, "attach", *lab.lb_interfaces, *attach_args)
            yield lab
        finally:
            forget(lab.lb_ns)
