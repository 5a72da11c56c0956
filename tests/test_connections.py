"""lbctl connections through the lab: real TCP and UDP flows through NAT VIPs (IPv4 and IPv6) and a
DSR VIP are listed with their client and backend; filters, --limit, --json's schema; entries the
data plane no longer trusts are shown as stale, not hidden."""
from __future__ import annotations

import socket
from typing import Iterator

import pytest

from control.connections import FIELDS
from lb.maps import U32, DataPlaneMaps
from netns.lbctl import DaemonProcess
from netns.nsenter import socket_in
from netns.topology import Lab
from netns.traffic import NetnsHTTPConnection, wait_for
from tests.conftest import add_vip_with_backends, backend_name, lbctl

CONNECTIONS = 6


def connections(lab: Lab, *args: str) -> dict:
    return lbctl(lab)("connections", "--json", *args).json()


@pytest.fixture(scope="module")
def backends(lab: Lab) -> dict[str, object]:
    """Backend host by the name its servers answer with."""
    return {backend_name(b.ns): b for b in lab.backends}


@pytest.fixture(scope="module")
def nat_vips(lab: Lab, servers) -> Iterator[dict[str, str]]:
    vips = {"tcp": add_vip_with_backends(lab, f"{lab.vip(1)}:80/tcp", 8080),
            "udp": add_vip_with_backends(lab, f"{lab.vip(2)}:53/udp", 5353)}
    vips["tcp6"] = f"[{lab.vip6(1)}]:80/tcp"
    lbctl(lab)("add-vip", vips["tcp6"])
    for b in lab.backends:
        lbctl(lab)("add-backend", vips["tcp6"], f"[{b.address6}]:8080")
    yield vips
    for vip in vips.values():
        lbctl(lab)("remove-vip", vip)


@pytest.fixture(scope="module")
def dsr_vip(lab: Lab, servers) -> Iterator[str]:
    """A DSR VIP on port 8080 (its backends listen on the VIP's port), the first backend behind it."""
    backend = lab.backends[0]
    vip = f"{lab.vip(3)}:8080/tcp"
    lab.hold_vip(backend, lab.vip(3))
    lbctl(lab)("add-vip", vip, "--mode", "dsr")
    lbctl(lab)("add-backend", vip, str(backend.address))
    yield vip
    lbctl(lab)("remove-vip", vip)


def open_http(lab: Lab, address: str, port: int, n: int) -> list[tuple[NetnsHTTPConnection, int, str]]:
    """n connections that each served a request: (connection, client port, backend name)."""
    opened = []
    try:
        for _ in range(n):
            conn = NetnsHTTPConnection(lab.client.ns, address, port)
            conn.connect()
            opened.append(conn)
            # the request: the handshake's last ACK has opened the flow's entry by the time it is answered
            name = conn.get_text()
            opened[-1] = (conn, conn.sock.getsockname()[1], name)
    except BaseException:
        for c in opened:
            (c[0] if isinstance(c, tuple) else c).close()
        raise
    return opened


@pytest.fixture
def udp_flows(lab: Lab, nat_vips) -> Iterator[list[tuple[int, str]]]:
    """UDP flows of distinct client ports to the UDP VIP: (client port, backend name)."""
    socks, flows = [], []
    try:
        for i in range(CONNECTIONS):
            sock = socket_in(lab.client.ns, socket.AF_INET, socket.SOCK_DGRAM)
            socks.append(sock)
            sock.settimeout(2)
            sock.bind(("0.0.0.0", 0))
            answer = None
            for _ in range(3):
                sock.sendto(f"q{i}".encode(), (str(lab.vip(2)), 53))
                try:
                    answer = sock.recvfrom(2048)[0]
                    break
                except socket.timeout:
                    continue
            assert answer is not None, "no UDP answer"
            flows.append((sock.getsockname()[1], answer.split(b" ")[0].decode()))
        yield flows
    finally:
        for s in socks:
            s.close()


def by_client(listing: dict) -> dict[str, dict]:
    return {c["client"]: c for c in listing["connections"]}


def test_nat_tcp_and_udp_flows_are_listed_with_their_client_and_backend(lab, nat_vips, backends, udp_flows):
    conns = open_http(lab, str(lab.vip(1)), 80, CONNECTIONS)
    try:
        listing = by_client(connections(lab))
        for _, port, name in conns:
            row = listing[f"{lab.client.address}:{port}"]
            assert row["vip"] == nat_vips["tcp"]
            assert row["backend"] == f"{backends[name].address}:8080"
            assert (row["state"], row["mode"], row["valid"], row["stale"]) == ("ESTABLISHED", "nat", True, None)
            assert 0 <= row["age"] < 30 and row["expires_in"] > 800  # TCP's 15 min, seconds ago
        for port, name in udp_flows:
            row = by_client(connections(lab, "--vip", nat_vips["udp"]))[f"{lab.client.address}:{port}"]
            assert row["backend"] == f"{backends[name].address}:5353"
            assert (row["proto"], row["state"], row["valid"]) == ("udp", "ACTIVE", True)
            assert 0 < row["expires_in"] <= 31  # UDP's 30 s
    finally:
        for c, _, _ in conns:
            c.close()


def test_ipv6_flows_are_listed_with_bracketed_addresses(lab, nat_vips, backends):
    conns = open_http(lab, str(lab.vip6(1)), 80, 2)
    try:
        listing = by_client(connections(lab, "--vip", f"[{lab.vip6(1)}]"))
        for _, port, name in conns:
            row = listing[f"[{lab.client.address6}]:{port}"]
            assert row["vip"] == nat_vips["tcp6"]
            assert row["backend"] == f"[{backends[name].address6}]:8080"
    finally:
        for c, _, _ in conns:
            c.close()


def test_dsr_flow_is_listed_with_its_backend(lab, dsr_vip):
    conns = open_http(lab, str(lab.vip(3)), 8080, 2)
    try:
        listing = by_client(connections(lab, "--vip", str(lab.vip(3))))
        for _, port, name in conns:
            assert name == backend_name(lab.backends[0].ns)
            row = listing[f"{lab.client.address}:{port}"]
            assert (row["vip"], row["mode"]) == (dsr_vip, "dsr")
            assert row["backend"] == f"{lab.backends[0].address}:8080"  # the VIP's port
            assert row["via"] is None
    finally:
        for c, _, _ in conns:
            c.close()


def test_filters_select_by_vip_backend_and_limit(lab, nat_vips, backends, udp_flows):
    conns = open_http(lab, str(lab.vip(1)), 80, CONNECTIONS)
    try:
        tcp_ports = {port for _, port, _ in conns}
        udp_ports = {port for port, _ in udp_flows}
        everything = connections(lab)["connections"]
        assert {r["vip"] for r in everything} >= {nat_vips["tcp"], nat_vips["udp"]}

        only_tcp = connections(lab, "--vip", f"{lab.vip(1)}:80")["connections"]
        assert {r["vip"] for r in only_tcp} == {nat_vips["tcp"]}
        assert tcp_ports <= {int(r["client"].rsplit(":", 1)[1]) for r in only_tcp}
        only_udp = connections(lab, "--vip", f"{lab.vip(2)}/udp")["connections"]
        assert {r["proto"] for r in only_udp} == {"udp"}
        assert udp_ports <= {int(r["client"].rsplit(":", 1)[1]) for r in only_udp}
        assert connections(lab, "--vip", f"{lab.vip(1)}:81")["connections"] == []

        name = conns[0][2]
        chosen = f"{backends[name].address}:8080"
        of_backend = connections(lab, "--backend", chosen)["connections"]
        assert of_backend and {r["backend"] for r in of_backend} == {chosen}
        mine = {port for _, port, n in conns if n == name}
        assert mine <= {int(r["client"].rsplit(":", 1)[1]) for r in of_backend}
        assert {r["backend"] for r in connections(lab, "--backend", str(backends[name].address))["connections"]} \
            == {chosen, f"{backends[name].address}:5353"} & {r["backend"] for r in everything}

        limited = connections(lab, "--limit", "2")
        assert limited["shown"] == 2 and len(limited["connections"]) == 2 and limited["truncated"] is True
        assert connections(lab, "--limit", str(len(everything)))["truncated"] is False
    finally:
        for c, _, _ in conns:
            c.close()


@pytest.mark.parametrize("args, message", [
    (("--vip", "not-an-address"), "not an IP address"),
    (("--vip", "198.19.0.1:99999"), "out of range"),
    (("--vip", "198.19.0.1:80/sctp"), "unknown protocol"),
    (("--backend", "198.18.1.2:8080/tcp"), "without /tcp"),
    (("--backend", "2001:db8::1"), "brackets"),
    (("--limit", "0"), "positive whole number"),
])
def test_bad_filters_are_refused_in_one_line(lab, args, message):
    result = lbctl(lab)("connections", *args, check=False)
    assert result.returncode == 2
    assert message in result.stderr and len(result.stderr.strip().splitlines()) == 1
    assert result.stdout == ""


def test_json_schema(lab, nat_vips, udp_flows):
    listing = connections(lab)
    assert set(listing) == {"connections", "shown", "truncated", "stale", "table_size"}
    assert listing["shown"] == len(listing["connections"]) >= len(udp_flows)
    assert listing["table_size"] == 1 << 20
    types = {"proto": str, "client": str, "vip": str, "vip_id": int, "backend_id": int, "generation": int,
             "state": str, "local": bool, "age": (int, float), "expires_in": (int, float), "valid": bool}
    for row in listing["connections"]:
        assert tuple(row) == FIELDS
        for field, kind in types.items():
            assert isinstance(row[field], kind), (field, row)
        assert row["via"] is None
        assert row["stale"] is None if row["valid"] else row["stale"] in (
            "backend gone", "backend rebound", "VIP changed", "idle")


def test_text_table_shows_each_flow(lab, nat_vips, backends, udp_flows):
    text = lbctl(lab)("connections", "--vip", nat_vips["udp"]).stdout
    lines = text.splitlines()
    assert lines[0].split() == ["PROTO", "CLIENT", "VIP", "VIA", "BACKEND", "STATE", "AGE", "EXPIRES", "ENTRY"]
    for port, name in udp_flows:
        line = next(line for line in lines if f"{lab.client.address}:{port} " in line)
        assert line.split()[:6] == ["udp", f"{lab.client.address}:{port}", f"{lab.vip(2)}:53", "-",
                                    f"{backends[name].address}:5353", "ACTIVE"]
        assert line.split()[-1] == "valid"
    assert lines[-1].startswith(f"{len(lines) - 2} connection(s)")


def test_closed_connection_shows_closing(lab, nat_vips):
    (conn, port, _), = open_http(lab, str(lab.vip(1)), 80, 1)
    conn.close()  # the client's FIN passes the LB
    client = f"{lab.client.address}:{port}"
    row = wait_for(lambda: by_client(connections(lab)).get(client, {}).get("state") == "CLOSING" and
                   by_client(connections(lab))[client], what="the entry to close")
    assert row["valid"] and row["expires_in"] <= 11  # the closing timeout, 10 s


def test_removed_backend_stays_valid_and_recreated_vip_makes_entries_stale(lab, servers, backends):
    """remove-backend: established flows go on, their entries still trusted. The VIP removed and added
    again with the same backend: a new binding (generation), so the old entries are stale."""
    run = lbctl(lab)
    vip = f"{lab.vip(4)}:80/tcp"
    backend = lab.backends[1]
    run("add-vip", vip)
    run("add-backend", vip, f"{backend.address}:8080")
    conns = open_http(lab, str(lab.vip(4)), 80, 2)
    try:
        clients = [f"{lab.client.address}:{port}" for _, port, _ in conns]
        run("remove-backend", vip, f"{backend.address}:8080")
        listing = by_client(connections(lab, "--vip", vip))
        assert all(listing[c]["valid"] and listing[c]["backend"] == f"{backend.address}:8080" for c in clients)
        assert [c.get_text() for c, _, _ in conns] == [backend_name(backend.ns)] * 2  # they go on

        run("remove-vip", vip)
        run("add-vip", vip)
        run("add-backend", vip, f"{backend.address}:8080")
        listing = connections(lab, "--vip", vip)
        rows = by_client(listing)
        for c in clients:
            assert rows[c]["valid"] is False
            assert rows[c]["stale"] in ("backend gone", "backend rebound")
        assert listing["stale"] >= 2
        text = run("connections", "--vip", vip).stdout
        assert "stale: backend" in text and "no longer trusted" in text
        # and the data plane agrees: the next packet of such a flow picks again, a fresh entry follows
        conns[0][0].get_text()
        assert by_client(connections(lab, "--vip", vip))[clients[0]]["valid"] is True
    finally:
        for c, _, _ in conns:
            c.close()
        run("remove-vip", vip, check=False)


def test_idle_entries_show_expired_by_the_data_planes_clock(lab, nat_vips, udp_flows):
    """Age is read from the data plane's clock (lb_config.clock_offset moves it, as tests do)."""
    clients = {f"{lab.client.address}:{port}" for port, _ in udp_flows}
    with DataPlaneMaps.open(lab_pin_dir(lab)) as maps:
        config = maps.lb_config.get(U32(0))
        saved = config.clock_offset
        config.clock_offset = (saved + 40) & 0xFFFFFFFF  # 40 ticks: beyond UDP's 30 s, within TCP's 15 min
        maps.lb_config.set(U32(0), config)
        try:
            rows = by_client(connections(lab, "--vip", f"{lab.vip(2)}/udp"))
        finally:
            config.clock_offset = saved
            maps.lb_config.set(U32(0), config)
    for c in clients:
        assert rows[c]["valid"] is False and rows[c]["stale"] == "idle" and rows[c]["age"] >= 40
        assert rows[c]["expires_in"] == 0


def lab_pin_dir(lab: Lab) -> str:
    return lbctl(lab)("list", "--json").json()["dataplane"]["pin_dir"]


def test_connections_through_the_daemon(lab, nat_vips, backends, udp_flows, tmp_path):
    """With a daemon on the API socket, lbctl connections is served by it: the same rows, the same errors."""
    daemon = DaemonProcess(lab.lb_ns, str(tmp_path / "daemon.log"), ())
    try:
        daemon.start()
        rows = by_client(connections(lab, "--vip", nat_vips["udp"]))
        assert daemon.events("command")[-1]["command"] == "connections"
        for port, name in udp_flows:
            assert rows[f"{lab.client.address}:{port}"]["backend"] == f"{backends[name].address}:5353"
        bad = lbctl(lab)("connections", "--backend", "198.18.1.2/udp", check=False)
        assert bad.returncode == 2 and "without /udp" in bad.stderr
        assert daemon.events("command failed")[-1]["command"] == "connections"
    finally:
        daemon.stop()
