"""The fixture table (tests/fixtures/packets.toml) through the BPF program and the reference model."""
from __future__ import annotations

from typing import Iterator

import pytest

from tests.harness import Harness, agree, configured_harness, disagreement, evaluate, expression_names, load_fixtures

FIXTURES = load_fixtures()


@pytest.fixture(scope="module")
def harness() -> Iterator[Harness]:
    with configured_harness(FIXTURES["config"]) as h:
        yield h


@pytest.mark.parametrize("case", FIXTURES["case"], ids=[c["name"] for c in FIXTURES["case"]])
def test_fixture(harness: Harness, case: dict):
    names = expression_names(harness.lab)
    for setup in case.get("setup", []):
        actual, expected = harness.run(evaluate(setup, names), case["ingress"])
        assert agree(actual, expected), disagreement(evaluate(setup, names), actual, expected)
    frame = bytes.fromhex(case["hex"]) if "hex" in case else evaluate(case["packet"], names)

    actual, expected = harness.run(frame, case["ingress"])

    assert agree(actual, expected), disagreement(frame, actual, expected)
    assert actual.action == case["action"]
    assert actual.reason == case["reason"]
    want = frame if case["output"] == "unchanged" else evaluate(case["output"], names)
    assert actual.packet.hex() == want.hex()


def test_fixture_table_covers_every_reason_it_can_reach_today():
    reasons = {c["reason"] for c in FIXTURES["case"]}
    assert {"fwd_nat", "fwd_reply", "pass_not_ip", "pass_not_vip", "pass_ip_options", "pass_fragment",
            "pass_unsupported_l4", "pass_malformed", "drop_no_backend"} <= reasons
