"""lb/offload.py: which interfaces can hand native XDP frames with partial checksums, by kind and,
for a veth, by its peer's TX checksum offload, wherever the peer lives."""
from __future__ import annotations

import os
import secrets
import subprocess
import sys
from typing import Iterator

import pytest

# Run in a namespace: lb.offload's verdict on each named interface, one line each.
JUDGE = """
import socket, sys
from lb.offload import partial_checksums
for name in sys.argv[1:]:
    found = partial_checksums(socket.if_nametoindex(name))
    print(f"{name}|{found.reason if found else ''}|{(found.peer or '') if found else ''}|{found.fix() if found else ''}")
"""


def ip(*args: str) -> None:
    subprocess.run(["ip", *args], check=True, capture_output=True, timeout=30)


@pytest.fixture(scope="module")
def namespaces() -> Iterator[tuple[str, str]]:
    here, there = (f"{os.environ.get('LB_LAB_PREFIX', 'lb')}o{secrets.token_hex(2)}-{n}" for n in ("a", "b"))
    try:
        for ns in (here, there):
            ip("netns", "add", ns)
        ip("-n", here, "link", "add", "v-out", "type", "veth", "peer", "name", "v-far", "netns", there)
        ip("-n", here, "link", "add", "v-near", "type", "veth", "peer", "name", "v-near-peer")
        ip("-n", here, "tuntap", "add", "dev", "tap0", "mode", "tap")
        ip("-n", here, "link", "add", "br0", "type", "bridge")
        yield here, there
    finally:
        for ns in (here, there):
            subprocess.run(["ip", "netns", "del", ns], capture_output=True, timeout=30)


def judge(ns: str, *names: str) -> dict[str, tuple[str, str, str]]:
    out = subprocess.run(["ip", "netns", "exec", ns, sys.executable, "-c", JUDGE, *names], check=True,
                         capture_output=True, text=True, timeout=60).stdout
    return {name: tuple(rest) for name, *rest in (line.split("|") for line in out.splitlines())}


def ethtool_tx(ns: str, ifname: str, on: bool) -> None:
    subprocess.run(["ip", "netns", "exec", ns, "ethtool", "-K", ifname, "tx", "on" if on else "off"],
                   check=True, capture_output=True, timeout=30)


def test_each_kind_is_judged_and_a_veth_by_its_peer_in_whatever_namespace(namespaces):
    here, there = namespaces
    got = judge(here, "v-out", "v-near", "tap0", "br0", "lo")
    assert got["v-out"] == ("its veth peer v-far offloads TX checksums", "v-far",
                            "'ethtool -K v-far tx off' on the peer, or --hook tc")
    assert got["v-near"][:2] == ("its veth peer v-near-peer offloads TX checksums", "v-near-peer")
    assert got["tap0"] == ("a tun/tap's writer (a VM) may hand over partial checksums", "",
                           "TX checksum offload off on the sender, or --hook tc")
    assert got["br0"][:2] == ("a bridge's local ports (containers' veths) deliver unfinished checksums", "")
    assert got["lo"] == ("", "", "")
    ethtool_tx(there, "v-far", False)
    ethtool_tx(here, "v-near-peer", False)
    try:
        assert judge(here, "v-out", "v-near") == {"v-out": ("", "", ""), "v-near": ("", "", "")}
    finally:
        ethtool_tx(there, "v-far", True)
        ethtool_tx(here, "v-near-peer", True)
