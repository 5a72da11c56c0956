"""The SQLite store: all or nothing, and concurrent writers serialised."""
from __future__ import annotations

import multiprocessing

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
