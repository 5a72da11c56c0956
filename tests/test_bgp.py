"""Which VIP addresses a node announces over BGP (control/bgp.py), without a speaker: a fake one
records the commands. The cluster lab (tests/test_cluster.py) runs the real ExaBGP and BIRD."""
from __future__ import annotations

import ipaddress

import pytest

from control.bgp import Announcer, BgpOptions
from control.errors import InputError
from control.model import BackendAddress, BackendState, DataPlaneState, State, VipAddress, VipState


class FakeSpeaker:
    def __init__(self) -> None:
        self.commands: list[str] = []

    def announce(self, prefix) -> None:
        self.commands.append(f"announce {prefix}")

    def withdraw(self, prefix) -> None:
        self.commands.append(f"withdraw {prefix}")


class Clock:
    def __init__(self) -> None:
        self.now = 100.0

    def __call__(self) -> float:
        return self.now


def vip(text: str, healthy: list[bool], min_healthy: int = 1, vid: int = 0) -> VipState:
    address = VipAddress.parse(text)
    backends = [BackendState(BackendAddress(ipaddress.ip_address(f"198.18.50.{100 + i}"), address.port), i + 1,
                             healthy=h) for i, h in enumerate(healthy)]
    return VipState(address, vid, "dsr", backends, min_healthy=min_healthy)


def state(*vips: VipState, attached: bool = True) -> State:
    dp = DataPlaneState([], "/sys/fs/bpf/lb/x", 1, {}) if attached else None
    return State(dp, list(vips))


def test_nothing_is_announced_before_the_settle_time():
    speaker, clock = FakeSpeaker(), Clock()
    announcer = Announcer(speaker, settle=5.0, clock=clock)
    s = state(vip("198.19.0.1:80/tcp", [True]))
    assert announcer.update(s) == ([], [])
    clock.now += 5.0
    announcer.update(s)
    assert speaker.commands == ["announce 198.19.0.1/32"]


def test_an_address_is_withdrawn_when_healthy_backends_drop_below_min_healthy():
    speaker = FakeSpeaker()
    announcer = Announcer(speaker, settle=0.0)
    announcer.update(state(vip("198.19.0.1:80/tcp", [True, True], min_healthy=2)))
    announcer.update(state(vip("198.19.0.1:80/tcp", [True, False], min_healthy=2)))
    announcer.update(state(vip("198.19.0.1:80/tcp", [True, True], min_healthy=2)))
    assert speaker.commands == ["announce 198.19.0.1/32", "withdraw 198.19.0.1/32", "announce 198.19.0.1/32"]


def test_failing_open_is_not_ready_and_min_healthy_zero_always_is():
    speaker = FakeSpeaker()
    announcer = Announcer(speaker, settle=0.0)  # no version: both
    announcer.update(state(vip("198.19.0.1:80/tcp", [False, False]),
                           vip("[2001:2:0:ff::1]:80/tcp", [False], min_healthy=0, vid=1)))
    assert speaker.commands == ["announce 2001:2:0:ff::1/128"]


def test_a_session_announces_only_addresses_of_its_own_ip_version():
    speaker = FakeSpeaker()
    announcer = Announcer(speaker, settle=0.0, version=4)
    announcer.update(state(vip("198.19.0.1:80/tcp", [True]), vip("[2001:2:0:ff::1]:80/tcp", [True], vid=1)))
    assert speaker.commands == ["announce 198.19.0.1/32"]


def test_a_full_nat_vip_is_announced_only_while_this_node_has_a_source_address_for_it():
    speaker = FakeSpeaker()
    announcer = Announcer(speaker, settle=0.0)
    v4, v6 = vip("198.19.0.1:80/tcp", [True]), vip("[2001:2:0:ff::1]:80/tcp", [True], vid=1)
    v4.mode = v6.mode = "fullnat"
    announcer.update(state(v4, v6))  # no pool on this node: its new flows would be dropped
    s = state(v4, v6)
    s.snat = {ipaddress.ip_address("198.18.50.31")}  # an IPv4 source: the IPv4 VIP only
    announcer.update(s)
    assert speaker.commands == ["announce 198.19.0.1/32"]


def test_one_ready_vip_keeps_its_address_announced():
    speaker = FakeSpeaker()
    announcer = Announcer(speaker, settle=0.0)
    announcer.update(state(vip("198.19.0.1:80/tcp", [True]), vip("198.19.0.1:443/tcp", [False], vid=1)))
    assert speaker.commands == ["announce 198.19.0.1/32"]


def test_everything_is_withdrawn_when_the_data_plane_goes_or_the_daemon_stops():
    speaker = FakeSpeaker()
    announcer = Announcer(speaker, settle=0.0)
    two = (vip("198.19.0.1:80/tcp", [True]), vip("198.19.0.2:80/tcp", [True], vid=1))
    announcer.update(state(*two))
    announcer.update(state(*two, attached=False))
    announcer.update(state(*two))
    announcer.withdraw_all()
    assert speaker.commands == ["announce 198.19.0.1/32", "announce 198.19.0.2/32",
                                "withdraw 198.19.0.1/32", "withdraw 198.19.0.2/32",
                                "announce 198.19.0.1/32", "announce 198.19.0.2/32",
                                "withdraw 198.19.0.1/32", "withdraw 198.19.0.2/32"]


@pytest.mark.parametrize("args, message", [
    (("10.0.0.1", None, 65000), "--bgp-peer needs --bgp-local-as and --bgp-peer-as"),
    (("10.0.0.1", 0, 65000), "an AS number is 1-4294967295"),
    (("nowhere", 65001, 65000), "--bgp-peer 'nowhere' is not an IP address"),
    (("10.0.0.1", 65001, 65000, "2001:db8::1"), "a router id is written as an IPv4 address"),
    (("10.0.0.1", 65001, 65000, None, None, 1), "--bgp-hold-time 1"),
])
def test_bad_bgp_options_are_refused_with_one_line(args, message):
    with pytest.raises(InputError, match=message.replace("(", r"\(").replace("[", r"\[")):
        BgpOptions.parse(*args)


def test_a_daemon_with_an_ipv4_and_an_ipv6_peer_runs_a_session_each():
    from control.cli import parse_args
    from control.daemon import bgp_sessions

    args = parse_args(["daemon", "--bgp-peer", "198.18.11.1", "--bgp-peer", "fd00:18:11::1", "--bgp-local-as", "65001",
                       "--bgp-peer-as", "65000", "--bgp-router-id", "198.18.11.2", "--bgp-local-address", "198.18.11.2"])
    v4, v6 = bgp_sessions(args, "lb1")
    assert (str(v4.peer), str(v4.local_address), v4.name) == ("198.18.11.1", "198.18.11.2", "lb1")
    assert (str(v6.peer), v6.local_address, v6.name) == ("fd00:18:11::1", None, "lb1-2")  # the source: its routes'
    assert str(v6.router_id) == "198.18.11.2"
    with pytest.raises(InputError, match="^--bgp-peer: a peer is given twice$"):
        bgp_sessions(parse_args(["daemon", "--bgp-peer", "198.18.11.1", "--bgp-peer", "198.18.11.1"]), "lb1")


def test_a_router_id_defaults_to_the_ipv4_local_address_or_a_hash_of_the_ipv6_one():
    from control.bgp import default_router_id

    assert str(default_router_id(ipaddress.ip_address("198.18.11.2"))) == "198.18.11.2"
    # nodes whose IPv6 addresses differ only in their subnet get different ids, the same id every time
    ids = {default_router_id(ipaddress.ip_address(f"fd00:18:{x}::2")) for x in (11, 12, 13)}
    assert len(ids) == 3 and all(i.version == 4 and int(i) for i in ids)
    assert default_router_id(ipaddress.ip_address("fd00:18:11::2")) in ids
