"""Per-VIP Maglev table sizes: what the Reconciler writes into the maglev map, on maps kept in
dicts (no kernel needed), and what the plan says moves when a table changes size."""
from __future__ import annotations

import ipaddress
import random

import pytest
from hypothesis import example, given, settings
from hypothesis import strategies as st

import control.reconcile as reconcile
from control.errors import InputError
from control.model import BackendAddress, BackendState, DraftState, State, VipAddress, VipState
from control.reconcile import Reconciler, maglev_table, ring_base, slots_moved
from lb.flowhash import flow_hash_raw
from lb.maglev import DEFAULT_RING_SIZE, is_prime, ring_size_for
from lb.structs import NO_BACKEND, LbAddr, lb_addr_bytes

MAX_RING = DEFAULT_RING_SIZE


class FakeMap(dict):
    """What the Reconciler uses of a BpfMap, by key bytes (or u32 index). Reading the maglev map
    fails: apply() must know what it holds from the old state."""

    ncpus = 1

    def __init__(self, readable: bool = True, default: int = NO_BACKEND):
        super().__init__()
        self.readable, self.default = readable, default
        self.written = 0

    @staticmethod
    def _k(key) -> object:
        return key.value if hasattr(key, "value") else bytes(key)

    def set(self, key, value) -> None:
        self[self._k(key)] = value

    def delete(self, key) -> None:
        self.pop(self._k(key), None)

    def set_many(self, keys, values) -> None:
        for k, v in zip(keys, values):
            self[k] = v
        self.written += len(keys)

    def read_range(self, start: int, count: int) -> list[int]:
        assert self.readable, "apply() read the maglev map"
        return [self.get(i, self.default) for i in range(start, start + count)]


class FakeMaps:
    NAMES = ("vips", "vip_addrs", "lb_config", "vip_meta", "backends", "backend_nh", "reply_sources", "acl",
             "vip_stats", "backend_stats")

    def __init__(self) -> None:
        self.maps = {name: FakeMap() for name in self.NAMES}
        self.maps["maglev"] = FakeMap(readable=False)
        for name in ("addr_filter", "vip_slots"):  # arrays of words, zero when new
            self.maps[name] = FakeMap(default=0)
        for name, m in self.maps.items():
            setattr(self, name, m)


def vip_with(backends: int, vip_id: int = 3, text: str = "198.19.0.1:80/tcp") -> VipState:
    vip = VipAddress.parse(text)
    return VipState(vip, vip_id, backends=[BackendState(BackendAddress.parse(f"198.18.{i // 250}.{i % 250 + 2}:8080",
                                                                               vip), 10 + i)
                                           for i in range(backends)])


def state(*vips: VipState) -> State:
    return State(vips=list(vips))


def ring_in(maps: FakeMaps, vip_id: int) -> list[int]:
    base = ring_base(vip_id, MAX_RING)
    return [maps.maglev.get(i, NO_BACKEND) for i in range(base, base + MAX_RING)]


def vip_info(maps: FakeMaps):
    (info,) = maps.vips.values()
    return info


def test_ring_sizes_are_primes_in_power_of_two_steps_capped_at_the_largest():
    sizes = [ring_size_for(n) for n in range(0, 700)]
    assert all(is_prime(s) for s in sizes)
    assert sizes[0] == sizes[16] >= 100 * 16 and sizes[17] == sizes[32] >= 100 * 32 > sizes[16]
    assert len(set(sizes)) == 7 and sizes[-1] == MAX_RING  # 16, 32, ..., 512 backends, then the cap
    assert all(ring_size_for(n) >= min(100 * n, MAX_RING) for n in range(700))
    assert ring_size_for(3, 251) == 251  # a data plane built with a smaller largest size


def test_a_new_vip_gets_a_table_of_its_size_in_its_ids_room_without_reading_the_map():
    maps = FakeMaps()
    v = vip_with(3)
    Reconciler(maps, MAX_RING).apply(state(), state(v))
    size = ring_size_for(3)
    info = vip_info(maps)
    assert (info.id, info.ring_base, info.ring_size) == (3, 3 * MAX_RING, size)
    ring = ring_in(maps, 3)
    assert ring[:size] == maglev_table(v, size) and set(ring[:size]) == {10, 11, 12}
    assert set(ring[size:]) == {NO_BACKEND} and maps.maglev.written == size


def test_a_change_writes_only_the_slots_that_differ():
    maps = FakeMaps()
    old, new = vip_with(4), vip_with(4)
    new.backends[0].weight = 0  # drained: same size, its slots go to the others
    Reconciler(maps, MAX_RING).apply(state(), state(old))
    maps.maglev.written = 0
    Reconciler(maps, MAX_RING).apply(state(old), state(new))
    size = ring_size_for(4)
    moved = sum(a != b for a, b in zip(maglev_table(old, size), maglev_table(new, size)))
    assert 0 < moved < size and maps.maglev.written == moved
    assert ring_in(maps, 3)[:size] == maglev_table(new, size)


def test_a_vip_that_outgrows_its_table_moves_to_a_larger_one_and_back():
    maps = FakeMaps()
    small, large = vip_with(16), vip_with(17)
    reconciler = Reconciler(maps, MAX_RING)
    reconciler.apply(state(), state(small))
    reconciler.apply(state(small), state(large))
    big = ring_size_for(17)
    assert vip_info(maps).ring_size == big > ring_size_for(16)
    assert ring_in(maps, 3) == maglev_table(large, big) + [NO_BACKEND] * (MAX_RING - big)
    reconciler.apply(state(large), state(small))  # shrinking: the larger table's tail is cleared
    size = ring_size_for(16)
    assert vip_info(maps).ring_size == size
    assert ring_in(maps, 3) == maglev_table(small, size) + [NO_BACKEND] * (MAX_RING - size)


def test_removing_a_vip_empties_its_room_and_an_id_taken_anew_is_written_whole():
    maps = FakeMaps()
    reconciler = Reconciler(maps, MAX_RING)
    first, second = vip_with(20), vip_with(0, text="198.19.0.2:80/tcp")
    reconciler.apply(state(), state(first))
    reconciler.apply(state(first), state(second))  # same id 3, another VIP, no backends
    assert vip_info(maps).ring_size == ring_size_for(0)
    assert set(ring_in(maps, 3)) == {NO_BACKEND}
    reconciler.apply(state(second), state())
    assert not maps.vips and set(ring_in(maps, 3)) == {NO_BACKEND}


def test_the_same_state_gives_the_same_maglev_map_whatever_came_before():
    direct, winding = FakeMaps(), FakeMaps()
    target = [vip_with(5, 1), vip_with(40, 2, "198.19.0.2:80/tcp")]
    Reconciler(direct, MAX_RING).apply(state(), state(*target))
    steps = [[vip_with(100, 1)], [vip_with(100, 1), vip_with(3, 2, "198.19.0.2:80/tcp")], target]
    before = state()
    for vips in steps:
        Reconciler(winding, MAX_RING).apply(before, state(*vips))
        before = state(*vips)
    assert dict(direct.maglev) == {k: v for k, v in winding.maglev.items() if v != NO_BACKEND}
    assert {k: bytes(v) for k, v in direct.vips.items()} == {k: bytes(v) for k, v in winding.vips.items()}


@pytest.mark.parametrize("old_count, new_count", [(16, 17), (33, 20)])
def test_the_planned_share_of_a_resized_table_is_the_share_of_flows_that_move(old_count, new_count):
    old, new = vip_with(old_count), vip_with(new_count)
    old_size, new_size = ring_size_for(old_count), ring_size_for(new_count)
    assert old_size != new_size
    _, share = slots_moved(old, new, MAX_RING)
    before, after = maglev_table(old, old_size), maglev_table(new, new_size)
    rng = random.Random(7)
    flows = [flow_hash_raw(rng.randbytes(16), rng.randbytes(16), rng.getrandbits(16), 80, 6) for _ in range(40000)]
    measured = sum(before[h % old_size] != after[h % new_size] for h in flows) / len(flows)
    assert abs(share - measured) < 0.01


def test_a_change_writes_the_same_entries_whether_or_not_it_looks_at_untouched_vips(monkeypatch):
    """Reconciler.apply works on the VIPs a change touches (touched()); the maps it leaves must be
    those a reconciler of the whole states leaves. VIPs share addresses and backend hosts."""
    def vip(i: int, addr: str, backends: list[str], mode: str = "nat") -> VipState:
        v = VipAddress.parse(f"{addr}:{80 + i}/tcp")
        return VipState(v, i, mode=mode, backends=[BackendState(BackendAddress.parse(b, v), 100 + 10 * i + j)
                                                   for j, b in enumerate(backends)])

    base = [vip(1, "198.19.0.1", ["198.18.1.2:8080"]), vip(2, "198.19.0.1", ["198.18.1.3:8080"]),
            vip(3, "198.19.0.2", ["198.18.1.2:8080", "198.18.1.4:8080"]), vip(4, "198.19.0.3", ["198.18.1.5:8080"]),
            VipState(VipAddress.parse("198.19.0.9/tcp"), 5)]
    changes = [lambda s: s.vips.pop(0), lambda s: s.vips[2].backends.pop(0), lambda s: s.vips.pop(4),
               lambda s: setattr(s.vips[3], "mode", "dsr"), lambda s: s.vips[1].backends.append(
                   BackendState(BackendAddress.parse("198.18.1.2:8080", s.vips[1].vip), 99)),
               lambda s: s.vips.append(vip(6, "198.19.0.4", ["198.18.1.3:8080"])),
               lambda s: setattr(s.vips[0].backends[0], "weight", 3),
               lambda s: s.vips[0].backends.append(BackendState(BackendAddress.parse("198.18.1.4:8080",
                                                                                     s.vips[0].vip), 98)),
               lambda s: (setattr(s.vips[0].backends[0], "retired_at", 1.0),  # removed, then added again anew:
                          s.vips[0].backends.append(BackendState(s.vips[0].backends[0].address, 97)))]  # same host
    for change in changes:
        old, new = state(*base), state(*[v.copy() for v in base])
        change(new)
        whole, part = FakeMaps(), FakeMaps()
        for maps in (whole, part):
            Reconciler(maps, MAX_RING).apply(state(), old)
        Reconciler(part, MAX_RING).apply(old, new)
        with monkeypatch.context() as m:
            m.setattr(reconcile, "touched", lambda o, n, *_: (o, n))  # the whole states
            Reconciler(whole, MAX_RING).apply(old, new)
        for name in FakeMaps.NAMES + ("maglev",):
            assert {k: bytes(v) if not isinstance(v, int) else v for k, v in whole.maps[name].items()} == \
                   {k: bytes(v) if not isinstance(v, int) else v for k, v in part.maps[name].items()}, name


def _comparable(maps: FakeMaps, names: tuple[str, ...]) -> dict[str, dict]:
    """The maps' entries as bytes, without those that hold nothing (an emptied entry = one never written)."""
    out = {}
    for name in names:
        m = maps.maps[name]
        empty = m.default if name in ("maglev", "addr_filter", "vip_slots") else None
        out[name] = {k: v if isinstance(v, int) else bytes(v) for k, v in m.items()
                     if v != empty and (isinstance(v, int) or any(bytes(v)))}
    return out


@settings(max_examples=80, deadline=None)
@given(st.lists(st.tuples(st.sampled_from(["weight", "retire", "add", "revive", "acl", "add_vip", "remove_vip",
                                           "mode", "health"]),
                          st.integers(0, 7)), min_size=1, max_size=6))
def test_a_change_on_a_draft_writes_what_a_change_of_the_whole_states_writes(edits):
    """Property: a change made on a DraftState (whose edits() name the VIPs it reached: the
    reconciler, the address filter and the VIP slots look only at those) leaves the maps a change
    of two whole, compared States leaves, and the maps that State written from nothing holds;
    the State under the draft is left as it was. VIPs share addresses and backend hosts."""
    texts = ["198.19.0.1:80/tcp", "198.19.0.1:81/tcp", "198.19.0.2:80/tcp", "198.19.0.2:80/udp",
             "198.19.0.3:80/tcp", "198.19.0.3/tcp", "198.19.0.4:80/tcp", "198.19.0.5:443/tcp"]
    vips = []
    for i, text in enumerate(texts[:6]):
        v = VipAddress.parse(text)
        vips.append(VipState(v, i, mode="dsr" if i == 4 else "nat", backends=[
            BackendState(BackendAddress.parse(f"198.18.1.{2 + (i + j) % 3}" + ("" if v.any_port or i == 4 else ":8080"),
                                              v), 10 * i + j + 1) for j in range(2)]))
    base = State(vips=vips)
    kept = base.copy()
    draft = DraftState.over(base)
    next_id = [100]

    for what, i in edits:
        vip = VipAddress.parse(texts[i])
        v = draft.vip(vip)
        if what == "add_vip" and v is None:
            draft.add_vip(VipState(vip, max(x.id for x in draft._reading()) + 1))
        elif v is None:
            continue
        elif what == "weight" and v.active_backends():
            v.active_backends()[0].weight = 0 if v.active_backends()[0].weight else 2
        elif what == "retire" and v.active_backends():
            v.active_backends()[-1].retired_at = 1.0
        elif what == "revive":
            for b in v.backends:
                b.retired_at = None
        elif what == "add" and not vip.any_port and v.mode == "nat":
            next_id[0] += 1
            v.backends.append(BackendState(BackendAddress.parse(f"198.18.2.{i % 3 + 2}:9000", vip), next_id[0]))
        elif what == "acl":
            v.acl[f"192.0.2.{i}/32"] = "deny"
        elif what == "remove_vip":
            draft.remove_vip(v)
        elif what == "mode" and v.mode == "nat" and all(b.address.port == vip.port for b in v.backends):
            v.mode = "tunnel"
        elif what == "health":
            for found in draft.vips_by_id({v.id}).values():
                for b in found.backends:
                    b.healthy = not b.healthy
    draft.done_editing()
    assert draft.edits(base) is not None

    names = FakeMaps.NAMES[:8] + ("maglev", "addr_filter", "vip_slots")
    by_draft, by_whole, from_nothing = FakeMaps(), FakeMaps(), FakeMaps()
    for maps in (by_draft, by_whole):
        Reconciler(maps, MAX_RING).apply(State(), base)
    Reconciler(by_draft, MAX_RING).apply(base, draft)
    Reconciler(by_whole, MAX_RING).apply(kept, draft.copy())
    Reconciler(from_nothing, MAX_RING).apply(State(), draft.copy())
    assert base == kept
    assert draft.derived()["backend_hosts"] == reconcile.backend_hosts(draft)  # brought up to date, not worked out
    for name in names:
        assert {k: v if isinstance(v, int) else bytes(v) for k, v in by_draft.maps[name].items()} == \
               {k: v if isinstance(v, int) else bytes(v) for k, v in by_whole.maps[name].items()}, name
    assert _comparable(by_draft, names) == _comparable(from_nothing, names)


@settings(max_examples=200, deadline=None)
@given(st.lists(st.tuples(st.sampled_from(["198.18.1.2", "198.18.1.3"]), st.sampled_from(["tcp", "tcp", "udp"]),
                          st.sampled_from([0, 80, 80, 81]), st.integers(0, 9)), min_size=6, max_size=40))
@example([("198.18.1.2", "tcp", 80, vid) for vid in range(7)])  # 7 VIPs on one endpoint
@example([("198.18.1.2", "tcp", 0, 1)] + [("198.18.1.2", "tcp", port, vid) for port, vid in
                                          ((80, 2), (80, 3), (81, 4), (81, 5), (81, 6), (81, 7), (81, 8))])
def test_refuse_overshared_refuses_what_counting_every_port_over_every_entry_refuses(entries):
    """Property: the check groups a host's VIPs by port; it refuses the states (with the same first
    message) that counting, for each port, the VIPs of every entry of its host refuses."""
    hosts: reconcile.BackendHosts = {}
    for address, proto, port, vid in entries:
        hosts.setdefault((lb_addr_bytes(ipaddress.ip_address(address)), proto), set()).add((port, vid))

    def counted_over_every_entry() -> str | None:
        for (address, proto), ports in hosts.items():
            for port in {p for p, _ in ports}:
                vip_ids = {vid for p, vid in ports if p == port or not p or not port}
                if len(vip_ids) > reconcile.REPLY_VIPS:
                    return (f"backend {LbAddr.from_buffer_copy(address).address()}:{port}/{proto} would serve "
                            f"{len(vip_ids)} NAT VIPs")
        return None

    expected = counted_over_every_entry()
    if expected is None:
        reconcile.refuse_overshared(hosts)
    else:
        with pytest.raises(InputError) as refused:
            reconcile.refuse_overshared(hosts)
        assert str(refused.value).startswith(expected)
