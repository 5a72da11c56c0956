"""The desired state in a real etcd: round trips, concurrent writers serialised with nothing lost,
all or nothing, and lbctl --store. etcd runs in a lab namespace of its own, on its loopback."""
from __future__ import annotations

import contextlib
import functools
import ipaddress
import json
import os
import shutil
import subprocess
import threading
import time
from collections import Counter
from typing import Iterator

import pytest
from prometheus_client.parser import text_string_to_metric_families

from control.errors import InputError
from control.etcdstore import LOCK_TTL, EtcdStore, StoreConflict, StoreUnreachable
from control.model import SNAT_PORTS, BackendAddress, BackendState, HealthCheck, State, VipAddress, VipState
from control.shared import shared_doc
from netns.etcd import Etcd, etcd_in
from netns.lbctl import LBCTL, DaemonProcess, forget, run_lbctl
from netns.nsenter import in_netns
from netns.topology import Lab, run_prefix
from netns.traffic import NetnsHTTPConnection, Servers, http_get, wait_for
from tests.conftest import backend_name

METRICS_PORT = 9464

pytestmark = pytest.mark.skipif(shutil.which("etcd") is None,
                                reason="no etcd binary (Debian etcd-server; make setup installs it)")

def node_store(etcd: Etcd, prefix: str, node: str = "ready", local_dir: str | None = None) -> EtcdStore:
    """A node's store on the lab's etcd: `node`'s own part in a file of `local_dir` (the etcd's data
    directory by default). Used from inside the etcd's namespace."""
    local = os.path.join(local_dir or etcd.data_dir, f"{prefix}-{node}.db")
    return EtcdStore.from_url(f"{etcd.url(prefix)}?node={node}&local={local}")


@pytest.fixture(scope="module")
def etcd() -> Iterator[Etcd]:
    ns = f"{run_prefix()}-etcd"
    subprocess.run(["ip", "netns", "add", ns], check=True)
    try:
        subprocess.run(["ip", "-n", ns, "link", "set", "lo", "up"], check=True)
        with etcd_in(ns) as server:
            yield server
    finally:
        subprocess.run(["ip", "netns", "del", ns], check=False)


@pytest.fixture
def prefix(request) -> str:
    """A fresh key prefix per test: tests share one etcd, never one state."""
    return f"t{abs(hash(request.node.name)) % 10**8}{os.urandom(2).hex()}"


def _vip(index: int, mode: str = "tunnel") -> VipState:
    """A VIP of id `index` with one backend (tunnel: as a cluster takes it, plain nat only with replies_via)."""
    vip = VipAddress.parse(f"10.0.0.{index}:80/tcp")
    return VipState(vip, index, mode, backends=[BackendState(BackendAddress.parse("10.0.1.2:8080", vip), 1, 3)])


def test_a_transaction_round_trips_a_state(etcd, prefix):
    """What one node writes, another reads: the shared part the same, its own part (ids, health) its own."""
    with in_netns(etcd.ns):
        store = node_store(etcd, prefix, "a")
        assert store.read() == State()
        with store.transaction() as state:
            state.vips.append(_vip(7))
            state.vips[0].health = HealthCheck("http", 8081, "/healthz", 204, 0.5, 0.25, 1, 5)
            state.vips[0].backends[0].healthy = False  # this node's observation
            state.vips[0].backends[0].generation = state.new_generation()  # as every new backend gets
            written = state.copy()
        assert store.read() == written  # the node's own part too, from its file
        other = node_store(etcd, prefix, "b").read()  # a second node
        assert shared_doc(other) == shared_doc(written)
        assert [(v.id, [(b.id, b.healthy) for b in v.backends]) for v in other.vips] == [(0, [(1, True)])]
        assert node_store(etcd, prefix + "x", "a").read() == State()  # prefixes are separate states
        assert set(store.nodes()) == {"a"}  # b only read


def test_a_raising_transaction_changes_nothing(etcd, prefix):
    with in_netns(etcd.ns):
        store = node_store(etcd, prefix)
        with store.transaction() as state:
            state.vips.append(_vip(1))
        before = store.shared.call("get", store.shared.key, True)[0]
        with pytest.raises(RuntimeError):
            with store.transaction() as state:
                state.vips.clear()
                raise RuntimeError("half-way")
        assert store.shared.call("get", store.shared.key, True)[0] == before  # same value, same mod_revision
        assert store.shared.call("get", store.shared.lock_key) == []  # and the lock is free again
        assert [v.id for v in store.read().vips] == [1]  # nor anything in the node's own file
        with store.transaction() as state:  # which the next writer finds
            state.vips.append(_vip(2))
        assert [v.id for v in store.read().vips] == [1, 2]


def test_two_nodes_writing_at_once_are_serialised_with_nothing_lost_or_half_applied(etcd, prefix):
    per_writer, errors = 8, []

    def writer(first: int) -> None:
        try:
            with in_netns(etcd.ns):
                store = node_store(etcd, prefix, f"w{first}")  # each writer a node of its own
                for i in range(first, first + per_writer):
                    with store.transaction() as state:  # one change in three parts: VIP, backend, ACL
                        state.vips.append(_vip(i))
                        threading.Event().wait(0.01)  # widen the window between read and write
                        state.vips[-1].acl = {f"192.0.2.{i}/32": "deny"}
        except BaseException as e:  # noqa: BLE001  (reported by the main thread)
            errors.append(e)

    threads = [threading.Thread(target=writer, args=(first,)) for first in (1, 101)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(timeout=120)
    assert not errors and not any(t.is_alive() for t in threads)
    with in_netns(etcd.ns):
        vips = {str(v.vip): ([(str(b.address), b.weight) for b in v.backends], v.acl)
                for v in node_store(etcd, prefix, "reader").read().vips}
    assert vips == {str(_vip(i).vip): ([("10.0.1.2:8080", 3)], {f"192.0.2.{i}/32": "deny"})
                    for i in [*range(1, 1 + per_writer), *range(101, 101 + per_writer)]}  # all, and each whole


def test_a_write_behind_the_lock_fails_the_compare_and_swap(etcd, prefix):
    """A writer that does not take the lock (or whose lease ran out) cannot be overwritten by a stale state."""
    with in_netns(etcd.ns):
        store = node_store(etcd, prefix)
        with store.transaction() as state:
            state.vips.append(_vip(1))
        shared = store.shared
        with pytest.raises(StoreConflict, match="nothing was saved"):
            with store.transaction() as state:
                state.vips.append(_vip(2))
                shared.call("put", shared.key, shared.call("get", shared.key)[0].replace(b'"weight": 3', b'"weight": 7'))
        assert [[b.weight for b in v.backends] for v in store.read().vips] == [[7]]  # the intruder's write stands
        assert shared.call("get", shared.lock_key) == []


def test_a_writer_that_died_holding_the_lock_frees_it_within_the_lease(etcd, prefix):
    """kill -9 of a writer mid-change: its lease is not kept alive, so the next writer waits at most
    about LOCK_TTL, not a long lease's worth."""
    with in_netns(etcd.ns):
        node_store(etcd, prefix, "dead").shared.lock()  # taken, then never refreshed nor released
        started = time.monotonic()
        with node_store(etcd, prefix, "next").transaction() as state:
            state.vips.append(_vip(1))
        waited = time.monotonic() - started
    assert 0 < waited < LOCK_TTL + 5


def test_a_live_writer_keeps_the_lock_past_its_lease(etcd, prefix):
    """A change that takes longer than the lease (an attach compiles) keeps the lock: its save succeeds."""
    with in_netns(etcd.ns):
        store = node_store(etcd, prefix, "slow")
        with store.transaction() as state:
            state.vips.append(_vip(1))
            lease_ends = time.monotonic() + LOCK_TTL + 3
            while time.monotonic() < lease_ends:  # outlive the lease while holding the lock
                assert store.shared.call("get", store.shared.lock_key) != []
                time.sleep(1)
        assert [v.id for v in store.read().vips] == [1]


def test_an_unreachable_etcd_refuses_shared_changes_and_the_node_goes_on_with_its_own(etcd, prefix, tmp_path):
    with in_netns(etcd.ns):
        with node_store(etcd, prefix, "a", str(tmp_path)).transaction() as state:
            state.vips.append(_vip(1))
        away = EtcdStore.from_url(f"etcd://127.0.0.1:1/{prefix}?node=a&local={tmp_path}/{prefix}-a.db")
        assert [v.id for v in away.read().vips] == [1]  # this node's last state
        assert away.reachable is False and away.unreachable_since is not None
        with pytest.raises(StoreUnreachable, match="^etcd at etcd://127.0.0.1:1/.* is unreachable; nothing was changed$"):
            with away.transaction() as state:
                state.vips[0].backends[0].weight = 9  # shared
        with away.transaction() as state:
            state.vips[0].backends[0].healthy = False  # this node's own: goes on
        assert [(b.weight, b.healthy) for b in away.read().vips[0].backends] == [(3, False)]
        assert [(b.weight, b.healthy) for b in node_store(etcd, prefix, "a", str(tmp_path)).read().vips[0].backends] == [
            (3, False)]  # etcd again: the node's observation stays its own
        assert [b.healthy for b in node_store(etcd, prefix, "b", str(tmp_path)).read().vips[0].backends] == [True]


def test_full_nat_sources_are_each_nodes_own_and_change_while_etcd_is_away(etcd, prefix, tmp_path):
    """A full-NAT VIP is shared; the source addresses its flows take are the node's (replies must come back
    to the node that holds the flow): `lbctl snat` lands in the node's own part, never in etcd."""
    a_source, b_source, later = (ipaddress.ip_address(f"198.18.50.{i}") for i in (31, 32, 33))
    with in_netns(etcd.ns):
        a, b = node_store(etcd, prefix, "a", str(tmp_path)), node_store(etcd, prefix, "b", str(tmp_path))
        with a.transaction() as state:
            state.snat, state.snat_ports = {a_source}, (20000, 29999)
            state.vips.append(_vip(1, "fullnat"))
        with b.transaction() as state:
            state.snat.add(b_source)
        assert (a.read().snat, a.read().snat_ports) == ({a_source}, (20000, 29999))
        assert (b.read().snat, b.read().snat_ports) == ({b_source}, SNAT_PORTS)
        assert [v.mode for v in b.read().vips] == ["fullnat"]
        stored, _ = a.shared.load()
        assert "snat" not in json.dumps(stored) and "198.18.50.3" not in json.dumps(stored)
        away = EtcdStore.from_url(f"etcd://127.0.0.1:1/{prefix}?node=b&local={tmp_path}/{prefix}-b.db")
        with away.transaction() as state:
            state.snat.add(later)  # the node's own part: goes on without etcd
        assert b.read().snat == {b_source, later} and a.read().snat == {a_source}


def test_lbctl_store_attaches_adds_lists_and_forwards(prefix, tmp_path):
    """lbctl --store on an LB namespace with etcd on its loopback: the data plane follows the state in etcd."""
    with Lab.build(2) as lab, etcd_in(lab.lb_ns) as server:
        url = server.url(prefix)
        lbctl = functools.partial(run_lbctl, lab.lb_ns)
        try:
            lbctl("--store", url, "attach", *lab.lb_interfaces)
            vip = f"{lab.vip(1)}:80/tcp"
            lbctl("--store", url, "add-vip", vip)
            # Both backends at once, from two lbctl processes, the option after the subcommand: both land.
            procs = [subprocess.Popen(["ip", "netns", "exec", lab.lb_ns, LBCTL, "add-backend", vip,
                                       f"{b.address}:8080", "--store", url],
                                      stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
                     for b in lab.backends]
            with contextlib.ExitStack() as stack:
                for p in procs:
                    stack.callback(p.kill)
                outcomes = [p.communicate(timeout=120) for p in procs]
            assert [p.returncode for p in procs] == [0, 0], outcomes
            listed = lbctl("list", "--json", "--store", url).json()
            assert [i["name"] for i in listed["dataplane"]["interfaces"]] == lab.lb_interfaces
            (listed_vip,) = listed["vips"]
            assert listed_vip["vip"] == vip
            assert sorted(b["backend"] for b in listed_vip["backends"]) == sorted(
                f"{b.address}:8080" for b in lab.backends)
            with in_netns(lab.lb_ns):  # the same state, read straight from etcd
                assert [len(v.backends) for v in node_store(server, prefix, "other", str(tmp_path)).read().vips] == [2]
            assert lbctl("list", "--json", check=False).json()["vips"] == []  # the SQLite default knows nothing
            names = {b.ns: backend_name(b.ns) for b in lab.backends}
            with Servers.running(names):
                served = Counter(http_get(lab.client.ns, str(lab.vip(1)), 80) for _ in range(20))
            assert set(served) == set(names.values())
            alone = lbctl("--node", "n1", "list", check=False)
            assert alone.returncode == 2 and "goes with --store" in alone.stderr
        finally:
            lbctl("--store", url, "detach", check=False)
            forget(lab.lb_ns)


def _store_reachable(ns: str) -> float:
    """lb_store_reachable, scraped from the daemon's metrics inside namespace `ns`."""
    conn = NetnsHTTPConnection(ns, "127.0.0.1", METRICS_PORT)
    try:
        text = conn.get_text("/metrics")
    finally:
        conn.close()
    (value,) = [s.value for fam in text_string_to_metric_families(text) for s in fam.samples
                if s.name == "lb_store_reachable"]
    return value


def test_the_daemon_follows_other_writers_and_forwards_while_etcd_is_away(prefix, tmp_path):
    """Another writer (here this test, as another node would) changes the state in etcd; the daemon,
    watching, brings its maps along within a second, and traffic shows it. With etcd stopped, the data
    plane goes on forwarding with the node's last state, and the log, the metrics and `lbctl status`
    say etcd is away; once it is back, a change made elsewhere reaches the maps again."""
    with Lab.build(2) as lab, etcd_in(lab.lb_ns) as server:
        url = server.url(prefix)
        lbctl = functools.partial(run_lbctl, lab.lb_ns)
        daemon = DaemonProcess(lab.lb_ns, str(tmp_path / "daemon.log"),
                               ("--store", url, "--metrics", f"127.0.0.1:{METRICS_PORT}"))
        try:
            daemon.start()
            lbctl("--store", url, "attach", *lab.lb_interfaces)
            vip = f"{lab.vip(1)}:80/tcp"
            lbctl("add-vip", vip, "--store", url)
            for b in lab.backends:
                lbctl("add-backend", vip, f"{b.address}:8080", "--store", url)
            names = {b.ns: backend_name(b.ns) for b in lab.backends}
            with Servers.running(names):
                assert set(http_get(lab.client.ns, str(lab.vip(1)), 80) for _ in range(20)) == set(names.values())
                drained = lab.backends[1]
                with in_netns(lab.lb_ns):
                    with node_store(server, prefix, "elsewhere", str(tmp_path)).transaction() as state:
                        (backend,) = [b for b in state.vips[0].backends
                                      if str(b.address.address) == str(drained.address)]
                        backend.weight = 0  # no new flows: every new connection goes to the other backend
                        written = time.time()
                reconciled = wait_for(lambda: [e for e in daemon.events("state changed in the store: maps reconciled",
                                                                        daemon.proc.pid)
                                               if e["time"] >= written - 0.01 and e["corrected"]],
                                      timeout=10, what="the daemon to reconcile the change")
                assert reconciled[0]["time"] - written < 1.0, reconciled
                served = Counter(http_get(lab.client.ns, str(lab.vip(1)), 80) for _ in range(20))
                assert set(served) == {names[b.ns] for b in lab.backends if b is not drained}
            listed = lbctl("list", "--json").json()  # through the daemon, which reads etcd
            elsewhere = lbctl("list", "--store", server.url(prefix + "x"), check=False)
            assert elsewhere.returncode == 2 and f"keeps its state in {url}" in elsewhere.stderr
            assert sorted(b["weight"] for b in listed["vips"][0]["backends"]) == [0, 1]
            assert _store_reachable(lab.lb_ns) == 1

            server.stop()
            wait_for(lambda: any(e["msg"].startswith(f"etcd at {url}: watch lost")
                                 for e in daemon.events(pid=daemon.proc.pid)),
                     timeout=15, what="the daemon to log etcd's loss")
            with Servers.running(names):  # still forwarding, with the last state (the drained one left out)
                served = Counter(http_get(lab.client.ns, str(lab.vip(1)), 80) for _ in range(20))
            assert set(served) == {names[b.ns] for b in lab.backends if b is not drained}
            status = lbctl("status").stdout
            assert f"store: {url}, node " in status and "UNREACHABLE since" in status, status
            assert lbctl("status", "--json").json()["store"]["reachable"] is False
            assert _store_reachable(lab.lb_ns) == 0
            refused = lbctl("set-weight", vip, f"{drained.address}:8080", "1", check=False)
            assert refused.returncode == 1 and refused.stderr.strip().splitlines() == [
                f"lbctl: error: etcd at {url} is unreachable; nothing was changed"]

            server.restart()
            wait_for(lambda: daemon.events("the store answers again: catching up with it", daemon.proc.pid),
                     timeout=15, what="the daemon to catch up")
            with in_netns(lab.lb_ns):  # the other node undoes the drain
                with node_store(server, prefix, "elsewhere", str(tmp_path)).transaction() as state:
                    for b in state.vips[0].backends:
                        b.weight = 1
            with Servers.running(names):
                wait_for(lambda: set(http_get(lab.client.ns, str(lab.vip(1)), 80) for _ in range(10))
                         == set(names.values()), timeout=10, what="the undrained backend to serve again")
            assert ": reachable" in lbctl("status").stdout and _store_reachable(lab.lb_ns) == 1
        finally:
            daemon.stop()
            lbctl("--store", url, "detach", check=False)
            forget(lab.lb_ns)


def test_the_watch_skips_its_own_writes_and_catches_up_after_an_etcd_restart(etcd, prefix):
    calls: list[str] = []
    stop = threading.Event()
    watched = node_store(etcd, prefix, "watched")

    def watch() -> None:
        with in_netns(etcd.ns):
            watched.watch(stop, lambda: calls.append("change"), lambda message: calls.append(message))

    other = node_store(etcd, prefix, "other")
    thread = threading.Thread(target=watch, daemon=True)
    thread.start()
    restarted = None
    try:
        wait_for(lambda: calls == ["change"], timeout=10, what="the catch-up when the watch is in place")
        with in_netns(etcd.ns):
            with watched.transaction() as state:  # its own write: no call
                state.vips.append(_vip(1))
            with other.transaction() as state:  # another writer's: one call
                state.vips.append(_vip(2))
        wait_for(lambda: len(calls) == 2, timeout=10, what="the other writer's change")
        time.sleep(0.3)  # nothing to wait for: a call for the own write, were there one, would have come by now
        assert calls == ["change", "change"]
        etcd.stop()
        wait_for(lambda: len(calls) == 3, timeout=15, what="the watch to report etcd gone")
        assert "watch lost" in calls[2]
        restarted = Etcd(etcd.ns, etcd.data_dir)
        wait_for(restarted.ready, timeout=60, interval=0.2, what="etcd to answer again")
        wait_for(lambda: len(calls) == 4, timeout=15, what="the catch-up after etcd came back")
        with in_netns(etcd.ns):
            with other.transaction() as state:
                state.vips.append(_vip(3))
        wait_for(lambda: len(calls) == 5, timeout=10, what="a change after the restart")
        assert calls[3:] == ["change", "change"]
    finally:
        stop.set()
        if restarted is not None:  # the module's later tests use the restarted etcd
            etcd.proc, etcd.log = restarted.proc, restarted.log


def test_plain_nat_is_refused_once_a_second_node_registers(etcd, prefix, tmp_path):
    """A lone node may hold plain nat VIPs; in a cluster a new one needs the operator to say where replies go."""
    def nat_vip(index: int, replies_via: str | None = None) -> VipState:
        v = _vip(index, "nat")
        v.replies_via = replies_via
        return v

    with in_netns(etcd.ns):
        a, b = node_store(etcd, prefix, "a", str(tmp_path)), node_store(etcd, prefix, "b", str(tmp_path))
        with a.transaction() as state:
            state.vips.append(nat_vip(1))  # alone: accepted
        with b.transaction():
            pass  # b registers: now a cluster of two
        assert set(a.nodes()) == {"a", "b"}
        with pytest.raises(InputError, match=r"^VIP 10.0.0.2:80/tcp: plain nat in a cluster of 2 nodes \(a, b\)"):
            with a.transaction() as state:
                state.vips.append(nat_vip(2))
        with a.transaction() as state:
            state.vips.append(nat_vip(3, replies_via="a"))  # said: accepted
            state.vips.append(_vip(4))
            state.vips[0].backends[0].weight = 5  # the VIP from before the cluster stays as it is
        assert [(str(v.vip), v.replies_via) for v in b.read().vips] == [
            ("10.0.0.1:80/tcp", None), ("10.0.0.3:80/tcp", "a"), ("10.0.0.4:80/tcp", None)]
