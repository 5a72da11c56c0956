"""Bad input to every lbctl command: one line on stderr, exit 2, nothing changed."""
from __future__ import annotations

import hashlib
import subprocess
from typing import Iterator

import pytest

from lb.maps import DataPlaneMaps
from netns.topology import Lab
from tests.conftest import lab_with_lb, run_lbctl

VIP = "198.19.0.1:80/tcp"
BACKEND = "198.18.1.2:8080"
ANY_PORT_VIP = "198.19.0.8/tcp"
DSR_VIP = "198.19.0.10:8080/tcp"
TUNNEL_VIP = "[2001:2:0:ff::10]:8080/tcp"


@pytest.fixture(scope="module")
def configured(lab: Lab) -> Lab:
    run_lbctl(lab.lb_ns, "add-vip", VIP)
    run_lbctl(lab.lb_ns, "add-backend", VIP, BACKEND)
    run_lbctl(lab.lb_ns, "add-vip", ANY_PORT_VIP)
    run_lbctl(lab.lb_ns, "add-vip", DSR_VIP, "--mode", "dsr")
    run_lbctl(lab.lb_ns, "add-vip", TUNNEL_VIP, "--mode", "tunnel")
    return lab


def snapshot(lab: Lab) -> tuple[str, str]:
    """The stored state as lbctl shows it, and a digest of the maps' contents."""
    listed = run_lbctl(lab.lb_ns, "list", "--json")
    pin_dir = listed.json()["dataplane"]["pin_dir"]
    ring = listed.json()["dataplane"]["ring_size"]
    digest = hashlib.sha256()
    with DataPlaneMaps.open(pin_dir) as maps:
        for name in ("vips", "backends", "reply_sources", "vip_meta", "routes", "acl"):
            for key, value in sorted((bytes(k), bytes(v)) for k, v in maps.maps[name].items()):
                digest.update(key + value)
        digest.update(str(maps.maglev.read_range(0, 2 * ring)).encode())
    return listed.stdout, digest.hexdigest()


BAD_INPUT = [
    ("attach", "no-such-if"),
    ("attach", "to-client"),  # already attached
    ("attach", "to-client", "--xdp-mode", "turbo"),
    ("attach", "to-client", "--ring-size", "65536"),
    ("add-vip", "198.19.0.300:80/tcp"),
    ("add-vip", "198.19.0.2:99999/tcp"),
    ("add-vip", "198.19.0.2:80/sctp"),
    ("add-vip", "198.19.0.2:80"),
    ("add-vip", "198.19.0.2:80/tcp", "--hash", "random"),
    ("add-vip", "2001:db8::1:80/tcp"),
    ("add-vip", VIP),  # exists
    ("add-vip", "198.19.0.2:80/tcp", "--mode", "teleport"),
    ("add-vip", "198.19.0.2:\u00b2/tcp"),  # a digit to str.isdigit, not to int()
    ("add-backend", VIP, "198.18.2.2", "--weight", "\u00b2"),
    ("attach", "to-client", "--max-vips", "\u00b2"),
    ("remove-vip", "198.19.0.9:80/tcp"),
    ("remove-vip", "not-an-address"),
    ("add-backend", "198.19.0.9:80/tcp", BACKEND),  # unknown VIP
    ("add-backend", VIP, "198.18.1.300"),
    ("add-backend", VIP, "198.18.1.3:0"),
    ("add-backend", VIP, BACKEND),  # exists
    ("add-backend", VIP, "198.18.2.2:8080/udp"),
    ("add-backend", VIP, "198.18.2.2", "--weight", "70000"),
    ("add-backend", VIP, "198.18.2.2", "--weight", "-1"),
    ("add-backend", VIP, "[2001:db8::2]:8080"),  # IP version mismatch
    ("add-backend", ANY_PORT_VIP, BACKEND),  # a VIP of every port: backends keep the client's port
    ("add-backend", DSR_VIP, "198.18.1.2:80"),  # dsr and tunnel cannot change the port
    ("add-backend", TUNNEL_VIP, "[2001:2:0:1::2]:9090"),
    ("add-vip", "198.19.0.11:80/tcp", "--mode", "dsr", "--hash", "sticky"),
    ("remove-backend", VIP, "198.18.3.2:8080"),
    ("remove-backend", "198.19.0.9:80/tcp", BACKEND),
    ("acl", "add", VIP, "198.18.0.0/33", "--deny"),
    ("acl", "add", VIP, "2001:db8::/32", "--deny"),  # IP version mismatch
    ("acl", "add", VIP, "198.18.0.0/24"),  # neither --allow nor --deny
    ("acl", "add", "198.19.0.9:80/tcp", "198.18.0.0/24", "--deny"),  # unknown VIP
    ("acl", "remove", VIP, "198.18.9.0/24"),  # no such rule
    ("apply", "-f", "/nonexistent.yaml"),
    ("apply", "--dry-run"),  # no file
    ("drain", VIP, "198.18.3.2:8080"),  # unknown backend
    ("drain", "198.19.0.9:80/tcp", BACKEND),  # unknown VIP
    ("drain", VIP),
    ("set-weight", VIP, BACKEND),  # no weight
    ("set-weight", VIP, BACKEND, "70000"),
    ("set-weight", VIP, BACKEND, "\u00b2"),
    ("set-weight", VIP, "198.18.3.2:8080", "1"),  # unknown backend
    ("status", "--verbose"),
    ("export", "extra"),
    ("test-packet", "zz"),
    ("test-packet", "0011223344"),  # shorter than an Ethernet header
    ("test-packet", "--pcap", "/nonexistent.pcap"),
    ("test-packet", "00" * 60, "--ingress", "no-such-if"),
    ("test-packet",),
    ("decap", "attach", "no-such-if"),
    ("decap", "attach", "to-client", "--hook", "egress"),
    ("decap", "detach", "to-client"),  # not attached
    ("decap",),
    ("frobnicate",),
    # addresses that cannot carry unicast to a remote host, and a backend that is a VIP
    ("add-vip", "0.0.0.0:80/tcp"),
    ("add-vip", "255.255.255.255:80/tcp"),
    ("add-vip", "224.0.0.5:80/udp"),
    ("add-vip", "127.0.0.1:80/tcp"),
    ("add-vip", "169.254.10.1:80/tcp"),
    ("add-vip", "[::ffff:198.19.0.20]:80/tcp"),
    ("add-vip", "[fe80::1]:80/tcp"),
    ("add-vip", "198.18.1.2:443/tcp"),  # already a backend's address
    ("add-backend", VIP, "[::ffff:198.18.1.9]:8080"),
    ("add-backend", VIP, "127.0.0.1:8080"),
    ("add-backend", VIP, "255.255.255.255"),
    ("add-backend", VIP, "224.1.1.1"),
    ("add-backend", VIP, "0.0.0.0"),
    ("add-backend", VIP, "198.19.0.8"),  # a VIP's address (ANY_PORT_VIP)
    ("add-backend", DSR_VIP, "198.19.0.1"),  # a VIP's address (VIP)
    ("add-backend", TUNNEL_VIP, "[ff02::2]"),
    ("add-backend", VIP, "198.18.0.1:8080"),  # the LB host's own address
    ("add-backend", TUNNEL_VIP, "[2001:2:0:1::1]"),  # the same, IPv6
    ("remove-backend", VIP, "[::]:8080"),
    ("drain", VIP, "127.0.0.1:8080"),
    ("acl", "add", "224.0.0.1:80/tcp", "198.18.0.0/24", "--deny"),
    ("unserved", "198.19.0.1", "allow"),
    ("unserved", "198.19.0.1"),
    ("unserved", "not-an-address", "pass"),
    ("unserved", "127.0.0.1", "pass"),
    ("unserved", "::ffff:198.19.0.1", "pass"),
    ("connections", "--vip", "198.19.0.1:80/sctp"),
    ("connections", "--backend", "2001:db8::1"),
    ("connections", "--limit", "-1"),
]


@pytest.mark.parametrize("args", BAD_INPUT, ids=lambda a: " ".join(a))
def test_bad_input_is_refused_cleanly(configured, args):
    before = snapshot(configured)
    result = run_lbctl(configured.lb_ns, *args, check=False)
    assert result.returncode == 2, result
    lines = result.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("lbctl"), result.stderr
    assert result.stdout == ""
    assert snapshot(configured) == before


BAD_FILES = {
    "empty": "",  # would remove every VIP: refused, "vips: []" says so on purpose
    "syntax": "vips:\n  - vip: 198.19.0.1:80/tcp\n   mode: nat\n",
    "unknown key": f"vips:\n  - vip: {VIP}\n    backends: [{BACKEND}]\n  - vip: 198.19.0.2:80/tcp\n    colour: red\n",
    # valid, but more VIPs than the data plane holds: refused inside the transaction, rolled back
    "loopback backend": f"vips:\n  - vip: {VIP}\n    backends: [{BACKEND}, 127.0.0.1]\n",
    "mapped VIP": "vips:\n  - vip: \"[::ffff:198.19.0.1]:80/tcp\"\n",
    "backend is a VIP": f"vips:\n  - vip: {VIP}\n    backends: [{BACKEND}, 198.19.0.10:8080]\n"
                        f"  - vip: {DSR_VIP}\n    mode: dsr\n",
    "backend is the LB host": f"vips:\n  - vip: {VIP}\n    backends: [{BACKEND}, 198.18.1.1:8080]\n",
    "too many VIPs": "vips:\n" + "".join(f"  - vip: 198.19.{i // 250}.{i % 250 + 1}:80/tcp\n" for i in range(257)),
}


@pytest.mark.parametrize("text", BAD_FILES.values(), ids=BAD_FILES.keys())
@pytest.mark.parametrize("dry_run", [(), ("--dry-run",)], ids=["apply", "dry-run"])
def test_a_bad_config_file_is_refused_cleanly(configured, tmp_path, text, dry_run):
    path = tmp_path / "lb.yaml"
    path.write_text(text)
    before = snapshot(configured)
    result = run_lbctl(configured.lb_ns, "apply", "-f", str(path), *dry_run, check=False)
    assert result.returncode == 2, result
    assert len(result.stderr.strip().splitlines()) == 1 and result.stdout == ""
    assert snapshot(configured) == before


@pytest.fixture(scope="module")
def bare_lab() -> Iterator[Lab]:
    with lab_with_lb(1, attach=False) as lab:
        yield lab


@pytest.mark.parametrize("args", [
    ("add-vip", VIP), ("remove-vip", VIP), ("add-backend", VIP, BACKEND), ("remove-backend", VIP, BACKEND),
    ("stats",), ("detach",), ("drain", VIP, BACKEND), ("status",), ("connections",),
], ids=lambda a: a[0])
def test_commands_need_an_attached_data_plane(bare_lab, args):
    result = run_lbctl(bare_lab.lb_ns, *args, check=False)
    assert result.returncode == 2
    assert "not attached" in result.stderr and len(result.stderr.strip().splitlines()) == 1
    listed = run_lbctl(bare_lab.lb_ns, "list", "--json").json()
    assert listed == {"dataplane": None, "vips": [], "pass_unserved": [],
                      "snat": {"pool": [], "ports": "1024-65535"}}


def test_backend_of_dsr_vip_named_with_the_vips_port_is_accepted(configured):
    result = run_lbctl(configured.lb_ns, "add-backend", DSR_VIP, "198.18.2.2:8080")
    assert result.returncode == 0
    listed = run_lbctl(configured.lb_ns, "list").stdout
    assert "dsr" in listed and "tunnel" in listed
    run_lbctl(configured.lb_ns, "remove-backend", DSR_VIP, "198.18.2.2")


def test_attach_names_the_kernel_settings_it_misses_in_one_warning_line(bare_lab):
    ns, ifname = bare_lab.lb_ns, bare_lab.client.lb_ifname
    was = {key: run(ns, "sysctl", "-n", key) for key in ("net.ipv4.ip_forward", f"net.ipv4.conf.{ifname}.rp_filter")}
    run(ns, "sysctl", "-w", "net.ipv4.ip_forward=0", f"net.ipv4.conf.{ifname}.rp_filter=1")
    try:
        result = run_lbctl(ns, "attach", ifname)
        assert result.returncode == 0 and result.stdout.startswith("attached to")
        lines = result.stderr.strip().splitlines()
        assert len(lines) == 1 and lines[0].startswith("lbctl: warning:"), result.stderr
        assert "net.ipv4.ip_forward=1" in lines[0] and f"net.ipv4.conf.{ifname}.rp_filter=0" in lines[0]
    finally:
        run_lbctl(ns, "detach", check=False)
        run(ns, "sysctl", "-w", *(f"{k}={v}" for k, v in was.items()))


def run(ns: str, *command: str) -> str:
    return subprocess.run(["ip", "netns", "exec", ns, *command], check=True, capture_output=True,
                          text=True, timeout=30).stdout.strip()
