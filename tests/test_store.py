"""The SQLite store: all or nothing, and concurrent writers serialised."""
from __future__ import annotations

import ipaddress
import json
import multiprocessing
import sqlite3

import pytest

from control.model import BackendAddress, BackendState, HealthCheck, State, VipAddress, VipState
from control.store import SqliteStore, state_from_doc, state_to_doc


def _vip(text: str, vid: int) -> VipState:
    vip = VipAddress.parse(text)
    return VipState(vip, vid, backends=[BackendState(BackendAddress.parse("10.0.1.2:8080", vip), 1, 3,
                                                     generation=vid + 1)])


def test_state_round_trips_through_the_document():
    state = State(vips=[_vip("10.0.0.1:80/tcp", 0), _vip("[2001:db8::1]:53/udp", 1)], generations=7)
    state.vips[0].health = HealthCheck("http", 8081, "/healthz", 204, 0.5, 0.25, 1, 5)
    state.vips[0].backends[0].healthy = False
    assert state_from_doc(state_to_doc(state)) == state


def test_the_saved_revision_and_unserved_addresses_come_back(tmp_path):
    store = SqliteStore(str(tmp_path / "s.db"))
    with store.transaction() as state:
        state.pass_unserved = {ipaddress.ip_address("198.19.0.1")}
    again = store.read()
    assert again.revision == 1 and {str(a) for a in again.pass_unserved} == {"198.19.0.1"}


def test_a_document_from_before_health_checks_loads_with_none():
    doc = state_to_doc(State(vips=[_vip("10.0.0.1:80/tcp", 0)]))
    del doc["vips"][0]["health"]
    del doc["vips"][0]["backends"][0]["healthy"]
    (v,) = state_from_doc(doc).vips
    assert v.health == HealthCheck() and not v.health.enabled and v.backends[0].healthy


def test_a_document_from_before_generations_gives_every_backend_a_new_one():
    doc = state_to_doc(State(vips=[_vip("10.0.0.1:80/tcp", 0), _vip("10.0.0.2:80/tcp", 1)]))
    del doc["generations"]
    for v in doc["vips"]:
        del v["backends"][0]["generation"]
    state = state_from_doc(doc)
    generations = [b.generation for v in state.vips for b in v.backends]
    assert len(set(generations)) == 2 and 0 not in generations and state.generations == max(generations)
    assert state.new_generation() > max(generations)


def test_transaction_saves_on_success_and_drops_on_error(tmp_path):
    store = SqliteStore(str(tmp_path / "s.db"))
    with store.transaction() as state:
        state.vips.append(_vip("10.0.0.1:80/tcp", 0))
    with pytest.raises(RuntimeError):
        with store.transaction() as state:
            state.vips.clear()
            raise RuntimeError("half-way")
    assert [str(v.vip) for v in store.read().vips] == ["10.0.0.1:80/tcp"]


def _append_vip(path: str, index: int) -> None:
    with SqliteStore(path).transaction() as state:
        state.vips.append(_vip(f"10.0.0.{index}:80/tcp", index))


def test_concurrent_transactions_lose_nothing(tmp_path):
    path = str(tmp_path / "s.db")
    procs = [multiprocessing.Process(target=_append_vip, args=(path, i)) for i in range(1, 13)]
    for p in procs:
        p.start()
    for p in procs:
        p.join(timeout=60)
    assert all(p.exitcode == 0 for p in procs)
    assert sorted(v.id for v in SqliteStore(path).read().vips) == list(range(1, 13))


def test_state_database_and_its_wal_and_shm_are_root_only(tmp_path):
    """The state (VIPs, backends, ACLs) is root's alone: a new directory 0700, the database and the
    -wal and -shm files SQLite creates beside it 0600; an older, looser file is tightened."""
    import os
    import sqlite3

    directory = tmp_path / "new" / "lb"
    path = str(directory / "state.db")
    store = SqliteStore(path)
    with store.transaction() as state:
        state.vips.append(_vip("10.0.0.1:80/tcp", 1))
    reader = sqlite3.connect(path)  # an open reader keeps the -wal and -shm in place
    try:
        reader.execute("BEGIN")
        reader.execute("SELECT * FROM head").fetchall()
        with store.transaction() as state:
            state.vips.append(_vip("10.0.0.2:80/tcp", 2))
        for suffix in ("", "-wal", "-shm"):
            assert os.stat(path + suffix).st_mode & 0o777 == 0o600, suffix
    finally:
        reader.close()
    assert os.stat(directory).st_mode & 0o777 == 0o700
    assert os.stat(directory.parent).st_mode & 0o777 == 0o700  # created here too

    os.chmod(path, 0o644)
    with open(path + "-wal", "ab"):
        pass
    os.chmod(path + "-wal", 0o644)
    assert [v.id for v in store.read().vips] == [1, 2]
    assert os.stat(path).st_mode & 0o777 == 0o600


def test_an_existing_directory_chosen_by_the_operator_keeps_its_mode(tmp_path):
    """--state /somewhere/x.db must not chmod /somewhere (it could be /etc or /tmp)."""
    import os

    os.chmod(tmp_path, 0o755)
    SqliteStore(str(tmp_path / "x.db")).read()
    assert os.stat(tmp_path).st_mode & 0o777 == 0o755
    assert os.stat(tmp_path / "x.db").st_mode & 0o777 == 0o600
def test_a_long_lived_store_saves_the_same_document_and_sees_other_writers(tmp_path):
    """The daemon's Store keeps the last State and each VIP's JSON: what it saves is the document
    state_to_doc gives, and a write by another process (another Store) is read, not the cache."""
    path = str(tmp_path / "state.db")
    daemon, other = SqliteStore(path), SqliteStore(path)
    with daemon.transaction() as state:
        state.vips = [VipState(VipAddress.parse(f"10.0.0.{i}:80/tcp"), i) for i in range(1, 4)]
    with daemon.transaction() as state:
        state.vips[1].mode = "dsr"
        del state.vips[0]
        expected = json.dumps(state_to_doc(state), sort_keys=True)
    assert _saved_doc(path) == expected
    with other.transaction() as state:
        state.vips[0].hash = "source"
    with daemon.transaction() as state:
        assert [v.hash for v in state.vips] == ["source", "flow"]
        state.vips[0].acl["192.0.2.0/24"] = "deny"  # edits a copy: the cache stays as saved
        expected = json.dumps(state_to_doc(state), sort_keys=True)
    assert _saved_doc(path) == expected and daemon.read().vips[0].acl == {"192.0.2.0/24": "deny"}


def _saved_doc(path: str) -> str:
    """The document the rows make up: the head's, with each VIP row's in the rows' order."""
    conn = sqlite3.connect(path)
    try:
        head = json.loads(conn.execute("SELECT doc FROM head WHERE id = 1").fetchone()[0])
        vips = [json.loads(doc) for (doc,) in conn.execute("SELECT doc FROM vips ORDER BY seq")]
        return json.dumps({**head, "vips": vips}, sort_keys=True)
    finally:
        conn.close()


def _statements(monkeypatch) -> list[str]:
    """Every SQL statement the stores run from now on."""
    seen: list[str] = []
    connect = SqliteStore._connect

    def traced(self):
        conn = connect(self)
        conn.set_trace_callback(seen.append)
        return conn

    monkeypatch.setattr(SqliteStore, "_connect", traced)
    return seen


def test_a_change_writes_the_rows_of_the_vips_it_changes(tmp_path, monkeypatch):
    """One row per VIP: a change to one VIP writes its row and the head, whatever else is stored;
    a VIP removed takes its row along, and the list keeps its order."""
    path = str(tmp_path / "state.db")
    with SqliteStore(path).transaction() as state:
        state.vips = [_vip(f"10.0.{i // 250}.{i % 250 + 1}:80/tcp", i) for i in range(300)]
    seen = _statements(monkeypatch)
    for store in (SqliteStore(path), SqliteStore(path)):  # a new process's, and the same one again
        for _ in range(2):
            seen.clear()
            with store.transaction() as state:
                state.vips[7].backends[0].weight += 1
            writes = [s for s in seen if s.startswith(("INSERT", "DELETE", "UPDATE"))]
            assert len(writes) == 2 and "INTO vips" in writes[0] and "INTO head" in writes[1], writes
    with SqliteStore(path).transaction() as state:
        del state.vips[3]
        state.vips.append(_vip("10.9.0.1:80/tcp", 3))
    again = SqliteStore(path).read()
    assert [v.id for v in again.vips] == [i for i in range(300) if i != 3] + [3]
    assert next(v for v in again.vips if v.id == 7).backends[0].weight == 7 and str(again.vips[-1].vip) == "10.9.0.1:80/tcp"
    assert _saved_doc(path) == json.dumps(state_to_doc(again), sort_keys=True)


def test_a_database_of_the_older_layout_is_read_and_then_written_in_rows(tmp_path):
    """Before rows per VIP, the whole State was one document in table state: it is read as it
    was, and the first change writes the rows and deletes that document."""
    path = str(tmp_path / "state.db")
    state = State(vips=[_vip("10.0.0.1:80/tcp", 0), _vip("10.0.0.2:80/tcp", 1)], generations=5)
    conn = sqlite3.connect(path)
    conn.execute("CREATE TABLE state (id INTEGER PRIMARY KEY CHECK (id = 1), revision INTEGER NOT NULL,"
                 " doc TEXT NOT NULL)")
    conn.execute("INSERT INTO state VALUES (1, 41, ?)", (json.dumps(state_to_doc(state)),))
    conn.commit()
    conn.close()

    store = SqliteStore(path)
    read = store.read()
    assert read.revision == 41 and read == state
    with store.transaction() as changed:
        changed.vips[1].mode = "dsr"
    again = SqliteStore(path).read()
    assert again.revision == 42 and [v.mode for v in again.vips] == ["nat", "dsr"] and again.generations == 5
    conn = sqlite3.connect(path)
    try:
        assert conn.execute("SELECT COUNT(*) FROM state").fetchone()[0] == 0
    finally:
        conn.close()


def test_a_change_in_a_long_lived_store_copies_only_what_it_edits_and_an_error_leaves_the_state(tmp_path):
    """The daemon's Store hands a change a draft over the State it keeps: the VIPs the change does
    not reach are the kept ones (nothing copied or compared for them), and a change that raises
    leaves the kept State as it was."""
    path = str(tmp_path / "state.db")
    store = SqliteStore(path)
    with store.transaction() as state:
        state.vips = [_vip(f"10.0.0.{i}:80/tcp", i) for i in range(1, 101)]
    with store.transaction() as state:
        kept = state.unedited()
        assert kept is not None and kept.vips[0] is store._cached[1].vips[0]
        state.require_vip(VipAddress.parse("10.0.0.5:80/tcp")).backends[0].weight = 9
        state.done_editing()
        assert [i for i, (v, k) in enumerate(zip(state.vips, kept.vips)) if v is not k] == [4]
    with pytest.raises(RuntimeError):
        with store.transaction() as state:
            state.require_vip(VipAddress.parse("10.0.0.6:80/tcp")).backends[0].weight = 0
            state.vips[7].mode = "dsr"
            raise RuntimeError("refused")
    for reader in (store, SqliteStore(path)):
        again = reader.read()
        assert [v.backends[0].weight for v in again.vips[3:6]] == [3, 9, 3] and again.vips[7].mode == "nat"
