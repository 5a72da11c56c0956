"""The fixture table (tests/fixtures/packets.toml) through the BPF program and the reference model."""
from __future__ import annotations

from typing import Iterator

import pytest
from scapy.layers.l2 import Ether
from scapy.utils import wrpcap

from tests.conftest import run_lbctl
from tests.harness import Harness, agree, configured_harness, disagreement, evaluate, expression_names, load_fixtures

FIXTURES = load_fixtures()


@pytest.fixture(scope="module")
def harness() -> Iterator[Harness]:
    with configured_harness(FIXTURES["config"]) as h:
        yield h


@pytest.mark.parametrize("case", FIXTURES["case"], ids=[c["name"] for c in FIXTURES["case"]])
def test_fixture(harness: Harness, case: dict):
    names = expression_names(harness.lab)
    backends = set()
    for setup in case.get("setup", []):
        actual, expected = harness.run(evaluate(setup, names), case["ingress"])
        assert agree(actual, expected), disagreement(evaluate(setup, names), actual, expected)
        backends.add(actual.backend)
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
            "drop_fragment", "drop_unsupported_l4", "drop_malformed", "drop_acl", "fwd_icmp_error",
            "drop_icmp_no_flow"} <= reasons


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
