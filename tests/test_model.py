"""Parsing operator input: addresses as operators write them, and clear refusals."""
from __future__ import annotations

import ipaddress

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from control.errors import InputError
from control.model import (BackendAddress, BackendState, DataPlaneState, DraftState, Interface, State, VipAddress,
                           VipState)
from control.reconcile import maglev_table


@pytest.mark.parametrize("text, address, port, proto", [
    ("10.0.0.1:80/tcp", "10.0.0.1", 80, "tcp"),
    ("10.0.0.1:53/UDP", "10.0.0.1", 53, "udp"),
    ("[2001:db8::1]:443/tcp", "2001:db8::1", 443, "tcp"),
])
def test_vip_parses(text, address, port, proto):
    vip = VipAddress.parse(text)
    assert (vip.address, vip.port, vip.proto) == (ipaddress.ip_address(address), port, proto)
    assert VipAddress.parse(str(vip)) == vip


@pytest.mark.parametrize("text, words", [
    ("10.0.0.300:80/tcp", "not an IP address"),
    ("10.0.0.1:0/tcp", "out of range"),
    ("10.0.0.1:65536/tcp", "out of range"),
    ("10.0.0.1:http/tcp", "not a number"),
    ("10.0.0.1:\u00b2/tcp", "not a number"),  # a digit to str.isdigit, not to int()
    ("10.0.0.1:\u0668\u0660/tcp", "not a number"),  # Arabic-Indic 80: int() takes it, operators do not mean it
    ("10.0.0.1:80/sctp", "unknown protocol"),
    ("10.0.0.1:80", "needs a protocol"),
    ("2001:db8::1:80/tcp", "brackets"),
    ("", "expected ADDR:PORT/PROTO"),
])
def test_vip_refused_with_reason(text, words):
    with pytest.raises(InputError, match=words):
        VipAddress.parse(text)


UNUSABLE = [
    ("0.0.0.0", "unspecified"), ("[::]", "unspecified"),
    ("255.255.255.255", "broadcast"),
    ("224.0.0.1", "multicast"), ("239.1.2.3", "multicast"), ("[ff02::1]", "multicast"),
    ("127.0.0.1", "loopback"), ("127.1.2.3", "loopback"), ("[::1]", "loopback"),
    ("169.254.1.1", "link-local"), ("[fe80::1]", "link-local"),
    ("[::ffff:10.0.0.1]", "IPv4-mapped IPv6 address.*write the IPv4 address 10.0.0.1"),
]


@pytest.mark.parametrize("address, words", UNUSABLE)
def test_an_address_that_cannot_reach_a_remote_host_is_refused_as_vip_and_backend(address, words):
    with pytest.raises(InputError, match=f"cannot be a VIP: it is .*{words}"):
        VipAddress.parse(f"{address}:80/tcp")
    vip = VipAddress.parse("[2001:db8::1]:80/tcp" if address.startswith("[") else "10.0.0.1:80/tcp")
    with pytest.raises(InputError, match=f"cannot be a backend: it is .*{words}"):
        BackendAddress.parse(f"{address}:8080", vip)


@pytest.mark.parametrize("address", ["10.0.0.1", "198.18.0.1", "240.0.0.1", "0.1.2.3", "[2001:db8::1]",
                                     "[64:ff9b::a00:1]"])
def test_unicast_addresses_are_taken(address):
    assert VipAddress.parse(f"{address}:80/tcp").port == 80


def test_a_stored_vip_is_read_even_if_no_longer_accepted():
    assert str(VipAddress.parse("127.0.0.1:80/tcp", usable=False)) == "127.0.0.1:80/tcp"


def test_a_backend_that_is_a_vip_is_found_only_when_new():
    vip = VipAddress.parse("10.0.0.1:80/tcp")
    other = VipAddress.parse("10.0.0.2:53/udp")
    before = State(vips=[VipState(vip, 0), VipState(other, 1)])
    before.require_no_new_backend_vips(before)
    after = State(vips=[VipState(vip, 0, backends=[BackendState(BackendAddress.parse("10.0.0.2", vip), 1)]),
                        VipState(other, 1)])
    with pytest.raises(InputError, match="backend 10.0.0.2:80 of VIP 10.0.0.1:80/tcp: its address is a VIP's"):
        after.require_no_new_backend_vips(before)
    after.require_no_new_backend_vips(after)  # one already there does not block other changes


def test_vip_without_port_takes_every_port_and_its_backends_keep_the_clients():
    vip = VipAddress.parse("10.0.0.1/tcp")
    assert vip.any_port and vip.port == 0 and str(vip) == "10.0.0.1/tcp"
    assert str(VipAddress.parse("[2001:db8::1]/udp")) == "[2001:db8::1]/udp"
    assert BackendAddress.parse("10.0.1.2", vip).port == 0
    with pytest.raises(InputError, match="keep the client's port"):
        BackendAddress.parse("10.0.1.2:8080", vip)


def test_backend_without_port_keeps_the_vips_port():
    vip = VipAddress.parse("10.0.0.1:80/tcp")
    assert BackendAddress.parse("10.0.1.2", vip) == BackendAddress(ipaddress.ip_address("10.0.1.2"), 80)
    assert BackendAddress.parse("10.0.1.2:8080", vip).port == 8080
    assert str(BackendAddress.parse("[2001:db8::2]:8080", vip)) == "[2001:db8::2]:8080"
    with pytest.raises(InputError, match="without /tcp"):
        BackendAddress.parse("10.0.1.2:8080/tcp", vip)


def test_the_maglev_table_holds_only_active_healthy_weighted_backends():
    vip = VipAddress.parse("10.0.0.1:80/tcp")
    b = [BackendState(BackendAddress.parse(f"10.0.1.{i}", vip), i) for i in range(1, 6)]
    b[1].healthy = False
    b[2].weight = 0  # drained
    b[3].retired_at = 1.0  # removed
    v = VipState(vip, 0, backends=b)
    assert [x.id for x in v.maglev_backends()] == [1, 5]
    assert set(maglev_table(v, 251)) == {1, 5}


def test_a_vip_whose_every_backend_is_down_fails_open_unless_told_to_fail_closed():
    """A broken check path marks every backend down: by default new flows still go to all the
    active, weighted ones (drained and removed ones stay out); all_down=closed drops them."""
    vip = VipAddress.parse("10.0.0.1:80/tcp")
    b = [BackendState(BackendAddress.parse(f"10.0.1.{i}", vip), i) for i in range(1, 5)]
    b[2].weight = 0  # drained
    b[3].retired_at = 1.0  # removed
    v = VipState(vip, 0, backends=b)
    for x in b:
        x.healthy = False
    assert v.failing_open and [x.id for x in v.maglev_backends()] == [1, 2]
    assert [v.takes_new_flows(x) for x in b] == [True, True, False, False]
    assert set(maglev_table(v, 251)) == {1, 2}
    b[1].healthy = True  # one passes again: only it
    assert not v.failing_open and [x.id for x in v.maglev_backends()] == [2]
    b[1].healthy = False
    v.all_down = "closed"
    assert not v.failing_open and v.maglev_backends() == [] and not any(v.takes_new_flows(x) for x in b)
    assert not VipState(vip, 1).failing_open  # no backend at all: nothing to fail open to


def _state(n: int) -> State:
    """n VIPs on 10.0.x.y:80/tcp, each with one backend, one of them retired (ids and generations set)."""
    vips = []
    for i in range(n):
        vip = VipAddress.parse(f"10.0.{i // 250}.{i % 250 + 1}:80/tcp")
        vips.append(VipState(vip, i, backends=[BackendState(BackendAddress.parse("10.1.0.2:8080", vip), 2 * i + 1,
                                                            generation=2 * i + 1),
                                               BackendState(BackendAddress.parse("10.1.0.3:8080", vip), 2 * i + 2,
                                                            retired_at=float(100 + i), generation=2 * i + 2)]))
    dp = DataPlaneState([Interface("eth0", 2, "native")], "/sys/fs/bpf/x", 1,
                        {"max_vips": n + 2, "max_backends": 2 * n + 1})
    return State(dp, vips, revision=5, generations=2 * n)


def test_a_draft_copies_the_vips_a_change_reaches_and_leaves_its_base_as_it_was():
    base = _state(50)
    kept = base.copy()
    draft = DraftState.over(base)
    assert draft.unedited() is base and draft == base
    v = draft.require_vip(VipAddress.parse("10.0.0.8:80/tcp"))
    v.backends[0].weight = 9
    v.acl["192.0.2.0/24"] = "deny"
    assert draft.unedited() is None  # a VIP was reached: base no longer stands for the draft
    draft.add_vip(VipState(VipAddress.parse("10.9.0.1:80/tcp"), draft.allocate_vip_id()))
    draft.remove_vip(draft.require_vip(VipAddress.parse("10.0.0.2:80/tcp")))
    draft.done_editing()
    assert base == kept  # nothing of base was edited
    shared = {id(b) for b in base.vips}
    assert [i for i, v in enumerate(draft.vips) if id(v) not in shared] == [6, 49]  # the edited VIP and the new one


def test_reading_the_vips_of_a_draft_copies_them_all_first():
    """What reaches the list itself may edit any VIP: it gets the draft's own copies (as State.copy
    gave every change before), base's stay as they were."""
    base = _state(5)
    kept = base.copy()
    draft = DraftState.over(base)
    for v in draft.vips:
        v.backends[0].weight = 7
        v.mode = "dsr"
    draft.vips.append(VipState(VipAddress.parse("10.9.0.1:80/tcp"), 9))
    assert base == kept and draft != base and draft.unedited() is None
    assert not {id(v) for v in draft.vips} & {id(v) for v in base.vips}


def test_a_draft_takes_the_longest_retired_backend_on_a_copy():
    base = _state(3)
    base.dataplane.config["max_backends"] = 7  # ids 1-6 in use: the one retired longest ago is taken over
    kept = base.copy()
    draft = DraftState.over(base)
    assert draft.allocate_backend_id() == 2 and base == kept
    assert [b.id for b in draft.vips[0].backends] == [1] and [b.id for b in base.vips[0].backends] == [1, 2]


@settings(max_examples=60, deadline=None)
@given(st.lists(st.tuples(st.sampled_from(["weight", "retire", "add", "acl", "add_vip", "remove_vip", "mode",
                                           "health", "unserved"]),
                          st.integers(0, 11)), max_size=8))
def test_a_change_made_on_a_draft_equals_the_same_change_made_on_a_copy(edits):
    """Property: whatever a change does through the State's methods, a draft over the state ends
    equal to a whole copy that went through the same change, and the state under the draft is left
    as it was."""
    base = _state(12)
    kept = base.copy()

    def change(state: State) -> None:
        for what, i in edits:
            vip = VipAddress.parse(f"10.0.0.{i + 1}:80/tcp")
            v = state.vip(vip)
            if what == "add_vip" and v is None:
                state.add_vip(VipState(vip, state.allocate_vip_id()))
            elif v is None:
                continue
            elif what == "weight" and v.active_backends():
                v.active_backends()[0].weight += 1
            elif what == "retire" and v.active_backends():
                v.active_backends()[0].retired_at = 1.0
            elif what == "add":
                address = BackendAddress.parse(f"10.2.0.{i + 1}:8080", vip)
                if v.backend(address) is None and v.revive(address, 1) is None:
                    v.backends.append(BackendState(address, state.allocate_backend_id(),
                                                   generation=state.new_generation()))
            elif what == "acl":
                v.acl[f"192.0.2.{i}/32"] = "deny"
            elif what == "remove_vip":
                state.remove_vip(v)
            elif what == "mode":
                v.mode = "dsr"
            elif what == "health":
                for found in state.vips_by_id({v.id}).values():
                    for b in found.backends[:1]:  # (a VIP added again has none)
                        b.healthy = False
            elif what == "unserved":
                state.pass_unserved.add(vip.address)

    copied = base.copy()
    draft = DraftState.over(base)
    outcomes = []
    for state in (copied, draft):
        try:
            change(state)
            outcomes.append(None)
        except InputError as e:  # (ids run out): the same refusal on both
            outcomes.append(str(e))
    draft.done_editing()
    assert outcomes[0] == outcomes[1]
    assert draft == copied and copied == draft and draft.generations == copied.generations
    assert base == kept
