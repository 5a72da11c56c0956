"""A real-client figure: HTTP requests per second and latency percentiles through the VIP.

wrk (Debian's) in the client namespace opens keep-alive connections to the VIP;
nginx in each backend namespace answers with a few bytes. The LB namespace runs
lb's XDP data plane, then in turn the kernel's nftables DNAT (kube-proxy-like,
conntrack included) with lb's program detached. New connections are made for
each repetition, so both paths carry connection set-up as well as requests.
On 2 vCPUs wrk and nginx use most of the CPU: the ratio tells how much of an
application's budget the LB takes, not the LB's ceiling (see endtoend.py)."""
from __future__ import annotations

import contextlib
import os
import re
import shutil
import statistics
import subprocess
import tempfile
import time
from typing import Iterator

from bench.endtoend import nft, nft_ruleset, switch_lb
from netns.nsenter import socket_in
from netns.topology import Lab

NGINX_CONF = """\
worker_processes 1;
pid {dir}/nginx.pid;
error_log {dir}/error.log;
events {{ worker_connections 4096; }}
http {{
  access_log off;
  keepalive_requests 10000000;
  client_body_temp_path {dir}/body;
  proxy_temp_path {dir}/proxy;
  server {{
    listen {port} reuseport;
    listen [::]:{port};
    location / {{ return 200 "{name}\\n"; }}
  }}
}}
"""
_UNITS = {"us": 1e-3, "ms": 1.0, "s": 1e3}


def _listening(ns: str, port: int) -> bool:
    sock = socket_in(ns)
    try:
        sock.settimeout(0.2)
        return sock.connect_ex(("127.0.0.1", port)) == 0
    finally:
        sock.close()


@contextlib.contextmanager
def nginx_in_backends(lab: Lab, port: int, timeout: float = 10.0) -> Iterator[None]:
    """One nginx per backend namespace, stopped (and its files removed) afterwards."""
    if shutil.which("nginx") is None:
        raise RuntimeError("nginx is not installed; run 'make setup'")
    procs: list[subprocess.Popen] = []
    workdir = tempfile.mkdtemp(prefix=f"{lab.prefix}-nginx-")
    try:
        for b in lab.backends:
            conf_dir = os.path.join(workdir, b.ns)
            os.makedirs(conf_dir)
            conf = os.path.join(conf_dir, "nginx.conf")
            with open(conf, "w") as f:
                f.write(NGINX_CONF.format(dir=conf_dir, port=port, name=b.ns))
            procs.append(subprocess.Popen(["ip", "netns", "exec", b.ns, "nginx", "-p", conf_dir, "-c", conf,
                                           "-g", "daemon off;"], stderr=subprocess.DEVNULL))
        deadline = time.monotonic() + timeout
        for b in lab.backends:
            while not _listening(b.ns, port):
                if time.monotonic() > deadline:
                    raise RuntimeError(f"nginx in {b.ns} did not listen on {port} within {timeout} s")
                time.sleep(0.05)
        yield
    finally:
        for p in procs:
            p.terminate()
        for p in procs:
            try:
                p.wait(timeout=5)
            except subprocess.TimeoutExpired:
                p.kill()
        shutil.rmtree(workdir, ignore_errors=True)


def _latency_ms(value: str) -> float:
    m = re.fullmatch(r"([\d.]+)(us|ms|s)", value)
    if not m:
        raise ValueError(f"unexpected wrk latency {value!r}")
    return float(m.group(1)) * _UNITS[m.group(2)]


def parse_wrk(output: str) -> dict[str, float]:
    """Requests/s, latency percentiles (ms) and errors from `wrk --latency` output."""
    rps = re.search(r"Requests/sec:\s+([\d.]+)", output)
    if not rps:
        raise RuntimeError(f"wrk printed no rate:\n{output}")
    result = {"requests_per_s": float(rps.group(1))}
    for pct, value in re.findall(r"^\s+(50|90|99)%\s+(\S+)$", output, re.M):
        result[f"p{pct}_ms"] = _latency_ms(value)
    errors = re.search(r"Socket errors: connect (\d+), read (\d+), write (\d+), timeout (\d+)", output)
    non2xx = re.search(r"Non-2xx or 3xx responses: (\d+)", output)
    result["errors"] = (sum(map(int, errors.groups())) if errors else 0) + (int(non2xx.group(1)) if non2xx else 0)
    return result


def wrk(ns: str, url: str, seconds: int, connections: int, threads: int = 2) -> dict[str, float]:
    proc = subprocess.run(["ip", "netns", "exec", ns, "wrk", f"-t{threads}", f"-c{connections}", f"-d{seconds}s",
                           "--timeout", "2s", "--latency", url], capture_output=True, text=True, timeout=seconds + 60)
    if proc.returncode != 0:
        raise RuntimeError(f"wrk failed ({proc.returncode}): {proc.stderr.strip()}")
    return parse_wrk(proc.stdout)


def run(lab: Lab, lb_prog: int, vip_port: int, backend_port: int, reps: int, seconds: int,
        connections: int = 32, progress=print) -> dict:
    """lb XDP against nftables DNAT, interleaved; medians with min and max."""
    url = f"http://{lab.vip(1)}:{vip_port}/"
    ruleset = nft_ruleset(lab, "tcp", vip_port, backend_port, table="lbweb")
    runs: dict[str, list[dict[str, float]]] = {"xdp_lb": [], "nftables": []}
    with nginx_in_backends(lab, backend_port):
        for rep in range(reps):
            for name in (("xdp_lb", "nftables") if rep % 2 == 0 else ("nftables", "xdp_lb")):
                if name == "nftables":
                    switch_lb(lab, None)
                    nft(lab, ruleset)
                try:
                    runs[name].append(wrk(lab.client.ns, url, seconds, connections))
                finally:
                    if name == "nftables":
                        nft(lab, "delete table ip lbweb\n")
                        switch_lb(lab, lb_prog)
            progress(f"  rep {rep + 1}/{reps}: " + ", ".join(
                f"{n} {v[-1]['requests_per_s']:.0f} req/s" for n, v in runs.items()))

    def med(values: list[float]) -> dict[str, float]:
        return {"median": statistics.median(values), "min": min(values), "max": max(values)}

    out: dict = {name: {key: med([r[key] for r in rs]) for key in rs[0] if key != "errors"}
                 | {"errors": sum(r["errors"] for r in rs)} for name, rs in runs.items()}
    out["xdp_over_nft_rps"] = out["xdp_lb"]["requests_per_s"]["median"] / out["nftables"]["requests_per_s"]["median"]
    out["method"] = f"wrk -t2 -c{connections} -d{seconds}s --latency {url}, nginx in each of {len(lab.backends)} backends"
    return out
