"""Parsing operator input: addresses as operators write them, and clear refusals."""
from __future__ import annotations

import ipaddress

import pytest

from control.errors import InputError
from control.model import BackendAddress, BackendState, State, VipAddress, VipState
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
