"""Desired state as typed values, and the parsing of operator input into them."""
from __future__ import annotations

import copy
import ipaddress
import re
from dataclasses import dataclass, field
from typing import Any, TypeVar

from control.errors import InputError
from lb.structs import IPAddress, PROTOCOLS, be16, lb_addr_bytes

T = TypeVar("T")


class _worked_out_once:
    """A property worked out on first use and kept in the instance (a frozen dataclass's too): as
    functools.cached_property, without its lock (which doubled the cost of a first use, paid once
    per address of a State that a one-shot lbctl parses anew)."""

    def __init__(self, work: Any) -> None:
        self.work, self.name = work, work.__name__
        self.__doc__ = work.__doc__

    def __get__(self, obj: Any, owner: type | None = None) -> Any:
        if obj is None:
            return self
        value = obj.__dict__[self.name] = self.work(obj)
        return value

# nat: rewrite the destination to the backend, replies come back through the LB.
# dsr: only the MACs change; the backend holds the VIP and answers the client itself.
# tunnel: the packet goes inside IPIP / IPv6-in-IPv6 to the backend, which answers directly.
# fullnat: rewrite the source too, to an address of the LB's (State.snat or VipState.snat) and a port
# the data plane allocates: backends answer the LB whatever their routes.
MODES = ("nat", "dsr", "tunnel", "fullnat")
# Full NAT's source ports, unless the operator narrows them (lbctl snat ports)
SNAT_PORTS = (1024, 65535)
SNAT_ADDRS = 8  # source addresses one full-NAT VIP may use (bpf/consts.h LB_SNAT_ADDRS)
HASHES = ("flow", "source")  # source: session affinity on the client's address
CHECK_KINDS = ("none", "tcp", "http")
# When every backend of a VIP fails its check (often the check path or the LB's own network, not
# the backends): "open" keeps sending new flows to all of them, as production LBs do; "closed" drops them.
ALL_DOWN = ("open", "closed")
MAX_WEIGHT = 65535
MAX_MIN_HEALTHY = 1000  # a VIP's min_healthy: how many of its backends must pass for BGP to announce it

_ENDPOINT = re.compile(r"^(?:\[(?P<v6>[^\]]+)\]|(?P<v4>[^:/\[\]]+))(?::(?P<port>[^/]*))?(?:/(?P<proto>.*))?$")


def is_whole_number(text: str) -> bool:
    """Only the digits 0-9 (str.isdigit also takes '²' and other scripts' digits, which int() refuses)."""
    return text.isascii() and text.isdigit()


def _parse_address(text: str, original: str) -> IPAddress:
    try:
        return ipaddress.ip_address(text)
    except ValueError:
        raise InputError(f"{original!r}: {text!r} is not an IP address") from None


# ipaddress counts the limited broadcast only as "reserved", with 240/4, which Linux routes as unicast
_LIMITED_BROADCAST = ipaddress.ip_address("255.255.255.255")


def unicast_problem(address: IPAddress) -> str | None:
    """Why packets to `address` cannot reach one remote host (None if they can): the kernel and
    routers treat these kinds as local, for a link only, for many hosts or for no host."""
    if address.version == 6 and address.ipv4_mapped is not None:
        return ("an IPv4-mapped IPv6 address: no IPv6 packet on the wire carries it; "
                f"write the IPv4 address {address.ipv4_mapped}")
    if address.is_unspecified:
        return "the unspecified address, never a destination"
    if address == _LIMITED_BROADCAST:
        return "the broadcast address"
    if address.is_multicast:
        return "a multicast address"
    if address.is_loopback:
        return "a loopback address, which never leaves a host"
    if address.is_link_local:
        return "a link-local address, which routers do not forward"
    return None


def require_unicast(address: IPAddress, original: str, role: str) -> None:
    """InputError unless `address` can carry unicast traffic to a remote host."""
    problem = unicast_problem(address)
    if problem is not None:
        raise InputError(f"{original!r}: {address} cannot be {role}: it is {problem}")


def parse_vip_address(text: str) -> IPAddress:
    """A VIP's address alone (10.0.0.1, 2001:db8::1; brackets allowed), as settings per address take it."""
    stripped = text.strip()
    if stripped.startswith("[") and stripped.endswith("]"):
        stripped = stripped[1:-1]
    address = _parse_address(stripped, text)
    require_unicast(address, text, "a VIP's address")
    return address


def parse_port_range(text: str) -> tuple[int, int]:
    """FIRST-LAST, both in 1-65535."""
    first, sep, last = text.strip().partition("-")
    if not sep or not is_whole_number(first) or not is_whole_number(last):
        raise InputError(f"{text!r}: expected a port range FIRST-LAST, as in 1024-65535")
    lo, hi = int(first), int(last)
    if not 1 <= lo <= hi <= 65535:
        raise InputError(f"{text!r}: ports must satisfy 1 <= FIRST <= LAST <= 65535")
    return lo, hi


def address_sort_key(address: IPAddress) -> tuple[int, int]:
    return address.version, int(address)


def _parse_port(text: str, original: str) -> int:
    if not is_whole_number(text):
        raise InputError(f"{original!r}: port {text!r} is not a number")
    port = int(text)
    if not 1 <= port <= 65535:
        raise InputError(f"{original!r}: port {port} is out of range 1-65535")
    return port


def _split(text: str) -> tuple[IPAddress, str | None, str | None]:
    stripped = text.strip()
    if not stripped.startswith("[") and stripped.split("/")[0].count(":") > 1:
        raise InputError(f"{text!r}: write IPv6 addresses in brackets, as in [2001:db8::1]:80/tcp")
    m = _ENDPOINT.match(stripped)
    if not m:
        raise InputError(f"{text!r}: expected ADDR:PORT/PROTO, with IPv6 in brackets: [2001:db8::1]:80/tcp")
    raw_addr = m.group("v6") or m.group("v4")
    return _parse_address(raw_addr, text), m.group("port"), m.group("proto")


def parse_prefix(text: str) -> ipaddress.IPv4Network | ipaddress.IPv6Network:
    """A source prefix as operators write it: 10.1.0.0/16, 2001:db8::/32, or one address."""
    try:
        return ipaddress.ip_network(text.strip(), strict=False)
    except ValueError:
        raise InputError(f"{text!r} is not an address prefix (as in 10.1.0.0/16 or 2001:db8::/32)") from None


def parse_endpoint_filter(text: str, what: str, with_proto: bool) -> tuple[IPAddress, int | None, str | None]:
    """ADDR[:PORT] (and [/PROTO] where `with_proto`) to select by: an address, a port and protocol if
    given. No unicast check: it selects, it configures nothing."""
    address, port, proto = _split(text)
    if proto is not None:
        if not with_proto:
            raise InputError(f"{text!r}: {what} takes ADDR[:PORT], without /{proto}")
        proto = proto.lower()
        if proto not in PROTOCOLS:
            raise InputError(f"{text!r}: unknown protocol {proto!r} (expected one of: {', '.join(PROTOCOLS)})")
    return address, None if port is None else _parse_port(port, text), proto


def format_endpoint(address: IPAddress, port: int) -> str:
    """ADDR:PORT, IPv6 in brackets; port 0 (every port) is left out."""
    host = f"[{address}]" if address.version == 6 else str(address)
    return f"{host}:{port}" if port else host


@dataclass(frozen=True)
class VipAddress:
    """What clients connect to: 10.0.0.1:80/tcp, [2001:db8::1]:80/tcp, or 10.0.0.1/tcp
    for every port (port 0)."""

    address: IPAddress
    port: int
    proto: str

    @classmethod
    def parse(cls, text: str, usable: bool = True) -> "VipAddress":
        """`usable`: refuse addresses no client could reach (off only to read what is stored)."""
        address, port, proto = _split(text)
        if usable:
            require_unicast(address, text, "a VIP")
        if proto is None:
            raise InputError(f"{text!r}: a VIP needs a protocol, as in {format_endpoint(address, 80)}/tcp "
                             f"(or {format_endpoint(address, 0)}/tcp for every port)")
        proto = proto.lower()
        if proto not in PROTOCOLS:
            raise InputError(f"{text!r}: unknown protocol {proto!r} (expected one of: {', '.join(PROTOCOLS)})")
        return cls(address, 0 if port is None else _parse_port(port, text), proto)

    @property
    def any_port(self) -> bool:
        return self.port == 0

    @_worked_out_once
    def packed(self) -> bytes:
        """The address as the data plane holds it (lb_addr), worked out once: copies of a State share
        their addresses, and a daemon's change looks at every VIP's."""
        return lb_addr_bytes(self.address)

    @_worked_out_once
    def datapath(self) -> tuple[bytes, int, int]:
        """The VIP as the data plane keys it: (lb_addr bytes, port as a __be16, protocol number)."""
        return self.packed, be16(self.port), PROTOCOLS[self.proto]

    @_worked_out_once
    def slot(self) -> int:
        """The VIP's slot in the data plane's VIP slots (lb/addrfilter.py), worked out once."""
        from lb.addrfilter import vip_slot
        return vip_slot(*self.datapath)

    @_worked_out_once
    def bucket(self) -> int:
        """The address's bucket of the data plane's address filter (lb/addrfilter.py), worked out once."""
        from lb.addrfilter import bucket
        return bucket(self.packed)

    def sort_key(self) -> tuple[int, int, int, str]:
        """IPv4 before IPv6, then by address, port, protocol (addresses of two versions do not compare)."""
        return self.address.version, int(self.address), self.port, self.proto

    def __str__(self) -> str:
        return f"{format_endpoint(self.address, self.port)}/{self.proto}"


@dataclass(frozen=True)
class BackendAddress:
    """Where a VIP's traffic goes: 10.0.0.2:8080, or 10.0.0.2 to keep the VIP's port (for a VIP
    of every port, the client's: port 0)."""

    address: IPAddress
    port: int

    @classmethod
    def parse(cls, text: str, vip: VipAddress) -> "BackendAddress":
        address, port, proto = _split(text)
        require_unicast(address, text, "a backend")
        if proto is not None:
            raise InputError(f"{text!r}: a backend takes the VIP's protocol; write ADDR[:PORT] without /{proto}")
        if port is None:
            return cls(address, vip.port)
        if vip.any_port:
            raise InputError(f"{text!r}: VIP {vip} takes every port, so its backends keep the client's port; "
                             f"write the backend without a port")
        return cls(address, _parse_port(port, text))

    @_worked_out_once
    def packed(self) -> bytes:
        """The address as the data plane holds it (lb_addr), worked out once (VipAddress.packed)."""
        return lb_addr_bytes(self.address)

    @_worked_out_once
    def bucket(self) -> int:
        """The address's bucket of the data plane's address filter, worked out once (VipAddress.bucket)."""
        from lb.addrfilter import bucket
        return bucket(self.packed)

    def __str__(self) -> str:
        return format_endpoint(self.address, self.port)


@dataclass
class HealthCheck:
    """How a VIP's backends are checked: "none", a TCP connect, or an HTTP GET of `path`
    answered with `expect_status`. A backend goes down after `fall` failures in a row and
    comes back after `rise` successes; times are in seconds."""

    kind: str = "none"
    port: int | None = None  # None: the backend's own port
    path: str = "/"
    expect_status: int = 200
    interval: float = 2.0
    timeout: float = 1.0
    rise: int = 2
    fall: int = 3

    def problems(self) -> list[tuple[str, str]]:
        """(field, reason) for each invalid field; empty when valid."""
        found = []
        if self.kind not in CHECK_KINDS:
            found.append(("kind", f"unknown check kind {self.kind!r} (expected one of: {', '.join(CHECK_KINDS)})"))
        if self.port is not None and not 1 <= self.port <= 65535:
            found.append(("port", f"port {self.port} is out of range 1-65535"))
        if not self.path.startswith("/") or any(c.isspace() for c in self.path):
            found.append(("path", f"path {self.path!r} must start with / and hold no spaces"))
        if not 100 <= self.expect_status <= 599:
            found.append(("expect_status", f"HTTP status {self.expect_status} is out of range 100-599"))
        if not 0 < self.interval <= 3600:
            found.append(("interval", f"interval {self.interval}s is out of range (0, 3600]"))
        if not 0 < self.timeout <= self.interval:
            found.append(("timeout", f"timeout {self.timeout}s must be above 0 and at most the interval "
                                     f"({self.interval}s), so checks never pile up"))
        for name in ("rise", "fall"):
            if not 1 <= getattr(self, name) <= 100:
                found.append((name, f"{name} {getattr(self, name)} is out of range 1-100"))
        return found

    @property
    def enabled(self) -> bool:
        return self.kind != "none"


@dataclass
class BackendState:
    address: BackendAddress
    id: int
    weight: int = 1
    # Set when removed: kept (not in the Maglev table) so established flows go on.
    retired_at: float | None = None
    # Set by the health checker; an unhealthy backend leaves the Maglev table (its flows go on).
    healthy: bool = True
    # This binding of the id to (VIP, endpoint): a number never used before (State.new_generation).
    # The data plane trusts a flow entry only while its backend record carries the entry's generation.
    generation: int = 0

    @property
    def active(self) -> bool:
        return self.retired_at is None

    @property
    def serving(self) -> bool:
        """Whether new flows may pick it: in the Maglev table."""
        return self.active and self.healthy and self.weight > 0


@dataclass
class VipState:
    vip: VipAddress
    id: int
    mode: str = "nat"
    backends: list[BackendState] = field(default_factory=list)
    hash: str = "flow"
    # source rules: prefix (as written, normalised) -> "allow" or "deny"
    acl: dict[str, str] = field(default_factory=dict)
    health: HealthCheck = field(default_factory=HealthCheck)
    all_down: str = "open"  # ALL_DOWN
    # BGP (control/bgp.py): the VIP's address is announced only while this many backends take new flows
    min_healthy: int = 1
    # nat in a cluster: the node the operator routes the backends' replies through, which alone can
    # carry the VIP's flows (None: not said; a cluster refuses plain nat then, etcdstore.py)
    replies_via: str | None = None
    # fullnat: this VIP's own source addresses (empty: the node's pool, State.snat, of its family)
    snat: list[IPAddress] = field(default_factory=list)

    def copy(self) -> "VipState":
        v = _shallow_copy(self)
        v.backends = [_shallow_copy(b) for b in self.backends]
        v.acl, v.health, v.snat = dict(self.acl), _shallow_copy(self.health), list(self.snat)
        return v

    def backend(self, address: BackendAddress) -> BackendState | None:
        for b in self.backends:
            if b.address == address and b.active:
                return b
        return None

    def active_backends(self) -> list[BackendState]:
        return [b for b in self.backends if b.active]

    def revive(self, address: BackendAddress, weight: int) -> BackendState | None:
        """A removed backend added back keeps its id, so its established flows stay with it;
        None if the VIP has no removed backend of that address."""
        b = next((r for r in self.backends if r.address == address and not r.active), None)
        if b is not None:
            b.retired_at, b.weight, b.healthy = None, weight, True
        return b

    def _weighted(self) -> list[BackendState]:
        return [b for b in self.backends if b.active and b.weight > 0]

    @property
    def failing_open(self) -> bool:
        """Every backend that would take new flows fails its check, and the VIP fails open."""
        weighted = self._weighted()
        return self.all_down == "open" and bool(weighted) and not any(b.healthy for b in weighted)

    def maglev_backends(self) -> list[BackendState]:
        """The backends new flows may pick: active, healthy, weight above 0; failing open, all the
        active ones of weight above 0 whatever their checks say."""
        if self.failing_open:
            return self._weighted()
        return [b for b in self.backends if b.serving]

    def takes_new_flows(self, backend: BackendState) -> bool:
        """Whether new flows may pick this backend (what status and metrics call serving)."""
        return any(b is backend for b in self.maglev_backends())

    def ready_to_announce(self) -> bool:
        """Enough backends take new flows (active, healthy by this node's checks, weight above 0) for
        this node to draw the VIP's traffic: failing open does not count."""
        return sum(1 for b in self.backends if b.serving) >= self.min_healthy

    @property
    def replies_through_lb(self) -> bool:
        """Only NAT's backends answer through the LB; dsr and tunnel backends answer the client directly."""
        return self.mode == "nat"

    def check_backend(self, backend: BackendAddress) -> None:
        """dsr and tunnel leave the packet's L4 header alone: a backend listens on the VIP's port."""
        if self.mode in ("dsr", "tunnel") and backend.port != self.vip.port:
            raise InputError(f"backend {backend}: VIP {self.vip} is in {self.mode} mode, which cannot change the "
                             f"port; write the backend without a port (it must listen on the VIP's port)")


@dataclass
class Interface:
    name: str
    ifindex: int
    mode: str  # XDP "native" or "generic", or "tc" (TC ingress)


@dataclass
class DataPlaneState:
    """Where the data plane is and how it was built."""

    interfaces: list[Interface]
    pin_dir: str
    netns_ino: int
    config: dict[str, int]
    # lb.loader.program_digest of the program attached: a restart recompiles only when it differs
    program_digest: str | None = None
    hook: str = "xdp"  # "xdp", or "tc": the TC build at clsact ingress (loader.HOOKS)


def _shallow_copy(obj: T) -> T:
    """A copy of a dataclass instance's fields, whatever they are (3x faster than dataclasses.replace)."""
    new = object.__new__(type(obj))
    new.__dict__.update(obj.__dict__)
    return new


class IdPool:
    """The lowest ids not in `used`, one after another, for a change that takes many (a State's
    allocate_* scan everything per id). Ids are not freed in between: each comes after the last."""

    def __init__(self, used: set[int], first: int, limit: int):
        self.used, self.next, self.limit = set(used), first, limit

    def take(self) -> int | None:
        while self.next < self.limit and self.next in self.used:
            self.next += 1
        if self.next >= self.limit:
            return None
        self.used.add(self.next)
        return self.next


@dataclass
class State:
    """Everything an lb instance should be: persisted by a Store, realised by the Reconciler."""

    dataplane: DataPlaneState | None = None
    vips: list[VipState] = field(default_factory=list)
    # the store's revision this State was loaded at (0: never saved); a transaction saves it as revision + 1
    revision: int = field(default=0, compare=False)
    # VIP addresses whose traffic no VIP serves (other ports, protocols) goes to the host, not dropped
    pass_unserved: set[IPAddress] = field(default_factory=set)
    # The last backend generation handed out: only ever grows (never reset, even by detach).
    generations: int = 0
    # Full NAT's source addresses (the node's pool: addresses of this host) and their ports, first and last
    snat: set[IPAddress] = field(default_factory=set)
    snat_ports: tuple[int, int] = SNAT_PORTS
    _derived = None  # derived(): not a field (neither compared nor copied)

    def snat_sources(self, v: VipState) -> list[IPAddress]:
        """The source addresses a full-NAT VIP's flows take: its own, or the pool's of its IP version."""
        chosen = v.snat or [a for a in self.snat if a.version == v.vip.address.version]
        return sorted(chosen, key=address_sort_key)

    def require_snat(self) -> None:
        """InputError unless every full-NAT VIP has source addresses of its IP version, and few enough."""
        for v in self._reading():
            if v.mode != "fullnat":
                continue
            sources = self.snat_sources(v)
            if not sources:
                raise InputError(f"VIP {v.vip} is fullnat but has no IPv{v.vip.address.version} source address; "
                                 f"add one to the pool (lbctl snat add ADDR) or give the VIP its own (--snat ADDR)")
            if len(sources) > SNAT_ADDRS:
                raise InputError(f"VIP {v.vip} would take {len(sources)} source addresses; at most {SNAT_ADDRS}")
            wrong = [a for a in sources if a.version != v.vip.address.version]
            if wrong:
                raise InputError(f"VIP {v.vip}: source address {wrong[0]} is not of the VIP's IP version")

    def snat_addresses(self) -> set[IPAddress]:
        """Every source address the state names (the pool's and the VIPs' own)."""
        return set(self.snat) | {a for v in self._reading() for a in v.snat}

    def new_generation(self) -> int:
        self.generations += 1
        return self.generations

    def copy(self) -> "State":
        """A deep copy (copy.deepcopy takes over half a second on 1,000 VIPs): addresses are frozen
        and shared, everything a change may edit is copied."""
        return State(copy.deepcopy(self.dataplane), [v.copy() for v in self._reading()], self.revision,
                     set(self.pass_unserved), self.generations, set(self.snat), self.snat_ports)

    def _reading(self) -> list[VipState]:
        """The VIPs, to read and never to edit (a DraftState's share theirs with the State it is over)."""
        return self.vips

    def _editable(self, index: int) -> VipState:
        """The VIP at `index` of the list, to edit."""
        return self.vips[index]

    def unedited(self) -> "State | None":
        """A State equal to this one that no one edits, when there is one at hand (DraftState)."""
        return None

    def done_editing(self) -> None:
        """The change is over: what reads the State from now on only reads it (DraftState)."""

    def edits(self, before: "State") -> "Edits | None":
        """The VIPs that may differ from `before`'s, when this State knows them (a DraftState over
        `before`, its change over); None: any of them may."""
        return None

    def derived(self) -> dict | None:
        """Values worked out from this State's VIPs (the reconciler's), kept with it while no one
        edits it: a store's own State, a DraftState whose change is over; None for another State."""
        return self._derived

    def vip(self, vip: VipAddress) -> VipState | None:
        for i, v in enumerate(self._reading()):
            if v.vip == vip:
                return self._editable(i)
        return None

    def vips_by_id(self, ids: set[int]) -> dict[int, VipState]:
        """The VIPs of these ids that the State has, by id, to edit."""
        return {v.id: self._editable(i) for i, v in enumerate(self._reading()) if v.id in ids}

    def add_vip(self, v: VipState) -> None:
        self.vips.append(v)

    def remove_vip(self, v: VipState) -> None:
        self.vips.remove(v)

    def backend_ids(self) -> set[int]:
        return {b.id for v in self._reading() for b in v.backends}

    def backends_that_are_vips(self) -> set[tuple[str, str]]:
        """(VIP, backend) pairs whose backend's address is a VIP's address: the LB would send the
        packet to an address it takes itself (and whose routes lead nowhere useful)."""
        return _backend_vip_pairs(self._reading(), {v.vip.packed for v in self._reading()})

    def new_backends(self, before: "State") -> list[tuple[VipAddress, BackendAddress]]:
        """(VIP, backend) of the active backends `before` did not have."""
        pairs = self._edited_in_place(before)
        if pairs is not None:
            had = {(o.vip, b.address) for o, _ in pairs for b in o.active_backends()}
            return [(n.vip, b.address) for _, n in pairs for b in n.active_backends() if (n.vip, b.address) not in had]
        fresh = self._fresh(before)
        addresses = {v.vip.packed for v in fresh}
        had = {(v.vip, b.address) for v in before._reading() if v.vip.packed in addresses for b in v.active_backends()}
        return [(v.vip, b.address) for v in fresh for b in v.active_backends() if (v.vip, b.address) not in had]

    def require_no_new_backend_vips(self, before: "State") -> None:
        """InputError if this state has a backend-that-is-a-VIP that `before` did not. Only a VIP that
        is not `before`'s own (edited or added: a draft's untouched VIPs are), or one with a backend
        on an address that became a VIP's, can have one: the others are not looked at."""
        pairs = self._edited_in_place(before)
        if pairs is not None:  # the VIPs' addresses are before's: only the edited VIPs can have a new one
            backends = {b.address.packed for _, n in pairs for b in n.active_backends()}
            if not backends:
                return
            vip_addresses = {v.vip.packed for v in self._reading() if v.vip.packed in backends}
            self._refuse_backend_vips(sorted(_backend_vip_pairs([n for _, n in pairs], vip_addresses) -
                                             _backend_vip_pairs([o for o, _ in pairs], vip_addresses)))
            return
        had = {v.vip.packed for v in before._reading()}  # (bytes: hashed once, unlike ipaddress's)
        now = {v.vip.packed for v in self._reading()}
        appeared = now - had
        mine = self._fresh(before)
        if appeared:
            mine += [v for v in self._reading() if any(b.address.packed in appeared for b in v.backends)]
        if not mine:
            return
        named = {str(v.vip) for v in mine}
        addresses = {v.vip.packed for v in mine}
        theirs = [v for v in before._reading() if v.vip.packed in addresses and str(v.vip) in named]
        self._refuse_backend_vips(sorted(_backend_vip_pairs(mine, now) - _backend_vip_pairs(theirs, had)))

    @staticmethod
    def _refuse_backend_vips(new: list[tuple[str, str]]) -> None:
        if new:
            vip, backend = new[0]
            raise InputError(f"backend {backend} of VIP {vip}: its address is a VIP's address; "
                             f"a backend must be another host")

    def _edited_in_place(self, before: "State") -> list[tuple[VipState, VipState]] | None:
        """The VIPs that differ from `before`'s (as it has them, as this State has them), when this
        State knows them (edits()) and they were edited in place: none added, removed or given
        another address, so the VIPs' addresses are `before`'s. None otherwise."""
        edits = self.edits(before)
        if edits is None:
            return None
        pairs = edits.changed()
        if all(o is not None and n is not None and o.vip == n.vip for o, n in pairs):
            return pairs  # type: ignore[return-value]
        return None

    def _fresh(self, before: "State") -> list[VipState]:
        """This State's VIPs that are not `before`'s own objects (those are as they were), in list order."""
        edits = self.edits(before)
        if edits is not None:
            return [n for _, n in edits.changed() if n is not None]
        olds = {v.id: v for v in before._reading()}
        return [v for v in self._reading() if olds.get(v.id) is not v]

    def new_snat_addresses(self, before: "State") -> set[IPAddress]:
        """The source addresses this State names and `before` did not."""
        edits = self.edits(before)
        if edits is None:
            return self.snat_addresses() - before.snat_addresses()
        named = (self.snat - before.snat) | {a for _, n in edits.changed() if n is not None for a in n.snat}
        return named - before.snat_addresses() if named else set()

    def require_vip(self, vip: VipAddress) -> VipState:
        found = self.vip(vip)
        if found is None:
            raise InputError(f"unknown VIP {vip} (see: lbctl list)")
        return found

    def allocate_vip_id(self, reserved: set[int] = frozenset()) -> int:
        """The lowest id neither used nor `reserved` (ids of VIPs removed in the same change)."""
        limit = self.dataplane.config["max_vips"]
        used = {v.id for v in self._reading()} | reserved
        free = next((i for i in range(limit) if i not in used), None)
        if free is None:
            raise InputError(f"VIP limit reached ({limit}); attach with a larger --max-vips")
        return free

    def allocate_backend_id(self, reserved: set[int] = frozenset()) -> int:
        """The lowest id neither used nor `reserved` (ids of VIPs removed in the same change: a new
        backend must not take over their counters); when all are taken, the one retired longest ago."""
        limit = self.dataplane.config["max_backends"]
        used = self.backend_ids() | reserved
        free = next((i for i in range(1, limit) if i not in used), None)
        if free is not None:
            return free
        retired = [(b.retired_at, b.id, i) for i, v in enumerate(self._reading()) for b in v.backends if not b.active]
        if not retired:
            raise InputError(f"backend limit reached ({limit - 1}); attach with a larger --max-backends")
        _, bid, place = min(retired, key=lambda r: r[0])
        owner = self._editable(place)
        owner.backends = [b for b in owner.backends if b.id != bid]
        return bid


def _backend_vip_pairs(vips: list[VipState], vip_addresses: set[bytes]) -> set[tuple[str, str]]:
    """(VIP, backend) of these VIPs' active backends whose address is one of `vip_addresses` (packed)."""
    return {(str(v.vip), str(b.address)) for v in vips for b in v.active_backends() if b.address.packed in vip_addresses}


@dataclass
class Edits:
    """What a change on a DraftState did to the VIPs of the State under it: each VIP it reached, as
    that State has it and as the draft has it (None: added, or removed), the draft's in its list
    order, then the removed ones. Any VIP not here is the same object in both States."""

    pairs: list[tuple[VipState | None, VipState | None]]

    def changed(self) -> list[tuple[VipState | None, VipState | None]]:
        """The pairs whose two sides differ (a VIP reached and left as it was is not)."""
        return [(o, n) for o, n in self.pairs if o is None or n is None or o != n]


class DraftState(State):
    """A State to change, over one that no one edits (`base`: what a store holds), whose VIPs are
    copied as a change reaches them (vip, vips_by_id, require_vip, allocate_backend_id's retired
    backend), so that a change to one VIP copies one VIP, not the State. Anything that reads
    `vips` itself gets every VIP copied first (it may edit them), as State.copy would have; so
    does a DraftState made as a State is (by dataclasses.replace). Once the change is over,
    done_editing() makes `vips` the list as it stands, its untouched VIPs `base`'s own: what
    reads the State then (checks, the reconciler, the store's save) only reads it, and may ask
    edits() which VIPs differ from base's instead of comparing every VIP."""

    _base: State | None = None
    _own: dict[int, VipState | None] = {}  # id() of the VIPs of the list that are the draft's -> base's
    _removed: list[VipState] = []  # base's VIPs the change took out of the list
    _reached = True  # the list itself was handed out (or replaced): any VIP may have been edited
    _done = True  # the change is over: `vips` hands out the list as it stands
    _edits: Edits | None = None  # edits(), once the change is over

    @classmethod
    def over(cls, base: State) -> "DraftState":
        draft = object.__new__(cls)
        draft.__dict__.update(dataplane=copy.deepcopy(base.dataplane), revision=base.revision,
                              pass_unserved=set(base.pass_unserved), generations=base.generations,
                              snat=set(base.snat), snat_ports=base.snat_ports)
        draft._base, draft._list, draft._own, draft._removed = base, list(base.vips), {}, []
        draft._reached = draft._done = False
        return draft

    @property  # type: ignore[override]
    def vips(self) -> list[VipState]:
        if not self._reached and not self._done:
            self._list = [v if id(v) in self._own else v.copy() for v in self._list]
            self._reached = True
        return self._list

    @vips.setter
    def vips(self, value: list[VipState]) -> None:
        self._list, self._reached = value, True

    def __eq__(self, other: object) -> bool:  # a State and a DraftState of the same contents are equal
        if not isinstance(other, State):
            return NotImplemented
        fields = ("dataplane", "pass_unserved", "generations", "snat", "snat_ports")
        return all(getattr(self, f) == getattr(other, f) for f in fields) and \
            self._reading() == other._reading()

    __hash__ = None  # type: ignore[assignment]

    def _reading(self) -> list[VipState]:
        return self._list

    def _editable(self, index: int) -> VipState:
        v = self._list[index]
        if not self._reached and not self._done and id(v) not in self._own:
            copied = self._list[index] = v.copy()
            self._own[id(copied)] = v
            return copied
        return v

    def add_vip(self, v: VipState) -> None:
        self._list.append(v)
        if not self._reached:
            self._own[id(v)] = None

    def remove_vip(self, v: VipState) -> None:
        self._list.remove(v)
        if not self._reached:
            base_vip = self._own.pop(id(v), v)  # (v itself: one of base's, removed without a copy)
            if base_vip is not None:
                self._removed.append(base_vip)

    def unedited(self) -> State | None:
        """`base`, while nothing of this draft has been reached for an edit or changed."""
        b = self._base
        if b is None or self._reached or self._done or self._own or self._removed:
            return None
        same = (self.dataplane, self.revision, self.pass_unserved, self.generations, self.snat, self.snat_ports) == \
            (b.dataplane, b.revision, b.pass_unserved, b.generations, b.snat, b.snat_ports)
        return b if same and len(self._list) == len(b.vips) else None

    def done_editing(self) -> None:
        self._done = True
        if not self._reached:
            self._derived = {}

    def derived(self) -> dict | None:
        return None if self._reached else self._derived

    def edits(self, before: State) -> Edits | None:
        if before is not self._base or self._reached or not self._done:
            return None
        if self._edits is None:  # (the list no longer changes)
            own = self._own
            self._edits = Edits([(own[id(v)], v) for v in self._list if id(v) in own] +
                                [(o, None) for o in self._removed])
        return self._edits
