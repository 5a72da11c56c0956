"""The declarative configuration file (`lbctl apply -f lb.yaml`, `lbctl export`).

parse() reads YAML into a Config, checking everything that needs no running
state, and names the file's line of each mistake (from the nodes of
yaml.compose, so a mistake points at the value that is wrong). merge() makes a
State equal to a Config, keeping the ids of what stays (its flows go on).
plan() says what a change adds, removes and changes, and how many Maglev slots
of each VIP move. See examples/lb.yaml for the format."""
from __future__ import annotations

import copy
import re
from dataclasses import dataclass, field, fields
from typing import Any, NoReturn

import yaml

from control.errors import InputError
from control.model import (ALL_DOWN, CHECK_KINDS, HASHES, MAX_MIN_HEALTHY, MAX_WEIGHT, MODES, BackendAddress, BackendState, HealthCheck,
                           IdPool, State, VipAddress, VipState, address_sort_key, is_whole_number, parse_port_range,
                           parse_prefix, parse_vip_address, SNAT_PORTS)
from lb.structs import IPAddress
from control.etcdstore import valid_node_name
from control.reconcile import slots_moved

_DURATION = re.compile(r"^\s*(?P<n>\d+(?:\.\d+)?)\s*(?P<unit>ms|s)?\s*$", re.ASCII)
_HTTP_ONLY = ("path", "expect_status")


@dataclass
class BackendSpec:
    address: BackendAddress
    weight: int = 1


@dataclass
class VipSpec:
    vip: VipAddress
    mode: str = "nat"
    hash: str = "flow"
    health: HealthCheck = field(default_factory=HealthCheck)
    acl: dict[str, str] = field(default_factory=dict)
    backends: list[BackendSpec] = field(default_factory=list)
    all_down: str = "open"
    min_healthy: int = 1
    snat: list[IPAddress] = field(default_factory=list)  # fullnat: the VIP's own source addresses
    replies_via: str | None = None  # nat in a cluster: the node its replies come back through (VipState)


@dataclass
class Config:
    vips: list[VipSpec] = field(default_factory=list)
    pass_unserved: set[IPAddress] = field(default_factory=set)  # see State.pass_unserved
    snat: set[IPAddress] = field(default_factory=set)  # full NAT's source pool (State.snat)
    snat_ports: tuple[int, int] = SNAT_PORTS

    def names_snat(self) -> bool:
        """Whether the file says anything of full NAT's source addresses or ports (each node's own in a cluster)."""
        return bool(self.snat) or self.snat_ports != SNAT_PORTS or any(v.snat for v in self.vips)

    def shared_part(self) -> "Config":
        """What a cluster's nodes share of this configuration: all but full NAT's sources (each node's own)."""
        shared = copy.deepcopy(self)
        shared.snat, shared.snat_ports = set(), SNAT_PORTS
        for v in shared.vips:
            v.snat = []
        return shared


# --- durations ------------------------------------------------------------------

def parse_duration(text: str) -> float:
    """Seconds from "2s", "500ms" or a bare number of seconds."""
    m = _DURATION.match(text)
    if not m:
        raise ValueError(f"{text!r} is not a duration (as in 2s, 500ms or 1.5)")
    n = float(m.group("n"))
    return n / 1000 if m.group("unit") == "ms" else n


def format_duration(seconds: float) -> str:
    ms = round(seconds * 1000)
    return f"{ms // 1000}s" if ms % 1000 == 0 else f"{ms}ms"


# --- reading the file -----------------------------------------------------------

class _Reader:
    """Walks the composed YAML nodes; every error names the line of the node at fault."""

    def __init__(self, source: str):
        self.source = source
        self.backend_nodes: list[tuple[BackendAddress, yaml.Node]] = []  # to check against every VIP

    def fail(self, node: yaml.Node, reason: str) -> NoReturn:
        raise InputError(f"{self.source}:{node.start_mark.line + 1}: {reason}")

    def mapping(self, node: yaml.Node, what: str, allowed: tuple[str, ...],
                required: tuple[str, ...] = ()) -> dict[str, yaml.Node]:
        if not isinstance(node, yaml.MappingNode):
            self.fail(node, f"{what} must be a mapping of keys to values")
        out: dict[str, yaml.Node] = {}
        for key, value in node.value:
            name = self.scalar(key, f"a key of {what}")
            if name not in allowed:
                self.fail(key, f"unknown key {name!r} in {what} (expected: {', '.join(allowed)})")
            if name in out:
                self.fail(key, f"{name!r} is given twice in {what}")
            out[name] = value
        for name in required:
            if name not in out:
                self.fail(node, f"{what} needs {name!r}")
        return out

    def scalar(self, node: yaml.Node, what: str) -> str:
        if not isinstance(node, yaml.ScalarNode):
            self.fail(node, f"{what} must be a single value")
        return node.value

    def sequence(self, node: yaml.Node, what: str) -> list[yaml.Node]:
        if isinstance(node, yaml.ScalarNode) and node.tag.endswith(":null"):
            return []
        if not isinstance(node, yaml.SequenceNode):
            self.fail(node, f"{what} must be a list")
        return node.value

    def integer(self, node: yaml.Node, what: str, low: int, high: int) -> int:
        text = self.scalar(node, what).strip()
        if not is_whole_number(text) or not low <= int(text) <= high:
            self.fail(node, f"{what} must be a whole number {low}-{high}, got {text!r}")
        return int(text)

    def choice(self, node: yaml.Node, what: str, options: tuple[str, ...]) -> str:
        text = self.scalar(node, what)
        if text not in options:
            self.fail(node, f"unknown {what} {text!r} (expected one of: {', '.join(options)})")
        return text

    def parsed(self, node: yaml.Node, what: str, parse):
        """`parse` of the node's text, its InputError or ValueError pinned to the node's line."""
        text = self.scalar(node, what)
        try:
            return parse(text)
        except (InputError, ValueError) as e:
            self.fail(node, f"{what}: {e}")

    def config(self, root: yaml.Node | None) -> Config:
        if root is None:  # most likely a mistake: applied, it would remove every VIP
            raise InputError(f"{self.source}:1: the file is empty; to remove every VIP, write: vips: []")
        top = self.mapping(root, "the file", ("vips", "pass_unserved", "snat"), ("vips",))
        config = Config()
        if "snat" in top:
            self.snat(top["snat"], config)
        for node in self.sequence(top["pass_unserved"], "pass_unserved") if "pass_unserved" in top else []:
            address = self.parsed(node, "pass_unserved address", parse_vip_address)
            if address in config.pass_unserved:
                self.fail(node, f"{address} is listed twice in pass_unserved")
            config.pass_unserved.add(address)
        seen: dict[VipAddress, int] = {}
        for item in self.sequence(top["vips"], "vips"):
            spec = self.vip(item)
            if spec.vip in seen:
                self.fail(item, f"VIP {spec.vip} is listed twice (first on line {seen[spec.vip]})")
            seen[spec.vip] = item.start_mark.line + 1
            config.vips.append(spec)
        addresses = {spec.vip.address for spec in config.vips}
        for address, node in self.backend_nodes:
            if address.address in addresses:
                self.fail(node, f"backend {address}: its address is a VIP's address; a backend must be another host")
        return config

    def snat(self, node: yaml.Node, config: Config) -> None:
        """snat: {addresses: [ADDR, ...], ports: FIRST-LAST}: full NAT's source pool."""
        keys = self.mapping(node, "snat", ("addresses", "ports"), ())
        for item in self.sequence(keys["addresses"], "snat addresses") if "addresses" in keys else []:
            address = self.parsed(item, "snat address", parse_vip_address)
            if address in config.snat:
                self.fail(item, f"{address} is listed twice in snat addresses")
            config.snat.add(address)
        if "ports" in keys:
            config.snat_ports = self.parsed(keys["ports"], "snat ports", parse_port_range)

    def vip(self, node: yaml.Node) -> VipSpec:
        keys = self.mapping(node, "a VIP", ("vip", "mode", "hash", "health", "all_down", "min_healthy", "acl",
                                                       "backends", "snat", "replies_via"), ("vip",))
        spec = VipSpec(self.parsed(keys["vip"], "vip", VipAddress.parse))
        if "mode" in keys:
            spec.mode = self.choice(keys["mode"], "mode", MODES)
        if "hash" in keys:
            spec.hash = self.choice(keys["hash"], "hash", HASHES)
        if "health" in keys:
            spec.health = self.health(keys["health"], spec.vip)
        if "all_down" in keys:
            spec.all_down = self.choice(keys["all_down"], "all_down", ALL_DOWN)
        if "min_healthy" in keys:
            spec.min_healthy = self.integer(keys["min_healthy"], "min_healthy", 0, MAX_MIN_HEALTHY)
        if "acl" in keys:
            spec.acl = self.acl(keys["acl"], spec.vip)
        if "snat" in keys:
            if spec.mode != "fullnat":
                self.fail(keys["snat"], f"snat names full NAT's source addresses; VIP {spec.vip} is {spec.mode}")
            for item in self.sequence(keys["snat"], "snat"):
                address = self.parsed(item, "snat address", parse_vip_address)
                if address.version != spec.vip.address.version:
                    self.fail(item, f"source address {address} and VIP {spec.vip} are of different IP versions")
                if address not in spec.snat:
                    spec.snat.append(address)
        if "replies_via" in keys:
            if spec.mode != "nat":
                self.fail(keys["replies_via"], f"replies_via is for a nat VIP (its replies come back through that "
                                               f"node); VIP {spec.vip} is {spec.mode}")
            name = self.scalar(keys["replies_via"], "replies_via")
            if not valid_node_name(name):
                self.fail(keys["replies_via"], f"replies_via {name!r}: a node name is 1-63 letters, digits, "
                                               "'.', '_' or '-'")
            spec.replies_via = name
        seen: dict[BackendAddress, int] = {}
        for item in self.sequence(keys["backends"], "backends") if "backends" in keys else []:
            backend = self.backend(item, spec.vip)
            if backend.address in seen:
                self.fail(item, f"backend {backend.address} is listed twice in VIP {spec.vip} "
                                f"(first on line {seen[backend.address]})")
            seen[backend.address] = item.start_mark.line + 1
            try:
                VipState(spec.vip, 0, spec.mode).check_backend(backend.address)
            except InputError as e:
                self.fail(item, str(e))
            spec.backends.append(backend)
            self.backend_nodes.append((backend.address, item))
        if spec.health.enabled and spec.health.port is None and spec.vip.any_port:
            self.fail(keys["health"], f"VIP {spec.vip} takes every port, so its backends have none to check: "
                                      f"give the health check a port")
        return spec

    def backend(self, node: yaml.Node, vip: VipAddress) -> BackendSpec:
        if isinstance(node, yaml.ScalarNode):  # shorthand: just the address, weight 1
            keys = {"address": node}
        else:
            keys = self.mapping(node, "a backend", ("address", "weight"), ("address",))
        address = self.parsed(keys["address"], "backend address", lambda t: BackendAddress.parse(t, vip))
        if address.address.version != vip.address.version:
            self.fail(keys["address"], f"backend {address} and VIP {vip} are of different IP versions")
        weight = self.integer(keys["weight"], "weight", 0, MAX_WEIGHT) if "weight" in keys else 1
        return BackendSpec(address, weight)

    def health(self, node: yaml.Node, vip: VipAddress) -> HealthCheck:
        names = tuple(f.name for f in fields(HealthCheck))
        keys = self.mapping(node, "health", names, ("kind",))
        kind = self.choice(keys["kind"], "health check kind", CHECK_KINDS)
        if kind == "none":
            return HealthCheck()  # nothing else matters: all "no check" configurations are equal
        for name in _HTTP_ONLY:
            if name in keys and kind != "http":
                self.fail(keys[name], f"{name} applies to http checks only")
        check = HealthCheck(kind)
        if "port" in keys:
            check.port = self.integer(keys["port"], "health check port", 1, 65535)
        if "path" in keys:
            check.path = self.scalar(keys["path"], "path")
        if "expect_status" in keys:
            check.expect_status = self.integer(keys["expect_status"], "expect_status", 100, 599)
        for name in ("interval", "timeout"):
            if name in keys:
                setattr(check, name, self.parsed(keys[name], name, parse_duration))
        for name in ("rise", "fall"):
            if name in keys:
                setattr(check, name, self.integer(keys[name], name, 1, 100))
        for name, reason in check.problems():
            self.fail(keys.get(name, node), reason)
        return check

    def acl(self, node: yaml.Node, vip: VipAddress) -> dict[str, str]:
        if not isinstance(node, yaml.MappingNode):
            self.fail(node, "acl must map prefixes to allow or deny, as in {192.0.2.0/24: deny}")
        rules: dict[str, str] = {}
        for key, value in node.value:
            prefix = self.parsed(key, "acl prefix", parse_prefix)
            if prefix.version != vip.address.version:
                self.fail(key, f"prefix {prefix} and VIP {vip} are of different IP versions")
            if str(prefix) in rules:
                self.fail(key, f"VIP {vip} has two rules for {prefix}")
            rules[str(prefix)] = self.choice(value, "acl action", ("allow", "deny"))
        return rules


def read_text(path: str) -> str:
    """A configuration file's text; InputError (one line) if it cannot be read or is not UTF-8."""
    try:
        with open(path, encoding="utf-8") as f:
            return f.read()
    except (OSError, UnicodeDecodeError) as e:
        raise InputError(f"cannot read {path}: {getattr(e, 'strerror', None) or e}") from None


def parse(text: str, source: str = "<file>") -> Config:
    """A Config from YAML text; InputError("FILE:LINE: reason") for the first mistake."""
    try:
        root = yaml.compose(text, Loader=getattr(yaml, "CSafeLoader", yaml.SafeLoader))  # libyaml: 10x faster
    except yaml.MarkedYAMLError as e:
        mark = e.problem_mark or e.context_mark
        line = f":{mark.line + 1}" if mark else ""
        raise InputError(f"{source}{line}: not valid YAML: {e.problem or e.context}") from None
    except yaml.YAMLError as e:
        raise InputError(f"{source}: not valid YAML: {e}") from None
    return _Reader(source).config(root)


# --- state <-> file -------------------------------------------------------------

def config_of(state: State) -> Config:
    """The Config a State answers to (retired backends and health status are not configuration)."""
    return Config([
        VipSpec(v.vip, v.mode, v.hash, copy.deepcopy(v.health), dict(v.acl),
                [BackendSpec(b.address, b.weight) for b in sorted(v.active_backends(), key=lambda b: b.id)],
                v.all_down, v.min_healthy, list(v.snat), v.replies_via)
        for v in sorted(state.vips, key=lambda v: v.vip.sort_key())
    ], set(state.pass_unserved), set(state.snat), state.snat_ports)


def _health_doc(check: HealthCheck) -> dict[str, Any]:
    doc: dict[str, Any] = {"kind": check.kind}
    if check.port is not None:
        doc["port"] = check.port
    if check.kind == "http":
        doc.update(path=check.path, expect_status=check.expect_status)
    doc.update(interval=format_duration(check.interval), timeout=format_duration(check.timeout),
               rise=check.rise, fall=check.fall)
    return doc


def to_yaml(config: Config) -> str:
    vips = []
    for v in config.vips:
        doc: dict[str, Any] = {"vip": str(v.vip), "mode": v.mode, "hash": v.hash}
        if v.health.enabled:
            doc["health"] = _health_doc(v.health)
        if v.all_down != "open":
            doc["all_down"] = v.all_down
        if v.min_healthy != 1:
            doc["min_healthy"] = v.min_healthy
        if v.acl:
            doc["acl"] = dict(v.acl)
        if v.snat:
            doc["snat"] = [str(a) for a in v.snat]
        if v.replies_via is not None:
            doc["replies_via"] = v.replies_via
        doc["backends"] = [{"address": str(b.address), "weight": b.weight} for b in v.backends]
        vips.append(doc)
    header = "# lb configuration: lbctl apply -f FILE makes the running state equal to this file\n"
    doc: dict[str, Any] = {"vips": vips}
    if config.pass_unserved:
        doc["pass_unserved"] = [str(a) for a in sorted(config.pass_unserved, key=address_sort_key)]
    if config.snat or config.snat_ports != SNAT_PORTS:
        doc["snat"] = {"addresses": [str(a) for a in sorted(config.snat, key=address_sort_key)],
                       "ports": f"{config.snat_ports[0]}-{config.snat_ports[1]}"}
    return header + yaml.safe_dump(doc, sort_keys=False, default_flow_style=False)


def merge(state: State, config: Config, now: float, node_own: bool = True) -> None:
    """Make `state` what `config` describes. What stays keeps its id (its flows go on); removed
    backends are retired as `lbctl remove-backend` does, removed VIPs go with their backends.
    Without `node_own` (a node of a cluster), full NAT's sources, the pool's and the VIPs' own, stay
    as they are: they are the node's own, never in a shared file (Config.shared_part)."""
    state.pass_unserved = set(config.pass_unserved)
    if node_own:
        state.snat, state.snat_ports = set(config.snat), config.snat_ports
    wanted = {spec.vip for spec in config.vips}
    # what removed VIPs leave is not reused in the same change (its counters would carry over)
    removed = [v for v in state.vips if v.vip not in wanted]
    removed_ids = {v.id for v in removed}
    removed_backend_ids = {b.id for v in removed for b in v.backends}
    state.vips = [v for v in state.vips if v.vip in wanted]
    by_vip = {v.vip: v for v in state.vips}
    limits = state.dataplane.config
    vip_ids = IdPool({v.id for v in state.vips} | removed_ids, 0, limits["max_vips"])
    backend_ids = IdPool(state.backend_ids() | removed_backend_ids, 1, limits["max_backends"])
    for spec in config.vips:
        v = by_vip.get(spec.vip)
        if v is None:
            vip_id = vip_ids.take()
            v = by_vip[spec.vip] = VipState(spec.vip, state.allocate_vip_id(removed_ids) if vip_id is None else vip_id)
            state.vips.append(v)
        v.mode, v.hash, v.acl, v.all_down = spec.mode, spec.hash, dict(spec.acl), spec.all_down
        v.min_healthy, v.replies_via = spec.min_healthy, spec.replies_via
        if node_own:
            v.snat = list(spec.snat)
        if v.health != spec.health:
            v.health = copy.deepcopy(spec.health)
            for b in v.backends:  # a new check starts from healthy; no check means no verdict
                b.healthy = True
        kept = {b.address for b in spec.backends}
        for b in v.active_backends():
            if b.address not in kept:
                b.retired_at = now
        for bs in spec.backends:
            b = v.backend(bs.address) or v.revive(bs.address, bs.weight)
            if b is None:
                bid = backend_ids.take()  # when none is free, the State takes back one retired long ago
                b = BackendState(bs.address, state.allocate_backend_id(removed_backend_ids) if bid is None else bid,
                                 generation=state.new_generation())
                v.backends.append(b)
            b.weight = bs.weight


# --- plans ----------------------------------------------------------------------

def _describe_health(check: HealthCheck) -> str:
    if not check.enabled:
        return "none"
    what = f"http GET {check.path} expecting {check.expect_status}" if check.kind == "http" else "tcp connect"
    port = f" on port {check.port}" if check.port else ""
    return (f"{what}{port} every {format_duration(check.interval)} (timeout {format_duration(check.timeout)}, "
            f"rise {check.rise}, fall {check.fall})")


def _vip_changes(old: VipState, new: VipState) -> list[str]:
    changes = []
    for name in ("mode", "hash", "all_down", "min_healthy", "replies_via"):
        if getattr(old, name) != getattr(new, name):
            was, now = (getattr(v, name) for v in (old, new))
            changes.append(f"{name}: {'(none)' if was is None else was} -> {'(none)' if now is None else now}")
    if old.snat != new.snat:
        changes.append(f"snat: {', '.join(map(str, old.snat)) or 'the pool'} -> "
                       f"{', '.join(map(str, new.snat)) or 'the pool'}")
    if old.health != new.health:
        changes.append(f"health: {_describe_health(old.health)} -> {_describe_health(new.health)}")
    for prefix in sorted(old.acl.keys() | new.acl.keys()):
        was, now = old.acl.get(prefix), new.acl.get(prefix)
        if was != now:
            changes.append(f"acl {prefix}: {was or '(none)'} -> {now or '(none)'}")
    return changes


def _backend_changes(old: VipState, new: VipState) -> dict[str, list]:
    before = {str(b.address): b.weight for b in old.active_backends()}
    after = {str(b.address): b.weight for b in new.active_backends()}
    return {
        "added": [{"backend": a, "weight": after[a]} for a in after if a not in before],
        "removed": [a for a in before if a not in after],
        "weights": [{"backend": a, "from": before[a], "to": after[a]}
                    for a in after if a in before and before[a] != after[a]],
    }


def plan(old: State, new: State, ring_size: int) -> dict[str, Any]:
    """What turning `old` into `new` does; JSON-able. `share_moved` is the share of a VIP's
    Maglev slots (so of its new flows) that land on a different backend afterwards; with
    `rehash` (the hash input changes) flows are placed anew whatever the slots do; with
    `disruptive` (the mode changes: backends see other packets) every flow is affected and
    established connections break, so share_moved is 1."""
    olds = {v.vip: v for v in old.vips}
    news = {v.vip: v for v in new.vips}
    added = [{"vip": str(v.vip), "mode": v.mode, "hash": v.hash, "backends": len(v.active_backends())}
             for vip, v in sorted(news.items(), key=lambda i: i[0].sort_key()) if vip not in olds]
    removed = [str(vip) for vip in sorted(olds, key=VipAddress.sort_key) if vip not in news]
    changed = []
    for vip in sorted(olds.keys() & news.keys(), key=VipAddress.sort_key):
        o, n = olds[vip], news[vip]
        settings, backends = _vip_changes(o, n), _backend_changes(o, n)
        moved, share = slots_moved(o, n, ring_size)
        if settings or any(backends.values()) or moved:
            # a new hash input sends a flow to another slot, whether or not the slots change
            disruptive = o.mode != n.mode
            changed.append({"vip": str(vip), "settings": settings, "backends": backends,
                            "slots_moved": moved, "share_moved": 1.0 if disruptive else share,
                            "rehash": o.hash != n.hash, "disruptive": disruptive})
    unserved = {"pass": [str(a) for a in sorted(new.pass_unserved - old.pass_unserved, key=address_sort_key)],
                "drop": [str(a) for a in sorted(old.pass_unserved - new.pass_unserved, key=address_sort_key)]}
    return {"added": added, "removed": removed, "changed": changed, "unserved": unserved,
            "empty": not (added or removed or changed or unserved["pass"] or unserved["drop"])}
