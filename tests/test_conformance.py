"""The fixture table (tests/fixtures/packets.toml) through the BPF program and the reference model."""
from __future__ import annotations

import socket
from typing import Iterator

import pytest
from scapy.layers.l2 import Ether
from scapy.utils import wrpcap

from lb.refmodel import Flow
from lb.maps import U32
from lb.structs import FLOW_LOCAL, FlowEntry, FlowKey, LbAddr
from tests.conftest import run_lbctl
from tests.harness import Harness, agree, configured_harness, disagreement, evaluate, expression_names, load_fixtures

FIXTURES = load_fixtures()


@pytest.fixture(scope="module")
def harness() -> Iterator[Harness]:
    with configured_harness(FIXTURES["config"]) as h:
        yield h


@pytest.fixture(autouse=True)
def no_made_up_vlans(harness: Harness) -> Iterator[None]:
    """A case's VLAN devices (egress_vlans) end with it."""
    yield
    if harness.vlans:
        harness.set_egress_vlans(None)


@pytest.mark.parametrize("case", FIXTURES["case"], ids=[c["name"] for c in FIXTURES["case"]])
def test_fixture(harness: Harness, case: dict):
    names = expression_names(harness.lab)
    backends = set()
    harness.set_egress_vlans(case.get("egress_vlans"))
    for setup in case.get("setup", []):
        actual, expected = harness.run(evaluate(setup, names), case["ingress"])
        assert agree(actual, expected), disagreement(evaluate(setup, names), actual, expected)
        backends.add(actual.backend)
    if case.get("change"):  # the configuration changes between the setup and the packet
        for command in case["change"]:
            run_lbctl(harness.lab.lb_ns, *command)
        harness.resnapshot()
        backends.clear()
    frame = bytes.fromhex(case["hex"]) if "hex" in case else evaluate(case["packet"], names)

    actual, expected = harness.run(frame, case["ingress"])

    assert agree(actual, expected), disagreement(frame, actual, expected)
    assert actual.action == case["action"]
    assert actual.reason == case["reason"]
    if case["output"] == "model":  # the table says which backend: the model, which agreed, knows
        backends.add(actual.backend)
        assert len(backends) == 1, "flows of one client went to different backends"
        return
    want = frame if case["output"] == "unchanged" else evaluate(case["output"], names)
    assert actual.packet.hex() == want.hex()


def test_fixture_table_covers_every_reason_it_can_reach_today():
    reasons = {c["reason"] for c in FIXTURES["case"]}
    assert {"fwd_nat", "fwd_reply", "tx_icmp_echo", "pass_not_ip", "pass_not_vip", "pass_ip_options",
            "pass_fragment", "pass_unsupported_l4", "pass_malformed", "drop_no_backend", "drop_ip_options",
            "drop_fragment", "drop_unsupported_l4", "drop_malformed", "drop_acl", "fwd_dsr", "fwd_tunnel",
            "fwd_icmp_error", "drop_icmp_no_flow", "drop_neigh_unresolved", "pass_neigh_unresolved",
            "drop_unserved", "pass_unserved", "drop_v4_mapped", "pass_v4_mapped", "pass_egress_unmanaged",
            "fwd_egress_unmanaged", "drop_reply_no_flow", "pass_vlan_unmanaged", "fwd_fullnat",
            "fwd_fullnat_reply"} <= reasons


def test_lbctl_test_packet_reports_what_the_program_does(harness: Harness, tmp_path):
    names = expression_names(harness.lab)
    frame = evaluate("Ether(src=CLIENT_MAC, dst=LB_CLIENT_MAC)/IP(src=CLIENT, dst=VIP1)/UDP(sport=40100, dport=53)", names)
    result = run_lbctl(harness.lab.lb_ns, "test-packet", "--json", "--ingress", "to-client", frame.hex()).json()
    assert set(result) >= {"action", "packet_hex", "backend", "reason"}
    assert (result["action"], result["reason"], result["backend"]) == ("XDP_REDIRECT", "fwd_nat", "198.18.1.2:5353")
    want = evaluate("Ether(src=LB_B1_MAC, dst=B1_MAC)/IP(src=CLIENT, dst=B1)/UDP(sport=40100, dport=5353)", names)
    assert result["packet_hex"] == want.hex()

    pcap = tmp_path / "arp.pcap"
    wrpcap(str(pcap), [Ether(evaluate("Ether(src=CLIENT_MAC, dst='ff:ff:ff:ff:ff:ff')/ARP(psrc=CLIENT, pdst='198.18.0.1')", names))])
    text = run_lbctl(harness.lab.lb_ns, "test-packet", "--pcap", str(pcap)).stdout
    assert "action:  XDP_PASS" in text and "reason:  pass_not_ip" in text and "backend: -" in text


def test_reply_to_a_steered_connection_of_the_lb_host_is_handed_to_the_host(harness: Harness):
    """A flow the TC egress program remembered (LB_FLOW_LOCAL: the LB host's own connection to
    VIP1:53/udp, steered to b1:5353): its reply is rewritten back to the VIP and passed up."""
    names = expression_names(harness.lab)
    t = harness.model.t
    lb_host, vip = LbAddr.of(harness.lab.backends[0].lb_address), LbAddr.of(harness.lab.vip(1))
    b1 = bytes(LbAddr.of(harness.lab.backends[0].address))
    vip_id = t.vips[(bytes(vip), 53, socket.IPPROTO_UDP)][0]
    backend_id = next(i for i, (addr, port, *_) in t.backends.items() if (addr, port) == (b1, 5353))
    generation = t.backends[backend_id][3]
    now = harness.model.now()  # a live entry: an idle one answers no reply
    harness.maps.conn_table.set(
        FlowKey(src=lb_host, dst=vip, sport=socket.htons(40500), dport=socket.htons(53), proto=socket.IPPROTO_UDP),
        FlowEntry(backend_id=backend_id, vip_id=vip_id, flags=FLOW_LOCAL, generation=generation, last_seen=now))
    t.conn[(bytes(lb_host), bytes(vip), 40500, 53, socket.IPPROTO_UDP)] = Flow(backend_id, vip_id, FLOW_LOCAL,
                                                                                generation=generation, last_seen=now)
    lb_b1 = str(harness.lab.backends[0].lb_address)
    frame = evaluate(f"Ether(src=B1_MAC, dst=LB_B1_MAC)/IP(src=B1, dst='{lb_b1}')/UDP(sport=5353, dport=40500)/Raw(b'ok')",
                     names)

    actual, expected = harness.run(frame, "b1")

    assert agree(actual, expected), disagreement(frame, actual, expected)
    assert (actual.action, actual.reason) == ("XDP_PASS", "pass_local_reply")
    want = f"Ether(src=B1_MAC, dst=LB_B1_MAC)/IP(src=VIP1, dst='{lb_b1}')/UDP(sport=53, dport=40500)/Raw(b'ok')"
    assert actual.packet.hex() == evaluate(want, names).hex()


def advance_clock(harness: Harness, ticks: int) -> None:
    """Move the data plane's clock (lb_config.clock_offset, for tests; ticks of 2^30 ns, 1.07 s) and
    the model's alike."""
    config = harness.maps.lb_config.get(U32(0))
    config.clock_offset = (config.clock_offset + ticks) & 0xFFFFFFFF
    harness.maps.lb_config.set(U32(0), config)
    harness.model.t.clock_offset = config.clock_offset


def send(harness: Harness, names: dict, expression: str, ingress: str = "client"):
    frame = evaluate(expression, names)
    actual, expected = harness.run(frame, ingress)
    assert agree(actual, expected), disagreement(frame, actual, expected)
    return actual


def vip_on_first_backend(harness: Harness, vip: str, port: int) -> tuple[tuple[bytes, int], tuple[bytes, int]]:
    """`vip` with the lab's first backend on `port`; returns the first two backends' endpoints, as
    test-packet names them."""
    run_lbctl(harness.lab.lb_ns, "add-vip", vip)
    run_lbctl(harness.lab.lb_ns, "add-backend", vip, f"{harness.lab.backends[0].address}:{port}")
    harness.resnapshot()
    return tuple((bytes(LbAddr.of(b.address)), port) for b in harness.lab.backends[:2])


def test_a_drained_backends_udp_client_moves_once_idle(harness: Harness):
    """A fixed-port UDP client stays with its drained backend while it keeps sending, and moves
    to a serving backend after the UDP timeout (30 s: 28 ticks) of silence."""
    names = expression_names(harness.lab)
    vip = f"{harness.lab.vip(2)}:97/udp"
    b1, b2 = vip_on_first_backend(harness, vip, 5397)
    datagram = "Ether(src=CLIENT_MAC, dst=LB_CLIENT_MAC)/IP(src=CLIENT, dst=VIP2)/UDP(sport=40200, dport=97)/Raw(b'q')"
    assert send(harness, names, datagram).backend == b1
    run_lbctl(harness.lab.lb_ns, "add-backend", vip, f"{harness.lab.backends[1].address}:5397")
    run_lbctl(harness.lab.lb_ns, "drain", vip, f"{harness.lab.backends[0].address}:5397")
    harness.resnapshot()
    advance_clock(harness, 20)
    assert send(harness, names, datagram).backend == b1  # still talking: stays
    advance_clock(harness, 20)
    assert send(harness, names, datagram).backend == b1  # 20 ticks of silence < 28
    advance_clock(harness, 31)
    assert send(harness, names, datagram).backend == b2  # idle longer than the UDP timeout: moves
    assert send(harness, names, datagram).backend == b2


def test_a_closed_tcp_flow_ages_out_after_the_closing_timeout(harness: Harness):
    """After a FIN, the entry is trusted for 10 s (10 ticks) of silence, not 15 min: then its tuple picks again
    (here: its removed backend is not picked)."""
    names = expression_names(harness.lab)
    vip = f"{harness.lab.vip(2)}:98/tcp"
    b1, b2 = vip_on_first_backend(harness, vip, 9898)
    segment = "Ether(src=CLIENT_MAC, dst=LB_CLIENT_MAC)/IP(src=CLIENT, dst=VIP2)/TCP(sport=40201, dport=98, flags='{}')"
    for flags in ("S", "A"):
        assert send(harness, names, segment.format(flags)).backend == b1
    run_lbctl(harness.lab.lb_ns, "add-backend", vip, f"{harness.lab.backends[1].address}:9898")
    run_lbctl(harness.lab.lb_ns, "remove-backend", vip, f"{harness.lab.backends[0].address}:9898")
    harness.resnapshot()
    advance_clock(harness, 300)
    assert send(harness, names, segment.format("A")).backend == b1  # established, 300 ticks idle: goes on
    assert send(harness, names, segment.format("FA")).backend == b1
    advance_clock(harness, 5)
    assert send(harness, names, segment.format("A")).backend == b1  # the last ACK, within 10 s
    advance_clock(harness, 11)
    assert send(harness, names, segment.format("A")).backend == b2  # closed and idle: picks again


def test_the_address_filter_is_kept_for_the_vips_and_backends_the_maps_name(harness: Harness):
    """Every VIP's and NAT backend's bucket is open (the fixtures above pass through it), and
    the buckets no address uses let a packet skip the lookups (the point of the filter)."""
    from lb import addrfilter
    from lb.structs import ADDR_FILTER_SIZE, FILTER_NO_BACKEND, FILTER_NO_VIP

    words = harness.maps.addr_filter.read_range(0, ADDR_FILTER_SIZE)
    vips = [bytes(k) for k in harness.maps.vip_addrs.keys()]
    backends = [bytes(k.addr) for k in harness.maps.reply_sources.keys()]
    assert vips and backends
    assert not any(words[addrfilter.bucket(a)] & FILTER_NO_VIP for a in vips)
    assert not any(words[addrfilter.bucket(a)] & FILTER_NO_BACKEND for a in backends)
    assert sum(w == FILTER_NO_VIP | FILTER_NO_BACKEND for w in words) >= ADDR_FILTER_SIZE - len(vips) - len(backends)


def test_every_vip_of_one_port_has_its_slot_unless_it_shares_it(harness: Harness):
    """The fixtures above found their VIPs through vip_slots (or the vips map, for a shared slot)."""
    from lb import addrfilter
    from lb.structs import VIP_SLOTS

    slots = harness.maps.vip_slots.read_range(0, VIP_SLOTS)
    keyed = [(bytes(k.addr), k.port, k.proto, v.id) for k, v in harness.maps.vips.items()]
    assert keyed and slots == addrfilter.slots(keyed)
    assert any(slots[addrfilter.vip_slot(a, p, proto)] == vid + 1 for a, p, proto, vid in keyed if p)


def test_full_nat_backends_keep_their_address_filter_bucket_open(harness: Harness):
    """A reply to a full-NAT source comes from the flow's backend: the data plane looks it up only
    if the backend's bucket may hold a backend, so every full-NAT backend's must say so."""
    from lb import addrfilter
    from lb.structs import ADDR_FILTER_SIZE, BACKEND_IN_USE, FILTER_NO_BACKEND, MODE_FULLNAT, VIP_ACTIVE

    words = harness.maps.addr_filter.read_range(0, ADDR_FILTER_SIZE)
    fullnat = {k.value for k, v in harness.maps.vip_meta.items() if v.flags & VIP_ACTIVE and v.mode == MODE_FULLNAT}
    backends = [bytes(b.addr) for _, b in harness.maps.backends.items()
                if b.flags & BACKEND_IN_USE and b.vip_id in fullnat]
    assert backends  # the fixtures' lab has full-NAT VIPs
    assert not any(words[addrfilter.bucket(a)] & FILTER_NO_BACKEND for a in backends)
