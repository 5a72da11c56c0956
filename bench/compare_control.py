"""The control plane's cost in two revisions, measured in ONE run: python -m bench.compare_control REV [REV2]

Each revision (REV2: HEAD by default) is built from git as bench/compare.py builds it (with this
tree's lb/_maglev_fill.so when its source is the same) and attached by its own lbctl in a lab of
its own with room for 1,024 VIPs, VIP 1 over the lab's three backends. At 10 VIPs, then at 1,000
(the others without backends, added by the revision's own bench.populate, as the bench's VIP
scaling adds them), the figures of bench/control.py are taken in rounds that alternate the
revisions, so that the machine's load weighs on both alike:
  - `ip netns exec NS lbctl add-backend`, process start to exit, no daemon;
  - the same request on the daemon's API (the revision's own `lbctl daemon`);
  - `lbctl add-backend` through that daemon, process start included.
Each add-backend is undone by a remove-backend, untimed. Figures of different runs do not compare
(the machine's speed varies from day to day); the columns of one run do.

    python -m bench.compare_control main            # main against HEAD
    python -m bench.compare_control A B --rounds 20 --json out.json"""
from __future__ import annotations

import contextlib
import filecmp
import json
import os
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable, Iterator

from bench.compare import ROOT, named_commits, revision_parser, short_commits, source_tree
from control.apiclient import ApiClient, NoDaemon, default_socket_path
from netns.lbctl import STATE_DIR
from netns.topology import Lab
from netns.traffic import stop_process

SIZES = (10, 1000)
BACKEND = "198.18.1.9:8080"  # added and removed again: no lab host answers there, none needs to


@dataclass
class Revision:
    name: str
    tree: Path
    lab: Lab
    vip: str = ""
    daemon: subprocess.Popen | None = None
    api: ApiClient | None = None
    figures: dict[str, list[float]] = field(default_factory=dict)

    def command(self, *args: str) -> list[str]:
        return ["ip", "netns", "exec", self.lab.lb_ns, sys.executable, "-c",
                "import sys; from control.cli import main; sys.exit(main())", *args]

    def run(self, *args: str, module: str | None = None) -> float:
        """One lbctl (or `python -m module`) process of this revision in its lab; its wall time in ms."""
        argv = self.command(*args) if module is None else \
            ["ip", "netns", "exec", self.lab.lb_ns, sys.executable, "-m", module, *args]
        start = time.perf_counter()
        proc = subprocess.run(argv, capture_output=True, text=True, timeout=1200, cwd=self.tree,
                              env={"PATH": "/usr/sbin:/usr/bin:/sbin:/bin", "PYTHONPATH": str(self.tree)})
        elapsed = (time.perf_counter() - start) * 1000
        if proc.returncode != 0:
            raise RuntimeError(f"{self.name}: {' '.join(args)} failed ({proc.returncode}): {proc.stderr.strip()}")
        return elapsed

    def record(self, name: str, ms: float) -> None:
        self.figures.setdefault(name, []).append(ms)


def tree_with_fill_loop(rev: str, into: Path) -> Path:
    """The revision's files; with this tree's built Maglev fill loop when the revision's C is the same
    (otherwise its Python loop runs, and its figures say so by being slow)."""
    tree = source_tree(rev, into)
    built, source = ROOT / "lb" / "_maglev_fill.so", ROOT / "lb" / "maglev_fill.c"
    theirs = tree / "lb" / "maglev_fill.c"
    if built.exists() and theirs.exists() and filecmp.cmp(source, theirs, shallow=False):
        shutil.copy(built, tree / "lb" / "_maglev_fill.so")
    else:
        print(f"{rev}: no built Maglev fill loop for its source: its Python loop runs", flush=True)
    return tree


@contextlib.contextmanager
def revision_lab(name: str, tree: Path) -> Iterator[Revision]:
    """A lab with the revision's data plane attached (room for 1,024 VIPs), VIP 1 over its backends."""
    with Lab.build(3, hosts_tx_checksum=False) as lab:
        rev = Revision(name, tree, lab)
        try:
            rev.run("attach", *lab.lb_interfaces, "--max-vips", "1024", "--xdp-mode", "native")
            rev.vip = f"{lab.vip(1)}:80/tcp"
            rev.run("add-vip", rev.vip)
            for b in lab.backends:
                rev.run("add-backend", rev.vip, f"{b.address}:8080")
            yield rev
        finally:
            stop_daemon(rev)
            subprocess.run(rev.command("detach"), capture_output=True, timeout=600, cwd=tree,
                           env={"PATH": "/usr/sbin:/usr/bin:/sbin:/bin", "PYTHONPATH": str(tree)})
            for suffix in ("", "-wal", "-shm"):
                with contextlib.suppress(FileNotFoundError):
                    os.remove(os.path.join(STATE_DIR, f"{lab.lb_ns}.db{suffix}"))


def start_daemon(rev: Revision, timeout: float = 120.0) -> None:
    log = open(os.path.join(tempfile.gettempdir(), f"lb-compare-{rev.lab.lb_ns}.log"), "a")
    try:
        rev.daemon = subprocess.Popen(rev.command("daemon"), stdout=log, stderr=log, cwd=rev.tree,
                                      env={"PATH": "/usr/sbin:/usr/bin:/sbin:/bin", "PYTHONPATH": str(rev.tree)})
    finally:
        log.close()
    rev.api = ApiClient(default_socket_path(rev.lab.lb_ns))
    deadline = time.monotonic() + timeout
    while True:
        try:
            rev.api.describe()
            return
        except NoDaemon:
            if rev.daemon.poll() is not None or time.monotonic() > deadline:
                raise RuntimeError(f"{rev.name}: the daemon did not come up (exit {rev.daemon.poll()}), see {log.name}")
            time.sleep(0.1)


def stop_daemon(rev: Revision) -> None:
    stop_process(rev.daemon, timeout=30, kill_timeout=10)
    rev.daemon = rev.api = None


def api_add_backend_ms(rev: Revision) -> float:
    start = time.perf_counter()
    rev.api.command("add-backend", {"vip": rev.vip, "backend": BACKEND})
    elapsed = (time.perf_counter() - start) * 1000
    rev.api.command("remove-backend", {"vip": rev.vip, "backend": BACKEND})
    return elapsed


def lbctl_add_backend_ms(rev: Revision) -> float:
    elapsed = rev.run("add-backend", rev.vip, BACKEND)
    rev.run("remove-backend", rev.vip, BACKEND)
    return elapsed


def alternate(revs: list[Revision], name: str, measure: Callable[[Revision], float], rounds: int) -> None:
    """`rounds` figures per revision, one revision after the other, the first one changing each round."""
    for i in range(rounds):
        for rev in revs if i % 2 == 0 else reversed(revs):
            rev.record(name, measure(rev))


def measure(revs: list[Revision], rounds: int) -> None:
    for size in SIZES:
        for rev in revs:
            print(f"{rev.name}: {size} VIPs (its own bench.populate)", flush=True)
            rev.run("vips", str(size), module="bench.populate")
        for rev in revs:
            lbctl_add_backend_ms(rev)  # a first run migrates whatever the store or the caches keep
        alternate(revs, f"lbctl_add_backend_ms@{size}", lbctl_add_backend_ms, rounds)
        try:
            for rev in revs:
                start_daemon(rev)
                api_add_backend_ms(rev)
            alternate(revs, f"api_add_backend_ms@{size}", api_add_backend_ms, 2 * rounds)
            alternate(revs, f"lbctl_via_daemon_ms@{size}", lbctl_add_backend_ms, rounds)
        finally:
            for rev in revs:
                stop_daemon(rev)


def summary(values: list[float]) -> dict[str, float]:
    return {"median": statistics.median(values), "min": min(values), "max": max(values), "n": len(values)}


def table(revs: list[Revision]) -> str:
    first, second = revs
    lines = [f"{'what (ms, median over rounds; min-max)':<34} {first.name:>22} {second.name:>22} {'ratio':>6}"]
    for name in first.figures:
        a, b = summary(first.figures[name]), summary(second.figures[name])
        cells = [f"{s['median']:.1f} ({s['min']:.0f}-{s['max']:.0f})" for s in (a, b)]
        lines.append(f"{name:<34} {cells[0]:>22} {cells[1]:>22} {b['median'] / a['median']:>6.2f}")
    return "\n".join(lines)


def main() -> None:
    parser = revision_parser("python -m bench.compare_control", __doc__.splitlines()[0], rounds=15,
                             rounds_help="one-shot lbctl runs per revision and size (twice as many API requests)")
    parser.add_argument("--json", help="write the figures here too")
    args = parser.parse_args()
    if args.rev == args.rev2:
        parser.error("two different revisions, please")
    commits = short_commits([args.rev, args.rev2])
    with tempfile.TemporaryDirectory(prefix="lb-compare-") as tmp, contextlib.ExitStack() as stack:
        revs = []
        for name in (args.rev, args.rev2):
            print(f"{name}: attaching its data plane (compiled by its own loader)", flush=True)
            revs.append(stack.enter_context(revision_lab(name, tree_with_fill_loop(name, Path(tmp)))))
        measure(revs, args.rounds)
    print(named_commits(commits))
    print(table(revs))
    if args.json:
        Path(args.json).write_text(json.dumps({"revisions": commits, "figures": {
            r.name: {k: summary(v) for k, v in r.figures.items()} for r in revs}}, indent=2) + "\n")


if __name__ == "__main__":
    main()
