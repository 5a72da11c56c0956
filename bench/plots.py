"""PNG plots of bench/results.json under docs/."""
from __future__ import annotations

from pathlib import Path

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402



def _bars(ax, labels, values, errors=None, color="tab:blue", offset=0.0, width=0.38, label=None):
    xs = [i + offset for i in range(len(labels))]
    ax.bar(xs, values, width, yerr=errors, color=color, label=label, capsize=3)
    return xs


def _save(fig, out_dir: Path, name: str) -> str:
    fig.tight_layout()
    fig.savefig(out_dir / name, dpi=110)
    plt.close(fig)
    return f"docs/{name}"


def plot_all(results: dict, targets: dict, out_dir: Path) -> list[str]:
    out_dir.mkdir(parents=True, exist_ok=True)
    written = []

    if "perpacket" in results:
        written.append(_perpacket(results, targets, out_dir))
    if "endtoend" in results:
        written.append(_endtoend(results, out_dir))
    if "scaling" in results:
        written.append(_scaling(results, out_dir))
    if "katran" in results:
        written.append(_katran(results["katran"], out_dir))
    return written


def _katran(side: dict, out_dir: Path) -> str:
    """lb and Katran in the same run, every compared path, with the lb/Katran ratio over each pair."""
    names = list(side["ratios"])
    r = side["ratios"]
    fig, ax = plt.subplots(figsize=(12, 4.5))
    _bars(ax, names, [r[n]["katran_ns"] for n in names], None, "tab:gray", -0.2, label="Katran")
    _bars(ax, names, [r[n]["lb_ns"] for n in names], None, "tab:blue", 0.2, label="lb")
    for i, n in enumerate(names):
        top = max(r[n]["katran_ns"], r[n]["lb_ns"])
        bound = r[n].get("ratio_bound")
        label = (f"{r[n]['ratio']:.2f}" if r[n]["ratio"] is not None
                 else f"<={bound:.2f}" if bound is not None else "-")
        ax.annotate(label, (i, top), ha="center", va="bottom", fontsize=8)
    ax.set_xticks(range(len(names)), names, rotation=35, ha="right", fontsize=8)
    ax.set_ylabel("net ns per packet (minus XDP_DROP)")
    ax.set_title(f"lb beside Katran, one run, both connection tables full ({side['table_entries']:,} entries); "
                 "label: lb/Katran", fontsize=9)
    ax.legend()
    return _save(fig, out_dir, "katran.png")


def _perpacket(results: dict, targets: dict, out_dir: Path) -> str:
    pp = results["perpacket"]
    paths = ["hit", "hit_100k", "new_flow", "not_vip"]
    fig, ax = plt.subplots(figsize=(7, 4))
    ours = [pp[p]["median_ns"] for p in paths]
    err = [[pp[p]["median_ns"] - pp[p]["min_ns"] for p in paths], [pp[p]["max_ns"] - pp[p]["median_ns"] for p in paths]]
    _bars(ax, paths, ours, err, "tab:blue", 0.0, label="lb (this run)")
    for i, p in enumerate(paths):
        ax.hlines(targets["perpacket_net_ns"][p], i - 0.4, i + 0.4, colors="tab:red", linestyles="dashed",
                  label="target" if i == 0 else None)
    ax.set_xticks(range(len(paths)), paths)
    ax.set_ylabel("net ns per packet (minus XDP_DROP)")
    ax.set_title("Per-packet cost, BPF_PROG_TEST_RUN, IPv4")
    ax.legend()
    return _save(fig, out_dir, "perpacket.png")


def _endtoend(results: dict, out_dir: Path) -> str:
    e2e = results["endtoend"]
    fig, (a1, a2, a3) = plt.subplots(1, 3, figsize=(13, 4))
    names, colors = ["xdp_lb", "nftables", "bare_redirect"], ["tab:blue", "tab:orange", "tab:gray"]
    one_armed = [n for n in ("lb_tunnel", "lb_nat_onearm", "katran_tunnel", "bare_hairpin") if n in e2e["rate"]]
    shade = {"lb_tunnel": "tab:cyan", "lb_nat_onearm": "tab:blue", "katran_tunnel": "tab:red", "bare_hairpin": "tab:gray"}
    a1.bar(names + one_armed, [e2e["rate"][n]["median"] / 1e6 for n in names + one_armed],
           color=colors + [shade[n] for n in one_armed])
    a1.tick_params(axis="x", labelrotation=30)
    a1.set_ylabel("Mpps delivered to the backends")
    a1.set_title("Full speed, 60-byte UDP, 1,024 flows")
    a2.bar(names, [e2e["cpu"][n]["median"] if e2e["cpu"][n] else 0 for n in names], color=colors)
    a2.set_ylabel("CPU ns per forwarded packet")
    a2.set_title(f"CPU at {e2e['cpu']['offered_pps'] // 1000} kpps")
    web = results.get("http")
    if web:
        a3.bar(names[:2], [web[n]["requests_per_s"]["median"] / 1e3 for n in names[:2]], color=colors[:2])
    a3.set_ylabel("thousand HTTP requests per second")
    a3.set_title("wrk to nginx through the VIP")
    return _save(fig, out_dir, "endtoend.png")


def _scaling(results: dict, out_dir: Path) -> str:
    sc = results["scaling"]
    fig, (a1, a2) = plt.subplots(1, 2, figsize=(10, 4))
    xs = sorted(int(k) for k in sc.get("flows", {}))
    a1.plot(xs, [sc["flows"][str(x)]["median_ns"] for x in xs], marker="o")
    a1.set_xscale("log")
    a1.set_xlabel("established flows cycled over")
    a1.set_ylabel("net ns per packet (connection-table hit)")
    a1.set_title("Hit cost as the working set grows")
    for key, label, marker in (("backends_per_vip", "backends per VIP", "s"), ("vips", "VIPs", "^")):
        ns = sorted(int(k) for k in sc.get(key, {}))
        for path, style in (("hit", "-"), ("new_flow", "--")):
            a2.plot(ns, [sc[key][str(n)][path] for n in ns], style, marker=marker, label=f"{path}, by {label}")
    a2.set_xscale("log")
    a2.set_xlabel("count")
    a2.set_ylabel("net ns per packet")
    a2.set_title("Cost by number of VIPs and of backends")
    a2.legend(fontsize=8)
    return _save(fig, out_dir, "scaling.png")
