"""The per-packet cost of two revisions, measured in ONE run: python -m bench.compare REV [REV2]

Each revision (REV2: HEAD by default) is built from git (`git archive`, as tests/test_upgrade.py
takes the previous release) and attached by its own lbctl in labs of its own (--labs, each with
the same VIPs). bench/perpacket.py's harness then times the paths of both (hit, hit over 100k
flows, new flow, not a VIP, a reply), the blocks of every case of every lab interleaved in random
order against one XDP_DROP floor, each block in its lab's namespace. One load of a program can
run 10-20% faster or slower than another load of the same program (where its code and maps land):
a revision's figure is the median over rounds of its labs' mean, and the spread of its labs'
medians is shown beside it. Figures of different runs do not compare (the machine's speed varies
2x from day to day); the columns of one run do.

    python -m bench.compare d1b86fe            # the release before issue 12's work, against HEAD

An experiment that is not a revision: --patch FILE applies a patch (as `patch -p1`) to REV2's tree,
whose column is then named REV2+FILE's stem; e.g. lb with the cheapest connection table there is,
beside lb as it was (bench/experiments/README.md; a patch applies to the revision it was made on):
    python -m bench.compare 65e72f5 65e72f5 --patch bench/experiments/direct_mapped_table.patch \
        --paths hit,hit_100k,new_flow

The control plane's figures of two revisions: bench/compare_control.py.
    python -m bench.compare A B --labs 3 --rounds 5 --blocks 40 --json out.json"""
from __future__ import annotations

import argparse
import contextlib
import json
import os
import statistics
import subprocess
import sys
import tempfile
from pathlib import Path
from typing import Iterator

from bench import perpacket
from lb import loader
from netns.lbctl import STATE_DIR
from netns.nsenter import in_netns
from netns.topology import Lab

ROOT = Path(__file__).resolve().parent.parent
PATHS = ("hit", "hit_100k", "new_flow", "not_vip", "reply_hit")
# With --modes: the hit of a tunnel VIP, of an IPv6 NAT VIP and of an IPv6 tunnel VIP (as the side-by-side's)
# bench/experiments' patches and the revision each was made on (and applies to)
EXPERIMENT_REVISIONS = {"direct_mapped_table.patch": "65e72f5", "no_common_lru.patch": "65e72f5"}
MODE_PATHS = {"hit_tunnel": ("vip", 4, perpacket.MODE_PORT, "fwd_tunnel"), "hit_v6": ("vip6", 1, 80, "fwd_nat"),
              "hit_v6_tunnel": ("vip6", 4, perpacket.MODE_PORT, "fwd_tunnel")}


def revision_parser(prog: str, description: str, rounds: int,
                    rounds_help: str | None = None) -> argparse.ArgumentParser:
    """The arguments both comparisons take: two revisions (the second HEAD by default) and rounds."""
    parser = argparse.ArgumentParser(prog=prog, description=description)
    parser.add_argument("rev")
    parser.add_argument("rev2", nargs="?", default="HEAD")
    parser.add_argument("--rounds", type=int, default=rounds, help=rounds_help)
    return parser


def short_commits(names: list[str]) -> dict[str, str]:
    """Each revision's short commit, by the name it was given (a patched tree's: REV+stem, REV's commit)."""
    return {name: subprocess.run(["git", "-C", str(ROOT), "rev-parse", "--short", name.split("+")[0]],
                                 capture_output=True, text=True).stdout.strip() for name in names}


def named_commits(commits: dict[str, str]) -> str:
    """The line that says which commit a revision given by another name is (HEAD = 830b749)."""
    return " ".join(f"{name} = {commit}" for name, commit in commits.items() if commit != name.split("+")[0])


def source_tree(rev: str, into: Path, patch: Path | None = None) -> Path:
    """The revision's files, from git, in a directory of their own (with `patch` applied)."""
    tree = into / (rev.replace("/", "_") + (f"+{patch.stem}" if patch else ""))
    tree.mkdir()
    archive = subprocess.run(["git", "-C", str(ROOT), "archive", rev], capture_output=True, check=False)
    if archive.returncode != 0:
        raise SystemExit(f"bench.compare: no revision {rev}: {archive.stderr.decode().strip()}")
    subprocess.run(["tar", "-x", "-C", str(tree)], input=archive.stdout, check=True)
    if patch:  # a hunk that does not apply stops the run (--forward: never applied reversed instead)
        applied = subprocess.run(["patch", "-p1", "--forward", "--force", "--reject-file=-", "-d", str(tree), "-i",
                                  str(patch.resolve())],
                                 capture_output=True, text=True, check=False)
        if applied.returncode != 0:
            raise SystemExit(f"bench.compare: {patch} does not apply to {rev}: {applied.stdout.strip()}")
    return tree


def lbctl(tree: Path, ns: str, *args: str, check: bool = True) -> str:
    """The revision's own lbctl (its modules first on the path, run from its tree) in namespace ns."""
    proc = subprocess.run(["ip", "netns", "exec", ns, sys.executable, "-c",
                           "import sys; from control.cli import main; sys.exit(main())", *args],
                          capture_output=True, text=True, timeout=600, cwd=tree,
                          env={"PATH": "/usr/sbin:/usr/bin:/sbin:/bin", "PYTHONPATH": str(tree)})
    if check and proc.returncode != 0:
        raise RuntimeError(f"{tree.name}: lbctl {' '.join(args)} failed ({proc.returncode}): {proc.stderr.strip()}")
    return proc.stdout


@contextlib.contextmanager
def revision_lab(tree: Path, modes: bool = False) -> Iterator[tuple[Lab, str]]:
    """A lab with the revision's data plane attached (native XDP, as the bench times it), VIP 1 on
    port 80/tcp over the lab's backends (with `modes`, MODE_PATHS' VIPs too); yields the lab and the
    pin directory."""
    with Lab.build(3, hosts_tx_checksum=False) as lab:
        try:
            lbctl(tree, lab.lb_ns, "attach", *lab.lb_interfaces, "--xdp-mode", "native")
            vip = f"{lab.vip(1)}:80/tcp"
            lbctl(tree, lab.lb_ns, "add-vip", vip)
            for b in lab.backends:
                lbctl(tree, lab.lb_ns, "add-backend", vip, f"{b.address}:8080")
            if modes:
                for kind, index, port, reason in MODE_PATHS.values():
                    v6 = kind == "vip6"
                    vip = f"[{lab.vip6(index)}]:{port}/tcp" if v6 else f"{lab.vip(index)}:{port}/tcp"
                    tunnel = reason == "fwd_tunnel"
                    lbctl(tree, lab.lb_ns, "add-vip", vip, *(("--mode", "tunnel") if tunnel else ()))
                    for b in lab.backends:
                        address = f"[{b.address6}]" if v6 else str(b.address)
                        lbctl(tree, lab.lb_ns, "add-backend", vip, address if tunnel else f"{address}:8080")
            lab.resolve_neighbours()
            lbctl(tree, lab.lb_ns, "add-vip", f"{lab.vip(2)}:80/tcp")  # any change refreshes the route mirror
            yield lab, json.loads(lbctl(tree, lab.lb_ns, "list", "--json"))["dataplane"]["pin_dir"]
        finally:
            lbctl(tree, lab.lb_ns, "detach", check=False)
            for suffix in ("", "-wal", "-shm"):
                with contextlib.suppress(FileNotFoundError):
                    os.remove(os.path.join(STATE_DIR, f"{lab.lb_ns}.db{suffix}"))


def mode_cases(lab: Lab, prog: int) -> list[perpacket.Case]:
    """MODE_PATHS' hits in a lab of revision_lab(modes=True)."""
    client_if = perpacket._client_ifindex(lab)
    cases = []
    for name, (kind, index, port, reason) in MODE_PATHS.items():
        dst = str(lab.vip6(index) if kind == "vip6" else lab.vip(index))
        cases.append(perpacket.Case(name, prog, perpacket._client_frame(lab, dst, 1000, port), client_if,
                                    "XDP_REDIRECT", reason))
    return cases


def compare(revs: list[str], rounds: int, blocks: int, labs: int, modes: bool = False,
            patch: Path | None = None, paths: tuple[str, ...] = PATHS) -> dict:
    """{path@rev: {median_ns, min_ns, max_ns, labs_ns: [each lab's median]}} and the XDP_DROP floor.
    With `patch`, the second of revs is a label (REV2+stem) for REV2's tree with the patch applied."""
    baselines = perpacket.load_baselines()
    with tempfile.TemporaryDirectory(prefix="lb-compare-") as tmp, contextlib.ExitStack() as stack:
        trees = {revs[0]: source_tree(revs[0], Path(tmp))}
        trees[revs[1]] = source_tree(revs[1].split("+")[0], Path(tmp), patch) if patch else \
            source_tree(revs[1], Path(tmp))
        cases, drop, progs = [], None, []
        for i in range(labs):
            for rev in revs:  # alternating, so that neither revision's labs all come first
                print(f"{rev}: attaching its data plane in lab {i + 1}/{labs} (compiled by its own loader)", flush=True)
                lab, pin_dir = stack.enter_context(revision_lab(trees[rev], modes))
                prog = loader.pinned_program(pin_dir)
                progs.append(prog)
                with in_netns(lab.lb_ns):
                    lab_cases, lab_drop = perpacket.lab_cases(lab, prog, baselines)
                    if modes:
                        lab_cases += mode_cases(lab, prog)
                for case in lab_cases:
                    if case.name in paths or case.name in MODE_PATHS:
                        case.name, case.netns = f"{case.name}@{rev}#{i}", lab.lb_ns
                        cases.append(case)
                if drop is None:
                    drop = lab_drop
                    drop.netns = lab.lb_ns
        try:
            per_lab = perpacket.measure(cases, drop, rounds=rounds, blocks=blocks,
                                        progress=lambda m: print(m, flush=True))
        finally:
            for fd in progs:
                os.close(fd)
    figures: dict = {"xdp_drop_floor": per_lab["xdp_drop_floor"]}
    for rev in revs:
        for path in (*PATHS, *MODE_PATHS):
            runs = [per_lab[f"{path}@{rev}#{i}"] for i in range(labs) if f"{path}@{rev}#{i}" in per_lab]
            if not runs:
                continue
            means = [statistics.fmean(r["net_ns_rounds"][k] for r in runs) for k in range(rounds)]
            figures[f"{path}@{rev}"] = {"median_ns": statistics.median(means), "min_ns": min(means),
                                        "max_ns": max(means), "labs_ns": [round(r["median_ns"], 1) for r in runs]}
    return figures


def table(figures: dict, revs: list[str]) -> str:
    first, second = revs
    lines = [f"{'path':<13} {first:>12} {'(labs)':>13} {second:>12} {'(labs)':>13} {'change':>8}",
             "           (ns per packet, net of XDP_DROP; median over rounds of the labs' mean; labs: min-max of their medians)"]
    for path in (*PATHS, *MODE_PATHS):
        a, b = figures.get(f"{path}@{first}"), figures.get(f"{path}@{second}")
        if a is None or b is None:
            continue
        change = (b["median_ns"] - a["median_ns"]) / a["median_ns"] * 100 if a["median_ns"] else float("nan")
        spread = [f"{min(x['labs_ns']):.0f}-{max(x['labs_ns']):.0f}" for x in (a, b)]
        lines.append(f"{path:<13} {a['median_ns']:>12.1f} {spread[0]:>13} {b['median_ns']:>12.1f} {spread[1]:>13} "
                     f"{change:>+7.1f}%")
    lines.append(f"XDP_DROP floor {figures['xdp_drop_floor']['median_ns']:.1f} ns")
    return "\n".join(lines)


def main() -> None:
    parser = revision_parser("python -m bench.compare", __doc__.splitlines()[0], rounds=5)
    parser.add_argument("--blocks", type=int, default=40, help="blocks of 1,000 calls per case and round")
    parser.add_argument("--labs", type=int, default=3, help="labs (program loads) per revision")
    parser.add_argument("--modes", action="store_true",
                        help="also the hits of a tunnel VIP, an IPv6 NAT VIP and an IPv6 tunnel VIP")
    parser.add_argument("--patch", type=Path, help="apply this patch (patch -p1) to REV2's tree")
    parser.add_argument("--paths", default=",".join(PATHS), help=f"which of {','.join(PATHS)} to time")
    parser.add_argument("--json", help="write the figures here too")
    args = parser.parse_args()
    paths = tuple(args.paths.split(","))
    if set(paths) - set(PATHS):
        parser.error(f"--paths: unknown {','.join(sorted(set(paths) - set(PATHS)))} (known: {','.join(PATHS)})")
    if args.patch and not args.patch.is_file():
        parser.error(f"--patch: no file {args.patch}")
    revs = [args.rev, f"{args.rev2}+{args.patch.stem}" if args.patch else args.rev2]
    if revs[0] == revs[1]:
        parser.error("two different revisions (or --patch), please")
    commits = short_commits(revs)
    figures = compare(revs, args.rounds, args.blocks, args.labs, args.modes, args.patch, paths)
    print(named_commits(commits))
    print(table(figures, revs))
    if args.json:
        Path(args.json).write_text(json.dumps({"revisions": commits, "figures": figures}, indent=2) + "\n")


if __name__ == "__main__":
    main()
