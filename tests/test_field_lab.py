"""A lab built by hand, as the README's "Try it in network namespaces" tells a user: plain `ip`
commands, veth pairs with the kernel's default offloads (TX checksum offload on: the hosts' frames
carry partial checksums, as a container's do), GRO on the receiving ends, `python3 -m http.server`
backends, then lbctl as typed. Real HTTP through a NAT VIP with every hook (default attach,
--hook tc, --xdp-mode generic), with the LB's own TX checksum offload on and off (off: software
checksums on the LB's egress, as a NIC without offload). Every connection must succeed, and no
host may count a TCP checksum error. Deliberately not built with netns/."""
from __future__ import annotations

import json
import os
import secrets
import subprocess
import sys
from pathlib import Path
from typing import Iterator

import pytest

from netns.traffic import wait_for  # polling only: the lab itself is built with ip commands

LBCTL = str(Path(sys.executable).parent / "lbctl")
STATE_DIR = "/var/lib/lb"
VIP = "10.0.100.1"
CONNECTIONS = 50
HOOKS = {"default": (), "tc": ("--hook", "tc"), "generic": ("--xdp-mode", "generic")}


def sh(*args: str, timeout: float = 60) -> str:
    proc = subprocess.run(args, capture_output=True, text=True, timeout=timeout)
    if proc.returncode != 0:
        raise RuntimeError(f"{' '.join(args)} failed ({proc.returncode}): {proc.stderr.strip()}")
    return proc.stdout


def in_ns(ns: str, *args: str, timeout: float = 60) -> str:
    return sh("ip", "netns", "exec", ns, *args, timeout=timeout)


class HandLab:
    """Namespaces client, lb, b1..b3; veth l0 <-> client's eth0 (10.0.0.0/24), li <-> bi's eth0 (10.0.i.0/24)."""

    def __init__(self, lb_tx_checksum: bool) -> None:
        p = f"{os.environ.get('LB_LAB_PREFIX', 'lb')}f{secrets.token_hex(2)}"
        self.client, self.lb = f"{p}-client", f"{p}-lb"
        self.backends = [f"{p}-b{i}" for i in (1, 2, 3)]
        self.lb_tx_checksum = lb_tx_checksum
        self.namespaces: list[str] = []
        self.servers: list[subprocess.Popen] = []
        self.vip_added = False

    def build(self) -> None:
        for ns in (self.lb, self.client, *self.backends):
            sh("ip", "netns", "add", ns)
            self.namespaces.append(ns)
            in_ns(ns, "ip", "link", "set", "lo", "up")
        in_ns(self.lb, "sysctl", "-qw", "net.ipv4.ip_forward=1")
        in_ns(self.lb, "sysctl", "-qw", "net.ipv4.conf.all.rp_filter=0")
        for i, ns in enumerate((self.client, *self.backends)):
            lb_if = f"l{i}"
            sh("ip", "link", "add", lb_if, "netns", self.lb, "type", "veth", "peer", "name", "eth0", "netns", ns)
            in_ns(self.lb, "ip", "addr", "add", f"10.0.{i}.1/24", "dev", lb_if)
            in_ns(self.lb, "ip", "link", "set", lb_if, "up")
            in_ns(ns, "ip", "addr", "add", f"10.0.{i}.2/24", "dev", "eth0")
            in_ns(ns, "ip", "link", "set", "eth0", "up")
            in_ns(ns, "ip", "route", "add", "default", "via", f"10.0.{i}.1")
            in_ns(ns, "ethtool", "-K", "eth0", "gro", "on")  # takes the frames native XDP redirects to it
            if not self.lb_tx_checksum:
                in_ns(self.lb, "ethtool", "-K", lb_if, "tx", "off")
        for i, ns in enumerate(self.backends, start=1):
            self.servers.append(subprocess.Popen(
                ["ip", "netns", "exec", ns, sys.executable, "-m", "http.server", "8080", "--bind", f"10.0.{i}.2"],
                stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, cwd="/tmp"))
        for i, ns in enumerate(self.backends, start=1):
            wait_listening(ns, f"10.0.{i}.2", 8080)

    def lbctl(self, *args: str) -> str:
        return in_ns(self.lb, LBCTL, *args, timeout=180)

    def teardown(self) -> None:
        subprocess.run(["ip", "netns", "exec", self.lb, LBCTL, "detach"], capture_output=True, timeout=120)
        for suffix in ("", "-wal", "-shm"):
            path = os.path.join(STATE_DIR, f"{self.lb}.db{suffix}")
            if os.path.exists(path):
                os.remove(path)
        for server in self.servers:
            server.terminate()
            try:
                server.wait(timeout=10)
            except subprocess.TimeoutExpired:
                server.kill()
                server.wait(timeout=10)
        for ns in reversed(self.namespaces):
            subprocess.run(["ip", "netns", "del", ns], capture_output=True, timeout=60)


def wait_listening(ns: str, addr: str, port: int, timeout: float = 30) -> None:
    probe = f"import socket; socket.create_connection(('{addr}', {port}), 1).close()"
    wait_for(lambda: subprocess.run(["ip", "netns", "exec", ns, sys.executable, "-c", probe],
                                    capture_output=True).returncode == 0,
             timeout, interval=0.2, what=f"something to listen on {addr}:{port} in {ns}")


def tcp_csum_errors(ns: str) -> int:
    lines = [line.split() for line in in_ns(ns, "cat", "/proc/net/snmp").splitlines() if line.startswith("Tcp:")]
    return int(lines[1][lines[0].index("InCsumErrors")])


# Run in the client's namespace: CONNECTIONS fresh HTTP connections to the VIP, each with a deadline.
CLIENT = f"""
import urllib.request
ok = 0
for _ in range({CONNECTIONS}):
    try:
        with urllib.request.urlopen("http://{VIP}/", timeout=5) as r:
            ok += r.status == 200
    except OSError:
        pass
print(ok)
"""


@pytest.fixture(scope="module", params=[True, False], ids=["lb-tx-offload-on", "lb-tx-offload-off"])
def hand_lab(request) -> Iterator[HandLab]:
    lab = HandLab(lb_tx_checksum=request.param)
    try:
        lab.build()
        yield lab
    finally:
        lab.teardown()


@pytest.mark.parametrize("hook", HOOKS)
def test_every_http_connection_through_a_nat_vip_succeeds(hand_lab: HandLab, hook: str):
    attached = hand_lab.lbctl("attach", "l0", "l1", "l2", "l3", *HOOKS[hook])
    try:
        if not hand_lab.vip_added:  # once per lab, as the README says; a later attach restores it
            hand_lab.lbctl("add-vip", f"{VIP}:80/tcp")
            for i in (1, 2, 3):
                hand_lab.lbctl("add-backend", f"{VIP}:80/tcp", f"10.0.{i}.2:8080")
            hand_lab.vip_added = True
        if hook == "default":  # every peer offloads TX checksums: generic XDP, said once per interface
            assert [line for line in attached.splitlines() if "generic XDP, which keeps" in line] == [
                f"l{i}: generic XDP, which keeps partial checksums: its veth peer eth0 offloads TX checksums"
                for i in range(4)]
        hosts = (hand_lab.client, *hand_lab.backends)
        errors_before = {ns: tcp_csum_errors(ns) for ns in hosts}
        succeeded = int(in_ns(hand_lab.client, sys.executable, "-c", CLIENT, timeout=300))
        assert succeeded == CONNECTIONS
        assert {ns: tcp_csum_errors(ns) for ns in hosts} == errors_before
        reasons = json.loads(hand_lab.lbctl("stats", "--json"))["reasons"]
        assert reasons["fwd_nat"] >= CONNECTIONS and reasons["fwd_reply"] >= CONNECTIONS  # lb did the work
    finally:
        hand_lab.lbctl("detach")


def test_a_peer_without_tx_offload_keeps_native_xdp_and_mixed_modes_carry_traffic(hand_lab: HandLab):
    if not hand_lab.lb_tx_checksum:
        pytest.skip("the choice depends on the peers only: one lab shows it")
    in_ns(hand_lab.client, "ethtool", "-K", "eth0", "tx", "off")  # the client's frames: full checksums
    try:
        attached = hand_lab.lbctl("attach", "l0", "l1", "l2", "l3")
        try:
            modes = {i["name"]: i["mode"] for i in json.loads(hand_lab.lbctl("list", "--json"))["dataplane"]["interfaces"]}
            assert modes == {"l0": "native", "l1": "generic", "l2": "generic", "l3": "generic"}
            assert "l0 (native XDP)" in attached and "l0:" not in attached
            assert int(in_ns(hand_lab.client, sys.executable, "-c", CLIENT, timeout=300)) == CONNECTIONS
        finally:
            hand_lab.lbctl("detach")
    finally:
        in_ns(hand_lab.client, "ethtool", "-K", "eth0", "tx", "on")


# Run in the LB's namespace: what attach tells the operator who forces native XDP on l1.
FORCED_NATIVE = """
import socket
from control.model import Interface
from control.service import choose_xdp_mode
iface = Interface("l1", socket.if_nametoindex("l1"), "native")
print(choose_xdp_mode(iface, "native"))
print(iface.mode)
"""


def test_forcing_native_xdp_on_a_partial_checksum_veth_warns_with_the_fixes(hand_lab: HandLab):
    warning, mode = in_ns(hand_lab.lb, sys.executable, "-c", FORCED_NATIVE).splitlines()
    assert mode == "native"
    assert warning == ("l1: warning: native XDP forced, but its veth peer eth0 offloads TX checksums: the packets "
                       "it rewrites will arrive with bad checksums; fix: 'ethtool -K eth0 tx off' on the peer, "
                       "or --hook tc")
