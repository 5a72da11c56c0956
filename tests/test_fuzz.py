"""Differential fuzzing: random and mutated packets through the BPF program and the reference model.

They must agree on every packet (action, output bytes, reason, backend), and the
program must never abort. The budget is LB_FUZZ_EXAMPLES packets (5,000 in
`make test`, 100,000 in `make fuzz`)."""
from __future__ import annotations

import os
from typing import Iterator

import pytest
from hypothesis import HealthCheck, example, given, settings
from hypothesis import strategies as st
from scapy.layers.inet import ICMP, IP, TCP, UDP, IPOption_NOP
from scapy.layers.inet6 import ICMPv6PacketTooBig, ICMPv6Unknown, IPv6, IPv6ExtHdrFragment, IPv6ExtHdrHopByHop
from scapy.layers.l2 import Dot1Q, Ether
from scapy.packet import Raw

from tests.harness import Harness, agree, configured_harness, disagreement

EXAMPLES = int(os.environ.get("LB_FUZZ_EXAMPLES", "5000"))
CONFIG = {"vips": [
    {"vip": "198.19.0.1:80/tcp", "backends": ["198.18.1.2:8080", "198.18.2.2:8080"]},
    {"vip": "198.19.0.1:53/udp", "backends": ["198.18.1.2:5353", "198.18.2.2:5353"]},
    {"vip": "198.19.0.2:80/tcp", "backends": []},
    {"vip": "198.19.0.3:80/tcp", "backends": ["198.18.2.2:8080"]},  # b2:8080 serves two VIPs
    {"vip": "198.19.0.4/tcp", "backends": ["198.18.1.2", "198.18.2.2"]},  # every port
    {"vip": "198.19.0.5:53/udp", "backends": ["198.18.1.2:5353", "198.18.2.2:5353"], "hash": "source"},
    {"vip": "[2001:2:0:ff::1]:80/tcp", "backends": ["[2001:2:0:1::2]:8080", "[2001:2:0:2::2]:8080"]},
    {"vip": "[2001:2:0:ff::1]:53/udp", "backends": ["[2001:2:0:1::2]:5353"]},
    {"vip": "198.19.0.6:80/tcp", "backends": ["198.18.1.2:8080"],
     "acl": {"198.18.0.0/24": "allow", "198.18.0.2/32": "deny", "198.18.0.7/32": "allow"}},
    # forwarding modes, IPv4 and IPv6 (to-vip packets reach their IPv6 twins too)
    {"vip": "198.19.0.7:80/tcp", "backends": ["198.18.1.2", "198.18.2.2"], "mode": "dsr"},
    {"vip": "198.19.0.8:53/udp", "backends": ["198.18.1.2", "198.18.2.2"], "mode": "tunnel"},
    {"vip": "198.19.0.10/tcp", "backends": ["198.18.1.2", "198.18.2.2"], "mode": "tunnel"},  # every port
    {"vip": "[2001:2:0:ff::7]:80/tcp", "backends": ["[2001:2:0:1::2]", "[2001:2:0:2::2]"], "mode": "dsr"},
    {"vip": "[2001:2:0:ff::8]:53/udp", "backends": ["[2001:2:0:1::2]"], "mode": "tunnel"},
    # a dsr backend that never answers ARP/ND: its MAC stays unresolved
    {"vip": "198.19.0.11:80/tcp", "backends": ["198.18.1.99"], "mode": "dsr"},
    {"vip": "[2001:2:0:ff::b]:80/tcp", "backends": ["[2001:2:0:1::99]"], "mode": "dsr"},
    # changed between packets by test_program_and_model_agree_across_changes_and_time
    {"vip": "198.19.0.12:80/tcp", "backends": ["198.18.1.2:8080"]},
    {"vip": "198.19.0.12:53/udp", "backends": ["198.18.1.2:5353"]},
    # behind a VLAN device (VLANS)
    {"vip": "198.19.0.9:80/tcp", "backends": ["198.18.3.2:8080"]},
    {"vip": "198.19.0.9:53/udp", "backends": ["198.18.3.2:5353"]},
    # full NAT from the LB's address on b1's link, with 8 source ports (exhausted by the fuzzer's clients)
    {"vip": "198.19.0.14:80/tcp", "backends": ["198.18.1.2:8080", "198.18.2.2:8080"], "mode": "fullnat",
     "snat": ["198.18.1.1"]},
    {"vip": "198.19.0.14:53/udp", "backends": ["198.18.1.2:5353"], "mode": "fullnat", "snat": ["198.18.1.1"]},
    {"vip": "[2001:2:0:ff::e]:80/tcp", "backends": ["[2001:2:0:1::2]:8080"], "mode": "fullnat",
     "snat": ["2001:2:0:1::1"]},
    # changed between packets, full NAT
    {"vip": "198.19.0.15:80/tcp", "backends": ["198.18.1.2:8080"], "mode": "fullnat", "snat": ["198.18.1.1"]},
],
    "snat_ports": "40000-40007",
    # what no VIP of these addresses serves goes to the host (other VIP addresses': dropped)
    "pass_unserved": ["198.19.0.5", "2001:2:0:ff::1"]}
SEEN: set[str] = set()  # reasons reached, to check the fuzzer explores
ICMP_ERROR_MODES: set[str] = set()  # the ways forwarded ICMP errors went
VLAN_CHANGES: set[str] = set()  # what forwarding did to 802.1Q tags
# b3's interface (lb is not attached to it) taken for a VLAN device on b1's (this kernel has none):
# packets for b3 leave by b1, tagged
VLANS = {"b3": ["b1", 300]}


@pytest.fixture(scope="module")
def harness() -> Iterator[Harness]:
    with configured_harness(CONFIG) as h:
        h.set_egress_vlans(VLANS)
        yield h


def as_ipv6(v4: str) -> str:
    """The lab's IPv6 twin of an IPv4 address: 198.18.N.H -> 2001:2:0:N::H, 198.19.0.H -> 2001:2:0:ff::H."""
    a, b, n, h = (int(x) for x in v4.split("."))
    return f"2001:2:0:{n:x}::{h:x}" if (a, b) == (198, 18) else f"2001:2:0:ff::{h:x}"


addresses = st.sampled_from(["198.18.0.2", "198.18.1.2", "198.18.2.2", "198.19.0.1", "198.19.0.2", "198.19.0.9"])
ports = st.one_of(st.sampled_from([80, 53, 8080, 5353, 81]), st.integers(1, 65535))


@st.composite
def packets(draw) -> tuple[list[bytes], str]:
    """A packet to a VIP, a backend's reply, or anything else; then maybe mutated. (Sometimes
    preceded by the packet that opens the flow it is about.)"""
    scenario = draw(st.sampled_from(["to-vip", "to-vip", "icmp-error", "reply", "random"]))
    error = scenario == "icmp-error"  # a "too big" to a VIP about a flow opened just before: every VIP's mode
    scenario = "to-vip" if error else scenario
    client_ports = st.integers(40000, 40031)  # a small range: repeats and replies hit existing flows
    proto = "icmp" if error else draw(st.sampled_from(["tcp", "udp", "udp0", "icmp", "other"]))
    quoted = draw(st.sampled_from(["tcp", "udp"])) if proto == "icmp" else proto  # what an ICMP error quotes
    service_port = 80 if quoted == "tcp" else 53
    if scenario == "to-vip":
        src = draw(st.sampled_from(["198.18.0.2", "198.18.0.7"]))
        dst = draw(st.sampled_from(["198.19.0.1", "198.19.0.2", "198.19.0.3", "198.19.0.4", "198.19.0.5",
                                    "198.19.0.6", "198.19.0.7", "198.19.0.8", "198.19.0.9", "198.19.0.10",
                                    "198.19.0.11", "198.19.0.14", "198.19.0.14", "198.19.0.14"]))
        sport, dport = draw(client_ports), draw(st.sampled_from([service_port, service_port, 81, 2222]))
        ingress = "client"
    elif scenario == "reply":
        b = draw(st.sampled_from([1, 2]))
        src, dst = f"198.18.{b}.2", draw(st.sampled_from(["198.18.0.2", "198.18.0.2", "198.18.1.1"]))
        sport = draw(st.sampled_from([8080 if proto == "tcp" else 5353, 22, 2222]))
        # to the client (NAT), or to a full-NAT source port
        dport = draw(client_ports) if dst == "198.18.0.2" else draw(st.integers(40000, 40007))
        ingress = f"b{b}"
    else:
        src, dst, sport, dport = draw(addresses), draw(addresses), draw(ports), draw(ports)
        ingress = draw(st.sampled_from(["client", "b1", "b2"]))
    v6 = draw(st.integers(0, 3)) == 0
    if v6:  # the same scenario on the IPv6 side of the lab, or with IPv4-mapped addresses, which are never IPv4's
        mapped = draw(st.sampled_from(["none", "none", "none", "src", "dst", "both"]))
        src = f"::ffff:{src}" if mapped in ("src", "both") else as_ipv6(src)
        dst = f"::ffff:{dst}" if mapped in ("dst", "both") else as_ipv6(dst)
        ip = IPv6(src=src, dst=dst, hlim=draw(st.integers(1, 255)))
        if draw(st.integers(0, 15)) == 0:
            ip = ip / draw(st.sampled_from([IPv6ExtHdrFragment(m=1), IPv6ExtHdrHopByHop()]))
    else:
        ip = IP(src=src, dst=dst, ttl=draw(st.integers(1, 255)), id=draw(st.integers(0, 65535)))
        if draw(st.integers(0, 15)) == 0:
            ip.options = [IPOption_NOP()] * 4
        if draw(st.integers(0, 15)) == 0:
            ip.flags, ip.frag = draw(st.sampled_from([("MF", 0), (0, 64), ("MF", 8)]))
    icmp_type = "too-big" if error else draw(st.sampled_from([8, 8, 0, 3, 13, "too-big"] if not v6 else
                                                             [128, 128, 129, 1, 135, "too-big"]))
    l4 = {"tcp": lambda: TCP(sport=sport, dport=dport, flags=draw(st.sampled_from(["S", "A", "PA", "FA", "R"]))),
          "udp": lambda: UDP(sport=sport, dport=dport),
          "udp0": lambda: UDP(sport=sport, dport=dport, chksum=0),
          "icmp": lambda: (too_big(draw, v6, src, dst, sport, dport, quoted) if icmp_type == "too-big" else
                           ICMPv6Unknown(type=icmp_type) if v6 else ICMP(type=icmp_type, id=draw(st.integers(0, 65535)))),
          "other": lambda: Raw(b"\x00" * 8)}[proto]()
    if proto == "other":
        other = draw(st.sampled_from([47, 132, 50]))
        if v6:
            ip.lastlayer().nh = other
        else:
            ip.proto = other
    eth = Ether(src="02:00:00:00:00:02", dst="02:00:00:00:00:01")
    frame = eth / (Dot1Q(vlan=draw(st.integers(1, 4094))) / ip if draw(st.integers(0, 7)) == 0 else ip)
    data = bytearray(bytes(frame / l4 / Raw(draw(st.binary(max_size=64)))))
    if draw(st.integers(0, 7)) == 0:  # mutate a few bytes anywhere
        for _ in range(draw(st.integers(1, 3))):
            data[draw(st.integers(0, len(data) - 1))] = draw(st.integers(0, 255))
    if draw(st.integers(0, 15)) == 0:
        data = data[:draw(st.integers(14, len(data)))]
    opener = []  # an ICMP error to a VIP often quotes a flow opened just before
    if scenario == "to-vip" and icmp_type == "too-big" and (error or draw(st.booleans())):
        ip_hdr = IPv6(src=src, dst=dst) if v6 else IP(src=src, dst=dst)
        if quoted == "tcp":  # a SYN opens no entry: the handshake's next packet does
            opener = [bytes(eth / ip_hdr / TCP(sport=sport, dport=dport, flags=f)) for f in ("S", "A")]
        else:
            opener = [bytes(eth / ip_hdr / UDP(sport=sport, dport=dport))]
    return [*opener, bytes(data)], ingress


def too_big(draw, v6: bool, src: str, dst: str, sport: int, dport: int, quoted: str):
    """ICMP "fragmentation needed" / ICMPv6 "packet too big" to dst, quoting the reply dst -> src
    of the flow src -> dst (so it can name a flow the fuzzer opened)."""
    l4 = (TCP(sport=dport, dport=sport, flags="A") if quoted == "tcp" else UDP(sport=dport, dport=sport))
    l4.chksum = draw(st.integers(0, 65535))
    if v6:
        return ICMPv6PacketTooBig(mtu=draw(st.integers(1280, 1500))) / IPv6(src=dst, dst=src) / l4
    quote = IP(src=dst, dst=src, flags="DF")
    if draw(st.integers(0, 15)) == 0:
        quote.options = [IPOption_NOP()] * 4
    return ICMP(type=3, code=4, nexthopmtu=draw(st.integers(68, 1500))) / quote / l4


@settings(max_examples=EXAMPLES, deadline=None, database=None,
          suppress_health_check=[HealthCheck.too_slow, HealthCheck.function_scoped_fixture])
@given(packets())
def test_program_and_model_agree_on_any_packet(harness: Harness, packet):
    frames, ingress = packet
    for frame in frames:
        actual, expected = harness.run(frame, ingress)
        assert actual.action != "XDP_ABORTED"
        assert agree(actual, expected), disagreement(frame, actual, expected)
        SEEN.add(actual.reason)
        if actual.reason == "fwd_icmp_error":
            ICMP_ERROR_MODES.add(icmp_error_mode(frame, actual.packet))
        if actual.action in ("XDP_TX", "XDP_REDIRECT"):
            VLAN_CHANGES.add(vlan_change(frame, actual.packet))


def icmp_error_mode(before: bytes, after: bytes) -> str:
    """How a forwarded ICMP error went: encapsulated, to the VIP unchanged (dsr), or rewritten (nat)."""
    if len(after) > len(before):
        return "tunnel"
    return "dsr" if after[12:] == before[12:] else "nat"


def vlan_change(before: bytes, after: bytes) -> str:
    tagged_before, tagged_after = (int.from_bytes(f[12:14], "big") == 0x8100 for f in (before, after))
    return {(False, False): "untagged", (False, True): "pushed", (True, True): "replaced",
            (True, False): "stripped"}[(tagged_before, tagged_after)]


# --- configuration and time between packets ----------------------------------------------------
CHANGE_EXAMPLES = int(os.environ.get("LB_FUZZ_CHANGE_EXAMPLES", "40"))
CHANGE_VIPS = ("198.19.0.12:80/tcp", "198.19.0.12:53/udp", "198.19.0.15:80/tcp")
CHANGE_BACKENDS = {"198.19.0.12:80/tcp": 8080, "198.19.0.12:53/udp": 5353, "198.19.0.15:80/tcp": 8080}
SHARING_VIP = {"198.19.0.12:80/tcp": "198.19.0.13:80/tcp", "198.19.0.12:53/udp": "198.19.0.13:53/udp",
               "198.19.0.15:80/tcp": "198.19.0.16:80/tcp"}
FULLNAT_ADD = {"198.19.0.15:80/tcp": ["--mode", "fullnat", "--snat", "198.18.1.1"],
               "198.19.0.16:80/tcp": ["--mode", "fullnat", "--snat", "198.18.1.1"]}  # how add-vip re-creates them


@st.composite
def changes(draw, vip: str) -> list[str]:
    """An lbctl command that changes the VIP: its backends come and go, drain and return, the VIP
    is re-created (its ids freed and reused) or its backends' endpoints get shared with another VIP."""
    port = CHANGE_BACKENDS[vip]
    b = f"198.18.{draw(st.sampled_from([1, 2]))}.2:{port}"
    return draw(st.sampled_from([
        ["add-backend", vip, b], ["remove-backend", vip, b], ["drain", vip, b], ["set-weight", vip, b, "1"],
        ["remove-vip", vip], ["add-vip", vip, *FULLNAT_ADD.get(vip, [])],
        ["add-vip", SHARING_VIP[vip], *FULLNAT_ADD.get(SHARING_VIP[vip], [])], ["add-backend", SHARING_VIP[vip], b],
        ["remove-vip", SHARING_VIP[vip]],
    ]))


@st.composite
def steps(draw) -> list[tuple]:
    """A few packets of a few flows of one VIP, with configuration changes and the clock moving between them."""
    vip = draw(st.sampled_from(CHANGE_VIPS))
    tcp = vip.endswith("/tcp")
    fullnat = vip in FULLNAT_ADD
    vip_address = vip.split(":")[0]
    out = []
    for _ in range(draw(st.integers(2, 10))):
        kind = draw(st.sampled_from(["to-vip", "to-vip", "reply", "change", "clock"]))
        sport = draw(st.integers(41000, 41003))
        if kind == "to-vip":
            l4 = TCP(sport=sport, dport=80, flags=draw(st.sampled_from(["S", "A", "PA", "FA", "R"]))) if tcp \
                else UDP(sport=sport, dport=53)
            frame = Ether(src="02:00:00:00:00:02", dst="02:00:00:00:00:01") / IP(src="198.18.0.2", dst=vip_address) / l4
            out.append(("packet", bytes(frame), "client"))
        elif kind == "reply":
            b = draw(st.sampled_from([1, 2]))
            to, dport = ("198.18.1.1", draw(st.integers(40000, 40007))) if fullnat else ("198.18.0.2", sport)
            l4 = TCP(sport=8080, dport=dport, flags=draw(st.sampled_from(["SA", "A", "FA", "R"]))) if tcp \
                else UDP(sport=5353, dport=dport)
            frame = Ether(src="02:00:00:00:00:02", dst="02:00:00:00:00:01") / IP(src=f"198.18.{b}.2", dst=to) / l4
            out.append(("packet", bytes(frame), f"b{b}"))
        elif kind == "change":
            out.append(("change", draw(changes(vip))))
        else:
            out.append(("clock", draw(st.sampled_from([1, 9, 11, 29, 31, 300, 901]))))
    return out


def fullnat_reply_sequence() -> list[tuple]:
    """A full-NAT flow opened after every earlier flow's entry expired, then b1's replies to each of
    the 8 source ports: one of them is the flow's, so a full-NAT reply is reached whatever the draws."""
    def frame(src: str, dst: str, l4) -> bytes:
        return bytes(Ether(src="02:00:00:00:00:02", dst="02:00:00:00:00:01") / IP(src=src, dst=dst) / l4)
    opened = [("packet", frame("198.18.0.2", "198.19.0.15", TCP(sport=41000, dport=80, flags=f)), "client")
              for f in ("S", "A")]
    replies = [("packet", frame("198.18.1.2", "198.18.1.1", TCP(sport=8080, dport=port, flags="A")), "b1")
               for port in range(40000, 40008)]
    return [("clock", 901), *opened, *replies]


@settings(max_examples=CHANGE_EXAMPLES, deadline=None, database=None,
          suppress_health_check=[HealthCheck.too_slow, HealthCheck.function_scoped_fixture])
@given(steps())
@example(fullnat_reply_sequence())
def test_program_and_model_agree_across_changes_and_time(harness: Harness, sequence):
    from lb.maps import U32
    from tests.conftest import run_lbctl

    for step in sequence:
        if step[0] == "change":
            run_lbctl(harness.lab.lb_ns, *step[1], check=False)  # some do not apply (a backend not there...)
            harness.resnapshot()
        elif step[0] == "clock":
            config = harness.maps.lb_config.get(U32(0))
            config.clock_offset = (config.clock_offset + step[1]) & 0xFFFFFFFF
            harness.maps.lb_config.set(U32(0), config)
            harness.model.t.clock_offset = config.clock_offset
        else:
            _, frame, ingress = step
            actual, expected = harness.run(frame, ingress)
            assert actual.action != "XDP_ABORTED"
            assert agree(actual, expected), disagreement(frame, actual, expected)
            SEEN.add(actual.reason)


# --- eviction: a table far smaller than the flows -----------------------------------------------
EVICTION_EXAMPLES = int(os.environ.get("LB_FUZZ_EVICTION_EXAMPLES", "30"))
SMALL_TABLE = 128
EVICTED = [0]


@pytest.fixture(scope="module")
def small_harness() -> Iterator[Harness]:
    with configured_harness({"vips": CONFIG["vips"][:6]}, conn_table_size=SMALL_TABLE) as h:
        yield h


@st.composite
def many_flows(draw) -> list[tuple[bytes, str]]:
    """Packets of thousands of flows (to VIPs and back from their backends), so the table evicts."""
    out = []
    for _ in range(draw(st.integers(40, 100))):
        sport = draw(st.integers(20000, 23000))
        tcp = draw(st.booleans())
        if draw(st.integers(0, 3)):
            l4 = TCP(sport=sport, dport=80, flags=draw(st.sampled_from(["S", "A", "PA", "FA"]))) if tcp \
                else UDP(sport=sport, dport=53)
            ip = IP(src="198.18.0.2", dst=draw(st.sampled_from(["198.19.0.1", "198.19.0.3", "198.19.0.5"])))
            ingress = "client"
        else:
            b = draw(st.sampled_from([1, 2]))
            l4 = TCP(sport=8080, dport=sport, flags=draw(st.sampled_from(["SA", "A"]))) if tcp \
                else UDP(sport=5353, dport=sport)
            ip, ingress = IP(src=f"198.18.{b}.2", dst="198.18.0.2"), f"b{b}"
        out.append((bytes(Ether(src="02:00:00:00:00:02", dst="02:00:00:00:00:01") / ip / l4), ingress))
    return out


def test_fuzzer_reached_the_main_paths():
    # Runs after the packet test and the changes test, and counts what either reached: a reply to
    # a full-NAT source port is a rare draw of both, so the changes test has it as an explicit example.
    assert {"fwd_nat", "fwd_dsr", "fwd_tunnel", "fwd_reply", "tx_icmp_echo", "pass_not_vip", "drop_no_backend",
            "pass_malformed", "drop_fragment", "drop_unsupported_l4", "fwd_icmp_error", "drop_icmp_no_flow", "drop_neigh_unresolved",
            "drop_unserved", "pass_unserved", "drop_v4_mapped", "pass_v4_mapped", "fwd_fullnat", "fwd_fullnat_reply",
            "drop_snat_exhausted"} <= SEEN, SEEN
    assert ICMP_ERROR_MODES == {"nat", "dsr", "tunnel"}, ICMP_ERROR_MODES
    assert VLAN_CHANGES == {"untagged", "pushed", "replaced", "stripped"}, VLAN_CHANGES


@settings(max_examples=EVICTION_EXAMPLES, deadline=None, database=None,
          suppress_health_check=[HealthCheck.too_slow, HealthCheck.function_scoped_fixture])
@given(many_flows())
def test_program_and_model_agree_when_the_table_evicts(small_harness: Harness, packets):
    for frame, ingress in packets:
        actual, expected = small_harness.run(frame, ingress)
        assert agree(actual, expected), disagreement(frame, actual, expected)
        EVICTED[0] += small_harness.forget_evicted()


def test_the_small_table_did_evict():
    assert EVICTED[0] > 0
