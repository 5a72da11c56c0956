"""Upgrade from the previous release, built from git, to this checkout, under traffic.

The previous release attaches the data plane and balances a TCP stream; then this
checkout's daemon adopts it. Its maps have another layout version (the previous
release had no lb_state map to record one), so the daemon migrates them rather than
load today's program on maps of another meaning: the stream survives, the counters
carry on. Whatever changed in between (a struct's size too) goes the same way."""
from __future__ import annotations

import subprocess
import sys
from pathlib import Path
from typing import Iterator

import pytest

from lb.maps import U32, DataPlaneMaps
from lb.structs import LAYOUT_VERSION
from netns.lbctl import DaemonProcess, Result, forget, run_lbctl
from netns.topology import Lab
from netns.traffic import EchoStream, wait_for

PREVIOUS = "d1b86fe"  # main before the maps recorded their layout
PORT = 7100
REPO = Path(__file__).resolve().parent.parent


@pytest.fixture(scope="module")
def previous(tmp_path_factory) -> Path:
    """The previous release's sources, from git (its own bpf/, lb/ and control/)."""
    tree = tmp_path_factory.mktemp("previous")
    archive = subprocess.run(["git", "-C", str(REPO), "archive", PREVIOUS], capture_output=True)
    if archive.returncode != 0:
        pytest.skip(f"commit {PREVIOUS} is not in this clone: {archive.stderr.decode().strip()}")
    subprocess.run(["tar", "-x", "-C", str(tree)], input=archive.stdout, check=True)
    return tree


@pytest.fixture
def lab() -> Iterator[Lab]:
    # The previous release attaches native XDP everywhere: its hosts must send full checksums.
    with Lab.build(3, hosts_tx_checksum=False) as lab:
        try:
            yield lab
        finally:
            forget(lab.lb_ns)


def previous_lbctl(lab: Lab, tree: Path, *args: str) -> Result:
    """lbctl of the previous release: its modules first on the path, run from its tree."""
    proc = subprocess.run(["ip", "netns", "exec", lab.lb_ns, sys.executable, "-c",
                           "import sys; from control.cli import main; sys.exit(main())", *args],
                          capture_output=True, text=True, timeout=300, cwd=tree,
                          env={"PATH": "/usr/sbin:/usr/bin:/sbin:/bin", "PYTHONPATH": str(tree)})
    if proc.returncode != 0:
        raise RuntimeError(f"previous lbctl {' '.join(args)} failed ({proc.returncode}): {proc.stderr.strip()}")
    return Result(proc.returncode, proc.stdout, proc.stderr)


def test_upgrade_from_the_previous_release_keeps_a_stream_and_its_counters(lab: Lab, previous: Path, tmp_path):
    vip_host = str(lab.vip(20))
    vip = f"{vip_host}:{PORT}/tcp"
    previous_lbctl(lab, previous, "attach", *lab.lb_interfaces, "--ring-size", "251")
    previous_lbctl(lab, previous, "add-vip", vip)
    for b in lab.backends:
        previous_lbctl(lab, previous, "add-backend", vip, f"{b.address}:{PORT}")

    def vip_packets(lbctl) -> int:
        return next(v["packets"] for v in lbctl("stats", "--json").json()["vips"] if v["vip"] == vip)

    with EchoStream.running(lab.client.ns, [b.ns for b in lab.backends], vip_host, PORT) as stream:
        def flowing(what: str) -> None:
            exchanged = stream.exchanged
            wait_for(lambda: stream.error or stream.exchanged >= exchanged + 20, 30, what=what)
            assert stream.error is None, f"{what}: {stream.error}"

        flowing("through the previous release")
        before = vip_packets(lambda *a: previous_lbctl(lab, previous, *a))
        assert before > 0

        d = DaemonProcess(lab.lb_ns, str(tmp_path / "daemon.log"), ())
        try:
            d.start()
            adopted = d.events("data plane adopted")[0]
            assert adopted["program"] == "replaced"
            migrated = d.events(f"maps migrated to layout version {LAYOUT_VERSION}")
            assert migrated, d.log_tail()
            moved = migrated[0]["migrated"]
            assert "recreated empty" in moved["conn_table"] and "rebuilt" in moved["vips"]
            assert "vip_stats" not in moved or "copied" in moved["vip_stats"]  # counters are kept either way
            flowing("after the upgrade")
            after = vip_packets(lambda *a: run_lbctl(lab.lb_ns, *a))
            assert after > before  # carried on from the previous release's count, not from zero
            flowing("after the upgrade, later")
            assert vip_packets(lambda *a: run_lbctl(lab.lb_ns, *a)) > after
        finally:
            assert d.stop() == 0
        assert stream.error is None


def test_maps_of_a_newer_layout_are_refused_in_one_line(lab: Lab, tmp_path):
    """A data plane made by a newer lb (a downgrade): neither lbctl nor the daemon reads its maps."""
    run_lbctl(lab.lb_ns, "attach", *lab.lb_interfaces, "--ring-size", "251")
    vip = f"{lab.vip(21)}:{PORT}/tcp"
    run_lbctl(lab.lb_ns, "add-vip", vip)
    pin_dir = run_lbctl(lab.lb_ns, "list", "--json").json()["dataplane"]["pin_dir"]
    with DataPlaneMaps.open(pin_dir) as maps:
        mark = maps.lb_state.get(U32(0))
        mark.layout = LAYOUT_VERSION + 1
        maps.lb_state.set(U32(0), mark)
    for args in (("list",), ("add-vip", f"{lab.vip(22)}:{PORT}/tcp"), ("stats",)):
        refused = run_lbctl(lab.lb_ns, *args, check=False)
        assert refused.returncode == 1 and f"layout version {LAYOUT_VERSION + 1}" in refused.stderr, args
        assert len(refused.stderr.strip().splitlines()) == 1, refused.stderr
    d = DaemonProcess(lab.lb_ns, str(tmp_path / "daemon.log"), ())
    with pytest.raises(RuntimeError):
        d.start()
    assert d.proc.returncode == 1
    assert any(f"layout version {LAYOUT_VERSION + 1}, newer than this lb's" in e["msg"] for e in d.events())
    assert "adopted" not in d.log_tail()
