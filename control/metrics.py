"""Prometheus metrics of one data plane, read from its pinned maps at each scrape.

Counters are the data plane's own per-CPU counters summed (so they survive daemon
restarts); health comes from the stored state; the daemon adds its reconcile and
health-check timings as histograms."""
from __future__ import annotations

import time
from dataclasses import dataclass, field
from typing import Any, Callable, Iterator

from prometheus_client import CollectorRegistry, Histogram
from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily
from prometheus_client.registry import Collector

from control.model import State
from lb.maps import U32, DataPlaneMaps
from lb.structs import REASONS

# lb_counters field -> metric name suffix
COUNTER_FIELDS = {"packets": "packets", "bytes": "bytes", "reply_packets": "reply_packets",
                  "reply_bytes": "reply_bytes", "new_flows": "new_connections"}
CONN_COUNT_INTERVAL = 5.0  # seconds: counting a full 1M-entry table costs ~0.1 s, not on every scrape


@dataclass(eq=False)  # registries key collectors by identity
class DataPlaneCollector(Collector):
    """Reads the maps of the data plane that `read_state()` describes."""

    read_state: Callable[[], State]
    # a shared store's EtcdStore.status (None with SQLite): lb_store_reachable
    store_status: Callable[[], dict[str, Any]] | None = None
    _conn_cache: tuple[float, str, int] = (0.0, "", 0)  # (when, pin dir, entries)

    def describe(self) -> list:
        return []  # collected on demand only: the VIPs are not known in advance

    def collect(self) -> Iterator:
        state = self.read_state()  # first: it finds out whether the shared store answers
        if self.store_status is not None:
            reachable = GaugeMetricFamily("lb_store_reachable", "1 while the shared store (etcd) answers; 0 while "
                                          "it does not, and the node forwards with its last state")
            reachable.add_metric([], 1 if self.store_status()["reachable"] else 0)
            yield reachable
        dp = state.dataplane
        up = GaugeMetricFamily("lb_dataplane_attached", "1 when the data plane is attached and its pins present")
        try:
            maps = DataPlaneMaps.open(dp.pin_dir) if dp else None
        except OSError:
            maps = None
        up.add_metric([], 1 if maps else 0)
        yield up
        if maps is None:
            return
        with maps:
            yield from self._flows(state, maps)
            yield from self._reasons(maps)
            yield from self._conn_table(dp.pin_dir, maps)

    def _flows(self, state: State, maps: DataPlaneMaps) -> Iterator:
        vip_fams = {f: CounterMetricFamily(f"lb_vip_{name}", f"{name.replace('_', ' ')} of a VIP", labels=["vip"])
                    for f, name in COUNTER_FIELDS.items()}
        be_fams = {f: CounterMetricFamily(f"lb_backend_{name}", f"{name.replace('_', ' ')} of a VIP's backend",
                                          labels=["vip", "backend"])
                   for f, name in COUNTER_FIELDS.items()}
        healthy = GaugeMetricFamily("lb_backend_healthy", "1 if the backend passes its health checks",
                                    labels=["vip", "backend"])
        active = GaugeMetricFamily("lb_backend_active", "1 if the backend is configured, 0 once removed "
                                   "(its established connections go on either way)", labels=["vip", "backend"])
        serving = GaugeMetricFamily("lb_backend_serving", "1 if the backend takes new connections: configured, "
                                    "healthy (or its VIP failing open) and of weight above 0",
                                    labels=["vip", "backend"])
        failing_open = GaugeMetricFamily("lb_vip_failing_open", "1 while every backend of the VIP fails its health "
                                         "check and new flows go to all of them anyway (all_down: open)",
                                         labels=["vip"])
        for v in state.vips:
            _add(vip_fams, [str(v.vip)], maps.vip_stats.get(U32(v.id)))
            failing_open.add_metric([str(v.vip)], 1 if v.failing_open else 0)
            for b in v.backends:
                labels = [str(v.vip), str(b.address)]
                _add(be_fams, labels, maps.backend_stats.get(U32(b.id)))
                healthy.add_metric(labels, 1 if b.healthy else 0)
                active.add_metric(labels, 1 if b.active else 0)
                serving.add_metric(labels, 1 if v.takes_new_flows(b) else 0)
        yield from vip_fams.values()
        yield from be_fams.values()
        yield from (healthy, active, serving, failing_open)

    @staticmethod
    def _reasons(maps: DataPlaneMaps) -> Iterator:
        fam = CounterMetricFamily("lb_reason_packets", "packets by what the data plane did with them "
                                                       "(drop_* are drop reasons)", labels=["reason", "action"])
        for code, name in enumerate(REASONS):
            reason = name.removeprefix("LB_").lower()
            fam.add_metric([reason, reason.split("_", 1)[0]], sum(maps.reason_stats.get(U32(code)) or []))
        yield fam

    def _conn_table(self, pin_dir: str, maps: DataPlaneMaps) -> Iterator:
        when, cached_dir, entries = self._conn_cache
        if cached_dir != pin_dir or time.monotonic() - when > CONN_COUNT_INTERVAL:
            entries = maps.conn_table.count()
            self._conn_cache = (time.monotonic(), pin_dir, entries)
        fam = GaugeMetricFamily("lb_conn_table_entries", "flows in the connection table")
        fam.add_metric([], entries)
        yield fam
        cap = GaugeMetricFamily("lb_conn_table_capacity", "size of the connection table (LRU: full evicts the oldest)")
        cap.add_metric([], maps.conn_table.max_entries)
        yield cap


def _add(families: dict[str, CounterMetricFamily], labels: list[str], per_cpu: list | None) -> None:
    for f in families:
        families[f].add_metric(labels, sum(getattr(c, f) for c in per_cpu or []))


@dataclass
class Metrics:
    """The daemon's registry: the data plane collector and the daemon's own timings."""

    read_state: Callable[[], State]
    registry: CollectorRegistry = field(default_factory=lambda: CollectorRegistry(auto_describe=False))
    store_status: Callable[[], dict[str, Any]] | None = None

    def __post_init__(self) -> None:
        self.registry.register(DataPlaneCollector(self.read_state, self.store_status))
        self.reconcile_seconds = Histogram("lb_reconcile_seconds", "time to apply one command to state and maps",
                                           ["command"], registry=self.registry)
        self.health_check_seconds = Histogram("lb_health_check_seconds", "time of one backend health check",
                                              ["vip", "backend"], registry=self.registry)
