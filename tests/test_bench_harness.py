"""The bench's own machinery, without a lab: busy time, and a failing section losing nothing else."""
from __future__ import annotations

import json
import os

import pytest

import bench.__main__ as bench_main
from bench.busy import BusyClock, proc_stat_busy_ticks
from bench.sections import Sections

PROC_STAT = """cpu  100 5 30 1000 7 2 3 4 0 0
cpu0 50 5 15 500 3 1 2 2 0 0
cpu1 50 0 15 500 4 1 1 2 0 0
intr 12345
"""


def test_proc_stat_busy_is_user_nice_system_irq_softirq_steal():
    assert proc_stat_busy_ticks(PROC_STAT) == 100 + 5 + 30 + 2 + 3 + 4


def test_busy_clock_falls_back_to_proc_stat_without_cpuidle(tmp_path):
    (tmp_path / "sys/devices/system/cpu/cpu0").mkdir(parents=True)
    (tmp_path / "sys/devices/system/cpu/cpu1").mkdir(parents=True)
    (tmp_path / "proc").mkdir()
    stat = tmp_path / "proc/stat"
    stat.write_text(PROC_STAT)
    clock = BusyClock(root=str(tmp_path))
    assert clock.source == "proc_stat"
    mark = clock.read()
    stat.write_text(PROC_STAT.replace("cpu  100 5 30", "cpu  150 5 80"))  # 100 more busy ticks
    assert clock.busy_since(mark) == pytest.approx(100 * clock.tick_s)


def test_busy_clock_uses_cpuidle_residency_where_every_cpu_has_it(tmp_path):
    for cpu in (0, 1):
        state = tmp_path / f"sys/devices/system/cpu/cpu{cpu}/cpuidle/state0"
        state.mkdir(parents=True)
        (state / "time").write_text("0")
    assert BusyClock(root=str(tmp_path)).source == "cpuidle"
    with pytest.raises(ValueError, match="unknown busy-time source"):
        BusyClock(source="jiffies", root=str(tmp_path))


def test_a_failing_section_is_recorded_and_the_next_still_runs():
    results: dict = {}
    sections = Sections(results, progress=lambda _: None)

    def broken() -> None:
        results["half"] = 1
        raise RuntimeError("no cpuidle residency")

    assert not sections.run("endtoend", broken)
    assert sections.run("http", lambda: results.update(http={"ok": True}))
    assert not sections.run("after", lambda: None, needs=("endtoend",))
    assert results["http"] == {"ok": True} and results["half"] == 1
    assert results["failed_sections"]["endtoend"]["error"] == "RuntimeError: no cpuidle residency"
    assert "broken" in results["failed_sections"]["endtoend"]["traceback"]
    assert set(sections.failed) == {"endtoend", "after"}


def test_bench_writes_what_it_measured_and_exits_nonzero_when_a_section_fails(tmp_path, monkeypatch, capsys):
    """A lab-less run: every lab section is replaced, the end-to-end one raises."""
    class FakeLab:
        lb_ns = "none"

        def vip(self, _):
            return "198.19.0.1"

    import contextlib

    @contextlib.contextmanager
    def fake_lab():
        yield FakeLab(), "/nonexistent"

    monkeypatch.setattr(bench_main, "RESULTS", tmp_path / "results.json")
    monkeypatch.setattr(bench_main, "DOCS", tmp_path / "docs")
    monkeypatch.setattr(bench_main, "bench_lab", fake_lab)
    monkeypatch.setattr(bench_main.loader, "pinned_program", lambda _: -1)
    monkeypatch.setattr(bench_main.perpacket, "load_baselines", lambda: {})
    monkeypatch.setattr(bench_main.perpacket, "lab_cases", lambda *_: ([], None))
    monkeypatch.setattr(bench_main, "in_netns", lambda _: contextlib.nullcontext())
    monkeypatch.setattr(bench_main.perpacket, "measure", lambda *a, **k: {
        "hit": {"median_ns": 90.0, "min_ns": 80.0, "max_ns": 99.0}, "xdp_drop_floor": {"median_ns": 1.0}})
    monkeypatch.setattr(bench_main.perpacket, "mode_cases", lambda *_: [])

    def no_cpuidle(*_, **__):
        raise RuntimeError("no cpuidle residency in /sys: cannot measure busy time")

    monkeypatch.setattr(bench_main.endtoend, "build", no_cpuidle)
    for name in ("backends", "vips", "map_memory"):
        monkeypatch.setattr(bench_main.scaling, name, lambda *a, **k: {"total": 1 << 20})
    monkeypatch.setattr(bench_main.control, "maglev_build_ms", lambda: {"1000": {"median": 10.0}})
    for name in ("lbctl_add_backend_ms", "daemon_figures", "apply_many_vips"):
        monkeypatch.setattr(bench_main.control, name, lambda *a, **k: {"median": 5.0})
    monkeypatch.setattr(bench_main.web, "run", lambda *a, **k: (_ for _ in ()).throw(OSError("no wrk")))
    monkeypatch.setattr(bench_main, "lbctl", lambda *a: "")
    monkeypatch.setattr(bench_main.katran, "reference_object", lambda: None)
    with pytest.raises(SystemExit) as exit_:
        bench_main.main()
    assert exit_.value.code == 1
    written = json.loads((tmp_path / "results.json").read_text())
    assert written["perpacket"]["hit"]["median_ns"] == 90.0
    assert written["control"]["maglev_build_ms"]["1000"]["median"] == 10.0
    assert set(written["failed_sections"]) >= {"endtoend", "http"}
    assert "no cpuidle residency" in written["failed_sections"]["endtoend"]["error"]
    rows = {t["what"]: t for t in written["targets"]}
    assert rows["rate xdp/nftables"] == {"what": "rate xdp/nftables", "measured": None, "target": ">= 4.0",
                                         "pass": False}
    assert rows["per-packet hit (ns)"]["pass"] is True
    out = capsys.readouterr().out
    assert "FAILED sections" in out and "endtoend: RuntimeError" in out
    assert "katran" in written["skipped_sections"] and "Katran comparison skipped" in out


def test_katran_ratios_pass_or_fail_against_their_targets():
    from bench.sidebyside import verdicts
    result = {"ratios": {"v4_nat_hit": {"ratio": 0.55, "path": "hit"},
                         "v6_tunnel_new_flow": {"ratio": 1.04, "path": "new_flow"},
                         "v4_not_vip": {"ratio": None, "path": "not_vip"}}}
    rows = {r[0]: r for r in verdicts(result, {"hit": 0.6, "new_flow": 0.6, "not_vip": 0.6})}
    assert rows["lb/Katran v4_nat_hit"][4] is True
    assert rows["lb/Katran v6_tunnel_new_flow"][4] is False
    assert rows["lb/Katran v4_not_vip"][4] is False
    assert verdicts(None, {"hit": 0.6}) == []


def test_katran_map_layouts_match_katrans_structs():
    import ctypes

    from bench import katran
    sizes = {katran.VipDefinition: 20, katran.VipMeta: 8, katran.RealDefinition: 20, katran.FlowKey: 40,
             katran.RealPosLru: 16, katran.Stat: 16}
    assert {t: ctypes.sizeof(t) for t in sizes} == sizes


def test_a_ratio_needs_net_figures_above_the_floor_in_most_rounds():
    from bench.perpacket import Case
    from bench.sidebyside import Pair, ratios
    pairs = [Pair("v4", "nat", path, Case(f"lb_{path}", 0, b"", 0, "XDP_PASS"),
                  Case(f"katran_{path}", 0, b"", 0, "XDP_PASS"), ("198.19.0.1", 80)) for path in ("hit", "not_vip")]
    timed = {"lb_hit": {"median_ns": 50, "net_ns_rounds": [50, 40, 60]},
             "katran_hit": {"median_ns": 100, "net_ns_rounds": [100, 100, 100]},
             "lb_not_vip": {"median_ns": 1, "net_ns_rounds": [5, -3, -1]},
             "katran_not_vip": {"median_ns": 20, "net_ns_rounds": [20, 22, 18]}}
    out = ratios(pairs, timed)
    assert out["v4_nat_hit"]["ratio"] == 0.5 and out["v4_nat_hit"]["ratio_min"] == 0.4
    assert out["v4_nat_hit"]["ratio_bound"] is None
    assert out["v4_not_vip"]["ratio"] is None
    assert out["v4_not_vip"]["ratio_bound"] == 5 / 18  # lb's worst round over Katran's best


def test_a_path_at_the_floor_is_judged_by_its_bound_and_without_one_fails():
    from bench.sidebyside import verdicts
    result = {"ratios": {"v4_not_vip": {"ratio": None, "ratio_bound": 0.28, "path": "not_vip"},
                         "v6_not_vip": {"ratio": None, "ratio_bound": 0.9, "path": "not_vip"},
                         "v4_nat_hit": {"ratio": None, "ratio_bound": None, "path": "hit"}}}
    rows = {r[0].split(" (")[0]: r for r in verdicts(result, {"hit": 0.6, "not_vip": 0.6})}
    assert rows["lb/Katran v4_not_vip"][1:] == (0.28, "<=", 0.6, True)
    assert rows["lb/Katran v6_not_vip"][4] is False
    assert rows["lb/Katran v4_nat_hit"][1] is None and rows["lb/Katran v4_nat_hit"][4] is False


def test_cpu_per_packet_not_above_the_drop_floor_is_not_a_figure():
    """On a saturated machine every configuration reads as busy as the floor: no free LB, no ratio."""
    from bench import endtoend

    class Saturated:
        configs = dict.fromkeys(endtoend.TWO_ARMED + ("ingress_drop",))
        arm, errors = None, {}

        def rate(self, name, n):
            return {"offered_pps": 1e6, "delivered_pps": 1e6, "lost": 0}

        def cpu_per_packet(self, name, pps, seconds):
            busy = {"nftables": 6.5}.get(name, 6.0)
            return {"busy_s": busy, "delivered": 900_000, "sent": 900_000, "elapsed_s": 3, "busy_source": "proc_stat"}

    cpu = endtoend.run(Saturated(), reps=2, rate_packets=1, cpu_pps=1, cpu_seconds=1, progress=lambda _: None)["cpu"]
    assert cpu["xdp_lb"] is None and cpu["xdp_over_nft_ratio"] is None
    assert cpu["nftables"]["median"] == pytest.approx(0.5 / 900_000 * 1e9)
    assert cpu["busy_source"] == ["proc_stat"]


def test_the_katran_end_to_end_target_is_checked_unless_katran_was_skipped():
    targets = json.loads((bench_main.ROOT / "bench" / "targets.json").read_text())
    results = {"endtoend": {"rate": {"lb_tunnel_over_katran": {"median": 1.5}},
                            "lb_core": {"lb_tunnel_over_katran": {"median": 1.1}}}}
    rows = {r[0]: r for r in bench_main.verdicts(results, targets)}
    # judged by the rate per LB core (the LB on a core of its own), not the shared core's delivered rate
    assert rows["rate per LB core, lb tunnel/Katran tunnel, one-armed"][1:] == (1.1, ">=", 1.3, False)
    results["skipped_sections"] = {"endtoend_katran": "no Katran object"}
    assert not any("Katran tunnel" in r[0] for r in bench_main.verdicts(results, targets))


def test_an_unknown_section_is_a_clear_error_before_any_lab(monkeypatch, capsys):
    monkeypatch.setattr(bench_main, "ONLY", {"katran", "nope"})
    monkeypatch.setattr(bench_main, "bench_lab", lambda: pytest.fail("no lab for a bad selection"))
    with pytest.raises(SystemExit) as exit_:
        bench_main.main()
    assert exit_.value.code == 2
    assert "no section nope" in capsys.readouterr().err


def test_side_by_side_reads_lbs_flow_key_from_the_frames_it_sends():
    import ipaddress
    import socket

    from scapy.layers.inet import IP, TCP
    from scapy.layers.inet6 import IPv6
    from scapy.layers.l2 import Ether

    from bench.sidebyside import flow_key_of, with_flow
    for ip in (IP(src="10.0.0.1", dst="198.19.0.1"), IPv6(src="fd00::1", dst="fd00:19::1")):
        frame = with_flow(bytes(Ether() / ip / TCP(sport=1000, dport=80, flags="A")), 0x1234_5678)
        key = flow_key_of(frame)
        parsed = Ether(frame)[1]
        assert (key.src.address(), key.dst.address()) == (ipaddress.ip_address(parsed.src),
                                                          ipaddress.ip_address(parsed.dst))
        assert (socket.ntohs(key.sport), socket.ntohs(key.dport), key.proto) == (0x5678, 80, socket.IPPROTO_TCP)


def test_the_memory_floor_is_compared_with_katrans_hit_over_100k_flows_round_by_round():
    from bench.perpacket import Case
    from bench.sidebyside import Pair, floor_cases, floor_ratios
    pairs = [Pair(family, mode, "hit_100k", Case(f"lb_{family}_{mode}", 0, b"", 0, "XDP_REDIRECT"),
                  Case(f"katran_{family}_{mode}_hit_100k", 0, b"", 0, "XDP_TX"), ("198.19.0.1", 80))
             for family in ("v4", "v6") for mode in ("nat", "tunnel")]
    floors = floor_cases(pairs, line_prog=7)
    assert [(c.name, c.prog_fd, c.action, p.mode) for c, p in floors] == [
        ("floor_v4_line64_100k", 7, "XDP_DROP", "nat"), ("floor_v6_line64_100k", 7, "XDP_DROP", "nat")]
    assert all(c.vary and c.flow_mod == 100_000 for c, _ in floors)  # the same cycled flows as hit_100k
    timed = {"floor_v4_line64_100k": {"median_ns": 250, "net_ns_rounds": [250, 300, 200]},
             "katran_v4_nat_hit_100k": {"median_ns": 400, "net_ns_rounds": [500, 400, 400]},
             "floor_v6_line64_100k": {"median_ns": 240, "net_ns_rounds": [240]},
             "katran_v6_nat_hit_100k": {"median_ns": 0, "net_ns_rounds": [0]}}
    out = floor_ratios(floors, timed)
    v4 = out["v4_line64_100k"]  # per round 250/500, 300/400, 200/400
    assert (v4["over_katran"], v4["over_katran_min"], v4["over_katran_max"]) == (0.5, 0.5, 0.75)
    assert out["v6_line64_100k"]["over_katran"] is None  # Katran at the floor in every round: no ratio


def test_the_memory_floor_reads_a_line_and_drops_both_families():
    from scapy.layers.inet import IP, TCP
    from scapy.layers.inet6 import IPv6
    from scapy.layers.l2 import Ether

    from bench.perpacket import load_baselines
    from lb.testrun import run_xdp
    fds = load_baselines()
    try:
        for ip in (IP(src="10.0.0.1", dst="198.19.0.1"), IPv6(src="fd00::1", dst="fd00::2")):
            frame = bytes(Ether() / ip / TCP(sport=1000, dport=80, flags="A"))
            assert run_xdp(fds["xdp_line64"], frame).action == "XDP_DROP"
        assert run_xdp(fds["xdp_line64"], b"\0" * 20).action == "XDP_ABORTED"  # too short to hold a flow
    finally:
        for fd in fds.values():
            os.close(fd)


def test_the_steady_state_rows_time_the_cycled_flows_again_as_cases_of_their_own():
    from bench.perpacket import Case
    from bench.sidebyside import CYCLE_BASE, CYCLED, STEADY, Pair, steady_pairs
    pairs = [Pair("v4", mode, path, Case(f"lb_v4_{mode}_{path}", 1, b"f", 2, "XDP_REDIRECT", vary=True,
                                         flow_base=CYCLE_BASE, flow_mod=CYCLED),
                  Case(f"katran_v4_{mode}_{path}", 3, b"f", 2, "XDP_TX", vary=True, flow_base=CYCLE_BASE,
                       flow_mod=CYCLED), ("198.19.0.1", 80))
             for mode in ("nat", "tunnel") for path in ("hit", "hit_100k")]
    pairs[1].lb.flow_index.value = 5  # the first pass's cases have run
    steady = steady_pairs(pairs)
    assert [(p.mode, p.path, p.lb.name, p.katran.name) for p in steady] == [
        ("nat", STEADY, "lb_v4_nat_hit_100k_steady", "katran_v4_nat_hit_100k_steady"),
        ("tunnel", STEADY, "lb_v4_tunnel_hit_100k_steady", "katran_v4_tunnel_hit_100k_steady")]
    for p in steady:  # the same flows, from the first, through the same programs
        for c, prog in ((p.lb, 1), (p.katran, 3)):
            assert (c.prog_fd, c.vary, c.flow_base, c.flow_mod, c.flow_index.value) == (prog, True, CYCLE_BASE, CYCLED, 0)


def test_every_side_by_side_path_has_a_ratio_target():
    from bench.sidebyside import PATHS, STEADY, verdicts
    targets = json.loads((bench_main.ROOT / "bench" / "targets.json").read_text())["katran_ratio"]
    assert set(targets) == {*PATHS, STEADY}
    result = {"ratios": {"v6_tunnel_hit_100k_steady": {"ratio": 0.9, "path": STEADY}}}
    assert verdicts(result, targets) == [("lb/Katran v6_tunnel_hit_100k_steady", 0.9, "<=", 0.6, False)]


def test_the_churn_inserts_a_table_of_newer_flows_in_chunks_and_hits_every_cycled_flow_after_each(monkeypatch):
    from bench import sidebyside
    from bench.katran import Stat
    from bench.perpacket import Case
    pairs = [sidebyside.Pair("v4", "nat", path, Case(f"lb_{path}", 1, b"f", 2, "XDP_REDIRECT"),
                             Case(f"katran_{path}", 3, b"f", 2, "XDP_TX"), ("198.19.0.1", 80))
             for path in ("hit_100k", "new_entry")]
    calls = []
    monkeypatch.setattr(sidebyside, "run_block", lambda lib, case, n: calls.append((case.name, case.flow_base, n)))
    monkeypatch.setattr(sidebyside, "cycled_kept", lambda *a: {"lb": [10, 10], "katran": [9, 10]})
    monkeypatch.setattr(sidebyside, "lb_has_flow", lambda maps, frame: True)

    class FakeKatran:
        def stat(self, index):
            return Stat()

    out = sidebyside.churn(None, pairs, FakeKatran(), None, table=250_000)
    inserts = [(n, b, k) for n, b, k in calls if n.startswith("churn_")]
    keeps = [(n, b, k) for n, b, k in calls if n.startswith("keep_")]
    assert [k for n, _, k in inserts if "lb" in n] == [100_000, 100_000, 50_000]  # one table's worth, both programs
    assert [k for n, _, k in inserts if "katran" in n] == [100_000, 100_000, 50_000]
    assert {b for _, b, _ in inserts} == {sidebyside.CHURN_BASE}
    assert len(keeps) == 3 * 2 and {(b, k) for _, b, k in keeps} == {(sidebyside.CYCLE_BASE, sidebyside.CYCLED)}
    assert [n for n, _, _ in calls[:4]] == ["churn_lb_new_entry", "churn_katran_new_entry",
                                            "keep_lb_hit_100k", "keep_katran_hit_100k"]  # kept after each chunk
    assert out["cycled_kept_between_chunks"] == {"lb": "30/30", "katran": "27/30"}
    assert out["cycled_kept_per_chunk"] == {"lb": [10, 10, 10], "katran": [9, 9, 9]}


@pytest.mark.parametrize("name, marker", [("direct_mapped_table.patch", "struct ct_slot {"),
                                          ("no_common_lru.patch", "BPF_F_NO_COMMON_LRU")])
def test_an_experiments_patch_applies_to_the_revision_it_was_made_on(tmp_path, name, marker):
    from pathlib import Path

    from bench import compare

    patch = Path(__file__).resolve().parent.parent / "bench" / "experiments" / name
    tree = compare.source_tree(compare.EXPERIMENT_REVISIONS[name], tmp_path, patch)
    assert tree.name.endswith("+" + patch.stem)
    assert marker in (tree / "bpf" / "maps.h").read_text()
    # a patch that does not apply, or only reversed, stops the run
    reversed_patch = tmp_path / "reversed.patch"
    reversed_patch.write_text("".join(("+" + line[1:] if line.startswith("-") and not line.startswith("---") else
                                       "-" + line[1:] if line.startswith("+") and not line.startswith("+++") else line)
                                      for line in patch.read_text().splitlines(keepends=True)))
    with pytest.raises(SystemExit, match="does not apply"):
        compare.source_tree(compare.EXPERIMENT_REVISIONS[name], tmp_path, reversed_patch)
