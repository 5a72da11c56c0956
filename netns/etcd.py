"""A real etcd member for the lab: in a namespace of its own, with a temporary data directory."""
from __future__ import annotations

import contextlib
import os
import shutil
import subprocess
import tempfile
from typing import Iterator

from control.etcdstore import EtcdStore, StoreUnreachable
from netns.nsenter import in_netns
from netns.traffic import wait_for

CLIENT_PORT = 2379


class Etcd:
    """One etcd member in namespace `ns`, serving clients on `listen` (its loopback by default); stores
    made with store() talk to it from inside that namespace."""

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

    def store(self, prefix: str, node: str = "ready", local_dir: str | None = None) -> EtcdStore:
        """A node's store: `node`'s own part in a file of `local_dir` (the etcd's data directory by default)."""
        local = os.path.join(local_dir or self.data_dir, f"{prefix}-{node}.db")
        return EtcdStore.from_url(f"{self.url(prefix)}?node={node}&local={local}")

    def ready(self) -> bool:
        assert self.proc.poll() is None, f"etcd exited with {self.proc.returncode}; see {self.log.name}"
        try:
            with in_netns(self.ns):
                with self.store("ready").transaction():  # a write: a read would answer from the node's file
                    pass
            return True
        except StoreUnreachable:
            return False

    def stop(self) -> None:
        if self.proc.poll() is None:
            self.proc.terminate()
            try:
                self.proc.wait(timeout=15)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait(timeout=15)
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
