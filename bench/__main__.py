"""make bench: every benchmark in one run, against baselines measured in the same run.

Writes bench/results.json and docs/*.png, and prints a summary with PASS/FAIL
against bench/targets.json. Options come from the environment:
LB_BENCH_QUICK=1 runs a short version (for a smoke test, not for figures); LB_BENCH_KATRAN=PATH names
Katran's balancer.bpf.o for the side-by-side comparison (default: the shared reference copy, if present);
LB_BENCH_BUSY=proc_stat takes CPU busy time from /proc/stat even where cpuidle residency exists;
LB_BENCH_ONLY=endtoend,http,... runs only those sections of the lab (results then go to
bench/results-partial.json, without plots)."""
from __future__ import annotations

import contextlib
import json
import os
import platform
import signal
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

from bench import control, endtoend, health_scale, katran, perpacket, scaling, sidebyside, web
from bench.sections import Sections
from lb import loader
from netns.lbctl import forget, run_lbctl
from netns.nsenter import in_netns
from netns.topology import Lab

ROOT = Path(__file__).resolve().parent.parent
QUICK = os.environ.get("LB_BENCH_QUICK") == "1"
ONLY = {name for name in os.environ.get("LB_BENCH_ONLY", "").split(",") if name}
RESULTS, DOCS = ROOT / "bench" / ("results-partial.json" if ONLY else "results.json"), ROOT / "docs"
LAB_SECTIONS = ("perpacket", "perpacket_modes", "scaling_flows", "scaling_backends", "control", "endtoend", "http",
                "memory", "katran", "scaling_vips")


def lbctl(ns: str, *args: str) -> str:
    return run_lbctl(ns, *args).stdout


def log(message: str) -> None:
    print(message, flush=True)


@contextlib.contextmanager
def bench_lab():
    # Hosts send full checksums, as a NIC's wire does, so attach keeps native XDP (the path timed);
    # --xdp-mode native makes sure of it.
    with Lab.build(3, hosts_tx_checksum=False) as lab:
        try:
            lbctl(lab.lb_ns, "attach", *lab.lb_interfaces, "--xdp-mode", "native", "--fullnat-table-size", "262144")
            for vip, port in ((f"{lab.vip(1)}:80/tcp", 8080), (f"{lab.vip(1)}:53/udp", 5353)):
                lbctl(lab.lb_ns, "add-vip", vip)
                for b in lab.backends:
                    lbctl(lab.lb_ns, "add-backend", vip, f"{b.address}:{port}")
            lbctl(lab.lb_ns, "add-vip", f"[{lab.vip6(1)}]:80/tcp")
            for b in lab.backends:
                lbctl(lab.lb_ns, "add-backend", f"[{lab.vip6(1)}]:80/tcp", f"[{b.address6}]:8080")
            vip6_tunnel = f"[{lab.vip6(4)}]:{perpacket.MODE_PORT}/tcp"  # beside Katran over IPv6
            lbctl(lab.lb_ns, "add-vip", vip6_tunnel, "--mode", "tunnel")
            for b in lab.backends:
                lbctl(lab.lb_ns, "add-backend", vip6_tunnel, f"[{b.address6}]")
            for index, mode in ((3, "dsr"), (4, "tunnel")):  # per-packet cost of the other modes
                vip = f"{lab.vip(index)}:{perpacket.MODE_PORT}/tcp"
                lbctl(lab.lb_ns, "add-vip", vip, "--mode", mode)
                for b in lab.backends:
                    lbctl(lab.lb_ns, "add-backend", vip, str(b.address))
            # full NAT from the LB's own address on b1's link (perpacket.FULLNAT_VIP)
            lbctl(lab.lb_ns, "add-vip", f"{lab.vip(5)}:80/tcp", "--mode", "fullnat", "--snat", str(lab.backends[0].lb_address))
            for b in lab.backends:
                lbctl(lab.lb_ns, "add-backend", f"{lab.vip(5)}:80/tcp", f"{b.address}:8080")
            lab.resolve_neighbours()
            lbctl(lab.lb_ns, "add-vip", f"{lab.vip(2)}:80/tcp")  # any change refreshes the route mirror
            yield lab, json.loads(lbctl(lab.lb_ns, "list", "--json"))["dataplane"]["pin_dir"]
        finally:
            forget(lab.lb_ns)


def _get(results: dict, *path: str) -> Any:
    """results[a][b]..., or None where a section did not measure it."""
    for key in path:
        if not isinstance(results, dict) or key not in results:
            return None
        results = results[key]
    return results


def verdicts(results: dict, targets: dict) -> list[tuple[str, float | None, str, float, bool]]:
    """(what, measured or None, comparison, target, passed) for every target; not measured fails."""
    checks: list[tuple[str, tuple[str, ...], str, float]] = []
    for path, limit in targets["perpacket_net_ns"].items():
        checks.append((f"per-packet {path} (ns)", ("perpacket", path, "median_ns"), "<=", limit))
    e, c = targets["endtoend"], targets["control"]
    checks += [
        ("rate xdp/nftables", ("endtoend", "rate", "xdp_over_nft"), ">=", e["xdp_over_nft_rate"]),
        ("rate xdp/bare redirect", ("endtoend", "rate", "xdp_over_redirect"), ">=", e["xdp_over_redirect_rate"]),
        ("CPU/packet xdp/nftables", ("endtoend", "cpu", "xdp_over_nft_ratio", "median"), "<=", e["cpu_xdp_over_nft"]),
    ]
    if "endtoend_katran" not in results.get("skipped_sections", {}):
        # the rate one LB core sustains (the LB on a core of its own, bench/endtoend.py), not the shared
        # core's delivered rate, which the lab's router and backends set
        checks.append(("rate per LB core, lb tunnel/Katran tunnel, one-armed",
                       ("endtoend", "lb_core", "lb_tunnel_over_katran", "median"), ">=", e["lb_tunnel_over_katran_rate"]))
    checks += [
        ("Maglev build, 1,000 backends (ms)", ("control", "maglev_build_ms", "1000", "median"), "<=",
         c["maglev_build_ms_1000"]),
        ("lbctl add-backend (ms)", ("control", "lbctl_add_backend_ms", "median"), "<=", c["lbctl_add_backend_ms"]),
        ("daemon API add-backend (ms)", ("control", "daemon", "api_add_backend_ms", "median"), "<=",
         c["daemon_api_add_backend_ms"]),
        ("health checks, 1,000 backends, 1/3 silent: p99 late (s)",
         ("control", "health_checks_1000", "late_p99_s"), "<=", c["health_checks_late_p99_s"]),
    ]
    rows = []
    for what, path, op, target in checks:
        v = _get(results, *path)
        ok = v is not None and (v <= target if op == "<=" else v >= target)
        rows.append((what, v, op, target, ok))
    rows += sidebyside.verdicts(results.get("katran"), targets.get("katran_ratio", {}))
    return rows


class Run:
    """What the sections share: the lab, lb's program, the reference programs and the cases."""
    lab: Lab
    pin_dir: str
    lb_prog: int
    drop: perpacket.Case
    cases: list[perpacket.Case]
    baselines: dict[str, int]


def main() -> None:
    # A stopped run still tears its lab down: SIGTERM unwinds like an exception.
    signal.signal(signal.SIGTERM, lambda *_: sys.exit(143))
    targets = json.loads((ROOT / "bench" / "targets.json").read_text())
    unknown = ONLY - set(LAB_SECTIONS)
    if unknown:
        print(f"LB_BENCH_ONLY: no section {', '.join(sorted(unknown))} (sections: {', '.join(LAB_SECTIONS)})",
              file=sys.stderr)
        sys.exit(2)
    results: dict[str, Any] = {"machine": machine(), "quick": QUICK}
    sections = Sections(results, log)
    started = time.monotonic()
    runs = 5 if QUICK else 10
    r = Run()

    def lab_section() -> None:
        with bench_lab() as (lab, pin_dir):
            r.lab, r.pin_dir = lab, pin_dir
            r.lb_prog = loader.pinned_program(pin_dir)
            r.baselines = baselines = perpacket.load_baselines()
            with in_netns(lab.lb_ns):
                r.cases, r.drop = perpacket.lab_cases(lab, r.lb_prog, baselines)
            in_lab_sections()
            if r.lb_prog >= 0:
                os.close(r.lb_prog)

    def perpacket_section() -> None:
        log("per-packet cost (BPF_PROG_TEST_RUN, net of XDP_DROP), default sizes")
        with in_netns(r.lab.lb_ns):
            results["perpacket"] = perpacket.measure(r.cases, r.drop, rounds=5, blocks=8 if QUICK else 40,
                                                     progress=log)

    def modes_section() -> None:
        log("per-packet cost over IPv6 and in the dsr and tunnel modes")
        with in_netns(r.lab.lb_ns):
            results["perpacket_modes"] = perpacket.measure(perpacket.mode_cases(r.lab, r.lb_prog), r.drop, rounds=5,
                                                           blocks=4 if QUICK else 10, progress=log)
        results["perpacket_modes"].pop("xdp_drop_floor")

    def flows_section() -> None:
        log("scaling: connection-table hit while cycling over N established flows")
        hit = next(c for c in r.cases if c.name == "hit")
        flow_cases = []
        for n in (1_000, 10_000, 100_000) if QUICK else (1_000, 10_000, 100_000, 400_000):
            flow_cases.append(perpacket.Case(str(n), r.lb_prog, hit.frame, hit.ingress_ifindex, "XDP_REDIRECT",
                                             vary=True, flow_base=0x4000000 + n * 16, flow_mod=n, warmup_calls=n))
        with in_netns(r.lab.lb_ns):
            flows = perpacket.measure(flow_cases, r.drop, rounds=3, blocks=5 if QUICK else 20, progress=log)
        flows.pop("xdp_drop_floor")
        results.setdefault("scaling", {})["flows"] = flows

    def backends_section() -> None:
        log("scaling: backends per VIP")
        results.setdefault("scaling", {})["backends_per_vip"] = scaling.backends(
            r.lab, r.lb_prog, r.drop, (2, 10) if QUICK else (2, 10, 100), progress=log)

    def control_section() -> None:
        log("control plane")
        vip = f"{r.lab.vip(1)}:80/tcp"
        results["control"] = {
            "maglev_build_ms": control.maglev_build_ms(),
            "lbctl_add_backend_ms": control.lbctl_add_backend_ms(r.lab.lb_ns, vip, "198.18.1.9:8080", runs=runs),
            "daemon": control.daemon_figures(r.lab, vip, "198.18.1.9:8080", runs=2 * runs),
            "health_checks_1000": health_scale.health_checks_at_scale(quick=QUICK),
        }

    def endtoend_section() -> None:
        log("end to end: generator -> LB -> backends (lb XDP, nftables DNAT, bare redirect; one-armed: "
            "lb tunnel, lb NAT, Katran tunnel)")
        katran_path = katran.reference_object()
        if katran_path is None:
            sections.skip("endtoend_katran", katran.SKIPPED)
        bench = endtoend.build(r.lab, r.pin_dir, katran_path)
        try:
            results["endtoend"] = endtoend.run(bench, reps=2 if QUICK else 5,
                                               rate_packets=1_000_000 if QUICK else 3_000_000,
                                               cpu_pps=300_000, cpu_seconds=3 if QUICK else 10, progress=log)
        finally:
            bench.close()

    def http_section() -> None:
        log("real client: wrk through the VIP to nginx (lb XDP, nftables DNAT)")
        results["http"] = web.run(r.lab, r.lb_prog, vip_port=80, backend_port=8080, reps=2 if QUICK else 5,
                                  seconds=2 if QUICK else 5, progress=log)

    def memory_section() -> None:
        results.setdefault("memory", {})["default"] = {
            "maps_bytes": scaling.map_memory(r.pin_dir),
            "config": "defaults: 1M-entry connection table, 256 VIPs, 4,096 backends"}

    def vips_section() -> None:
        log("scaling: VIPs (attached again with room for 1,024 VIPs)")
        lab, vip = r.lab, f"{r.lab.vip(1)}:80/tcp"
        os.close(r.lb_prog)
        r.lb_prog = -1
        lbctl(lab.lb_ns, "detach")
        lbctl(lab.lb_ns, "attach", *lab.lb_interfaces, "--max-vips", "1024", "--xdp-mode", "native")
        r.lb_prog = loader.pinned_program(r.pin_dir)
        results.setdefault("scaling", {})["vips"] = scaling.vips(
            lab, r.lb_prog, r.drop, (10, 100) if QUICK else (10, 100, 1000), progress=log)
        ctl = results.setdefault("control", {})
        ctl["lbctl_add_backend_ms_at_1000_vips"] = control.lbctl_add_backend_ms(lab.lb_ns, vip, "198.18.1.9:8080",
                                                                                 runs=runs)
        ctl["daemon_at_1000_vips"] = control.daemon_figures(lab, vip, "198.18.1.9:8080", runs=runs)
        log("control plane: apply a file of 1,000 VIPs with 3 backends each")
        with tempfile.TemporaryDirectory() as workdir:
            ctl["apply_1000_vips"] = control.apply_many_vips(lab, 1000, workdir)
        results.setdefault("memory", {})["1024_vips"] = {
            "maps_bytes": scaling.map_memory(r.pin_dir),
            "config": "1M-entry connection table, 1,024 VIPs, 4,096 backends"}

    def katran_section() -> None:
        path = katran.reference_object()
        if path is None:
            sections.skip("katran", katran.SKIPPED)
            return
        log(f"side by side with Katran ({path}): the same frames, both connection tables full")
        results["katran"] = sidebyside.run(r.lab, r.lb_prog, r.pin_dir, r.drop, path, quick=QUICK, progress=log,
                                           line_prog=getattr(r, "baselines", {}).get("xdp_line64"))

    def section(name: str, body) -> None:
        if not ONLY or name in ONLY:
            sections.run(name, body)

    def in_lab_sections() -> None:
        section("perpacket", perpacket_section)
        section("perpacket_modes", modes_section)
        section("scaling_flows", flows_section)
        section("scaling_backends", backends_section)
        section("control", control_section)
        section("endtoend", endtoend_section)
        section("http", http_section)
        section("memory", memory_section)
        section("katran", katran_section)  # fills lb's table: after the sections that time it half empty
        section("scaling_vips", vips_section)  # attaches again: a fresh table

    sections.run("lab", lab_section)

    rows = verdicts(results, targets)
    if ONLY:  # the targets of the sections not run are not failures of this run
        rows = [row for row in rows if row[1] is not None]
    results["targets"] = [{"what": w, "measured": None if v is None else round(v, 3), "target": f"{op} {t}",
                           "pass": ok} for w, v, op, t, ok in rows]
    results["section_s"] = sections.elapsed
    results["elapsed_s"] = round(time.monotonic() - started, 1)
    RESULTS.write_text(json.dumps(results, indent=2) + "\n")
    written: list[str] = []

    def plots_section() -> None:
        from bench.plots import plot_all
        written.extend(plot_all(results, targets, DOCS))

    if not ONLY:
        sections.run("plots", plots_section)
    sections.run("summary", lambda: summary(results))
    log(f"\nresults in {RESULTS}, plots: {', '.join(written) or 'none'} ({results['elapsed_s']} s)\n")
    width = max((len(row[0]) for row in rows), default=0)
    for what, value, op, target, ok in rows:
        shown = "not measured" if value is None else f"{value:>12.3f}"
        log(f"  {what:<{width}}  {shown:>12}  target {op} {target:<8}  {'PASS' if ok else 'FAIL'}")
    for name, what in (("katran", "Katran comparison"), ("endtoend_katran", "Katran end to end")):
        if name in results.get("skipped_sections", {}):
            log(f"  {what} skipped: {results['skipped_sections'][name]}")
    if sections.failed:
        log(f"\nFAILED sections (the others' figures are in {RESULTS}):")
        for name, error in sections.failed.items():
            log(f"  {name}: {error}")
        sys.exit(1)


def machine() -> dict[str, Any]:
    model = ""
    with contextlib.suppress(OSError):
        model = next((line.split(":", 1)[1].strip() for line in Path("/proc/cpuinfo").read_text().splitlines()
                      if line.startswith("model name")), "")
    return {"kernel": platform.release(), "cpu_model": model, "cpus": os.cpu_count(),
            "date": time.strftime("%Y-%m-%d %H:%M:%S")}


def summary(results: dict) -> None:
    """The figures that have no target, from the sections that measured them."""
    for m in results.get("memory", {}).values():
        log(f"  map memory: {m['maps_bytes']['total'] / 2**20:.0f} MiB ({m['config']})")
    ctl = results.get("control", {})
    if "lbctl_add_backend_ms_at_1000_vips" in ctl:
        log(f"  lbctl add-backend with 1,000 VIPs configured: "
            f"{ctl['lbctl_add_backend_ms_at_1000_vips']['median']:.0f} ms")
    if "daemon" in ctl and "daemon_at_1000_vips" in ctl:
        log(f"  daemon: API add-backend {ctl['daemon']['api_add_backend_ms']['median']:.0f} ms "
            f"({ctl['daemon_at_1000_vips']['api_add_backend_ms']['median']:.0f} ms with 1,000 VIPs), lbctl through it "
            f"{ctl['daemon']['lbctl_add_backend_via_daemon_ms']['median']:.0f} ms, resident memory "
            f"{ctl['daemon']['daemon_rss_mib']:.0f} MiB "
            f"({ctl['daemon_at_1000_vips']['daemon_rss_mib']:.0f} MiB with 1,000 VIPs)")
    if "apply_1000_vips" in ctl:
        a = ctl["apply_1000_vips"]
        log(f"  apply 1,000 VIPs x 3 backends: {a['apply_s']:.1f} s, again (no change) {a['apply_again_s']:.1f} s, "
            f"remove all {a['remove_all_s']:.1f} s")
    pp = results.get("perpacket", {}) | results.get("perpacket_modes", {})
    if pp:
        log("  per-packet net ns, median [min-max]: " + ", ".join(
            f"{k} {v['median_ns']:.0f} [{v['min_ns']:.0f}-{v['max_ns']:.0f}]" for k, v in pp.items() if "min_ns" in v))
    if "endtoend" in results:
        e = results["endtoend"]
        log("  delivered Mpps: " + ", ".join(f"{k} {v['median'] / 1e6:.2f}" for k, v in e["rate"].items()
                                             if isinstance(v, dict) and "_over_" not in k))
        for part, error in e.get("errors", {}).items():
            log(f"  end to end, {part} not set up: {error}")
        if "onearm" in e:
            log(f"  one-armed: packets at the backends still in IPIP {e['onearm']['not_decapsulated']}, "
                f"decapsulated per backend {e['onearm']['decapsulated_per_backend']}, "
                f"lb's reasons {e['onearm']['lb_reasons']}")
            above = e["onearm"].get("ns_above_bare_hairpin", {})
            log("  one-armed ns per packet above the bare hairpin's (1/rate): " + ", ".join(
                f"{n} {v['median']:.0f}" if v else f"{n} -" for n, v in above.items()))
        if "lb_core" in e:
            log("  one-armed, the LB on a core of its own: LB core ns per packet (Mpps per core): " + ", ".join(
                f"{n} {v['ns_per_packet']['median']:.0f} ({v['mpps_per_core']:.2f})"
                for n, v in e["lb_core"].items() if "_over_" not in n))
        log(f"  CPU ns/packet at 300 kpps (busy time from {', '.join(e['cpu']['busy_source'])}): " + ", ".join(
            f"{n} {e['cpu'][n]['median']:.0f}" if e["cpu"][n] else f"{n} not above the floor"
            for n in ("xdp_lb", "nftables", "bare_redirect")))
    if "http" in results:
        h = results["http"]
        log("  HTTP req/s (wrk): " + ", ".join(f"{n} {h[n]['requests_per_s']['median']:.0f} "
                                              f"(p99 {h[n]['p99_ms']['median']:.2f} ms)" for n in ("xdp_lb", "nftables")))
    if "katran" in results:
        sidebyside.print_table(results["katran"], log)


if __name__ == "__main__":
    main()
