"""The split of a cluster's state (control/shared.py), without etcd or a data plane: what nodes share,
how a node's own ids follow the shared document, and why their Maglev tables agree anyway."""
from __future__ import annotations

import ipaddress
from types import SimpleNamespace

import pytest

from control import config as declarative
from control.errors import InputError
from control.model import BackendAddress, BackendState, DataPlaneState, HealthCheck, State, VipAddress, VipState
from control.service import Controller
from control.reconcile import maglev_table
from control.shared import merge, normalise, plain_nat_vips, shared_doc
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


def attached(state: State) -> State:
    state.dataplane = DataPlaneState([], "/nonexistent", 0, {"ring_size": 1601, "max_vips": 16, "max_backends": 64})
    return state


def a_node(name: str, snat: str) -> State:
    """A node of a cluster that follows a shared state of three VIPs: nat with its replies through lb1,
    full NAT, tunnel with a check; and its own full NAT source (the pool) and ports."""
    vips = [{"vip": "10.0.0.1:80/tcp", "mode": "nat", "hash": "flow", "acl": {"192.0.2.0/24": "deny"},
             "health": vars(HealthCheck()), "all_down": "open", "replies_via": "lb1",
             "backends": [{"address": "10.0.1.1", "port": 8080, "weight": 2}]},
            {"vip": "10.0.0.2:80/tcp", "mode": "fullnat", "hash": "flow", "acl": {}, "health": vars(HealthCheck()),
             "all_down": "closed", "backends": [{"address": "10.0.1.2", "port": 8080, "weight": 1}]},
            {"vip": "10.0.0.3:80/tcp", "mode": "tunnel", "hash": "source", "acl": {},
             "health": vars(HealthCheck("tcp", interval=0.5, timeout=0.4)), "all_down": "open", "min_healthy": 2,
             "backends": [{"address": "10.0.1.3", "port": 80, "weight": 1}, {"address": "10.0.1.4", "port": 80,
                                                                              "weight": 1}]}]
    node = merge(attached(State()), normalise({"vips": vips, "pass_unserved": ["10.0.0.3"]}))
    node.snat, node.snat_ports = {ipaddress.ip_address(snat)}, (20000, 29999)
    return node


class FakeNodeStore:
    """Enough of a cluster node's store for export and apply's checks: a name and a State."""

    def __init__(self, state: State, node: str | None = "lb2"):
        self.state, self.node = state, node

    def read(self) -> State:
        return self.state.copy()


def exported(state: State, node: str | None = "lb2") -> str:
    ctl = Controller(SimpleNamespace(netns_ino=0, name="default"), FakeNodeStore(state, node))
    return ctl.export()["yaml"]


def test_an_exported_cluster_state_re_applies_identically_on_any_node_and_keeps_each_nodes_sources():
    lb2, lb3 = a_node("lb2", "198.18.50.32"), attached(State(snat={ipaddress.ip_address("198.18.50.33")}))
    text = exported(lb2)
    assert "replies_via: lb1" in text
    assert "198.18.50.32" not in text and "snat" not in text  # the node's own part stays out of the shared file
    again = lb2.copy()
    declarative.merge(again, declarative.parse(text), now=1.0, node_own=False)
    assert again == lb2  # through the node it came from: nothing changes, its pool and ports included
    assert declarative.plan(lb2, again, 1601)["empty"]
    declarative.merge(lb3, declarative.parse(text), now=1.0, node_own=False)  # a node that had none of it
    assert shared_doc(lb3) == shared_doc(lb2)
    assert lb3.snat == {ipaddress.ip_address("198.18.50.33")}  # its own source, not lb2's
    assert exported(lb3) == text


def test_a_file_without_replies_via_makes_the_vip_plain_nat_again():
    lb2 = a_node("lb2", "198.18.50.32")
    changed = lb2.copy()
    declarative.merge(changed, declarative.parse(exported(lb2).replace("  replies_via: lb1\n", "")), 1.0, node_own=False)
    (nat,) = [c for c in declarative.plan(lb2, changed, 1601)["changed"]]
    assert nat["vip"] == "10.0.0.1:80/tcp" and nat["settings"] == ["replies_via: lb1 -> (none)"]
    assert plain_nat_vips(shared_doc(changed)) == {"10.0.0.1:80/tcp"}  # which a cluster refuses (etcdstore.py)


@pytest.mark.parametrize("node, text, message", [
    ("lb2", "vips: []\nsnat: {addresses: [198.18.50.32]}\n",
     r"^f.yaml: full NAT's source addresses and ports \(snat\) are each node's own in a cluster"),
    ("lb2", "vips:\n  - {vip: 10.0.0.2:80/tcp, mode: fullnat, snat: [198.18.50.32]}\n", r"^f.yaml: full NAT's source"),
    (None, "vips:\n  - {vip: 10.0.0.1:80/tcp, mode: nat, replies_via: lb1}\n",
     r"^f.yaml: replies_via names the node of a cluster .*; this state is one node's"),
    (None, "vips:\n  - {vip: 10.0.0.1:80/tcp, mode: tunnel, replies_via: lb1}\n",
     r"^f.yaml:2: replies_via is for a nat VIP .*; VIP 10.0.0.1:80/tcp is tunnel$"),
    ("lb2", "vips:\n  - {vip: 10.0.0.1:80/tcp, mode: nat, replies_via: 'a b'}\n", r"^f.yaml:2: replies_via 'a b': a node name"),
])
def test_apply_refuses_what_is_not_its_stores_to_hold(node, text, message):
    ctl = Controller(SimpleNamespace(netns_ino=0, name="default"), FakeNodeStore(attached(State()), node))
    with pytest.raises(InputError, match=message):
        ctl.apply(text, source="f.yaml")


def test_a_vip_of_its_own_sources_is_refused_in_a_cluster():
    ctl = Controller(SimpleNamespace(netns_ino=0, name="default"), FakeNodeStore(attached(State())))
    with pytest.raises(InputError, match=r"^--snat: in a cluster a full-NAT VIP takes each node's own source"):
        ctl.add_vip("10.0.0.2:80/tcp", "fullnat", snat=["198.18.50.32"])
