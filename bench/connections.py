"""How long `lbctl connections` takes on a full connection table (not part of make bench).

`.venv/bin/python -m bench.connections [ENTRIES]` builds a one-backend lab, fills conn_table with
ENTRIES (default 1,048,576) entries of a NAT VIP, each naming the backend's binding, and times
lbctl as an operator runs it: a --limit'ed listing, a filter that matches nothing (the whole
table is read), and the whole table as JSON. Prints wall and CPU time and peak RSS."""
from __future__ import annotations

import json
import os
import subprocess
import sys
import time

from lb import bpfsys
from lb.maps import U32, DataPlaneMaps
from lb.refmodel import kernel_ticks
from lb.structs import FlowEntry, FlowKey, LbAddr, be16
from netns.lbctl import LBCTL, lab_with_lb, run_lbctl

BATCH = 65536


def fill(maps: DataPlaneMaps, vip: LbAddr, backend_id: int, vip_id: int, generation: int, entries: int) -> None:
    """entries flows to the VIP from 10.0.0.0/8 clients, a batch write at a time."""
    now = (kernel_ticks() + maps.lb_config.get(U32(0)).clock_offset) & 0xFFFFFFFF
    for base in range(0, entries, BATCH):
        n = min(BATCH, entries - base)
        keys, values = (FlowKey * n)(), (FlowEntry * n)()
        for i in range(n):
            flow = base + i
            client = LbAddr.from_buffer_copy(bytes(10) + b"\xff\xff" + bytes([10, flow >> 16 & 0xFF,
                                                                               flow >> 8 & 0xFF, flow & 0xFF]))
            keys[i] = FlowKey(src=client, dst=vip, sport=be16(1024 + flow % 60000), dport=be16(80), proto=6)
            values[i] = FlowEntry(backend_id=backend_id, vip_id=vip_id, generation=generation, last_seen=now)
        bpfsys.map_update_batch(maps.conn_table.fd, keys, values, n)


def timed(ns: str, *args: str) -> tuple[float, float, float, str]:
    """Wall seconds, CPU seconds (user + system: what the listing costs, whatever else the machine
    runs), peak RSS in MiB of the lbctl process (GNU time), and its output."""
    start = time.monotonic()
    proc = subprocess.run(["ip", "netns", "exec", ns, "/usr/bin/time", "-f", "%U %S %M", LBCTL, *args],
                          capture_output=True, text=True, check=True)
    elapsed = time.monotonic() - start
    user, system, rss = proc.stderr.strip().splitlines()[-1].split()
    return elapsed, float(user) + float(system), int(rss) / 1024, proc.stdout


def main(entries: int) -> None:
    with lab_with_lb(1) as lab:
        vip = f"{lab.vip(1)}:80/tcp"
        run_lbctl(lab.lb_ns, "add-vip", vip)
        run_lbctl(lab.lb_ns, "add-backend", vip, f"{lab.backends[0].address}:8080")
        pin_dir = run_lbctl(lab.lb_ns, "list", "--json").json()["dataplane"]["pin_dir"]
        with DataPlaneMaps.open(pin_dir) as maps:
            record = maps.backends.get(U32(1))
            start = time.monotonic()
            fill(maps, LbAddr.of(lab.vip(1)), 1, record.vip_id, record.generation, entries)
            held = maps.conn_table.count()
            print(f"filled {held:,} entries in {time.monotonic() - start:.1f} s", flush=True)
        cases = [("--limit 100", ("connections", "--limit", "100")),
                 ("--vip (no match: whole table read)", ("connections", "--vip", f"{lab.vip(2)}")),
                 ("--backend --limit 10", ("connections", "--backend", f"{lab.backends[0].address}", "--limit", "10")),
                 ("whole table, text", ("connections",)),
                 ("whole table, --json", ("connections", "--json"))]
        for name, args in cases:
            seconds, cpu, rss, out = timed(lab.lb_ns, *args)
            shown = json.loads(out)["shown"] if "--json" in args else out.strip().splitlines()[-1]
            print(f"{name}: {seconds:.2f} s ({cpu:.2f} s CPU), peak RSS {rss:.0f} MiB ({shown})", flush=True)
        print(f"load average: {os.getloadavg()[0]:.1f} on {os.cpu_count()} CPUs", flush=True)


if __name__ == "__main__":
    if os.geteuid() != 0:
        raise SystemExit("run as root")
    main(int(sys.argv[1]) if len(sys.argv) > 1 else 1 << 20)
