"""lbctl: the operator's command line. Thin: parse, call the Controller, print.

Errors are one line on stderr: exit 2 for bad input, 1 for anything else."""
from __future__ import annotations

import argparse
import json
import os
import sys
from typing import Any, NoReturn

from control.errors import EXIT_ERROR, EXIT_USAGE, InputError, LbError
from control.model import ALL_DOWN, HASHES, MODES, is_whole_number


class _Parser(argparse.ArgumentParser):
    def error(self, message: str) -> NoReturn:
        print(f"{self.prog}: error: {message} (see: {self.prog.split()[0]} --help)", file=sys.stderr)
        sys.exit(EXIT_USAGE)


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    """Parse, then settle where the state lives: --store (etcd) or --state (SQLite, env LBCTL_STATE)."""
    parser = build_parser()
    args = parser.parse_args(argv)
    if args.node and not args.store:
        parser.error("--node names a node of a cluster: it goes with --store etcd://HOST:PORT/PREFIX")
    if args.store:
        if not args.store.startswith("etcd://"):
            parser.error(f"--store {args.store}: expected etcd://HOST:PORT/PREFIX")
        from control.etcdstore import parse_url
        try:
            location = parse_url(args.store)
            for node in (args.node, os.environ.get("LB_NODE")):
                if node:
                    parse_url(location.with_node(node, None))  # checks the name
        except InputError as e:
            parser.error(str(e))
        # every consumer of args.state (daemon, health, Controller.open) takes the one URL: with --store,
        # --state is this node's own file (its data plane, map ids, health), the shared part is in etcd
        node = args.node or location.node or os.environ.get("LB_NODE")
        args.state = location.with_node(node, args.state or location.local)
    elif args.state is None:
        args.state = os.environ.get("LBCTL_STATE")
    del args.store, args.node
    return args


def _positive(text: str) -> int:
    if not is_whole_number(text) or int(text) < 1:
        raise argparse.ArgumentTypeError(f"expected a positive whole number, got {text!r}")
    return int(text)


def _weight_free_int(text: str) -> int:
    if not is_whole_number(text):
        raise argparse.ArgumentTypeError(f"expected a whole number, got {text!r}")
    return int(text)


def _weight(text: str) -> int:
    if not is_whole_number(text):
        raise argparse.ArgumentTypeError(f"expected a whole number 0-65535, got {text!r}")
    return int(text)


def build_parser() -> argparse.ArgumentParser:
    p = _Parser(prog="lbctl", description="Manage the lb XDP load balancer of this network namespace.")
    _add_global_options(p, defaults=True)
    sub = p.add_subparsers(dest="command", required=True, parser_class=_Parser)

    a = sub.add_parser("attach", help="load the data plane and attach it to interfaces")
    a.add_argument("interfaces", nargs="+", metavar="IFACE")
    a.add_argument("--xdp-mode", choices=("auto", "native", "generic"), default="auto",
                   help="auto (default): native (driver) XDP, generic where frames may arrive with partial "
                        "checksums (a veth whose peer offloads them, tun/tap); native: everywhere; "
                        "generic: everywhere (slower)")
    a.add_argument("--hook", choices=("xdp", "tc"), default="xdp",
                   help="xdp (default), or tc: TC ingress, for interfaces without native XDP")
    a.add_argument("--ring-size", type=_positive, default=65537,
                   help="the largest Maglev table of a VIP, in slots (a prime); a VIP gets ~100 per backend")
    a.add_argument("--max-vips", type=_positive, default=256)
    a.add_argument("--max-backends", type=_positive, default=4096)
    a.add_argument("--conn-table-size", type=_positive, default=1 << 20)
    a.add_argument("--fullnat-table-size", type=_positive, default=1 << 16,
                   help="full-NAT flows held at once (each holds one source port)")
    a.add_argument("--tcp-timeout", type=_positive, default=900, metavar="SECONDS",
                   help="an idle TCP flow's entry is no longer trusted after this (default 15 min)")
    a.add_argument("--tcp-closing-timeout", type=_positive, default=10, metavar="SECONDS",
                   help="the same once a FIN or an RST was seen (default 10 s)")
    a.add_argument("--udp-timeout", type=_positive, default=30, metavar="SECONDS",
                   help="the same for UDP (default 30 s): a drained backend's clients move once idle this long")

    sub.add_parser("detach", help="detach the data plane and remove its pins (the VIPs stay configured)")

    v = sub.add_parser("add-vip", help="add a VIP: ADDR:PORT/tcp|udp, or ADDR/tcp|udp for every port")
    v.add_argument("vip", metavar="VIP")
    v.add_argument("--mode", choices=MODES, default="nat",
                   help="nat (default): rewrite to the backend, replies return through the LB; "
                        "dsr: change only the MACs, the backend (on a directly connected network, with the VIP on "
                        "its loopback) answers the client itself; tunnel: IPIP / IPv6-in-IPv6 to the backend, "
                        "which decapsulates (lbctl decap) and answers itself. dsr and tunnel backends use the "
                        "VIP's port; fullnat: rewrite the source too, to an address of this host (lbctl snat, "
                        "--snat) and a port of its own, so backends anywhere answer the LB")
    v.add_argument("--hash", choices=HASHES, default="flow",
                   help="what picks the backend: the whole flow (default), or the client's address alone "
                        "(session affinity)")
    v.add_argument("--all-down", choices=ALL_DOWN, default="open",
                   help="when every backend fails its health check: open (default) keeps sending new flows to "
                        "all of them (a broken check must not take the service down); closed drops them")
    v.add_argument("--min-healthy", type=_weight, default=1, metavar="N",
                   help="with BGP (lbctl daemon --bgp-peer): announce the VIP's address only while at least N of "
                        "its backends pass this node's health checks (default 1; 0: always)")
    v.add_argument("--replies-via-this-node", action="store_true",
                   help="nat in a cluster (refused otherwise): the backends route their replies through this node, "
                        "which alone should take the VIP's flows")
    v.add_argument("--snat", action="append", default=None, metavar="ADDR",
                   help="fullnat: a source address of this VIP's own (repeatable; default: the pool, lbctl snat; "
                        "not in a cluster, where every node uses its own pool)")
    v = sub.add_parser("remove-vip", help="remove a VIP and all its backends")
    v.add_argument("vip", metavar="VIP")

    b = sub.add_parser("add-backend", help="add a backend ADDR[:PORT] to a VIP")
    b.add_argument("vip", metavar="VIP")
    b.add_argument("backend", metavar="BACKEND")
    b.add_argument("--weight", type=_weight, default=1)
    b = sub.add_parser("remove-backend", help="remove a backend from a VIP (established flows go on)")
    b.add_argument("vip", metavar="VIP")
    b.add_argument("backend", metavar="BACKEND")

    acl = sub.add_parser("acl", help="source rules of a VIP (longest prefix wins; with allow rules, others are denied)")
    acl_sub = acl.add_subparsers(dest="acl_command", required=True, parser_class=_Parser)
    a = acl_sub.add_parser("add", help="add a rule: VIP PREFIX --allow|--deny")
    a.add_argument("vip", metavar="VIP")
    a.add_argument("prefix", metavar="PREFIX")
    action = a.add_mutually_exclusive_group(required=True)
    action.add_argument("--allow", dest="action", action="store_const", const="allow")
    action.add_argument("--deny", dest="action", action="store_const", const="deny")
    a = acl_sub.add_parser("remove", help="remove the rule of a prefix")
    a.add_argument("vip", metavar="VIP")
    a.add_argument("prefix", metavar="PREFIX")

    sn = sub.add_parser("snat", help="full NAT's source addresses (this host's own) and ports",
                        description="Full NAT's source addresses (addresses of this host) and ports. On a node of "
                                    "a cluster (--store etcd://...) they are this node's own, kept in its own "
                                    "part of the state and never shared: add addresses of each node on that "
                                    "node. A full-NAT VIP's flows through a node leave from that node's "
                                    "addresses, so the backends' replies come back to the node that holds the "
                                    "flow; a node without one for a VIP's IP version does not announce the VIP.")
    sn_sub = sn.add_subparsers(dest="snat_command", required=True, parser_class=_Parser)
    a = sn_sub.add_parser("add", help="add addresses of this host to the pool full-NAT VIPs take their sources from")
    a.add_argument("addresses", nargs="+", metavar="ADDR")
    a = sn_sub.add_parser("remove", help="take addresses out of the pool")
    a.add_argument("addresses", nargs="+", metavar="ADDR")
    a = sn_sub.add_parser("ports", help="the source ports used on each address: FIRST-LAST (default 1024-65535)")
    a.add_argument("ports", metavar="FIRST-LAST")
    a = sn_sub.add_parser("list", help="the pool, the ports, and each full-NAT VIP's sources")
    a.add_argument("--json", action="store_true", help="print JSON")

    u = sub.add_parser("unserved", help="traffic to a VIP's address that no VIP of it serves (other ports and "
                                        "protocols): drop it (default) or pass it to this host (for SSH to "
                                        "the LB, say); ICMP echo to the address is answered either way")
    u.add_argument("address", metavar="ADDR", help="the address (it may have no VIP yet)")
    u.add_argument("action", choices=("drop", "pass"))

    d = sub.add_parser("decap", help="on a backend of tunnel-mode VIPs: decapsulate IPIP and IPv6-in-IPv6 "
                                     "packets addressed to this host")
    d_sub = d.add_subparsers(dest="decap_command", required=True, parser_class=_Parser)
    a = d_sub.add_parser("attach", help="load the decapsulation program on an interface; on one where it is "
                                        "attached, take the host's addresses, VIPs and sources again")
    a.add_argument("interface", metavar="IFACE")
    a.add_argument("--vip", action="append", default=[], metavar="ADDR",
                   help="a VIP this host serves (repeatable; default: the addresses held on lo): tunnel packets "
                        "for any other inner destination are dropped")
    a.add_argument("--source", action="append", default=[], metavar="PREFIX",
                   help="accept tunnel packets only from this outer source prefix (repeatable; default: any)")
    a.add_argument("--hook", choices=("xdp", "tc"), default="xdp",
                   help="xdp (native, default), or tc (ingress; for interfaces without native XDP)")
    a.add_argument("--json", action="store_true", help="print JSON")
    a = d_sub.add_parser("detach", help="remove the decapsulation program from an interface")
    a.add_argument("interface", metavar="IFACE")
    a = d_sub.add_parser("stats", help="interfaces decapsulating and packets decapsulated")
    a.add_argument("--json", action="store_true", help="print JSON")

    for name, text in (("list", "show VIPs and backends"), ("stats", "show packet counters")):
        s = sub.add_parser(name, help=text)
        s.add_argument("--json", action="store_true", help="print JSON")

    c = sub.add_parser("connections", help="list the connection table's entries: client, VIP, backend, TCP state, "
                                            "age, and whether the data plane still trusts the entry")
    c.add_argument("--vip", metavar="ADDR[:PORT][/PROTO]", help="only entries towards this VIP address (and port)")
    c.add_argument("--backend", metavar="ADDR[:PORT]", help="only entries of this backend (and port)")
    c.add_argument("--limit", type=_positive, metavar="N",
                   help="at most N entries (the table is read until N match: bounded time and memory)")
    c.add_argument("--json", action="store_true", help="print JSON")

    ap = sub.add_parser("apply", help="make the running state equal to a configuration file, as one change")
    ap.add_argument("-f", "--file", required=True, metavar="FILE", help="the YAML file (- for standard input)")
    ap.add_argument("--dry-run", action="store_true",
                    help="only print the plan: what is added, removed, changed, and the Maglev slots that move")
    ap.add_argument("--json", action="store_true", help="print JSON")
    sub.add_parser("export", help="print the running state as a configuration file for apply")
    d = sub.add_parser("drain", help="weight 0: no new connections to a backend; established ones go on")
    d.add_argument("vip", metavar="VIP")
    d.add_argument("backend", metavar="BACKEND")
    w = sub.add_parser("set-weight", help="a backend's weight: its share of new connections (0 drains it; "
                                          "above 0 undoes a drain); established ones go on")
    w.add_argument("vip", metavar="VIP")
    w.add_argument("backend", metavar="BACKEND")
    w.add_argument("weight", type=_weight, metavar="WEIGHT")
    s = sub.add_parser("status", help="each backend's health, weight and active connections")
    s.add_argument("--json", action="store_true", help="print JSON")

    t = sub.add_parser("test-packet", help="run one packet through the loaded program and show what it does "
                                           "(a packet to a VIP creates its flow, as real traffic would)")
    src = t.add_mutually_exclusive_group(required=True)
    src.add_argument("hex", nargs="?", metavar="HEX", help="the frame, from the Ethernet header, in hex")
    src.add_argument("--pcap", metavar="FILE", help="take the first frame of a pcap file")
    t.add_argument("--ingress", metavar="IFACE", help="interface it arrives on (default: the first attached)")
    t.add_argument("--json", action="store_true", help="print JSON")

    d = sub.add_parser("daemon", help="run in the foreground: serve lbctl over --api-socket, keep the data plane "
                                      "in line with the state, export metrics")
    d.add_argument("--config", metavar="FILE", help="declarative configuration to apply (again on SIGHUP)")
    d.add_argument("--metrics", metavar="ADDR:PORT",
                   help="serve Prometheus metrics at http://ADDR:PORT/metrics; bind a loopback address, as in "
                        "127.0.0.1:9464 (a wildcard, 0.0.0.0 or [::], is refused without --metrics-public)")
    d.add_argument("--metrics-public", action="store_true",
                   help="allow --metrics on a wildcard address: every VIP and backend and their health, to anyone "
                        "who reaches the host")
    d.add_argument("--log-format", choices=("text", "json"), default="text")
    g = d.add_argument_group("BGP", "announce VIP addresses to a router with ExaBGP (control/bgp.py)")
    g.add_argument("--bgp-peer", metavar="ADDR", action="append", default=None,
                   help="the router to announce VIPs to (enables BGP); repeatable: one session each, which "
                        "announces the VIPs of its own IP version (an IPv4 and an IPv6 peer for both)")
    g.add_argument("--bgp-local-as", type=_weight_free_int, metavar="N", help="this node's AS number")
    g.add_argument("--bgp-peer-as", type=_weight_free_int, metavar="N", help="the router's AS number")
    g.add_argument("--bgp-router-id", metavar="ADDR", help="default: the session's local address (IPv4), or 32 bits hashed from it (IPv6)")
    g.add_argument("--bgp-local-address", metavar="ADDR",
                   help="the session's source (default: the address the routes pick towards the peer); "
                        "with several peers, for those of its IP version")
    g.add_argument("--bgp-hold-time", type=_weight_free_int, default=3, metavar="SECONDS",
                   help="BGP hold time (default 3, the least allowed: a frozen node loses its routes within it)")
    g.add_argument("--bgp-settle", type=float, default=5.0, metavar="SECONDS",
                   help="wait this long after start before announcing anything (default 5): a joining node has "
                        "its state before it draws flows")
    for command in _subparsers(p):  # people type them after the command too: lbctl daemon --state FILE
        _add_global_options(command, defaults=False)
    return p


def _add_global_options(p: argparse.ArgumentParser, defaults: bool) -> None:
    """The options every command takes. Only the top parser has defaults: a subcommand's parser
    leaves an option it was not given alone (SUPPRESS), so one given before the command stays."""
    def default(env: str | None) -> str | None:
        return (os.environ.get(env) if env else None) if defaults else argparse.SUPPRESS

    # --state's environment default is applied by parse_args, after checking it against --store
    p.add_argument("--state", default=default(None),
                   help="desired-state file (default: /var/lib/lb/NETNS.db; env LBCTL_STATE)")
    p.add_argument("--store", metavar="etcd://HOST:PORT/PREFIX", default=default(None),
                   help="a node of a cluster: the shared state in etcd under PREFIX, this node's own part in "
                        "--state (default: /var/lib/lb/NETNS.node.db)")
    p.add_argument("--node", default=default(None),
                   help="this node's name in the cluster (with --store; default: the host's name, and in a "
                        "named network namespace HOST-NETNS; env LB_NODE)")
    p.add_argument("--api-socket", default=default("LBCTL_API_SOCKET"),
                   help="the daemon's socket (default: /run/lb/NETNS.sock; env LBCTL_API_SOCKET); "
                        "without a daemon there, lbctl works on the maps itself")


def _subparsers(p: argparse.ArgumentParser) -> list[argparse.ArgumentParser]:
    """Every subcommand's parser, nested ones (acl add, decap attach) included."""
    found = []
    for action in p._actions:
        if isinstance(action, argparse._SubParsersAction):
            for child in dict.fromkeys(action.choices.values()):
                found += [child, *_subparsers(child)]
    return found


def _table(rows: list[list[Any]]) -> str:
    widths = [max(len(str(r[i])) for r in rows) for i in range(len(rows[0]))]
    return "\n".join("  ".join(str(c).ljust(w) for c, w in zip(r, widths)).rstrip() for r in rows)


def format_list(data: dict[str, Any]) -> str:
    dp = data["dataplane"]
    lines = ["data plane: " + ("not attached" if dp is None else
                               ", ".join(f"{i['name']} ({i['mode']})" for i in dp["interfaces"]))]
    if data.get("pass_unserved"):
        lines.append("passed to the host when no VIP serves it: traffic to " + ", ".join(data["pass_unserved"]))
    if not data["vips"]:
        lines.append("no VIPs")
        return "\n".join(lines)
    snat = data.get("snat") or {}
    if snat.get("pool"):
        lines.append(f"full NAT source pool: {', '.join(snat['pool'])} (ports {snat['ports']})")
    rows: list[list[Any]] = [["VIP", "MODE", "BACKEND", "WEIGHT"]]
    for v in data["vips"]:
        rows.append([v["vip"], v["mode"], "-" if not v["backends"] else "", ""])
        if "snat" in v:
            rows.append(["", "from", ", ".join(v["snat"]) or "(none)", ""])
        rows.extend(["", "", b["backend"], b["weight"]] for b in v["backends"])
        rows.extend(["", f"{action} from", prefix, ""] for prefix, action in v["acl"].items())
    lines.append(_table(rows))
    return "\n".join(lines)


def format_snat(r: dict[str, Any]) -> str:
    lines = [f"full NAT source pool: {', '.join(r['pool']) or 'empty'}; ports {r['ports']}"]
    lines += [f"{v['vip']}: sources {', '.join(v['sources']) or 'none'}" + (" (its own)" if v["own"] else "")
              for v in r["vips"]]
    return "\n".join(lines)


def format_stats(data: dict[str, Any]) -> str:
    cols = ("packets", "bytes", "reply_packets", "reply_bytes", "new_flows")
    rows: list[list[Any]] = [["VIP", "BACKEND", *(c.upper() for c in cols)]]
    for v in data["vips"]:
        rows.append([v["vip"], "(all)", *(v[c] for c in cols)])
        for b in v["backends"]:
            name = b["backend"] + ("" if b["active"] else " (removed)")
            rows.append(["", name, *(b[c] for c in cols)])
    reasons: list[list[Any]] = [["REASON", "PACKETS"], *([k, n] for k, n in data["reasons"].items())]
    return _table(rows) + "\n\n" + _table(reasons)


def format_decap(r: dict[str, Any]) -> str:
    if "packets" in r:
        where = ", ".join(f"{i} ({h})" for i, h in sorted(r["interfaces"].items())) or "no interface"
        return (f"decapsulating on: {where}\n" + _table([["FAMILY", "DECAPSULATED"], *r["packets"].items()]) +
                "\n\n" + _table([["REFUSED", "DROPPED"], *r["refused"].items()]))
    if "addresses" in r:
        again = "still " if r.get("resynced") else ""
        sources = f"{r['sources']} source prefix(es)" if r["sources"] else "any source"
        line = (f"{again}decapsulating on {r['interface']} ({r['hook']}) for this host's {r['addresses']} "
                f"address(es), {r['vips']} VIP(s), from {sources}")
        if not r["vips"]:
            line += "\nwarning: no VIP held on lo and none given (--vip): every tunnel packet is dropped"
        return line
    return f"stopped decapsulating on {r['interface']}"


def format_change(command: str, r: dict[str, Any]) -> str:
    match command:
        case "attach":
            where = ", ".join(f"{i['name']} ({'TC ingress' if i['mode'] == 'tc' else i['mode'] + ' XDP'})"
                              for i in r["interfaces"])
            return "\n".join([f"attached to {where}; maps pinned in {r['pin_dir']}; {r['vips']} VIP(s) restored",
                              *r["notes"]])
        case "detach":
            return f"detached from {', '.join(r['detached']) or 'no interface'}"
        case "add-vip":
            sources = f", sources {', '.join(r['snat'])}" if r.get("snat") else ""
            return f"added VIP {r['vip']} ({r['mode']}, hash on {r['hash']}{sources})"
        case "snat":
            return format_snat(r)
        case "remove-vip":
            return f"removed VIP {r['removed']}"
        case "add-backend":
            return f"added backend {r['backend']} to {r['vip']} (weight {r['weight']})"
        case "remove-backend":
            return f"removed backend {r['removed']} from {r['vip']}; its established flows go on"
        case "drain":
            return (f"drained backend {r['backend']} of {r['vip']} (weight {r['previous_weight']} -> 0): no new "
                    f"flows; established ones go on")
        case "set-weight":
            return (f"backend {r['backend']} of {r['vip']}: weight {r['previous_weight']} -> {r['weight']}"
                    + ("; no new flows, established ones go on" if r["weight"] == 0 else ""))
        case "unserved":
            what = "passed to this host" if r["unserved"] == "pass" else "dropped"
            return (f"traffic to {r['address']} that no VIP serves is {what}"
                    + ("" if r["vips"] else " (the address has no VIP yet)"))
        case "acl":
            if r.get("removed"):
                return f"removed the rule for {r['prefix']} from {r['vip']}"
            return f"{r['action']} {r['prefix']} to {r['vip']}"
    return ""


def format_plan(r: dict[str, Any]) -> str:
    if r["empty"]:
        return "no changes" + (" (dry run)" if r["dry_run"] else "")
    unserved = r.get("unserved", {"pass": [], "drop": []})
    lines = [f"+ VIP {v['vip']} ({v['mode']}, hash on {v['hash']}, {v['backends']} backend(s))" for v in r["added"]]
    lines += [f"- VIP {vip} (with its backends; established flows go on until they end)" for vip in r["removed"]]
    for v in r["changed"]:
        moved = f"{v['share_moved']:.1%} of Maglev slots move ({v['slots_moved']} slots"
        if v.get("disruptive"):
            what = "the mode changes, so ESTABLISHED CONNECTIONS BREAK and every flow is placed anew"
        elif v["rehash"]:
            what = f"the hash changes, so new flows are placed anew; {moved})"
        else:
            what = f"{moved}: the share of new flows that land on another backend)"
        lines.append(f"~ VIP {v['vip']}: {what}")
        lines += [f"    ~ {change}" for change in v["settings"]]
        b = v["backends"]
        lines += [f"    + backend {a['backend']} (weight {a['weight']})" for a in b["added"]]
        lines += [f"    - backend {a}" for a in b["removed"]]
        lines += [f"    ~ backend {w['backend']}: weight {w['from']} -> {w['to']}" for w in b["weights"]]
    lines += [f"~ traffic to {a} that no VIP serves: passed to the host" for a in unserved["pass"]]
    lines += [f"~ traffic to {a} that no VIP serves: dropped" for a in unserved["drop"]]
    lines.append("dry run: nothing applied" if r["dry_run"] else "applied")
    return "\n".join(lines)


def format_status(data: dict[str, Any]) -> str:
    attached = "data plane: " + ", ".join(f"{i['name']} ({i['mode']})" for i in data.get("interfaces", []))
    store = data.get("store")
    if store is not None:
        import time
        since = store["unreachable_since"]
        attached += (f"\nstore: {store['store']}, node {store['node']}: " +
                     ("reachable" if store["reachable"] else
                      f"UNREACHABLE since {time.strftime('%H:%M:%S', time.localtime(since))}" if since else
                      "UNREACHABLE") +
                     ("" if store["reachable"] else "; forwarding with this node's last state, changes refused"))
        if store.get("nodes"):
            attached += "\nnodes: " + ", ".join(
                f"{name} (last change {time.strftime('%H:%M:%S', time.localtime(record['time']))})"
                for name, record in sorted(store["nodes"].items()))
    if not data["vips"]:
        return attached + "\nno VIPs"
    rows: list[list[Any]] = [["VIP", "BACKEND", "HEALTH", "WEIGHT", "NEW FLOWS", "CONNECTIONS"]]
    for v in data["vips"]:
        check = f"(check: {v['health_check']})" + (" ALL DOWN: failing open" if v["failing_open"] else "")
        rows.append([v["vip"], "-" if not v["backends"] else "", check, "", "", ""])
        rows.extend(["", b["backend"], b["health"], b["weight"], "yes" if b["serving"] else "no", b["connections"]]
                    for b in v["backends"])
    return attached + "\n" + _table(rows) + "\n" + data["connections_note"]


def read_config(path: str) -> tuple[str, str]:
    """The file's text and the name errors use."""
    from control.config import read_text
    if path == "-":
        try:
            return sys.stdin.read(), "<stdin>"
        except UnicodeDecodeError as e:
            raise InputError(f"cannot read standard input: {e}") from None
    return read_text(path), path


def read_frame(args: argparse.Namespace) -> bytes:
    if args.pcap:
        from scapy.utils import rdpcap
        try:
            frames = rdpcap(args.pcap, count=1)
        except (OSError, Exception) as e:
            raise InputError(f"cannot read {args.pcap}: {e}") from None
        if not frames:
            raise InputError(f"{args.pcap} holds no packet")
        return bytes(frames[0])
    text = "".join(args.hex.split()).removeprefix("0x")
    try:
        return bytes.fromhex(text)
    except ValueError:
        raise InputError("the packet is not valid hex") from None


def format_test_packet(r: dict[str, Any]) -> str:
    from scapy.layers import inet  # noqa: F401  (binds IP, TCP, UDP into Ether for decoding)
    from scapy.layers.l2 import Ether
    decoded = Ether(bytes.fromhex(r["packet_hex"])).show(dump=True)
    return "\n".join([
        f"action:  {r['action']}",
        f"reason:  {r['reason'] or 'unknown'}",
        f"backend: {r['backend'] or '-'}",
        f"ingress: {r['ingress']}",
        f"output:  {r['packet_hex']}",
        decoded.rstrip(),
    ])


def command_params(args: argparse.Namespace) -> dict[str, Any]:
    """The command's arguments as JSON values, as control.commands.dispatch takes them."""
    params = {k: v for k, v in vars(args).items() if k not in ("command", "state", "api_socket", "json")}
    if args.command == "test-packet":  # files are read here, where lbctl runs
        params = {"frame_hex": read_frame(args).hex(), "ingress": args.ingress}
    if args.command == "apply":
        text, source = read_config(args.file)
        params = {"text": text, "source": source, "dry_run": args.dry_run}
    return params


def run(args: argparse.Namespace) -> dict[str, Any]:
    """One command: through the daemon when one answers on the API socket, else on the maps here;
    both end in control.commands.dispatch."""
    from control.apiclient import ApiClient, NoDaemon, default_socket_path
    from lb.pins import Instance

    if os.geteuid() != 0:
        raise LbError("lbctl needs root (CAP_BPF and CAP_NET_ADMIN)")
    if args.command == "decap":  # a backend's business: no LB state, no daemon involved
        return run_decap(args)
    params = command_params(args)
    client = ApiClient(args.api_socket or default_socket_path(Instance.current().name))
    try:
        if args.state:
            _refuse_other_state(client, args.state)
        return client.command(args.command, params)
    except NoDaemon:
        pass
    from control.commands import dispatch  # after argument errors, which need none of it
    from control.service import Controller
    return dispatch(Controller.open(args.state), args.command, params)


def _refuse_other_state(client: "ApiClient", state: str) -> None:
    """A daemon works on its own state file: a different --state would be silently ignored."""
    daemon = client.describe()
    from control.stores import same_location
    if not same_location(state, daemon["state"]):
        option = "--store" if state.startswith("etcd://") else "--state"
        raise InputError(f"{option} {state}: the daemon (pid {daemon['pid']}) on {client.path} keeps its state in "
                         f"{daemon['state']}; leave out {option}, or stop the daemon to work on another state")


def run_decap(args: argparse.Namespace) -> dict[str, Any]:
    from lb import decap as lb_decap
    from lb.loader import UnknownInterface

    try:
        match args.decap_command:
            case "attach":
                return lb_decap.attach(args.interface, args.hook, lb_decap.parse_addresses(args.vip),
                                       lb_decap.parse_prefixes(args.source))
            case "detach":
                return lb_decap.detach(args.interface)
        found = lb_decap.stats()
        return {"interfaces": found.interfaces, "packets": found.packets, "refused": found.refused}
    except (lb_decap.DecapError, UnknownInterface) as e:
        raise InputError(str(e)) from None


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    if args.command == "daemon":
        from control.daemon import serve
        return serve(args)
    try:
        result = run(args)
    except InputError as e:
        print(f"lbctl: error: {e}", file=sys.stderr)
        return EXIT_USAGE
    except (LbError, OSError, RuntimeError) as e:
        print(f"lbctl: error: {e}", file=sys.stderr)
        return EXIT_ERROR
    if isinstance(result, dict) and result.get("warning"):
        print(f"lbctl: warning: {result['warning']}", file=sys.stderr)
    if args.command == "connections":
        from control.connections import connections_json, format_connections
        print(connections_json(result) if args.json else format_connections(result))
    elif getattr(args, "json", False):
        print(json.dumps(result, indent=2))
    elif args.command == "list":
        print(format_list(result))
    elif args.command == "stats":
        print(format_stats(result))
    elif args.command == "test-packet":
        print(format_test_packet(result))
    elif args.command == "apply":
        print(format_plan(result))
    elif args.command == "export":
        print(result["yaml"], end="")
    elif args.command == "status":
        print(format_status(result))
    elif args.command == "decap":
        print(format_decap(result))
    else:
        print(format_change(args.command, result))
    return 0


if __name__ == "__main__":
    sys.exit(main())
