"""make bench: every benchmark in one run, against baselines measured in the same run.

Writes bench/results.json and docs/*.png, and prints a summary with PASS/FAIL
against bench/targets.json. Options come from the environment:
LB_BENCH_QUICK=1 runs a short version (for a smoke test, not for figures)."""
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

from bench import control, endtoend, perpacket, scaling, web
from lb import loader
from netns.lbctl import forget, run_lbctl
from netns.nsenter import in_netns
from netns.topology import Lab

ROOT = Path(__file__).resolve().parent.parent
QUICK = os.environ.get("LB_BENCH_QUICK") == "1"


def lbctl(ns: str, *args: str) -> str:
    return run_lbctl(ns, *args).stdout


def log(message: str) -> None:
    print(message, flush=True)


@contextlib.contextmanager
def bench_lab():
    with Lab.build(3) as lab:
        try:
            lbctl(lab.lb_ns, "attach", *lab.lb_interfaces)
            for vip, port in ((f"{lab.vip(1)}:80/tcp", 8080), (f"{lab.vip(1)}:53/udp", 5353)):
                lbctl(lab.lb_ns, "add-vip", vip)
                for b in lab.backends:
                    lbctl(lab.lb_ns, "add-backend", vip, f"{b.address}:{port}")
            lbctl(lab.lb_ns, "add-vip", f"[{lab.vip6(1)}]:80/tcp")
            for b in lab.backends:
                lbctl(lab.lb_ns, "add-backend", f"[{lab.vip6(1)}]:80/tcp", f"[{b.address6}]:8080")
            for index, mode in ((3, "dsr"), (4, "tunnel")):  # per-packet cost of the other modes
                vip = f"{lab.vip(index)}:{perpacket.MODE_PORT}/tcp"
                lbctl(lab.lb_ns, "add-vip", vip, "--mode", mode)
                for b in lab.backends:
                    lbctl(lab.lb_ns, "add-backend", vip, str(b.address))
            lab.resolve_neighbours()
            lbctl(lab.lb_ns, "add-vip", f"{lab.vip(2)}:80/tcp")  # any change refreshes the route mirror
            yield lab, json.loads(lbctl(lab.lb_ns, "list", "--json"))["dataplane"]["pin_dir"]
        finally:
            forget(lab.lb_ns)


def verdicts(results: dict, targets: dict) -> list[tuple[str, float, str, float, bool]]:
    """(what, measured, comparison, target, passed) for every target."""
    rows = []
    for path, limit in targets["perpacket_net_ns"].items():
        v = results["perpacket"][path]["median_ns"]
        rows.append((f"per-packet {path} (ns)", v, "<=", limit, v <= limit))
    e = targets["endtoend"]
    r = results["endtoend"]
    rows.append(("rate xdp/nftables", r["rate"]["xdp_over_nft"], ">=", e["xdp_over_nft_rate"],
                 r["rate"]["xdp_over_nft"] >= e["xdp_over_nft_rate"]))
    rows.append(("rate xdp/bare redirect", r["rate"]["xdp_over_redirect"], ">=", e["xdp_over_redirect_rate"],
                 r["rate"]["xdp_over_redirect"] >= e["xdp_over_redirect_rate"]))
    cpu = r["cpu"]["xdp_over_nft_ratio"]["median"]
    rows.append(("CPU/packet xdp/nftables", cpu, "<=", e["cpu_xdp_over_nft"], cpu <= e["cpu_xdp_over_nft"]))
    c = targets["control"]
    m = results["control"]["maglev_build_ms"]["1000"]["median"]
    rows.append(("Maglev build, 1,000 backends (ms)", m, "<=", c["maglev_build_ms_1000"], m <= c["maglev_build_ms_1000"]))
    a = results["control"]["lbctl_add_backend_ms"]["median"]
    rows.append(("lbctl add-backend (ms)", a, "<=", c["lbctl_add_backend_ms"], a <= c["lbctl_add_backend_ms"]))
    d = results["control"]["daemon"]["api_add_backend_ms"]["median"]
    rows.append(("daemon API add-backend (ms)", d, "<=", c["daemon_api_add_backend_ms"],
                 d <= c["daemon_api_add_backend_ms"]))
    return rows


def main() -> None:
    # A stopped run still tears its lab down: SIGTERM unwinds like an exception.
    signal.signal(signal.SIGTERM, lambda *_: sys.exit(143))
    targets = json.loads((ROOT / "bench" / "targets.json").read_text())
    results: dict[str, Any] = {"machine": {"kernel": platform.release(), "cpus": os.cpu_count(),
                                           "date": time.strftime("%Y-%m-%d %H:%M:%S")},
                               "quick": QUICK}
    started = time.monotonic()
    with bench_lab() as (lab, pin_dir):
        lb_prog = loader.pinned_program(pin_dir)
        baselines = perpacket.load_baselines()

        log("per-packet cost (BPF_PROG_TEST_RUN, net of XDP_DROP), default sizes")
        with in_netns(lab.lb_ns):
            cases, drop = perpacket.lab_cases(lab, lb_prog, baselines)
            results["perpacket"] = perpacket.measure(cases, drop, rounds=5, blocks=8 if QUICK else 40, progress=log)
            log("per-packet cost over IPv6 and in the dsr and tunnel modes")
            results["perpacket_modes"] = perpacket.measure(perpacket.mode_cases(lab, lb_prog), drop, rounds=5,
                                                           blocks=4 if QUICK else 10, progress=log)
            results["perpacket_modes"].pop("xdp_drop_floor")

            log("scaling: connection-table hit while cycling over N established flows")
            hit = next(c for c in cases if c.name == "hit")
            flow_cases = []
            for n in (1_000, 10_000, 100_000) if QUICK else (1_000, 10_000, 100_000, 400_000):
                flow_cases.append(perpacket.Case(str(n), lb_prog, hit.frame, hit.ingress_ifindex, "XDP_REDIRECT",
                                                 vary=True, flow_base=0x4000000 + n * 16, flow_mod=n,
                                                 warmup_calls=n))
            results["scaling"] = {"flows": perpacket.measure(flow_cases, drop, rounds=3, blocks=5 if QUICK else 20,
                                                             progress=log)}
            results["scaling"]["flows"].pop("xdp_drop_floor")


        log("scaling: backends per VIP")
        results["scaling"]["backends_per_vip"] = scaling.backends(
            lab, lb_prog, drop, (2, 10) if QUICK else (2, 10, 100), progress=log)

        log("control plane")
        vip = f"{lab.vip(1)}:80/tcp"
        runs = 5 if QUICK else 10
        results["control"] = {
            "maglev_build_ms": control.maglev_build_ms(),
            "lbctl_add_backend_ms": control.lbctl_add_backend_ms(lab.lb_ns, vip, "198.18.1.9:8080", runs=runs),
            "daemon": control.daemon_figures(lab, vip, "198.18.1.9:8080", runs=2 * runs),
        }

        log("end to end: generator -> LB -> backends (lb XDP, nftables DNAT, bare redirect)")
        bench = endtoend.build(lab, pin_dir)
        try:
            results["endtoend"] = endtoend.run(bench, reps=2 if QUICK else 5,
                                               rate_packets=1_000_000 if QUICK else 3_000_000,
                                               cpu_pps=300_000, cpu_seconds=3 if QUICK else 10, progress=log)
        finally:
            bench.close()
        log("real client: wrk through the VIP to nginx (lb XDP, nftables DNAT)")
        results["http"] = web.run(lab, lb_prog, vip_port=80, backend_port=8080, reps=2 if QUICK else 5,
                                  seconds=2 if QUICK else 5, progress=log)
        results["memory"] = {"default": {"maps_bytes": scaling.map_memory(pin_dir),
                                         "config": "defaults: 1M-entry connection table, 256 VIPs, 4,096 backends"}}
        os.close(lb_prog)

        log("scaling: VIPs (attached again with room for 1,024 VIPs)")
        lbctl(lab.lb_ns, "detach")
        lbctl(lab.lb_ns, "attach", *lab.lb_interfaces, "--max-vips", "1024")
        lb_prog = loader.pinned_program(pin_dir)
        results["scaling"]["vips"] = scaling.vips(lab, lb_prog, drop, (10, 100) if QUICK else (10, 100, 1000),
                                                  progress=log)
        results["control"]["lbctl_add_backend_ms_at_1000_vips"] = control.lbctl_add_backend_ms(
            lab.lb_ns, vip, "198.18.1.9:8080", runs=runs)
        results["control"]["daemon_at_1000_vips"] = control.daemon_figures(lab, vip, "198.18.1.9:8080", runs=runs)
        log("control plane: apply a file of 1,000 VIPs with 3 backends each")
        with tempfile.TemporaryDirectory() as workdir:
            results["control"]["apply_1000_vips"] = control.apply_many_vips(lab, 1000, workdir)
        results["memory"]["1024_vips"] = {"maps_bytes": scaling.map_memory(pin_dir),
                                          "config": "1M-entry connection table, 1,024 VIPs, 4,096 backends"}
        os.close(lb_prog)

    rows = verdicts(results, targets)
    results["targets"] = [{"what": w, "measured": round(v, 3), "target": f"{op} {t}", "pass": ok}
                          for w, v, op, t, ok in rows]
    results["elapsed_s"] = round(time.monotonic() - started, 1)
    (ROOT / "bench" / "results.json").write_text(json.dumps(results, indent=2) + "\n")
    from bench.plots import plot_all
    written = plot_all(results, targets, ROOT / "docs")

    for m in results["memory"].values():
        log(f"  map memory: {m['maps_bytes']['total'] / 2**20:.0f} MiB ({m['config']})")
    log(f"  lbctl add-backend with 1,000 VIPs configured: "
        f"{results['control']['lbctl_add_backend_ms_at_1000_vips']['median']:.0f} ms")
    ctl = results["control"]
    log(f"  daemon: API add-backend {ctl['daemon']['api_add_backend_ms']['median']:.0f} ms "
        f"({ctl['daemon_at_1000_vips']['api_add_backend_ms']['median']:.0f} ms with 1,000 VIPs), lbctl through it "
        f"{ctl['daemon']['lbctl_add_backend_via_daemon_ms']['median']:.0f} ms, resident memory "
        f"{ctl['daemon']['daemon_rss_mib']:.0f} MiB ({ctl['daemon_at_1000_vips']['daemon_rss_mib']:.0f} MiB with 1,000 VIPs)")
    a = ctl["apply_1000_vips"]
    log(f"  apply 1,000 VIPs x 3 backends: {a['apply_s']:.1f} s, again (no change) {a['apply_again_s']:.1f} s, "
        f"remove all {a['remove_all_s']:.1f} s")
    log(f"\nresults in bench/results.json, plots: {', '.join(written)} ({results['elapsed_s']} s)\n")
    width = max(len(r[0]) for r in rows)
    for what, value, op, target, ok in rows:
        log(f"  {what:<{width}}  {value:>10.3f}  target {op} {target:<8}  {'PASS' if ok else 'FAIL'}")
    pp = results["perpacket"]
    pp = pp | results["perpacket_modes"]
    log("\n  per-packet net ns, median [min-max]: " + ", ".join(
        f"{k} {v['median_ns']:.0f} [{v['min_ns']:.0f}-{v['max_ns']:.0f}]" for k, v in pp.items() if "min_ns" in v))
    e = results["endtoend"]
    log("  delivered Mpps: " + ", ".join(f"{k} {v['median'] / 1e6:.2f}" for k, v in e["rate"].items()
                                         if isinstance(v, dict)))
    h = results["http"]
    log("  HTTP req/s (wrk): " + ", ".join(f"{n} {h[n]['requests_per_s']['median']:.0f} "
                                          f"(p99 {h[n]['p99_ms']['median']:.2f} ms)" for n in ("xdp_lb", "nftables")))
    log("  CPU ns/packet at 300 kpps: " + ", ".join(
        f"{n} {e['cpu'][n]['median']:.0f}" for n in ("xdp_lb", "nftables", "bare_redirect")))


if __name__ == "__main__":
    main()
