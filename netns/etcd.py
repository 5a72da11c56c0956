"""A real etcd member for the lab: in a namespace of its own, with a temporary data directory."""
from __future__ import annotations

import contextlib
import json
import os
import shutil
import subprocess
import tempfile
import urllib.error
import urllib.request
from typing import Iterator

from netns.nsenter import in_netns
from netns.traffic import stop_process, wait_for

CLIENT_PORT = 2379


class Etcd:
    """One etcd member in namespace `ns`, serving clients on `listen` (its loopback by default) at url()."""

    def __init__(self, ns: str, data_dir: str, listen: str = "127.0.0.1"):
        self.ns = ns
        self.data_dir = data_dir
        self.listen = listen
        self.log = open(os.path.join(data_dir, "etcd.log"), "a")
        self.proc = subprocess.Popen(
            ["ip", "netns", "exec", ns, "etcd", "--name", ns, "--data-dir", os.path.join(data_dir, "member"),
             "--listen-client-urls", f"http://{listen}:{CLIENT_PORT}",
             "--advertise-client-urls", f"http://127.0.0.1:{CLIENT_PORT}",
             "--listen-peer-urls", "http://127.0.0.1:2380", "--initial-advertise-peer-urls", "http://127.0.0.1:2380",
             "--initial-cluster", f"{ns}=http://127.0.0.1:2380"],
            stdout=self.log, stderr=subprocess.STDOUT)

    def url(self, prefix: str) -> str:
        return f"etcd://127.0.0.1:{CLIENT_PORT}/{prefix}"

    def ready(self) -> bool:
        """Does the member answer, with a leader (etcd's own /health: writes would go through)?"""
        assert self.proc.poll() is None, f"etcd exited with {self.proc.returncode}; see {self.log.name}"
        host = "127.0.0.1" if self.listen == "0.0.0.0" else self.listen
        try:
            with in_netns(self.ns), urllib.request.urlopen(f"http://{host}:{CLIENT_PORT}/health", timeout=2) as r:
                return json.load(r).get("health") == "true"
        except (OSError, ValueError):  # not listening yet, or no leader yet
            return False

    def stop(self) -> None:
        stop_process(self.proc)
        self.log.close()

    def restart(self) -> None:
        """Start it again on the same data (after stop())."""
        self.__init__(self.ns, self.data_dir, self.listen)
        wait_for(self.ready, timeout=60, interval=0.2, what="etcd to answer again")


@contextlib.contextmanager
def etcd_in(ns: str, listen: str = "127.0.0.1") -> Iterator[Etcd]:
    """etcd in namespace `ns`, with a temporary data directory; all of it goes afterwards."""
    data_dir = tempfile.mkdtemp(prefix=f"{ns}-etcd-")
    server = None
    try:
        server = Etcd(ns, data_dir, listen)
        wait_for(server.ready, timeout=60, interval=0.2, what="etcd to answer")
        yield server
    finally:
        if server is not None:
            server.stop()
        shutil.rmtree(data_dir, ignore_errors=True)
