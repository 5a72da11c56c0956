"""`lbctl daemon`: the data plane's keeper, in the foreground.

On start it first takes its API socket (control/api.py) and metrics port, so a
second daemon stops there before touching anything; then it adopts the running
data plane (control/adopt.py: no recompile unless the program changed, maps kept,
corrections reported), applies --config if given, and serves lbctl over the
socket, Prometheus metrics (control/metrics.py) and health checks
(control/health.py) until SIGTERM or SIGINT. SIGHUP applies the config file
again. Logs are one line per event, as text or JSON."""
from __future__ import annotations

import argparse
import ipaddress
import json
import logging
import os
import signal
import sys
import threading
import time
from dataclasses import dataclass, field
from typing import Any

from control.adopt import AdoptReport, adopt
from control.bgp import BgpOptions, follow as follow_bgp
from control.api import ApiServer, default_socket_path
from control.commands import CHANGES, dispatch
from control.config import read_text
from control.errors import EXIT_ERROR, EXIT_USAGE, InputError, LbError
from control.health import HealthMonitor
from control.logescape import escape
from control.metrics import Metrics
from control.model import is_whole_number
from control.routes import KernelChanges
from control.service import Controller
from control.watch import start_store_watch
from lb.structs import LAYOUT_VERSION


# --- logging ----------------------------------------------------------------------------------

class _JsonFormatter(logging.Formatter):
    def format(self, record: logging.LogRecord) -> str:
        line = {"time": round(record.created, 3), "level": record.levelname.lower(), "pid": record.process,
                "msg": record.getMessage(), **getattr(record, "fields", {})}
        if record.exc_info:
            line["exception"] = self.formatException(record.exc_info)
        return json.dumps(line, default=str)


class _TextFormatter(logging.Formatter):
    def format(self, record: logging.LogRecord) -> str:
        stamp = time.strftime("%Y-%m-%dT%H:%M:%S", time.gmtime(record.created))
        fields = " ".join(f"{escape(str(k))}={json.dumps(v, default=str)}"
                          for k, v in getattr(record, "fields", {}).items())
        # the message may quote a name or a path from the API or a file: one record, one line
        return f"{stamp} {record.levelname.lower()} {escape(record.getMessage())}" + (f" {fields}" if fields else "")


def make_logger(log_format: str) -> logging.Logger:
    """The daemon's logger; every module's records (health checks too) go out in the same format."""
    handler = logging.StreamHandler(sys.stderr)
    handler.setFormatter(_JsonFormatter() if log_format == "json" else _TextFormatter())
    root = logging.getLogger()
    root.handlers[:] = [handler]
    root.setLevel(logging.INFO)
    return logging.getLogger("lb.daemon")


def bgp_sessions(args: Any, name: str) -> list[BgpOptions]:
    """The daemon's BGP sessions, one per --bgp-peer (none without). The first keeps the instance's name
    for its ExaBGP files, the others take NAME-2, NAME-3...; --bgp-local-address goes to the peers of
    its IP version."""
    peers = args.bgp_peer or []
    if len(set(peers)) != len(peers):
        raise InputError("--bgp-peer: a peer is given twice")
    sessions = []
    for i, peer in enumerate(peers):
        local = args.bgp_local_address
        if local is not None and len(peers) > 1 and (":" in local) != (":" in peer):
            local = None
        sessions.append(BgpOptions.parse(peer, args.bgp_local_as, args.bgp_peer_as, args.bgp_router_id, local,
                                         args.bgp_hold_time, args.bgp_settle,
                                         name=name if i == 0 else f"{name}-{i + 1}"))
    return sessions


def _event(log: logging.Logger, msg: str, level: int = logging.INFO, **fields: Any) -> None:
    log.log(level, msg, extra={"fields": fields})


# --- the daemon -------------------------------------------------------------------------------

def parse_listen(text: str, public: bool = False) -> tuple[str, int]:
    """ADDR:PORT, IPv6 in brackets. The metrics name every VIP and backend and tell their health:
    a wildcard address (every interface) needs `public`, an operator's explicit choice."""
    host, sep, port = text.rpartition(":")
    if not sep or not is_whole_number(port) or not 0 < int(port) < 65536 or not host:
        raise InputError(f"--metrics {text!r}: expected ADDR:PORT, as in 127.0.0.1:9400 or [::1]:9400")
    host = host.strip("[]")
    try:
        wildcard = ipaddress.ip_address(host).is_unspecified
    except ValueError:  # a host name: bound where it resolves
        wildcard = False
    if wildcard and not public:
        raise InputError(f"--metrics {text!r}: {host} listens on every interface; use a loopback or one "
                         f"interface's address, or add --metrics-public to expose the metrics on purpose")
    return host, int(port)


@dataclass
class Daemon:
    ctl: Controller
    log: logging.Logger
    socket_path: str
    config_path: str | None = None
    metrics_listen: tuple[str, int] | None = None
    bgp: list[BgpOptions] = field(default_factory=list)  # one BGP session (an ExaBGP) each
    started: float = field(default_factory=time.time)
    adopted: AdoptReport = field(default_factory=AdoptReport)
    commands_served: int = 0

    def __post_init__(self) -> None:
        self.metrics = Metrics(self.ctl.store.read, store_status=getattr(self.ctl.store, "status", None))

    # lbctl commands arrive here from the API server, one at a time
    def handle(self, command: str, params: dict[str, Any]) -> dict[str, Any]:
        start = time.monotonic()
        # the parameters' names only: their values can be a whole config file or packet
        logged: dict[str, Any] = {"command": command, "params": sorted(params)}
        if command == "apply" and isinstance(params.get("source"), str):
            logged["source"] = params["source"]
        try:
            result = dispatch(self.ctl, command, params)
        except Exception as e:
            _event(self.log, "command failed", logging.WARNING, **logged, error=str(e))
            raise
        finally:
            self.commands_served += 1
        elapsed = time.monotonic() - start
        if command in CHANGES:
            self.metrics.reconcile_seconds.labels(command).observe(elapsed)
        _event(self.log, "command", **logged, seconds=round(elapsed, 4))
        return result

    def describe(self) -> dict[str, Any]:
        return {"pid": os.getpid(), "socket": self.socket_path, "state": self.ctl.store.path,
                "started": self.started, "adopted": self.adopted.as_dict(), "commands_served": self.commands_served}

    def apply_config(self) -> None:
        """Apply the --config file, if any (a bad file is logged and changes nothing)."""
        if not self.config_path:
            return
        try:
            text = read_text(self.config_path)
            start = time.monotonic()
            result = self.ctl.apply(text, source=self.config_path)
            self.metrics.reconcile_seconds.labels("apply").observe(time.monotonic() - start)
            _event(self.log, "config applied", config=self.config_path, result=result)
        except (LbError, OSError, RuntimeError, ValueError) as e:
            _event(self.log, "config not applied", logging.ERROR, config=self.config_path, error=str(e))

    def start_health_checks(self, stop: threading.Event) -> threading.Thread:
        monitor = HealthMonitor(lambda: Controller(self.ctl.instance, self.ctl.store), on_check=self._observe_check)
        t = threading.Thread(target=monitor.run, args=(stop,), name="health", daemon=True)
        t.start()
        return t

    def start_route_mirror(self, stop: threading.Event) -> threading.Thread:
        t = threading.Thread(target=self.follow_routes, args=(stop,), name="routes", daemon=True)
        t.start()
        return t

    def follow_routes(self, stop: threading.Event) -> None:
        """Refresh the route mirror on every burst of netlink notifications (links, neighbours,
        routes), so cached next hops follow a moved gateway, a new MAC, an interface gone down."""
        with KernelChanges() as changes:
            while not stop.is_set():
                if not changes.wait(timeout=0.5):
                    continue
                try:
                    writes = self.ctl.refresh_routes()
                except (LbError, OSError, RuntimeError) as e:
                    _event(self.log, "route mirror not refreshed", logging.WARNING, error=str(e))
                    continue
                if writes:
                    _event(self.log, "route mirror refreshed", writes=writes)

    def start_bgp(self, stop: threading.Event) -> list[threading.Thread]:
        """With --bgp-peer: announce the VIPs this node can serve until `stop`, then withdraw them;
        a thread (and a speaker) per peer."""
        threads = []
        for options in self.bgp:
            t = threading.Thread(target=follow_bgp, args=(options, self.serving_state, stop),
                                 name=f"bgp-{options.peer}", daemon=True)
            t.start()
            threads.append(t)
        return threads

    def serving_state(self) -> Any:
        """The stored state, or None while the data plane is not there (detached, pins gone)."""
        state = self.ctl.store.read()
        if state.dataplane is None or not self.ctl.pins_alive(state.dataplane):
            return None
        return state

    def _observe_check(self, target: Any, result: Any) -> None:
        self.metrics.health_check_seconds.labels(str(target.vip), str(target.backend)).observe(result.duration)

    def run(self, stop: threading.Event, reload: threading.Event) -> None:
        # Socket and port first: a second daemon must stop before it adopts or applies anything.
        api = ApiServer(self.socket_path, self.handle, self.describe)
        metrics_server = None
        health = routes = None
        bgp: list[threading.Thread] = []
        try:
            if self.metrics_listen:
                from prometheus_client import start_http_server
                metrics_server, _ = start_http_server(self.metrics_listen[1], self.metrics_listen[0],
                                                      registry=self.metrics.registry)
            start = time.monotonic()
            self.adopted = adopt(self.ctl)  # etcd away: from this node's own part (etcdstore.py)
            self.metrics.reconcile_seconds.labels("start").observe(time.monotonic() - start)
            _event(self.log, "data plane adopted", **self.adopted.as_dict())
            if self.adopted.migrated:
                _event(self.log, f"maps migrated to layout version {LAYOUT_VERSION}", logging.WARNING,
                       migrated=self.adopted.migrated)
            if self.adopted.corrected:
                _event(self.log, "maps corrected to the stored state", logging.WARNING,
                       corrected=self.adopted.corrected)
            self.apply_config()
            api.serve_in_thread()  # lbctl calls made meanwhile waited in the socket's backlog
            health = self.start_health_checks(stop)
            routes = self.start_route_mirror(stop)
            start_store_watch(self.ctl, stop)  # etcd: changes made through other nodes reach our maps
            bgp = self.start_bgp(stop)
            _event(self.log, "ready", socket=self.socket_path, metrics=self.metrics_listen)
            while not stop.is_set():
                if reload.wait(timeout=0.5):
                    reload.clear()
                    _event(self.log, "SIGHUP: reloading the config", config=self.config_path)
                    self.apply_config()
        finally:
            stop.set()  # on an error too: BGP withdraws before the daemon goes
            for t in bgp:  # withdrawn side by side: each thread ends its own session
                t.join(timeout=15)
            api.close()
            if metrics_server is not None:
                metrics_server.shutdown()
                metrics_server.server_close()
            if health is not None:
                health.join(timeout=10)
            if routes is not None:
                routes.join(timeout=5)
            _event(self.log, "stopped")


def serve(args: argparse.Namespace) -> int:
    """Entry point of `lbctl daemon`; returns the exit code."""
    from lb.pins import Instance

    log = make_logger(args.log_format)
    try:
        if os.geteuid() != 0:
            raise LbError("lbctl daemon needs root (CAP_BPF and CAP_NET_ADMIN)")
        listen = parse_listen(args.metrics, args.metrics_public) if args.metrics else None
        ctl = Controller.open(args.state)
        path = args.api_socket or default_socket_path(Instance.current().name)
        bgp = bgp_sessions(args, Instance.current().name)
        daemon = Daemon(ctl, log, path, args.config, listen, bgp)
        stop, reload = threading.Event(), threading.Event()
        signal.signal(signal.SIGTERM, lambda *_: stop.set())
        signal.signal(signal.SIGINT, lambda *_: stop.set())
        signal.signal(signal.SIGHUP, lambda *_: reload.set())
        daemon.run(stop, reload)
    except InputError as e:
        _event(log, str(e), logging.ERROR)
        return EXIT_USAGE
    except (LbError, OSError, RuntimeError) as e:
        _event(log, str(e), logging.ERROR)
        return EXIT_ERROR
    return 0
