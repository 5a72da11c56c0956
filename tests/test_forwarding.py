"""The kernel settings attach checks (control/forwarding.py), on a fake /proc/sys (no root, no lab)."""
from __future__ import annotations

from pathlib import Path

from control.forwarding import describe, missing_settings


def fake_sysctls(root: Path, values: dict[str, str]) -> Path:
    for key, value in values.items():
        path = root / key.replace(".", "/")
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text(value + "\n")
    return root


GOOD = {"net.ipv4.ip_forward": "1", "net.ipv6.conf.all.forwarding": "1", "net.ipv4.conf.all.rp_filter": "0",
        "net.ipv4.conf.eth0.rp_filter": "0", "net.ipv4.conf.eth1.rp_filter": "2"}


def test_nothing_missing_when_forwarding_is_on_and_reverse_path_filtering_off_or_loose(tmp_path):
    root = fake_sysctls(tmp_path, GOOD)
    assert missing_settings(["eth0", "eth1"], ipv6=True, root=root) == []
    assert describe([]) is None


def test_each_missing_setting_is_named_as_sysctl_takes_it(tmp_path):
    root = fake_sysctls(tmp_path, {**GOOD, "net.ipv4.ip_forward": "0", "net.ipv6.conf.all.forwarding": "0",
                                   "net.ipv4.conf.eth1.rp_filter": "1"})
    missing = missing_settings(["eth0", "eth1"], ipv6=True, root=root)
    assert missing == ["net.ipv4.ip_forward=1", "net.ipv6.conf.all.forwarding=1", "net.ipv4.conf.eth1.rp_filter=0"]
    line = describe(missing)
    assert "\n" not in line and "net.ipv4.ip_forward=1 net.ipv6.conf.all.forwarding=1" in line


def test_ipv6_forwarding_matters_only_with_ipv6_vips_and_strict_all_counts(tmp_path):
    root = fake_sysctls(tmp_path, {**GOOD, "net.ipv6.conf.all.forwarding": "0", "net.ipv4.conf.all.rp_filter": "1"})
    assert missing_settings(["eth0"], ipv6=False, root=root) == ["net.ipv4.conf.all.rp_filter=0"]
