"""Desired state storage behind one small interface.

A Store hands out exclusive transactions on the whole State: `with
store.transaction() as state:` loads it, and the block's changes are saved
atomically when it exits cleanly, or dropped when it raises. SQLite (one file)
is the default; etcd (etcdstore.py) implements the same two methods, keeping the
part nodes share in etcd and each node's own part in a SQLite file here."""
from __future__ import annotations

import contextlib
import copy
import ipaddress
import json
import os
import sqlite3
import time
from typing import Any, Iterator, Protocol

from lb.pins import STATE_DIR
from lb.private import private_dir, private_file, tighten_if_present
from control.model import (BackendAddress, BackendState, DataPlaneState, DraftState, HealthCheck, Interface, State,
                           VipAddress, VipState, address_sort_key, SNAT_PORTS)
from lb import fault


class Store(Protocol):
    def read(self) -> State: ...

    def transaction(self) -> contextlib.AbstractContextManager[State]: ...


def state_to_doc(state: State) -> dict[str, Any]:
    return {**head_to_doc(state), "vips": [vip_to_doc(v) for v in state.vips]}


def head_to_doc(state: State) -> dict[str, Any]:
    """Everything of a State but its VIPs."""
    doc = {"dataplane": _dataplane_doc(state.dataplane),
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
    """The State in SQLite: one row per VIP (table vips: its id, its place in the State's list, its
    JSON) and one row for the rest and the revision (table head). A change writes the head and the
    rows of the VIPs it changed: adding a backend writes two small rows whatever the state holds.
    A database of the older layout (the whole State as one document in table state) is read, and
    written in this layout by the first change, which deletes the old row.

    BEGIN IMMEDIATE takes the database's write lock for the whole transaction, so
    concurrent lbctl commands run one after another and none is lost.

    A long-lived Store (the daemon's) keeps the State of the last revision it read or saved: a
    change then parses nothing (the revision says whether another process wrote since)."""

    def __init__(self, path: str, timeout: float = 30.0):
        self.path = path
        self.timeout = timeout
        self._cached: tuple[int, State] | None = None  # (revision, the State it holds), never handed out
        # VIP id -> (the VIP as its row holds it, never handed out; the row's place): the rows as stored
        self._rows: dict[int, tuple[VipState, int]] = {}
        self._head = ""  # the head row's document as stored

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
        conn.execute("CREATE TABLE IF NOT EXISTS head (id INTEGER PRIMARY KEY CHECK (id = 1),"
                     " revision INTEGER NOT NULL, doc TEXT NOT NULL)")
        conn.execute("CREATE TABLE IF NOT EXISTS vips (id INTEGER PRIMARY KEY, seq INTEGER NOT NULL, doc TEXT NOT NULL)")
        return conn

    def _load(self, conn: sqlite3.Connection, draft: bool = False) -> tuple[State, int]:
        """The stored State, parsed only when another process wrote since; `draft`: for a change to
        edit, a DraftState over the kept one (only the VIPs the change reaches are copied)."""
        row = conn.execute("SELECT revision FROM head WHERE id = 1").fetchone()
        if row is None:
            return self._load_older(conn)
        if self._cached is None or self._cached[0] != row[0]:
            head = conn.execute("SELECT doc FROM head WHERE id = 1").fetchone()[0]
            rows = conn.execute("SELECT id, seq, doc FROM vips ORDER BY seq").fetchall()
            vips = json.loads(f"[{','.join(doc for _, _, doc in rows)}]")  # one parse, not one per row
            state = state_from_doc({**json.loads(head), "vips": vips})
            self._rows = {v.id: (v.copy(), seq) for v, (_, seq, _) in zip(state.vips, rows)}
            self._head = head
            self._cached = (row[0], self._stored_state(state, [self._rows[v.id][0] for v in state.vips]))
        else:
            state = DraftState.over(self._cached[1]) if draft else self._cached[1].copy()
        state.revision = row[0]
        return state, row[0]

    def _load_older(self, conn: sqlite3.Connection) -> tuple[State, int]:
        """The older layout's document, if the database has one; an empty State otherwise."""
        self._cached, self._rows, self._head = None, {}, ""
        if not self._has_older_table(conn):
            return State(), 0
        row = conn.execute("SELECT revision, doc FROM state WHERE id = 1").fetchone()
        if row is None:
            return State(), 0
        state = state_from_doc(json.loads(row[1]))
        state.revision = row[0]
        return state, row[0]

    @staticmethod
    def _has_older_table(conn: sqlite3.Connection) -> bool:
        return conn.execute("SELECT 1 FROM sqlite_master WHERE type = 'table' AND name = 'state'").fetchone() is not None

    @staticmethod
    def _stored_state(state: State, vips: list[VipState]) -> State:
        """A State of these VIPs and `state`'s other parts, sharing nothing an edit of `state` changes;
        what was derived from `state`'s VIPs (State.derived) goes with it: the VIPs are equal."""
        kept = State(copy.deepcopy(state.dataplane), vips, state.revision, set(state.pass_unserved),
                     state.generations, set(state.snat), state.snat_ports)
        kept._derived = dict(state.derived() or {})  # (a kept State is edited by no one)
        return kept

    def _places(self, state: State) -> list[int]:
        """Each VIP's place (the rows' order is the State's list order): rows keep theirs while the
        list keeps their order and new VIPs come after them, as changes do; otherwise all renumbered."""
        known = [self._rows[v.id][1] if v.id in self._rows else None for v in state.vips]
        first_new = next((i for i, p in enumerate(known) if p is None), len(known))
        kept = known[:first_new]
        if all(p is None for p in known[first_new:]) and all(a < b for a, b in zip(kept, kept[1:])):
            start = (kept[-1] + 1) if kept else 0
            return kept + list(range(start, start + len(known) - first_new))
        return list(range(len(known)))

    def _save(self, conn: sqlite3.Connection, state: State, revision: int) -> tuple[State, dict, str]:
        """Write the head, and the rows of the VIPs that changed, came, went or moved. Returns what
        is then stored (the State, the rows, the head), for the cache once committed."""
        if not self._head:  # the first save in this layout (or of a new database): no older row stays
            if self._has_older_table(conn):
                conn.execute("DELETE FROM state")
            conn.execute("DELETE FROM vips")
        edits = state.edits(self._cached[1]) if self._cached is not None and self._head else None
        if edits is not None and all(o is not None and n is not None and o.id == n.id for o, n in edits.pairs):
            rows = dict(self._rows)  # a draft's change that kept the list's VIPs and order: its rows alone
            for _, v in edits.changed():
                rows[v.id] = (v.copy(), self._rows[v.id][1])
                conn.execute("INSERT OR REPLACE INTO vips (id, seq, doc) VALUES (?, ?, ?)",
                             (v.id, rows[v.id][1], json.dumps(vip_to_doc(v), sort_keys=True)))
        else:
            rows = {}
            for v, place in zip(state.vips, self._places(state)):
                was = self._rows.get(v.id)
                if was is None or was[1] != place or (was[0] is not v and was[0] != v):  # (is: a draft's untouched VIP)
                    was = (v.copy(), place)
                    conn.execute("INSERT OR REPLACE INTO vips (id, seq, doc) VALUES (?, ?, ?)",
                                 (v.id, place, json.dumps(vip_to_doc(v), sort_keys=True)))
                rows[v.id] = was
            for vid in self._rows.keys() - rows.keys():
                conn.execute("DELETE FROM vips WHERE id = ?", (vid,))
        head = json.dumps(head_to_doc(state), sort_keys=True)
        conn.execute("INSERT OR REPLACE INTO head (id, revision, doc) VALUES (1, ?, ?)", (revision, head))
        stored = self._stored_state(state, [rows[v.id][0] for v in state.vips])
        stored.revision = revision
        return stored, rows, head

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
                state, _ = self._load(conn, draft=True)
                yield state
                # state.revision + 1, not the row's: a store built on this one (etcdstore.py) may raise
                # state.revision while the block runs, to tell the maps' mark that the state moved on.
                saved = state.revision + 1
                stored, rows, head = self._save(conn, state, saved)
                fault.point("store_commit")
                conn.execute("COMMIT")
                self._cached, self._rows, self._head = (saved, stored), rows, head
            except BaseException:
                conn.execute("ROLLBACK")
                raise
        finally:
            conn.close()
