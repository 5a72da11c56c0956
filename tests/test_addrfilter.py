"""The address filter (lb/addrfilter.py) against bpf/hash.h's addr_bucket, and what it claims."""
from __future__ import annotations

import ipaddress
import subprocess
from pathlib import Path

from lb import addrfilter
from lb.structs import ADDR_FILTER_SIZE, ADDR_FILTER_BITS, FILTER_NO_BACKEND, FILTER_NO_VIP, LbAddr

BPF_DIR = Path(__file__).resolve().parent.parent / "bpf"
ADDRESSES = ["198.19.0.1", "198.18.1.2", "10.0.0.1", "0.0.0.0", "255.255.255.255", "2001:db8::1",
             "fd00:19::ff:1", "::ffff:198.19.0.1"]


def test_python_and_c_put_an_address_in_the_same_bucket(tmp_path):
    addrs = [bytes(LbAddr.of(ipaddress.ip_address(a))) for a in ADDRESSES]
    lines = ["#include <stdio.h>", "#include <linux/types.h>", "#define __always_inline inline",
             '#include "consts.h"', '#include "structs.h"', '#include "hash.h"', "int main(void) {",
             "union lb_addr a;"]
    for addr in addrs:
        lines.append("{ static const unsigned char b[16] = {" + ",".join(str(x) for x in addr) + "};")
        lines.append('__builtin_memcpy(a.b, b, 16); printf("%u\\n", addr_bucket(&a)); }')
    lines.append("return 0; }")
    (tmp_path / "bucket.c").write_text("\n".join(lines))
    subprocess.run(["gcc", f"-I{BPF_DIR}", "-o", str(tmp_path / "bucket"), str(tmp_path / "bucket.c")], check=True)
    out = subprocess.run([str(tmp_path / "bucket")], check=True, capture_output=True, text=True).stdout.split()
    assert [int(x) for x in out] == [addrfilter.bucket(a) for a in addrs]
    assert all(0 <= addrfilter.bucket(a) < 1 << ADDR_FILTER_BITS for a in addrs)


def test_the_filter_claims_none_only_where_no_address_of_the_kind_falls():
    vip, backend = (bytes(LbAddr.of(ipaddress.ip_address(a))) for a in ("198.19.0.1", "198.18.1.2"))
    words = addrfilter.words([vip], [backend])
    assert len(words) == ADDR_FILTER_SIZE
    assert not words[addrfilter.bucket(vip)] & FILTER_NO_VIP
    assert not words[addrfilter.bucket(backend)] & FILTER_NO_BACKEND
    others = set(range(ADDR_FILTER_SIZE)) - {addrfilter.bucket(vip), addrfilter.bucket(backend)}
    assert all(words[i] == FILTER_NO_VIP | FILTER_NO_BACKEND for i in others)


def test_neighbouring_addresses_spread_over_the_buckets():
    """A /22 of clients should not share a handful of buckets with the VIPs."""
    base = int(ipaddress.ip_address("198.19.0.0"))
    buckets = {addrfilter.bucket(bytes(LbAddr.of(ipaddress.ip_address(base + i)))) for i in range(1024)}
    assert len(buckets) > 600


def test_python_and_c_put_a_vip_in_the_same_slot(tmp_path):
    import socket

    from lb.structs import VIP_SLOT_BITS, be16
    keys = [(bytes(LbAddr.of(ipaddress.ip_address(a))), be16(port), proto)
            for a in ADDRESSES for port, proto in ((80, socket.IPPROTO_TCP), (53, socket.IPPROTO_UDP), (65535, 6))]
    lines = ["#include <stdio.h>", "#include <linux/types.h>", "#define __always_inline inline",
             '#include "consts.h"', '#include "structs.h"', '#include "hash.h"', "int main(void) {",
             "union lb_addr a;"]
    for addr, port, proto in keys:
        lines.append("{ static const unsigned char b[16] = {" + ",".join(str(x) for x in addr) + "};")
        lines.append(f'__builtin_memcpy(a.b, b, 16); printf("%u\\n", vip_slot(&a, {port}, {proto})); }}')
    lines.append("return 0; }")
    (tmp_path / "slot.c").write_text("\n".join(lines))
    subprocess.run(["gcc", f"-I{BPF_DIR}", "-o", str(tmp_path / "slot"), str(tmp_path / "slot.c")], check=True)
    out = subprocess.run([str(tmp_path / "slot")], check=True, capture_output=True, text=True).stdout.split()
    assert [int(x) for x in out] == [addrfilter.vip_slot(*k) for k in keys]
    assert all(0 <= int(x) < 1 << VIP_SLOT_BITS for x in out)


def test_a_slot_holds_its_one_vip_and_not_two_nor_a_vip_of_every_port():
    from lb.structs import be16
    a = bytes(LbAddr.of(ipaddress.ip_address("198.19.0.1")))
    table = addrfilter.slots([(a, be16(80), 6, 0), (a, be16(443), 6, 7), (a, 0, 6, 9)])
    assert table[addrfilter.vip_slot(a, be16(80), 6)] == 1 and table[addrfilter.vip_slot(a, be16(443), 6)] == 8
    assert sum(1 for w in table if w) == 2
    clash = addrfilter.slots([(a, be16(80), 6, 0), (a, be16(80), 6, 3)])  # as two VIPs of one slot
    assert not any(clash)


def test_full_nat_and_nat_backends_are_backends_to_the_filter_and_dsr_ones_are_not():
    """A reply to a full-NAT source address comes from the flow's backend: the data plane looks
    for it only when the filter leaves the backend's bucket open (lb.c xdp_lb)."""
    from control.model import BackendAddress, BackendState, State, VipAddress, VipState
    from control.reconcile import filter_addresses

    vips = []
    for i, mode in enumerate(("fullnat", "nat", "dsr")):
        vip = VipAddress.parse(f"10.0.0.{i + 1}:80/tcp")
        backend = BackendState(BackendAddress.parse(f"10.0.1.{i + 1}", vip), i + 1)
        vips.append(VipState(vip, i, mode=mode, backends=[backend]))
    vip_addrs, backend_addrs = filter_addresses(State(vips=vips))
    assert len(vip_addrs) == 3
    assert backend_addrs == [bytes(LbAddr.of(ipaddress.ip_address(a))) for a in ("10.0.1.1", "10.0.1.2")]
