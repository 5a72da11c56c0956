"""The declarative configuration: parsing (errors name the line), export and apply, plans.

The first tests need no lab; the rest apply files to a real data plane and
compare maps and stored state before and after."""
from __future__ import annotations

import copy
import hashlib
from collections import Counter
from pathlib import Path

import pytest

from control import config
from control.errors import InputError
from control.model import DataPlaneState, State
from control.reconcile import maglev_table
from lb.maps import DataPlaneMaps
from netns.traffic import http_get
from tests.conftest import backend_name, lbctl

RING = 251  # a small prime keeps the pure tests fast
EXAMPLE = Path(__file__).parent.parent / "examples" / "lb.yaml"

GOOD = """\
vips:
  - vip: 198.19.0.1:80/tcp
    mode: nat
    hash: flow
    health: {kind: http, path: /healthz, expect_status: 204, interval: 500ms, timeout: 200ms, rise: 2, fall: 3}
    acl:
      192.0.2.0/24: deny
    backends:
      - address: 198.18.1.2:8080
        weight: 2
      - 198.18.2.2:8080
  - vip: "[2001:db8::1]:53/udp"
    backends: [{address: "[2001:db8:1::2]", weight: 1}]
"""


def empty_state() -> State:
    return State(DataPlaneState([], "/nonexistent", 0, {"ring_size": RING, "max_vips": 16, "max_backends": 64}))


def applied(text: str, state: State | None = None) -> State:
    state = copy.deepcopy(state) if state is not None else empty_state()
    config.merge(state, config.parse(text), now=1.0)
    return state


def test_a_good_file_parses_into_what_it_says():
    parsed = config.parse(GOOD)
    first, second = parsed.vips
    assert str(first.vip) == "198.19.0.1:80/tcp" and first.hash == "flow"
    assert (first.health.kind, first.health.path, first.health.expect_status) == ("http", "/healthz", 204)
    assert (first.health.interval, first.health.timeout, first.health.rise, first.health.fall) == (0.5, 0.2, 2, 3)
    assert first.acl == {"192.0.2.0/24": "deny"}
    assert [(str(b.address), b.weight) for b in first.backends] == [("198.18.1.2:8080", 2), ("198.18.2.2:8080", 1)]
    assert [(str(b.address), b.weight) for b in second.backends] == [("[2001:db8:1::2]:53", 1)]


def test_the_shipped_example_parses():
    assert config.parse(EXAMPLE.read_text(), str(EXAMPLE)).vips


BAD = [
    ("vips:\n  - vip: 198.19.0.1:80/tcp\n    backends:\n      - address: 198.18.1.300\n", 4, "not an IP address"),
    ("vips:\n  - vip: 198.19.0.1:80/tcp\n    mode: teleport\n", 3, "unknown mode 'teleport'"),
    ("vips:\n  - vip: 198.19.0.1:80/tcp\n    mode: dsr\n    backends:\n      - 198.18.1.2:8080\n", 5,
     "in dsr mode, which cannot change the port"),
    ("vips:\n  - vip: 198.19.0.1:80/tcp\n    colour: blue\n", 3, "unknown key 'colour'"),
    ("vips:\n  - vip: 198.19.0.1:80/tcp\n    all_down: ajar\n", 3, "unknown all_down 'ajar'"),
    ("vips:\n  - vip: 198.19.0.1:80/tcp\n  - vip: 198.19.0.1:80/tcp\n", 3, "listed twice (first on line 2)"),
    ("vips:\n  - vip: 198.19.0.1:80/tcp\n    backends:\n      - 198.18.1.2:8080\n      - 198.18.1.2:8080\n",
     5, "listed twice"),
    ("vips:\n  - vip: 198.19.0.1:80/tcp\n    backends:\n      - {address: 198.18.1.2, weight: 70000}\n",
     4, "weight must be a whole number 0-65535"),
    ("vips:\n  - vip: 198.19.0.1:80/tcp\n    backends:\n      - {address: 198.18.1.2, weight: \"\u00b2\"}\n",
     4, "weight must be a whole number 0-65535, got '\u00b2'"),
    ("vips:\n  - vip: 198.19.0.1:80/tcp\n    health: {kind: tcp, interval: \u0662s}\n", 3, "not a duration"),
    ("vips:\n  - vip: 198.19.0.1:80/tcp\n    backends:\n      - \"[2001:db8::2]:80\"\n", 4, "different IP versions"),
    ("vips:\n  - vip: 198.19.0.1:80/tcp\n    health:\n      kind: tcp\n      timeout: 5s\n", 5, "at most the interval"),
    ("vips:\n  - vip: 198.19.0.1:80/tcp\n    health:\n      kind: tcp\n      path: /x\n", 5, "http checks only"),
    ("vips:\n  - vip: 198.19.0.1:80/tcp\n    health:\n      kind: ping\n", 4, "unknown health check kind"),
    ("vips:\n  - vip: 198.19.0.1:80/tcp\n    health: {kind: http, interval: soon}\n", 3, "not a duration"),
    ("vips:\n  - vip: 198.19.0.1:80/tcp\n    health: {kind: tcp, fall: 0}\n", 3, "fall must be a whole number"),
    ("vips:\n  - vip: 198.19.0.1/tcp\n    health: {kind: tcp}\n", 3, "give the health check a port"),
    ("vips:\n  - vip: 198.19.0.1:80/tcp\n    acl: {198.18.0.0/33: deny}\n", 3, "not an address prefix"),
    ("vips:\n  - vip: 198.19.0.1:80/tcp\n    acl: {198.18.0.0/16: maybe}\n", 3, "unknown acl action"),
    ("vips:\n  - vip: 198.19.0.1:80/tcp\n    acl: {198.18.0.0/16: deny, 198.18.0.0/16: allow}\n", 3, "two rules"),
    ("vips:\n  - vip: 198.19.0.1:80/tcp\n    backends: 198.18.1.2\n", 3, "must be a list"),
    ("vips:\n  - mode: nat\n", 2, "needs 'vip'"),
    ("vips:\n  - vip: 198.19.0.1:80/tcp\n    mode: [nat]\n", 3, "must be a single value"),
    ("vips:\n  - vip: 198.19.0.1:80/tcp\n    hash: flow\n    hash: source\n", 4, "given twice"),
    ("vips:\n  - vip: 198.19.0.1:80/tcp\n   backends: []\n", 3, "not valid YAML"),
    ("vips:\n  - vip: 198.19.0.1:80/tcp\n\tmode: nat\n", 3, "not valid YAML"),
    ("- 198.19.0.1:80/tcp\n", 1, "the file must be a mapping"),
    ("# nothing\n", 1, "the file is empty"),
    ("vipz: []\n", 1, "unknown key 'vipz'"),
    ("vips: []\npass_unserved: [198.19.0.1, 224.0.0.1]\n", 2, "cannot be a VIP's address: it is a multicast"),
    ("vips: []\npass_unserved:\n  - 198.19.0.1\n  - 198.19.0.1\n", 4, "listed twice in pass_unserved"),
    ("vips: []\npass_unserved: 198.19.0.1\n", 2, "pass_unserved must be a list"),
    ("vips:\n  - vip: 127.0.0.1:80/tcp\n", 2, "127.0.0.1 cannot be a VIP: it is a loopback address"),
    ("vips:\n  - vip: \"[::ffff:198.19.0.1]:80/tcp\"\n", 2, "cannot be a VIP: it is an IPv4-mapped"),
    ("vips:\n  - vip: 198.19.0.1:80/tcp\n    backends:\n      - 255.255.255.255\n", 4,
     "cannot be a backend: it is the broadcast address"),
    ("vips:\n  - vip: 198.19.0.1:80/tcp\n    backends:\n      - {address: 169.254.0.7}\n", 4,
     "cannot be a backend: it is a link-local address"),
    ("vips:\n  - vip: \"[2001:db8::1]:80/tcp\"\n    backends: [\"[ff05::2]\"]\n", 3,
     "cannot be a backend: it is a multicast address"),
    # a backend that is a VIP, listed before or after that VIP
    ("vips:\n  - vip: 198.19.0.1:80/tcp\n    backends:\n      - 198.19.0.2\n  - vip: 198.19.0.2:53/udp\n", 4,
     "backend 198.19.0.2:80: its address is a VIP's address"),
    ("vips:\n  - vip: 198.19.0.2:53/udp\n  - vip: 198.19.0.1:80/tcp\n    backends: [198.19.0.1:8080]\n", 4,
     "backend 198.19.0.1:8080: its address is a VIP's address"),
]


@pytest.mark.parametrize("text,line,reason", BAD, ids=[b[2] for b in BAD])
def test_a_bad_file_is_refused_with_its_line_and_reason(text, line, reason):
    with pytest.raises(InputError) as e:
        config.parse(text, "lb.yaml")
    assert str(e.value).startswith(f"lb.yaml:{line}: "), str(e.value)
    assert reason in str(e.value)


def test_export_then_apply_plans_no_change():
    state = applied(GOOD)
    exported = config.to_yaml(config.config_of(state))
    again = applied(exported, state)
    assert config.plan(state, again, RING)["empty"]
    assert config.to_yaml(config.config_of(again)) == exported


def test_all_down_is_per_vip_fails_open_by_default_and_round_trips():
    state = applied(GOOD.replace("    hash: flow\n", "    hash: flow\n    all_down: closed\n"))
    assert [v.all_down for v in state.vips] == ["closed", "open"]
    exported = config.to_yaml(config.config_of(state))
    assert exported.count("all_down: closed") == 1 and "all_down: open" not in exported
    assert config.plan(state, applied(exported, state), RING)["empty"]
    (changed,) = config.plan(state, applied(GOOD, state), RING)["changed"]
    assert changed["settings"] == ["all_down: closed -> open"]


def test_addresses_passing_unserved_traffic_round_trip_and_are_planned():
    text = GOOD + "pass_unserved: [198.19.0.1, '2001:db8::1']\n"
    state = applied(text)
    assert {str(a) for a in state.pass_unserved} == {"198.19.0.1", "2001:db8::1"}
    exported = config.to_yaml(config.config_of(state))
    assert "pass_unserved:\n- 198.19.0.1\n- 2001:db8::1\n" in exported
    assert config.plan(state, applied(exported, state), RING)["empty"]
    dropped = applied(GOOD, state)
    plan = config.plan(state, dropped, RING)
    assert not plan["empty"] and plan["unserved"] == {"pass": [], "drop": ["198.19.0.1", "2001:db8::1"]}


def test_apply_keeps_the_ids_of_what_stays_and_retires_what_goes():
    before = applied(GOOD)
    vip = before.vips[0]
    ids = {str(b.address): b.id for b in vip.backends}
    after = applied(GOOD.replace("      - 198.18.2.2:8080\n", "      - 198.18.3.2:8080\n"), before)
    v = after.vip(vip.vip)
    assert v.id == vip.id
    kept = {str(b.address): b for b in v.backends}
    assert kept["198.18.1.2:8080"].id == ids["198.18.1.2:8080"]
    assert not kept["198.18.2.2:8080"].active  # retired, as remove-backend does: its flows go on
    assert kept["198.18.3.2:8080"].id not in ids.values()
    back = applied(GOOD, after)  # the retired backend returns with its old id
    assert back.vip(vip.vip).backend(kept["198.18.2.2:8080"].address).id == ids["198.18.2.2:8080"]


def test_apply_gives_new_backends_no_id_of_a_vip_removed_in_the_same_change():
    before = applied("vips:\n  - vip: 198.19.0.1:80/tcp\n    backends: [198.18.1.2:8080, 198.18.2.2:8080]\n")
    gone = {b.id for b in before.vips[0].backends}
    after = applied("vips:\n  - vip: 198.19.0.2:80/tcp\n    backends: [198.18.3.2:8080]\n", before)
    (new,) = after.vips[0].backends
    assert new.id not in gone  # it would inherit the removed backend's counters and connection-table entries


def test_plan_names_what_is_added_removed_and_changed():
    before = applied(GOOD)
    text = GOOD.replace("weight: 2", "weight: 3").replace("hash: flow", "hash: source") \
        .replace("      - 198.18.2.2:8080\n", "      - 198.18.3.2:8080\n") \
        .replace('  - vip: "[2001:db8::1]:53/udp"', '  - vip: "[2001:db8::9]:53/udp"')
    p = config.plan(before, applied(text, before), RING)
    assert [v["vip"] for v in p["added"]] == ["[2001:db8::9]:53/udp"]
    assert p["removed"] == ["[2001:db8::1]:53/udp"]
    (changed,) = p["changed"]
    assert changed["settings"] == ["hash: flow -> source"] and changed["rehash"]
    assert changed["backends"] == {"added": [{"backend": "198.18.3.2:8080", "weight": 1}],
                                   "removed": ["198.18.2.2:8080"],
                                   "weights": [{"backend": "198.18.1.2:8080", "from": 2, "to": 3}]}


def test_plan_share_of_moved_slots_is_the_real_table_difference():
    before = applied(GOOD)
    after = applied(GOOD.replace("weight: 2", "weight: 1"), before)
    (changed,) = config.plan(before, after, RING)["changed"]
    old, new = maglev_table(before.vips[0], RING), maglev_table(after.vips[0], RING)
    moved = sum(a != b for a, b in zip(old, new))
    assert 0 < moved < RING
    assert changed["slots_moved"] == moved and changed["share_moved"] == moved / RING
    assert not changed["rehash"]


def test_a_mode_change_is_planned_as_breaking_every_connection():
    from control.cli import format_plan
    text = "vips:\n  - vip: 198.19.0.1:80/tcp\n    mode: nat\n    backends: [198.18.1.2, 198.18.2.2]\n"
    before = applied(text)
    after = applied(text.replace("mode: nat", "mode: tunnel"), before)
    (changed,) = config.plan(before, after, RING)["changed"]
    assert changed["slots_moved"] == 0  # the table is the same, yet no established flow survives
    assert changed["disruptive"] and changed["share_moved"] == 1.0
    printed = format_plan({"dry_run": True, **config.plan(before, after, RING)})
    assert "ESTABLISHED CONNECTIONS BREAK" in printed and "mode: nat -> tunnel" in printed
    (added,) = config.plan(before, applied(text.replace("]", ", 198.18.3.2]"), before), RING)["changed"]
    assert not added["disruptive"] and 0 < added["share_moved"] < 1


def test_durations_read_and_write_alike():
    for text, seconds in (("2s", 2.0), ("500ms", 0.5), ("1.5", 1.5), ("250 ms", 0.25)):
        assert config.parse_duration(text) == seconds
        assert config.parse_duration(config.format_duration(seconds)) == seconds


# --- with a data plane ------------------------------------------------------------

def maps_digest(pin_dir: str, ring: int, vips: int = 8) -> str:
    digest = hashlib.sha256()
    with DataPlaneMaps.open(pin_dir) as maps:
        for name in ("vips", "vip_addrs", "backends", "reply_sources", "vip_meta", "acl"):
            for key, value in sorted((bytes(k), bytes(v)) for k, v in maps.maps[name].items()):
                digest.update(key + value)
        digest.update(str(maps.maglev.read_range(0, vips * ring)).encode())
    return digest.hexdigest()


def lab_file(lab, tmp_path: Path, text: str) -> str:
    path = tmp_path / "lb.yaml"
    path.write_text(text)
    return str(path)


def lab_config(lab, weights: tuple[int, ...] = (1, 1, 1), extra: str = "") -> str:
    backends = "".join(f"      - address: {b.address}:8080\n        weight: {w}\n"
                       for b, w in zip(lab.backends, weights))
    return f"vips:\n  - vip: {lab.vip(1)}:80/tcp\n    health: {{kind: tcp, interval: 1s}}\n" \
           f"    backends:\n{backends}{extra}"


@pytest.fixture
def clean(lab):
    """Each test starts and ends with no VIPs."""
    run = lbctl(lab)
    yield run
    for v in run("list", "--json").json()["vips"]:
        run("remove-vip", v["vip"])


def snapshot(run) -> tuple[str, str]:
    listed = run("list", "--json").json()
    dp = listed["dataplane"]
    return run("export").stdout, maps_digest(dp["pin_dir"], dp["ring_size"])


def test_apply_makes_the_running_state_the_file_and_traffic_follows(lab, servers, clean, tmp_path):
    run = clean
    path = lab_file(lab, tmp_path, lab_config(lab))
    out = run("apply", "-f", path).stdout
    assert f"+ VIP {lab.vip(1)}:80/tcp" in out and "applied" in out
    served = Counter(http_get(lab.client.ns, str(lab.vip(1)), 80) for _ in range(30))
    assert set(served) == {backend_name(b.ns) for b in lab.backends}
    assert config.parse(run("export").stdout).vips == config.parse(lab_config(lab)).vips
    # export -> apply is a no-op plan, and applies nothing
    exported = lab_file(lab, tmp_path, run("export").stdout)
    assert run("apply", "-f", exported, "--dry-run").stdout.strip() == "no changes (dry run)"
    assert run("apply", "-f", exported, "--json").json()["empty"]


def test_dry_run_prints_the_plan_and_changes_nothing(lab, clean, tmp_path):
    run = clean
    run("apply", "-f", lab_file(lab, tmp_path, lab_config(lab)))
    before = snapshot(run)
    changed = lab_config(lab, (1, 1, 0), extra=f"  - vip: {lab.vip(2)}:80/tcp\n")
    plan = run("apply", "-f", lab_file(lab, tmp_path, changed), "--dry-run", "--json").json()
    assert plan["dry_run"] and [v["vip"] for v in plan["added"]] == [f"{lab.vip(2)}:80/tcp"]
    assert 0.2 < plan["changed"][0]["share_moved"] < 0.5  # one backend of three leaves
    assert snapshot(run) == before


def test_the_plans_slot_share_matches_the_maglev_map_diff(lab, clean, tmp_path):
    run = clean
    run("apply", "-f", lab_file(lab, tmp_path, lab_config(lab)))
    dp = run("list", "--json").json()["dataplane"]

    def table() -> list[int]:
        with DataPlaneMaps.open(dp["pin_dir"]) as maps:
            (info,) = (info for _, info in maps.vips.items())  # the only VIP
            return maps.maglev.read_range(info.ring_base, info.ring_size)

    old = table()
    path = lab_file(lab, tmp_path, lab_config(lab, (2, 1, 1)))
    planned = run("apply", "-f", path, "--dry-run", "--json").json()["changed"][0]
    run("apply", "-f", path)
    new = table()
    moved = sum(a != b for a, b in zip(old, new))
    assert len(old) == len(new) and moved > 0
    assert planned["slots_moved"] == moved and planned["share_moved"] == moved / len(new)


def test_an_invalid_file_changes_nothing(lab, clean, tmp_path):
    run = clean
    run("apply", "-f", lab_file(lab, tmp_path, lab_config(lab)))
    before = snapshot(run)
    # valid up to the last line: nothing of it may be applied
    bad = lab_config(lab, (2, 2, 2), extra=f"  - vip: {lab.vip(2)}:80/tcp\n    mode: teleport\n")
    result = run("apply", "-f", lab_file(lab, tmp_path, bad), check=False)
    assert result.returncode == 2 and result.stdout == ""
    assert result.stderr.strip().endswith("unknown mode 'teleport' (expected one of: nat, dsr, tunnel, fullnat)")
    assert f"lb.yaml:{bad.count(chr(10))}:" in result.stderr
    assert snapshot(run) == before


def test_set_weight_undoes_a_drain_and_status_shows_removed_backends_with_flows(lab, servers, clean, tmp_path):
    run = clean
    run("apply", "-f", lab_file(lab, tmp_path, lab_config(lab)))
    vip, b1 = f"{lab.vip(1)}:80/tcp", f"{lab.backends[0].address}:8080"

    def served() -> Counter:
        return Counter(http_get(lab.client.ns, str(lab.vip(1)), 80) for _ in range(30))

    run("drain", vip, b1)
    assert "b1" not in served()
    out = run("set-weight", vip, b1, "2").stdout
    assert out.strip() == f"backend {b1} of {vip}: weight 0 -> 2"
    assert served()["b1"] > 0  # back in the Maglev table: new connections reach it again

    run("remove-backend", vip, b1)  # its flows stay in the connection table until they age out
    (shown,) = [b for v in run("status", "--json").json()["vips"] for b in v["backends"] if b["backend"] == b1]
    assert shown["health"] == "removed" and shown["connections"] > 0 and not shown["serving"]
    assert "removed" in run("status").stdout
