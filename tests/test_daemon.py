"""lbctl daemon: lbctl through its API, concurrent commands, hitless restart and upgrade,
desired state restored after a crash, metrics."""
from __future__ import annotations

import concurrent.futures
import ipaddress
import json
import os
import re
import signal
import shutil
import socket
import subprocess
import sys
import tempfile
import threading
from pathlib import Path
from typing import Iterator

import pytest
from prometheus_client.parser import text_string_to_metric_families
from scapy.layers.inet import IP, UDP
from scapy.layers.l2 import Ether

from control.api import ApiClient, ApiServer, NoDaemon
from control.daemon import parse_listen
from control.errors import InputError
from control.store import SqliteStore
from lb import loader
from lb.maps import DataPlaneMaps
from lb.structs import Endpoint, LbAddr, ReplySource, be16
from netns.lbctl import STATE_DIR, DaemonProcess
from netns.nsenter import in_netns
from netns.topology import Lab
from netns.traffic import EchoStream, NetnsHTTPConnection, Servers, http_get, wait_for
from tests.conftest import lab_with_lb, run_lbctl

METRICS = "127.0.0.1:9464"
STREAM_PORT = 7000


@pytest.fixture(scope="module")
def lab() -> Iterator[Lab]:
    with lab_with_lb(3) as lab:
        yield lab


@pytest.fixture
def daemon(lab: Lab, tmp_path) -> Iterator[DaemonProcess]:
    d = DaemonProcess(lab.lb_ns, str(tmp_path / "daemon.log"), ("--metrics", METRICS))
    try:
        yield d.start()
    finally:
        d.stop()


def scrape(lab: Lab) -> dict[tuple[str, tuple], float]:
    """The daemon's metrics: (sample name, sorted labels) -> value (scraped inside the LB namespace)."""
    host, port = METRICS.split(":")
    conn = NetnsHTTPConnection(lab.lb_ns, host, int(port))
    try:
        text = conn.get_text("/metrics")
    finally:
        conn.close()
    return {(s.name, tuple(sorted(s.labels.items()))): s.value
            for fam in text_string_to_metric_families(text) for s in fam.samples}


def dashboard_metrics() -> set[str]:
    dashboard = json.loads((Path(__file__).parent.parent / "deploy" / "grafana-dashboard.json").read_text())
    return {name for panel in dashboard["panels"] for target in panel["targets"]
            for name in re.findall(r"\blb_[a-z_]+", target["expr"])}


def program_ids(lab: Lab) -> set[int]:
    from tests.test_attach import xdp_prog_ids
    return set(xdp_prog_ids(lab.lb_ns, lab.lb_interfaces).values())


def test_lbctl_goes_through_the_daemon_and_concurrent_commands_all_apply(lab: Lab, daemon: DaemonProcess):
    vip = f"{lab.vip(5)}:80/tcp"
    run_lbctl(lab.lb_ns, "add-vip", vip)  # found at the default socket
    assert os.stat(f"/run/lb/{lab.lb_ns}.sock").st_mode & 0o777 == 0o600
    backends = [f"198.18.200.{i}:8080" for i in range(1, 21)]
    with concurrent.futures.ThreadPoolExecutor(20) as pool:
        results = list(pool.map(lambda b: run_lbctl(lab.lb_ns, "add-backend", vip, b, check=False), backends))
    assert [r.returncode for r in results] == [0] * 20, [r.stderr for r in results if r.returncode]

    listed = {v["vip"]: v for v in run_lbctl(lab.lb_ns, "list", "--json").json()["vips"]}
    assert sorted(b["backend"] for b in listed[vip]["backends"]) == sorted(backends)
    served = [e for e in daemon.events("command") if e["command"] == "add-backend"]
    assert len(served) == 20 and served[0]["params"] == ["backend", "vip", "weight"]  # names, not values

    # Bad input: the same line and exit code as lbctl direct, through the socket named by the environment.
    env = {"LBCTL_API_SOCKET": f"/run/lb/{lab.lb_ns}.sock"}
    bad = run_lbctl(lab.lb_ns, "add-backend", vip, backends[0], check=False, env=env)
    assert (bad.returncode, bad.stderr.strip()) == (2, f"lbctl: error: backend {backends[0]} already exists in VIP {vip}")
    assert backends[0] in daemon.events("command failed")[-1]["error"]
    frame = bytes(Ether(dst="02:00:00:00:00:01") / IP(src="10.9.9.1", dst="10.9.9.9") / UDP(dport=9)).hex()
    probed = run_lbctl(lab.lb_ns, "test-packet", frame, "--json").json()
    assert probed["action"] == "XDP_PASS" and daemon.events("command")[-1]["command"] == "test-packet"
    assert frame not in Path(daemon.log_path).read_text()  # the packet itself is not logged

    nowhere = run_lbctl(lab.lb_ns, "remove-vip", vip, env={"LBCTL_API_SOCKET": "/run/lb/none.sock"})
    assert nowhere.returncode == 0  # no daemon there: lbctl worked on the maps itself
    assert not [e for e in daemon.events("command") if e["command"] == "remove-vip"]


def test_apply_export_drain_and_status_go_through_the_daemon(lab: Lab, daemon: DaemonProcess, tmp_path):
    vip, backend = f"{lab.vip(6)}:80/tcp", f"{lab.backends[0].address}:8080"
    config = tmp_path / "lb.yaml"  # read by lbctl, not by the daemon: only its text crosses the socket
    config.write_text(f"vips:\n  - vip: {vip}\n    backends:\n      - {backend}\n")
    planned = run_lbctl(lab.lb_ns, "apply", "-f", str(config), "--dry-run", "--json").json()
    assert vip not in {v["vip"] for v in run_lbctl(lab.lb_ns, "list", "--json").json()["vips"]}
    run_lbctl(lab.lb_ns, "apply", "-f", str(config))
    run_lbctl(lab.lb_ns, "drain", vip, backend)
    status = run_lbctl(lab.lb_ns, "status", "--json").json()
    exported = run_lbctl(lab.lb_ns, "export").stdout
    served = [e["command"] for e in daemon.events("command")]
    assert served[-6:] == ["apply", "list", "apply", "drain", "status", "export"]
    assert [e["source"] for e in daemon.events("command") if e["command"] == "apply"][-2:] == [str(config)] * 2
    assert "backends:" not in Path(daemon.log_path).read_text()  # the file's text is not logged
    assert planned and vip in exported
    drained = [b for v in status["vips"] if v["vip"] == vip for b in v["backends"]]
    assert [b["weight"] for b in drained] == [0]
    labels = (("backend", backend), ("vip", vip))
    metrics = scrape(lab)  # still configured, no longer taking new connections
    assert (metrics[("lb_backend_active", labels)], metrics[("lb_backend_serving", labels)]) == (1, 0)
    run_lbctl(lab.lb_ns, "set-weight", vip, backend, "3")
    assert scrape(lab)[("lb_backend_serving", labels)] == 1
    run_lbctl(lab.lb_ns, "remove-vip", vip)


def test_lbctl_refuses_a_state_file_other_than_the_daemons(lab: Lab, daemon: DaemonProcess, tmp_path):
    other = run_lbctl(lab.lb_ns, "--state", str(tmp_path / "other.db"), "add-vip", f"{lab.vip(5)}:80/tcp",
                      check=False)
    assert other.returncode == 2 and other.stdout == ""
    assert other.stderr.count("\n") == 1 and "keeps its state in" in other.stderr
    assert not daemon.events("command")  # refused before anything was sent
    assert not os.path.exists(tmp_path / "other.db")
    own = run_lbctl(lab.lb_ns, "--state", os.path.join(STATE_DIR, f"{lab.lb_ns}.db"), "list")
    assert own.returncode == 0 and daemon.events("command")[-1]["command"] == "list"


def test_attach_and_detach_go_through_the_daemon(lab: Lab, daemon: DaemonProcess):
    run_lbctl(lab.lb_ns, "detach")
    assert program_ids(lab) == {0}
    run_lbctl(lab.lb_ns, "attach", *lab.lb_interfaces)
    assert 0 not in program_ids(lab)
    assert [e["command"] for e in daemon.events("command")][-2:] == ["detach", "attach"]


def test_a_second_daemon_stops_before_it_adopts_or_applies_anything(lab: Lab, daemon: DaemonProcess, tmp_path):
    vip = f"{lab.vip(9)}:80/tcp"
    config = tmp_path / "lb.yaml"
    config.write_text(f"vips:\n  - vip: {vip}\n")  # applied, it would remove every other VIP
    run_lbctl(lab.lb_ns, "add-vip", f"{lab.vip(5)}:80/tcp")
    second = DaemonProcess(lab.lb_ns, str(tmp_path / "second.log"), ("--config", str(config)))
    with pytest.raises(RuntimeError, match="exited with 1"):
        second.start()
    assert "another daemon already answers" in second.events()[-1]["msg"]
    assert not second.events("data plane adopted") and not second.events("config applied")
    listed = [v["vip"] for v in run_lbctl(lab.lb_ns, "list", "--json").json()["vips"]]
    assert vip not in listed and f"{lab.vip(5)}:80/tcp" in listed  # answered by the first daemon
    assert os.path.exists(f"/run/lb/{lab.lb_ns}.sock")
    run_lbctl(lab.lb_ns, "remove-vip", f"{lab.vip(5)}:80/tcp")


def test_daemon_restores_maps_to_the_stored_state_and_reports_it(lab: Lab, tmp_path):
    vip = f"{lab.vip(6)}:80/tcp"
    run_lbctl(lab.lb_ns, "add-vip", vip)
    run_lbctl(lab.lb_ns, "add-backend", vip, f"{lab.backends[0].address}:8080")
    pin_dir = run_lbctl(lab.lb_ns, "list", "--json").json()["dataplane"]["pin_dir"]
    stale = Endpoint(addr=LbAddr.of(ipaddress.ip_address("203.0.113.9")), port=be16(80), proto=6)
    with DataPlaneMaps.open(pin_dir) as maps:  # a crash between map writes: VIP keys lost, a stale entry left
        before = {bytes(k): bytes(v) for k, v in maps.vips.items()}
        replies = {bytes(k) for k in maps.reply_sources.keys()}
        for key in list(maps.vips.keys()):
            maps.vips.delete(key)
        maps.reply_sources.set(stale, ReplySource(count=1))
    config = tmp_path / "lb.yaml"
    config.write_text("vips: [\n")  # not valid: start and reload must change nothing
    d = DaemonProcess(lab.lb_ns, str(tmp_path / "daemon.log"), ("--config", str(config)))
    try:
        d.start()
        corrected = d.events("maps corrected to the stored state")
        assert corrected and corrected[0]["corrected"] == {"vips": len(before), "reply_sources": 1}

        # not YAML, not UTF-8, a digit int() refuses: logged, nothing changed, the daemon goes on
        for text in ("vips: [\n", b"vips: []\n# \xff\n",
                     "vips:\n  - vip: 198.19.9.9:80/tcp\n    backends: [{address: 198.18.1.2, weight: \u00b2}]\n"):
            config.write_bytes(text if isinstance(text, bytes) else text.encode())
            errors = len(d.events("config not applied"))
            d.proc.send_signal(signal.SIGHUP)
            wait_for(lambda: len(d.events("config not applied")) > errors, what="the reload's verdict")
            assert d.proc.poll() is None
        assert d.events("SIGHUP: reloading the config")
    finally:
        assert d.stop() == 0
    assert d.events("stopped")
    with DataPlaneMaps.open(pin_dir) as maps:
        assert {bytes(k): bytes(v) for k, v in maps.vips.items()} == before
        assert {bytes(k) for k in maps.reply_sources.keys()} == replies
    run_lbctl(lab.lb_ns, "remove-vip", vip)


def test_daemon_rebuilds_the_data_plane_after_a_reboot(lab: Lab, tmp_path):
    vip = f"{lab.vip(8)}:80/tcp"
    run_lbctl(lab.lb_ns, "add-vip", vip)
    run_lbctl(lab.lb_ns, "add-backend", vip, f"{lab.backends[0].address}:8080")
    listed = run_lbctl(lab.lb_ns, "list", "--json").json()["dataplane"]
    pin_dir = listed["pin_dir"]
    with in_netns(lab.lb_ns):  # what a reboot leaves: the state file, no program, no pins
        for iface in listed["interfaces"]:
            loader.detach_xdp(socket.if_nametoindex(iface["name"]), iface["mode"])
    loader.unpin_all(pin_dir)
    assert program_ids(lab) == {0}

    d = DaemonProcess(lab.lb_ns, str(tmp_path / "daemon.log"), ())
    try:
        d.start()
        assert d.events("data plane adopted")[0]["program"] == "loaded"
        assert 0 not in program_ids(lab)
        with Servers.running({lab.backends[0].ns: "b1"}):
            assert http_get(lab.client.ns, str(lab.vip(8)), 80) == "b1"
        run_lbctl(lab.lb_ns, "remove-vip", vip)
    finally:
        assert d.stop() == 0


def test_established_stream_survives_kill9_restart_and_upgrade(lab: Lab, tmp_path):
    vip_host = str(lab.vip(7))
    vip = f"{vip_host}:{STREAM_PORT}/tcp"
    d = DaemonProcess(lab.lb_ns, str(tmp_path / "daemon.log"), ("--metrics", METRICS))
    try:
        d.start()
        run_lbctl(lab.lb_ns, "add-vip", vip)
        for b in lab.backends:
            run_lbctl(lab.lb_ns, "add-backend", vip, f"{b.address}:{STREAM_PORT}")
        with EchoStream.running(lab.client.ns, [b.ns for b in lab.backends], vip_host, STREAM_PORT) as stream:

            def flowing(what: str) -> None:
                """The stream goes on, and the VIP's packet counter keeps growing."""
                exchanged, packets = stream.exchanged, vip_packets()
                wait_for(lambda: stream.error or stream.exchanged >= exchanged + 20, 30, what=what)
                assert stream.error is None, f"{what}: {stream.error}"
                assert vip_packets() > packets, what

            def vip_packets() -> int:
                return next(v["packets"] for v in run_lbctl(lab.lb_ns, "stats", "--json").json()["vips"]
                            if v["vip"] == vip)

            flowing("started")
            program = program_ids(lab)
            metrics = scrape(lab)
            assert metrics[("lb_vip_packets_total", (("vip", vip),))] > 0
            assert metrics[("lb_conn_table_entries", ())] >= 1
            assert sum(metrics[("lb_backend_new_connections_total", (("backend", f"{b.address}:{STREAM_PORT}"),
                                                                       ("vip", vip)))] for b in lab.backends) == 1
            assert metrics[("lb_backend_healthy", (("backend", f"{lab.backends[0].address}:{STREAM_PORT}"),
                                                   ("vip", vip)))] == 1
            assert metrics[("lb_reconcile_seconds_count", (("command", "add-backend"),))] == len(lab.backends)
            assert metrics[("lb_reason_packets_total", (("action", "fwd"), ("reason", "fwd_nat")))] > 0
            assert metrics[("lb_reason_packets_total", (("action", "drop"), ("reason", "drop_no_backend")))] == 0
            # Every series the dashboard plots exists (health checks appear once a check has run).
            scraped = {name for name, _ in metrics} | {"lb_health_check_seconds_bucket"}
            assert dashboard_metrics() <= scraped, dashboard_metrics() - scraped

            d.kill9()
            flowing("daemon killed")
            d.start()  # restart: the unchanged program is kept, not even recompiled
            assert d.events("data plane adopted", d.proc.pid)[0]["program"] == "kept"
            assert program_ids(lab) == program
            flowing("daemon restarted")

            d.kill9()  # upgrade: the program on the interfaces came from other sources
            store = SqliteStore(os.path.join(STATE_DIR, f"{lab.lb_ns}.db"))
            with store.transaction() as state:
                state.dataplane.program_digest = "0" * 64
            pin_dir = state.dataplane.pin_dir
            with DataPlaneMaps.open(pin_dir) as maps:
                flows = {bytes(k) for k in maps.conn_table.keys()}
            d.start()
            adopted = d.events("data plane adopted", d.proc.pid)[0]
            assert adopted["program"] == "replaced" and adopted["corrected"] == {}
            assert program_ids(lab) == {adopted["program_id"]} != program
            flowing("program upgraded")
            with DataPlaneMaps.open(pin_dir) as maps:
                assert flows <= {bytes(k) for k in maps.conn_table.keys()}  # the connection table was kept
            assert store.read().dataplane.program_digest != "0" * 64
        assert stream.error is None
        run_lbctl(lab.lb_ns, "remove-vip", vip)
    finally:
        assert d.stop() == 0


# --- without a lab ------------------------------------------------------------------------------

def test_api_runs_one_command_at_a_time_and_answers_errors_as_lbctl_does(tmp_path):
    inside, most = [0], [0]
    lock = threading.Lock()

    def handler(command: str, params: dict) -> dict:
        with lock:
            inside[0] += 1
            most[0] = max(most[0], inside[0])
        try:
            if command == "bad":
                raise InputError("bad input, one line")
            threading.Event().wait(0.01)  # stay inside a while, so overlapping calls would show
            return {"echo": params["n"]}
        finally:
            with lock:
                inside[0] -= 1

    path = str(tmp_path / "api.sock")
    server = ApiServer(path, handler, lambda: {"pid": os.getpid()})
    server.serve_in_thread()
    try:
        assert os.stat(path).st_mode & 0o777 == 0o600
        client = ApiClient(path, timeout=10)
        with concurrent.futures.ThreadPoolExecutor(20) as pool:
            answers = list(pool.map(lambda n: client.command("echo", {"n": n}), range(40)))
        assert answers == [{"echo": n} for n in range(40)] and most[0] == 1
        with pytest.raises(InputError, match="^bad input, one line$"):
            client.command("bad", {})
        assert client.describe() == {"pid": os.getpid()}
    finally:
        server.close()
    assert not os.path.exists(path)
    with pytest.raises(NoDaemon):
        ApiClient(path).command("list", {})


@pytest.mark.parametrize("text, expected", [("127.0.0.1:9464", ("127.0.0.1", 9464)), ("[::1]:80", ("::1", 80))])
def test_metrics_address_is_parsed(text, expected):
    assert parse_listen(text) == expected


@pytest.mark.parametrize("text", ["9464", "localhost:", ":80", "127.0.0.1:70000", "127.0.0.1:http"])
def test_bad_metrics_address_is_refused(text):
    with pytest.raises(InputError, match="expected ADDR:PORT"):
        parse_listen(text)


@pytest.mark.parametrize("text", ["0.0.0.0:9464", "[::]:9464", "[0:0::0]:9464"])
def test_a_wildcard_metrics_address_needs_metrics_public(text):
    with pytest.raises(InputError, match="every interface.*--metrics-public"):
        parse_listen(text)
    assert parse_listen(text, public=True)[1] == 9464


def test_daemon_refuses_a_wildcard_metrics_address_in_one_line(tmp_path):
    """Exit 2 and one line, before the daemon takes its socket or touches any state."""
    state, sock = tmp_path / "state.db", tmp_path / "api.sock"
    proc = subprocess.run([str(Path(sys.executable).parent / "lbctl"), "--state", str(state), "--api-socket",
                           str(sock), "daemon", "--metrics", "0.0.0.0:9464"],
                          capture_output=True, text=True, timeout=60)
    assert proc.returncode == 2
    assert proc.stderr.count("\n") == 1 and "--metrics-public" in proc.stderr, proc.stderr
    assert not sock.exists() and not state.exists()


FORGED = "b1\n2026-01-01T00:00:00 error forged line\r\x1b[2Jand\u2028more"


@pytest.mark.parametrize("log_format", ["text", "json"])
def test_a_name_with_a_newline_or_control_character_cannot_forge_a_log_line(log_format):
    """Names, paths and values from the API or files reach the logs in messages, fields and
    exceptions: each record stays one line, with the characters escaped."""
    import io
    import logging

    from control.daemon import _event, make_logger

    root = logging.getLogger()
    saved = root.handlers[:], root.level
    out = io.StringIO()
    try:
        log = make_logger(log_format)
        root.handlers[0].stream = out
        _event(log, f"cannot read {FORGED}", logging.ERROR, config=FORGED, **{FORGED: 1})
        logging.getLogger("lb.health").warning("backend %s of %s is down (%s)", FORGED, "v", FORGED)
        try:
            raise ValueError(FORGED)
        except ValueError:
            log.exception("failed: %s", FORGED)
    finally:
        root.handlers[:], level = saved
        root.setLevel(level)
    lines = out.getvalue().split("\n")
    assert lines[-1] == "" and len(lines) == 4, lines
    for line in lines[:-1]:
        assert not any(ord(c) < 0x20 or c in "\x7f\u2028\u2029" for c in line), line
        assert "forged line" in line
        if log_format == "json":
            assert FORGED in json.loads(line)["msg"]  # the whole text, once decoded
        else:
            assert "b1\\n2026-01-01T00:00:00 error forged line\\r\\x1b[2Jand\\u2028more" in line


def test_the_standalone_monitors_formatter_escapes_too():
    import logging

    from control.logescape import EscapingFormatter

    record = logging.LogRecord("lb.health", logging.WARNING, __file__, 1, "backend %s is down", (FORGED,), None)
    line = EscapingFormatter("%(name)s %(message)s").format(record)
    assert line == "lb.health backend b1\\n2026-01-01T00:00:00 error forged line\\r\\x1b[2Jand\\u2028more is down"


CONNECT_AS_NOBODY = """
import os, socket, sys
os.setgroups([]); os.setgid(65534); os.setuid(65534)
s = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
s.settimeout(10)
try:
    s.connect(sys.argv[1])
except PermissionError:
    print("refused by mode"); sys.exit(0)
try:
    s.sendall(b"GET /v1/daemon HTTP/1.1\\r\\nHost: lb\\r\\n\\r\\n")
    answer = s.recv(4096)
except ConnectionError:  # closed before or while it spoke
    answer = b""
print("answered" if answer else "closed unanswered")
"""


def connect_as_nobody(path: str) -> str:
    proc = subprocess.run(["/usr/bin/python3", "-I", "-c", CONNECT_AS_NOBODY, path], capture_output=True,
                          text=True, timeout=30, cwd="/")
    assert proc.returncode == 0, proc.stderr
    return proc.stdout.strip()


def test_api_refuses_a_peer_that_is_not_root():
    """Mode 0600 keeps others off the socket; were it opened up, the peer credentials still refuse them."""
    directory = tempfile.mkdtemp(prefix="lb-api-")  # under /tmp: nobody can reach it once it is 0755
    path = os.path.join(directory, "api.sock")
    described = []
    server = ApiServer(path, lambda c, p: {}, lambda: described.append(1) or {"pid": os.getpid()})
    server.serve_in_thread()
    try:
        os.chmod(directory, 0o755)
        assert connect_as_nobody(path) == "refused by mode"
        os.chmod(path, 0o666)  # only the peer-credential check is left
        assert connect_as_nobody(path) == "closed unanswered"
        assert not described
        assert ApiClient(path, timeout=10).describe() == {"pid": os.getpid()}  # root is answered
    finally:
        server.close()
        shutil.rmtree(directory, ignore_errors=True)
