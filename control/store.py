"""Desired state storage behind one small interface.

A Store hands out exclusive transactions on the whole State: `with
store.transaction() as state:` loads it, and the block's changes are saved
atomically when it exits cleanly, or dropped when it raises. SQLite (one file)
is the default; etcd (etcdstore.py) implements the same two methods, keeping the
part nodes share in etcd and each node's own part in a SQLite file here."""
from __future__ import annotations

import contextlib
import ipaddress
import json
import os
import sqlite3
import time
from typing import Any, Iterator, Protocol

from lb.pins import STATE_DIR
from lb.private import private_dir, private_file, tighten_if_present
from control.model import (BackendAddress, BackendState, DataPlaneState, HealthCheck, Interface, State,
                           VipAddress, VipState, address_sort_key, SNAT_PORTS)
from lb import fault


class Store(Protocol):
    def read(self) -> State: ...

    def transaction(self) -> contextlib.AbstractContextManager[State]: ...


def state_to_doc(state: State) -> dict[str, Any]:
    doc = {"dataplane": _dataplane_doc(state.dataplane), "vips": [vip_to_doc(v) for v in state.vips],
           "pass_unserved": [str(a) for a in sorted(state.pass_unserved, key=address_sort_key)],
           "generations": state.generations}
    snat = _snat_doc(state)
    if snat is not None:
        doc["snat"] = snat
    return doc


def _snat_doc(state: State) -> dict[str, Any] | None:
    """Full NAT's pool and ports, None when they are the defaults (documents stay as they were)."""
    if not state.snat and state.snat_ports == SNAT_PORTS:
        return None
    return {"addresses": [str(a) for a in sorted(state.snat, key=address_sort_key)], "ports": list(state.snat_ports)}


def _dataplane_doc(dp: DataPlaneState | None) -> dict[str, Any] | None:
    return None if dp is None else {
        "interfaces": [vars(i) for i in dp.interfaces],
        "pin_dir": dp.pin_dir,
        "netns_ino": dp.netns_ino,
        "config": dp.config,
        "program_digest": dp.program_digest,
        "hook": dp.hook,
    }


def vip_to_doc(v: VipState) -> dict[str, Any]:
    return {
        "vip": str(v.vip),
        "id": v.id,
        "mode": v.mode,
        "hash": v.hash,
        "acl": v.acl,
        "health": vars(v.health),
        "all_down": v.all_down,
        "min_healthy": v.min_healthy,
        **({"replies_via": v.replies_via} if v.replies_via is not None else {}),
        **({"snat": [str(a) for a in v.snat]} if v.snat else {}),
        "backends": [
            {"address": str(b.address.address), "port": b.address.port, "id": b.id, "weight": b.weight,
             "retired_at": b.retired_at, "healthy": b.healthy, "generation": b.generation}
            for b in v.backends
        ],
    }


def state_from_doc(doc: dict[str, Any]) -> State:
    dp = doc.get("dataplane")
    vips = []
    for v in doc.get("vips", []):
        vip = VipAddress.parse(v["vip"], usable=False)  # as stored, even from before the check
        backends = [
            BackendState(BackendAddress(ipaddress.ip_address(b["address"]), b["port"]), b["id"], b["weight"],
                         b["retired_at"], b.get("healthy", True), b.get("generation", 0))
            for b in v["backends"]
        ]
        health = HealthCheck(**v.get("health", {}))  # documents from before health checks have none
        vips.append(VipState(vip, v["id"], v["mode"], backends, v.get("hash", "flow"), v.get("acl", {}), health,
                             v.get("all_down", "open"), v.get("min_healthy", 1), v.get("replies_via"),
                             [ipaddress.ip_address(a) for a in v.get("snat", [])]))
    dataplane = None
    if dp is not None:
        dataplane = DataPlaneState([Interface(**i) for i in dp["interfaces"]], dp["pin_dir"], dp["netns_ino"],
                                   dp["config"], dp.get("program_digest"), dp.get("hook", "xdp"))
    # Documents from before generations: every backend gets one now, above any seen.
    generations = max([doc.get("generations", 0)] + [b.generation for v in vips for b in v.backends])
    snat = doc.get("snat", {})
    state = State(dataplane, vips, pass_unserved={ipaddress.ip_address(a) for a in doc.get("pass_unserved", [])},
                  generations=generations, snat={ipaddress.ip_address(a) for a in snat.get("addresses", [])},
                  snat_ports=tuple(snat.get("ports", SNAT_PORTS)))
    for v in vips:
        for b in v.backends:
            if not b.generation:
                b.generation = state.new_generation()
    return state


class SqliteStore:
    """The whole State as one JSON document in one SQLite row, with a revision.

    BEGIN IMMEDIATE takes the database's write lock for the whole transaction, so
    concurrent lbctl commands run one after another and none is lost.

    A long-lived Store (the daemon's) keeps the State of the last revision it read or saved, and
    each VIP's JSON as saved: a change then parses nothing (the revision says whether another
    process wrote since) and serialises only the VIPs it changed."""

    def __init__(self, path: str, timeout: float = 30.0):
        self.path = path
        self.timeout = timeout
        self._cached: tuple[int, State] | None = None  # (revision, the State it holds), never handed out
        self._vip_json: dict[int, tuple[VipState, str]] = {}  # VIP id -> (the VIP as last saved, its JSON)

    def _connect(self) -> sqlite3.Connection:
        # Root's alone: SQLite gives its -wal and -shm the database's own mode; older files are tightened.
        directory = os.path.dirname(os.path.abspath(self.path))
        private_dir(directory, own=directory == STATE_DIR)
        private_file(self.path)
        for suffix in ("-wal", "-shm"):
            tighten_if_present(self.path + suffix)
        conn = sqlite3.connect(self.path, timeout=self.timeout, isolation_level=None)
        # Switching a new file to WAL takes an exclusive lock and SQLite does not wait for it
        # (no busy handler): commands racing to create the state retry, bounded by the timeout.
        deadline = time.monotonic() + self.timeout
        while True:
            try:
                if conn.execute("PRAGMA journal_mode").fetchone()[0] != "wal":
                    conn.execute("PRAGMA journal_mode=WAL")
                break
            except sqlite3.OperationalError as e:
                if "locked" not in str(e) or time.monotonic() > deadline:
                    conn.close()
                    raise
                time.sleep(0.01)
        conn.execute("PRAGMA synchronous=FULL")
        conn.execute("CREATE TABLE IF NOT EXISTS state (id INTEGER PRIMARY KEY CHECK (id = 1),"
                     " revision INTEGER NOT NULL, doc TEXT NOT NULL)")
        return conn

    def _load(self, conn: sqlite3.Connection) -> tuple[State, int]:
        row = conn.execute("SELECT revision FROM state WHERE id = 1").fetchone()
        if row is None:
            return State(), 0
        if self._cached is None or self._cached[0] != row[0]:
            doc = conn.execute("SELECT doc FROM state WHERE id = 1").fetchone()[0]
            self._cached = (row[0], state_from_doc(json.loads(doc)))
        state = self._cached[1].copy()
        state.revision = row[0]
        return state, row[0]

    def _dump(self, state: State) -> str:
        """json.dumps(state_to_doc(state), sort_keys=True), from each unchanged VIP's saved JSON."""
        vips = []
        for v in state.vips:
            saved = self._vip_json.get(v.id)
            if saved is None or saved[0] != v:
                saved = self._vip_json[v.id] = (v.copy(), json.dumps(vip_to_doc(v), sort_keys=True))
            vips.append(saved[1])
        for vid in self._vip_json.keys() - {v.id for v in state.vips}:
            del self._vip_json[vid]
        unserved = json.dumps([str(a) for a in sorted(state.pass_unserved, key=address_sort_key)])
        snat = _snat_doc(state)
        snat_part = "" if snat is None else f'"snat": {json.dumps(snat, sort_keys=True)}, '
        return f'{{"dataplane": {json.dumps(_dataplane_doc(state.dataplane), sort_keys=True)}, ' \
               f'"generations": {state.generations}, "pass_unserved": {unserved}, {snat_part}' \
               f'"vips": [{", ".join(vips)}]}}'

    def read(self) -> State:
        conn = self._connect()
        try:
            return self._load(conn)[0]
        finally:
            conn.close()

    @contextlib.contextmanager
    def transaction(self) -> Iterator[State]:
        conn = self._connect()
        try:
            conn.execute("BEGIN IMMEDIATE")
            try:
                state, _ = self._load(conn)
                yield state
                # state.revision + 1, not the row's: a store built on this one (etcdstore.py) may raise
                # state.revision while the block runs, to tell the maps' mark that the state moved on.
                saved = state.revision + 1
                conn.execute("INSERT OR REPLACE INTO state (id, revision, doc) VALUES (1, ?, ?)",
                             (saved, self._dump(state)))
                fault.point("store_commit")
                conn.execute("COMMIT")
                self._cached = (saved, state.copy())
            except BaseException:
                conn.execute("ROLLBACK")
                raise
        finally:
            conn.close()
