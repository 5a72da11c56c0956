"""The split of a cluster's state (control/shared.py), without etcd or a data plane: what nodes share,
how a node's own ids follow the shared document, and why their Maglev tables agree anyway."""
from __future__ import annotations

from control.model import BackendAddress, BackendState, HealthCheck, State, VipAddress, VipState
from control.reconcile import maglev_table
from control.shared import merge, normalise, shared_doc
from lb.maglev import ring_size_for
from lb.structs import NO_BACKEND

V1 = VipAddress.parse("10.0.0.1:80/tcp")
V2 = VipAddress.parse("10.0.0.2:53/udp")


def doc(backends: dict[str, int], v2: bool = False, **vip: object) -> dict:
    """A shared document: V1 with `backends` (address -> weight), and V2 with one backend if asked."""
    vips = [{"vip": str(V1), "mode": "tunnel", "hash": "flow", "acl": {}, "health": vars(HealthCheck()),
             "all_down": "open", "backends": [{"address": a, "port": 80, "weight": w} for a, w in backends.items()],
             **vip}]
    if v2:
        vips.append({**vips[0], "vip": str(V2), "backends": [{"address": "10.0.2.1", "port": 53, "weight": 1}]})
    return normalise({"vips": vips, "pass_unserved": []})


def ids(state: State) -> dict[str, int]:
    return {f"{v.vip} {b.address}": b.id for v in state.vips for b in v.backends if b.active}


def test_a_node_keeps_its_ids_health_and_removed_backends_across_shared_changes():
    node = merge(State(), doc({"10.0.1.1": 1, "10.0.1.2": 1}))
    node.vips[0].backends[1].healthy = False  # this node's observation
    first = ids(node)
    node = merge(node, doc({"10.0.1.2": 2, "10.0.1.3": 1}), now=100.0)
    (v,) = node.vips
    assert {str(b.address): (b.id, b.weight, b.retired_at, b.healthy) for b in v.backends} == {
        "10.0.1.1:80": (first["10.0.0.1:80/tcp 10.0.1.1:80"], 1, 100.0, True),  # retired here, flows go on
        "10.0.1.2:80": (first["10.0.0.1:80/tcp 10.0.1.2:80"], 2, None, False),  # same id, health kept
        "10.0.1.3:80": (3, 1, None, True)}  # a new id
    node = merge(node, doc({"10.0.1.1": 1, "10.0.1.2": 2, "10.0.1.3": 1}))
    assert ids(node)["10.0.0.1:80/tcp 10.0.1.1:80"] == first["10.0.0.1:80/tcp 10.0.1.1:80"]  # back: its old id
    assert node.vips[0].backends[0].retired_at is None


def test_ids_of_a_removed_vip_are_not_reused_in_the_same_merge():
    node = merge(State(), doc({"10.0.1.1": 1}, v2=True))
    gone = {v.id for v in node.vips if v.vip == V2}, {b.id for v in node.vips if v.vip == V2 for b in v.backends}
    node = merge(node, doc({"10.0.1.1": 1, "10.0.1.9": 1}))
    assert [v.vip for v in node.vips] == [V1]
    assert not {b.id for b in node.vips[0].backends} & gone[1]
    node = merge(node, doc({"10.0.1.1": 1, "10.0.1.9": 1}, v2=True))
    assert {v.id for v in node.vips if v.vip == V2} == gone[0]  # free again a merge later


def test_nodes_numbering_backends_apart_build_the_same_maglev_tables():
    final = doc({"10.0.1.1": 1, "10.0.1.2": 3, "10.0.1.3": 1, "10.0.1.4": 2})
    a = State()  # followed every change, one at a time
    for step in ({"10.0.1.4": 2}, {"10.0.1.4": 2, "10.0.1.3": 1}, {"10.0.1.4": 2, "10.0.1.3": 1, "10.0.1.9": 1},
                 {"10.0.1.4": 2, "10.0.1.3": 1, "10.0.1.2": 3, "10.0.1.1": 1}):
        a = merge(a, doc(step))
    a = merge(a, final)
    b = merge(State(), final)  # was down, caught up at once
    assert ids(a) != ids(b)

    def table(state: State) -> list[str | None]:
        (v,) = state.vips
        names = {b.id: str(b.address) for b in v.backends}
        return [names.get(s) if s != NO_BACKEND else None
                for s in maglev_table(v, ring_size_for(len(v.active_backends())))]

    assert table(a) == table(b) and None not in table(a)


def test_a_whole_state_document_from_before_the_split_is_read_as_its_shared_part():
    old = {"dataplane": {"interfaces": [{"name": "eth0", "ifindex": 2, "mode": "native"}], "pin_dir": "/x",
                         "netns_ino": 1, "config": {}, "program_digest": None, "hook": "xdp"},
           "generations": 7, "revision": 12, "pass_unserved": ["10.0.0.1"],
           "vips": [{"vip": str(V1), "id": 5, "mode": "dsr", "hash": "source", "acl": {"192.0.2.0/24": "deny"},
                     "health": {"kind": "tcp"}, "all_down": "closed",
                     "backends": [{"address": "10.0.1.1", "port": 80, "id": 3, "weight": 2, "retired_at": None,
                                   "healthy": False, "generation": 6},
                                  {"address": "10.0.1.2", "port": 80, "id": 4, "weight": 1, "retired_at": 5.0,
                                   "healthy": True, "generation": 7}]}]}
    state = State(vips=[VipState(V1, 0, "dsr", [BackendState(BackendAddress.parse("10.0.1.1", V1), 1, 2)],
                                 "source", {"192.0.2.0/24": "deny"}, HealthCheck("tcp"), "closed")],
                  pass_unserved={V1.address})
    assert normalise(old) == shared_doc(state)
    assert shared_doc(merge(State(), normalise(old))) == normalise(old)
