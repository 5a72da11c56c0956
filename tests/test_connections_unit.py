"""lbctl connections without root or a lab: entries decoded from the table's raw bytes, the data
plane's trust rules (generation, VIP, idle time), filters, and the text table."""
from __future__ import annotations

import ctypes
import errno
import ipaddress
import socket

import pytest

from control.connections import FIELDS, Filters, format_connections, list_connections
from control.errors import InputError
from control.model import BackendAddress, BackendState, State, VipAddress, VipState
from lb import bpfsys, structs
from lb.maps import BpfMap
from lb.conntable import address_text, connections, endpoint_text, raw_address as raw
from lb.structs import Backend, FlowEntry, FlowKey, LbAddr, LbConfig, VipInfo, VipKey, be16

CLIENT = ipaddress.ip_address("192.0.2.7")
VIP = ipaddress.ip_address("10.0.0.1")
BACKEND = ipaddress.ip_address("10.0.1.2")
NOW = 1000  # the kernel's ticks the listing is made at
OFFSET = 5  # lb_config.clock_offset: the data plane's clock is NOW + OFFSET


class FakeMap:
    """A map as lb.maps.BpfMap shows it: entries by u32 index, or (key, value) pairs of a hash map."""

    def __init__(self, entries: dict[int, object] | list[tuple], max_entries: int = 64):
        self.entries, self.max_entries = entries, max_entries

    def get(self, key: ctypes.c_uint32):
        return self.entries.get(key.value)

    def items(self) -> list[tuple]:
        return list(self.entries)

    def raw_items(self, chunk: int):
        for i in range(0, len(self.entries), chunk):  # as BpfMap.raw_items: packed keys, packed values
            part = self.entries[i:i + chunk]
            yield b"".join(bytes(k) for k, _ in part), b"".join(bytes(v) for _, v in part)


class FakeMaps:
    def __init__(self, flows: list[tuple[FlowKey, FlowEntry]], backends: dict[int, Backend],
                 fullnat: list[tuple[FlowKey, structs.FullnatFlow]] = ()):
        self.conn_table = FakeMap(flows, max_entries=1024)
        self.fullnat_flows = FakeMap(list(fullnat), max_entries=1024)
        self.lb_config = FakeMap({0: LbConfig(clock_offset=OFFSET)})
        self.vips = FakeMap([(VipKey(addr=LbAddr.of(VIP), port=be16(80), proto=socket.IPPROTO_TCP), VipInfo(id=3)),
                             (VipKey(addr=LbAddr.of(VIP), port=0, proto=socket.IPPROTO_UDP), VipInfo(id=4))])
        self.backends = FakeMap(backends)


def flow(sport: int, backend_id: int = 1, generation: int = 7, vip_id: int = 3, idle: int = 0, flags: int = 0,
         proto: int = socket.IPPROTO_TCP, dport: int = 80) -> tuple[FlowKey, FlowEntry]:
    key = FlowKey(src=LbAddr.of(CLIENT), dst=LbAddr.of(VIP), sport=be16(sport), dport=be16(dport), proto=proto)
    entry = FlowEntry(backend_id=backend_id, vip_id=vip_id, flags=flags, generation=generation,
                      last_seen=NOW + OFFSET - idle)
    return key, entry


def backend(generation: int = 7, vip_id: int = 3, port: int = 8080) -> Backend:
    return Backend(addr=LbAddr.of(BACKEND), port=be16(port), flags=structs.BACKEND_IN_USE, generation=generation,
                   vip_id=vip_id)


def state() -> State:
    vip = VipAddress(VIP, 80, "tcp")
    udp = VipAddress(VIP, 0, "udp")
    return State(vips=[VipState(vip, 3, "nat", [BackendState(BackendAddress(BACKEND, 8080), 1, generation=7)]),
                       VipState(udp, 4, "tunnel", [BackendState(BackendAddress(BACKEND, 0), 2, generation=8)])])


def test_entries_are_decoded_with_client_vip_backend_state_and_age():
    maps = FakeMaps([flow(40000, idle=3), flow(40001, flags=structs.FLOW_CLOSING)], {1: backend()})
    found = {c.client[1]: c for c in connections(maps, now=NOW)}
    c = found[40000]
    assert (c.client, c.vip, c.backend) == ((raw(CLIENT), 40000), (raw(VIP), 80), (raw(BACKEND), 8080))
    assert endpoint_text(*c.client) == "192.0.2.7:40000"
    assert (c.state, c.stale, c.age_ticks, c.idle_timeout_ticks) == ("ESTABLISHED", None, 3, structs.TCP_TIMEOUT)
    assert found[40001].state == "CLOSING" and found[40001].idle_timeout_ticks == structs.TCP_CLOSING_TIMEOUT


def test_a_fullnat_flow_shows_the_source_address_and_port_it_took():
    key, entry = flow(40002)
    source = ipaddress.ip_address("198.51.100.1")
    full = structs.FullnatFlow(flow=entry, snat_addr=LbAddr.of(source), snat_port=be16(51000))
    maps = FakeMaps([flow(40000)], {1: backend()}, [(key, full)])
    found = {c.client[1]: c for c in connections(maps, now=NOW)}
    assert found[40000].via is None
    assert found[40002].via == (raw(source), 51000) and found[40002].stale is None
    rows = {r["client"]: r for r in list_connections(maps, state())["connections"]}
    assert rows["192.0.2.7:40002"]["via"] == "198.51.100.1:51000" and rows["192.0.2.7:40000"]["via"] is None
    assert "198.51.100.1:51000" in format_connections(list_connections(maps, state()))


@pytest.mark.parametrize("entry, backends, stale", [
    (flow(1), {}, "backend gone"),                                   # record cleared
    (flow(1, generation=6), {1: backend()}, "backend rebound"),      # the id bound anew
    (flow(1, vip_id=9), {1: backend(vip_id=9)}, "VIP changed"),      # the tuple now reaches VIP 3, not 9
    (flow(1, idle=structs.TCP_TIMEOUT + 1), {1: backend()}, "idle"),
    (flow(1, idle=structs.TCP_TIMEOUT), {1: backend()}, None),       # conn.h: idle <= timeout is trusted
])
def test_trust_follows_the_data_planes_rules(entry, backends, stale):
    (c,) = connections(FakeMaps([entry], backends), now=NOW)
    assert c.stale == stale
    assert (c.backend is None) == (stale in ("backend gone", "backend rebound"))


@pytest.mark.parametrize("text", ["2001:db8::1", "2001:db8:0:1:0:0:0:1", "::1", "::", "::1.2.3.4", "::ffff:0:1.2.3.4",
                                  "fe80::1:0:0:0", "1:0:0:2:0:0:0:3", "2001:db8:1:2:3:4:5:6", "0:0:1::",
                                  "198.51.100.7", "0.0.0.0"])
def test_address_text_writes_what_ipaddress_writes(text):
    address = ipaddress.ip_address(text)
    assert address_text(raw(address)) == str(address)
    assert endpoint_text(raw(address), 80) == (f"[{address}]:80" if address.version == 6 else f"{address}:80")


def test_limit_stops_reading_and_filters_select():
    flows = [flow(port) for port in range(100, 140)] + [flow(53, proto=socket.IPPROTO_UDP, backend_id=2,
                                                            generation=8, vip_id=4, dport=53)]
    maps = FakeMaps(flows, {1: backend(), 2: backend(8, 4, 0)})
    assert len(list(connections(maps, limit=5, now=NOW, chunk=4))) == 5
    s = state()
    udp = list_connections(maps, s, Filters.parse("10.0.0.1/udp", None, None))
    assert [(r["proto"], r["backend"], r["mode"]) for r in udp["connections"]] == [("udp", "10.0.1.2:53", "tunnel")]
    by_port = list_connections(maps, s, Filters.parse(None, "10.0.1.2:53", None))  # the any-port VIP's backend
    assert [r["client"] for r in by_port["connections"]] == ["192.0.2.7:53"]
    assert list_connections(maps, s, Filters.parse(None, "10.0.1.3", None))["connections"] == []
    limited = list_connections(maps, s, Filters.parse("10.0.0.1:80", "10.0.1.2:8080", 10))
    assert (limited["shown"], limited["truncated"]) == (10, True)
    ports = [int(r["client"].rsplit(":", 1)[1]) for r in limited["connections"]]
    assert ports == sorted(ports)  # sorted by VIP, then client
    assert list_connections(maps, s, Filters.parse(None, None, 41))["truncated"] is False


def test_stale_entry_is_named_by_its_binding_in_the_state():
    """The record now holds another binding; the state still knows generation 7's backend."""
    maps = FakeMaps([flow(40000)], {1: backend(generation=11)})
    (row,) = list_connections(maps, state())["connections"]
    assert tuple(row) == FIELDS
    assert (row["backend"], row["valid"], row["stale"], row["via"]) == ("10.0.1.2:8080", False, "backend rebound",
                                                                          None)


@pytest.mark.parametrize("vip, backend, limit", [
    ("10.0.0.1:0", None, None), ("nonsense", None, None), ("10.0.0.1/icmp", None, None),
    (None, "10.0.1.2/tcp", None), (None, "2001:db8::1", None), (None, None, 0), (None, None, True),
])
def test_bad_filters_raise_input_errors(vip, backend, limit):
    with pytest.raises(InputError):
        Filters.parse(vip, backend, limit)


def test_text_table_has_a_column_per_field_and_says_what_is_stale():
    rows = [{"proto": "tcp", "client": "192.0.2.7:40000", "vip": "10.0.0.1:80/tcp", "via": None,
             "backend": "10.0.1.2:8080", "backend_id": 1, "state": "ESTABLISHED", "local": False, "age": 3.2,
             "expires_in": 896.4, "valid": True, "stale": None},
            {"proto": "udp", "client": "[2001:db8::7]:5000", "vip": "[2001:db8::1]:53/udp", "via": "198.51.100.1:1024",
             "backend": None, "backend_id": 4, "state": "ACTIVE", "local": True, "age": 40.0, "expires_in": 0,
             "valid": False, "stale": "idle"},
            {"proto": "tcp", "client": "192.0.2.8:1", "vip": "10.0.0.1:80/tcp", "via": None, "backend": None,
             "backend_id": 2, "state": "CLOSING", "local": False, "age": 1, "expires_in": 9, "valid": False,
             "stale": "backend gone"}]
    text = format_connections({"connections": rows, "shown": 3, "truncated": True, "stale": 2})
    lines = text.splitlines()
    assert lines[0].split() == ["PROTO", "CLIENT", "VIP", "VIA", "BACKEND", "STATE", "AGE", "EXPIRES", "ENTRY"]
    assert lines[1].split() == ["tcp", "192.0.2.7:40000", "10.0.0.1:80", "-", "10.0.1.2:8080", "ESTABLISHED",
                                "3s", "896s", "valid"]
    assert lines[2].split() == ["udp", "[2001:db8::7]:5000", "[2001:db8::1]:53", "198.51.100.1:1024", "?", "(id",
                                "4)", "ACTIVE", "(local)", "40s", "0s", "expired"]
    assert lines[3].endswith("stale: backend gone")
    assert lines[4] == ("3 connection(s), 2 no longer trusted (a packet of theirs picks a backend again); "
                        "--limit reached, more entries match")


@pytest.mark.parametrize("refusal", [errno.EINVAL, 524])  # no batch command (before 5.6); no batch ops (ENOTSUPP)
def test_a_map_without_batch_lookup_is_read_entry_by_entry(monkeypatch, refusal):
    pairs = [flow(port) for port in range(1, 8)]
    keys = [k for k, _ in pairs]
    entries = {bytes(k): v for k, v in pairs}

    def no_batch(*args):
        raise bpfsys.BpfError(refusal, "map batch lookup: unsupported")

    def next_key(fd, key, next_key):
        at = 0 if key is None else next(i for i, k in enumerate(keys) if bytes(k) == bytes(key)) + 1
        if at == len(keys):
            return False
        ctypes.memmove(ctypes.addressof(next_key), bytes(keys[at]), ctypes.sizeof(FlowKey))
        return True

    def lookup(fd, key, value):
        ctypes.memmove(ctypes.addressof(value), bytes(entries[bytes(key)]), ctypes.sizeof(FlowEntry))
        return True

    monkeypatch.setattr(bpfsys, "map_lookup_batch", no_batch)
    monkeypatch.setattr(bpfsys, "map_next_key", next_key)
    monkeypatch.setattr(bpfsys, "map_lookup", lookup)
    table = BpfMap.__new__(BpfMap)
    table.fd, table.key_type, table.value_type, table.percpu, table.ncpus = -1, FlowKey, FlowEntry, False, 1
    read = list(table.raw_items(chunk=3))
    assert [len(k) // ctypes.sizeof(FlowKey) for k, _ in read] == [3, 3, 1]
    assert b"".join(k for k, _ in read) == b"".join(map(bytes, keys))
    assert b"".join(v for _, v in read) == b"".join(bytes(v) for _, v in pairs)


def test_other_batch_failures_are_not_hidden(monkeypatch):
    def failing(*args):
        raise bpfsys.BpfError(errno.EPERM, "map batch lookup: Operation not permitted")

    monkeypatch.setattr(bpfsys, "map_lookup_batch", failing)
    table = BpfMap.__new__(BpfMap)
    table.fd, table.key_type, table.value_type, table.percpu, table.ncpus = -1, FlowKey, FlowEntry, False, 1
    with pytest.raises(bpfsys.BpfError):
        list(table.raw_items())
