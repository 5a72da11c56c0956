"""Desired state storage behind one small interface.

A Store hands out exclusive transactions on the whole State: `with
store.transaction() as state:` loads it, and the block's changes are saved
atomically when it exits cleanly, or dropped when it raises. SQLite (one file)
is the default; a shared store (etcd, later) implements the same two methods
with a compare-and-swap on a revision."""
from __future__ import annotations

import contextlib
import ipaddress
import json
import os
import sqlite3
import time
from typing import Any, Iterator, Protocol

from control.model import (BackendAddress, BackendState, DataPlaneState, HealthCheck, Interface, State,
                           VipAddress, VipState)


class Store(Protocol):
    def read(self) -> State: ...

    def transaction(self) -> contextlib.AbstractContextManager[State]: ...


def state_to_doc(state: State) -> dict[str, Any]:
    dp = state.dataplane
    return {
        "dataplane": None if dp is None else {
            "interfaces": [vars(i) for i in dp.interfaces],
            "pin_dir": dp.pin_dir,
            "netns_ino": dp.netns_ino,
            "config": dp.config,
            "program_digest": dp.program_digest,
            "hook": dp.hook,
        },
        "vips": [
            {
                "vip": str(v.vip),
                "id": v.id,
                "mode": v.mode,
                "hash": v.hash,
                "acl": v.acl,
                "health": vars(v.health),
                "backends": [
                    {"address": str(b.address.address), "port": b.address.port, "id": b.id, "weight": b.weight,
                     "retired_at": b.retired_at, "healthy": b.healthy, "generation": b.generation}
                    for b in v.backends
                ],
            }
            for v in state.vips
        ],
        "generations": state.generations,
    }


def state_from_doc(doc: dict[str, Any]) -> State:
    dp = doc.get("dataplane")
    vips = []
    for v in doc.get("vips", []):
        vip = VipAddress.parse(v["vip"])
        backends = [
            BackendState(BackendAddress(ipaddress.ip_address(b["address"]), b["port"]), b["id"], b["weight"],
                         b["retired_at"], b.get("healthy", True), b.get("generation", 0))
            for b in v["backends"]
        ]
        health = HealthCheck(**v.get("health", {}))  # documents from before health checks have none
        vips.append(VipState(vip, v["id"], v["mode"], backends, v.get("hash", "flow"), v.get("acl", {}), health))
    dataplane = None
    if dp is not None:
        dataplane = DataPlaneState([Interface(**i) for i in dp["interfaces"]], dp["pin_dir"], dp["netns_ino"],
                                   dp["config"], dp.get("program_digest"), dp.get("hook", "xdp"))
    # Documents from before generations: every backend gets one now, above any seen.
    generations = max([doc.get("generations", 0)] + [b.generation for v in vips for b in v.backends])
    state = State(dataplane, vips, generations)
    for v in vips:
        for b in v.backends:
            if not b.generation:
                b.generation = state.new_generation()
    return state


class SqliteStore:
    """The whole State as one JSON document in one SQLite row, with a revision.

    BEGIN IMMEDIATE takes the database's write lock for the whole transaction, so
    concurrent lbctl commands run one after another and none is lost."""

    def __init__(self, path: str, timeout: float = 30.0):
        self.path = path
        self.timeout = timeout

    def _connect(self) -> sqlite3.Connection:
        os.makedirs(os.path.dirname(os.path.abspath(self.path)), exist_ok=True)
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

    @staticmethod
    def _load(conn: sqlite3.Connection) -> tuple[State, int]:
        row = conn.execute("SELECT revision, doc FROM state WHERE id = 1").fetchone()
        if row is None:
            return State(), 0
        return state_from_doc(json.loads(row[1])), row[0]

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
                state, revision = self._load(conn)
                yield state
                conn.execute("INSERT OR REPLACE INTO state (id, revision, doc) VALUES (1, ?, ?)",
                             (revision + 1, json.dumps(state_to_doc(state), sort_keys=True)))
                conn.execute("COMMIT")
            except BaseException:
                conn.execute("ROLLBACK")
                raise
        finally:
            conn.close()
