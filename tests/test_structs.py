"""bpf/structs.h and bpf/consts.h against their Python mirrors: sizes, offsets, reason codes."""
from __future__ import annotations

import ctypes
import subprocess
from pathlib import Path

import pytest

from lb import structs
from lb.loader import BPF_DIR


# Constants of bpf/consts.h and their Python mirrors.
FLAGS = {
    "LB_VIP_ACTIVE": structs.VIP_ACTIVE, "LB_FLOW_CLOSING": structs.FLOW_CLOSING, "LB_NO_BACKEND": structs.NO_BACKEND,
    "LB_PROBE_MAGIC": structs.PROBE_MAGIC, "LB_BACKEND_IN_USE": structs.BACKEND_IN_USE,
    "LB_BACKEND_NO_NEW": structs.BACKEND_NO_NEW, "LB_BACKEND_SHARED": structs.BACKEND_SHARED,
    "LB_VIP_META_HASH_SOURCE": structs.VIP_META_HASH_SOURCE, "LB_REPLY_VIPS": structs.REPLY_VIPS,
    "LB_TCP_TIMEOUT": structs.TCP_TIMEOUT, "LB_TCP_CLOSING_TIMEOUT": structs.TCP_CLOSING_TIMEOUT,
    "LB_UDP_TIMEOUT": structs.UDP_TIMEOUT, "LB_TICK_SHIFT": structs.TICK_SHIFT,
    "LB_MAX_IFINDEX": structs.MAX_IFINDEX, "LB_VIP_HASH_SOURCE": structs.VIP_HASH_SOURCE,
    "LB_CFG_ANY_PORT": structs.CFG_ANY_PORT, "LB_ICMP_TTL": structs.ICMP_TTL, "LB_VIP_ACL": structs.VIP_ACL,
    "LB_VIP_ACL_ALLOWLIST": structs.VIP_ACL_ALLOWLIST,
    "LB_VIP_DSR": structs.VIP_DSR, "LB_VIP_TUNNEL": structs.VIP_TUNNEL, "LB_MODE_NAT": structs.MODE_NAT,
    "LB_MODE_DSR": structs.MODE_DSR, "LB_MODE_TUNNEL": structs.MODE_TUNNEL, "LB_ENCAP_TTL": structs.ENCAP_TTL,
    "LB_ENCAP_SRC4_PREFIX": structs.ENCAP_SRC4_PREFIX, "LB_ENCAP_SRC6_PREFIX": structs.ENCAP_SRC6_PREFIX,
    "LB_ACL_ALLOW": structs.ACL_ALLOW, "LB_ACL_DENY": structs.ACL_DENY, "LB_FLOW_LOCAL": structs.FLOW_LOCAL,
    "LB_MARK_MAGIC": structs.MARK_MAGIC, "LB_MARK_MAGIC_MASK": structs.MARK_MAGIC_MASK,
    "LB_MARK_BACKEND_MASK": structs.MARK_BACKEND_MASK, "LB_LAYOUT_VERSION": structs.LAYOUT_VERSION,
    "LB_MAX_ACL_RULES": structs.MAX_ACL_RULES, "LB_ADDR_PASS_UNSERVED": structs.ADDR_PASS_UNSERVED,
    "LB_MAX_VLANS": structs.MAX_VLANS,
    "LB_ADDR_FILTER_SIZE": structs.ADDR_FILTER_SIZE, "LB_ADDR_FILTER_BITS": structs.ADDR_FILTER_BITS,
    "LB_VIP_SLOTS": structs.VIP_SLOTS, "LB_VIP_SLOT_BITS": structs.VIP_SLOT_BITS,
    "LB_FILTER_NO_VIP": structs.FILTER_NO_VIP, "LB_FILTER_NO_BACKEND": structs.FILTER_NO_BACKEND,
    "LB_VIP_FULLNAT": structs.VIP_FULLNAT, "LB_CFG_FULLNAT": structs.CFG_FULLNAT, "LB_MODE_FULLNAT": structs.MODE_FULLNAT,
    "LB_SNAT_ADDRS": structs.SNAT_ADDRS, "LB_SNAT_PROBES": structs.SNAT_PROBES,
}


def _c_program() -> str:
    lines = ["#include <stdio.h>", "#include <stddef.h>", '#include "structs.h"', '#include "consts.h"',
             "int main(void) {"]
    for c_name, py in structs.C_STRUCTS.items():
        lines.append(f'printf("{c_name} size %zu\\n", sizeof({c_name}));')
        for field, _ in py._fields_:
            if c_name == "union lb_addr":
                continue  # the mirror names one view of the union
            lines.append(f'printf("{c_name}.{field} %zu\\n", offsetof({c_name}, {field}));')
    for name in structs.REASONS:
        lines.append(f'printf("{name} %d\\n", (int){name});')
    lines.append('printf("LB_REASON_MAX %d\\n", (int)LB_REASON_MAX);')
    for name in FLAGS:
        lines.append(f'printf("{name} %u\\n", (unsigned){name});')
    lines.append("return 0; }")
    return "\n".join(lines)


@pytest.fixture(scope="module")
def c_layout(tmp_path_factory) -> dict[str, int]:
    d: Path = tmp_path_factory.mktemp("layout")
    (d / "layout.c").write_text(_c_program())
    subprocess.run(["gcc", f"-I{BPF_DIR}", "-o", str(d / "layout"), str(d / "layout.c")], check=True)
    out = subprocess.run([str(d / "layout")], check=True, capture_output=True, text=True).stdout
    return {line.rsplit(" ", 1)[0]: int(line.rsplit(" ", 1)[1]) for line in out.splitlines()}


@pytest.mark.parametrize("c_name", list(structs.C_STRUCTS))
def test_struct_layout_matches_c(c_layout, c_name):
    py = structs.C_STRUCTS[c_name]
    assert ctypes.sizeof(py) == c_layout[f"{c_name} size"]
    if c_name != "union lb_addr":
        for field, _ in py._fields_:
            assert getattr(py, field).offset == c_layout[f"{c_name}.{field}"], field


def test_reason_codes_are_explicit_in_c():
    """Every enum lb_reason member has its value written out: pinned counters keep their meaning."""
    import re
    text = (BPF_DIR / "consts.h").read_text()
    body = text[text.index("enum lb_reason {"):text.index("};", text.index("enum lb_reason {"))]
    members = re.findall(r"^\s*(LB_[A-Z0-9_]+)\s*(=\s*\d+)?\s*,", body, re.M)
    assert members and all(value for _, value in members), [name for name, value in members if not value]


def test_reason_codes_match_c(c_layout):
    assert [c_layout[name] for name in structs.REASONS] == list(range(len(structs.REASONS)))
    assert c_layout["LB_REASON_MAX"] == len(structs.REASONS)


@pytest.mark.parametrize("name", FLAGS)
def test_flags_match_c(c_layout, name):
    assert c_layout[name] == FLAGS[name]


def test_ipv4_addresses_are_stored_ipv4_mapped():
    import ipaddress
    a = structs.LbAddr.of(ipaddress.ip_address("198.19.0.1"))
    assert bytes(a) == bytes(10) + b"\xff\xff" + bytes([198, 19, 0, 1])
    assert a.address() == ipaddress.ip_address("198.19.0.1")
    v6 = ipaddress.ip_address("2001:db8::1")
    assert structs.LbAddr.of(v6).address() == v6
