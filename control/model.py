"""Desired state as typed values, and the parsing of operator input into them."""
from __future__ import annotations

import ipaddress
import re
from dataclasses import dataclass, field

from control.errors import InputError
from lb.structs import IPAddress, PROTOCOLS

MODES = ("nat",)
HASHES = ("flow", "source")  # source: session affinity on the client's address

_ENDPOINT = re.compile(r"^(?:\[(?P<v6>[^\]]+)\]|(?P<v4>[^:/\[\]]+))(?::(?P<port>[^/]*))?(?:/(?P<proto>.*))?$")


def _parse_address(text: str, original: str) -> IPAddress:
    try:
        return ipaddress.ip_address(text)
    except ValueError:
        raise InputError(f"{original!r}: {text!r} is not an IP address") from None


def _parse_port(text: str, original: str) -> int:
    if not text.isdigit():
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
    def parse(cls, text: str) -> "VipAddress":
        address, port, proto = _split(text)
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
        if proto is not None:
            raise InputError(f"{text!r}: a backend takes the VIP's protocol; write ADDR[:PORT] without /{proto}")
        if port is None:
            return cls(address, vip.port)
        if vip.any_port:
            raise InputError(f"{text!r}: VIP {vip} takes every port, so its backends keep the client's port; "
                             f"write the backend without a port")
        return cls(address, _parse_port(port, text))

    def __str__(self) -> str:
        return format_endpoint(self.address, self.port)


@dataclass
class BackendState:
    address: BackendAddress
    id: int
    weight: int = 1
    # Set when removed: kept (not in the Maglev table) so established flows go on.
    retired_at: float | None = None

    @property
    def active(self) -> bool:
        return self.retired_at is None


@dataclass
class VipState:
    vip: VipAddress
    id: int
    mode: str = "nat"
    backends: list[BackendState] = field(default_factory=list)
    hash: str = "flow"
    # source rules: prefix (as written, normalised) -> "allow" or "deny"
    acl: dict[str, str] = field(default_factory=dict)

    def backend(self, address: BackendAddress) -> BackendState | None:
        for b in self.backends:
            if b.address == address and b.active:
                return b
        return None

    def active_backends(self) -> list[BackendState]:
        return [b for b in self.backends if b.active]


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
    hook: str = "xdp"  # "xdp", or "tc": the TC build at clsact ingress (loader.HOOKS)


@dataclass
class State:
    """Everything an lb instance should be: persisted by a Store, realised by the Reconciler."""

    dataplane: DataPlaneState | None = None
    vips: list[VipState] = field(default_factory=list)

    def vip(self, vip: VipAddress) -> VipState | None:
        for v in self.vips:
            if v.vip == vip:
                return v
        return None

    def backend_ids(self) -> set[int]:
        return {b.id for v in self.vips for b in v.backends}

    def require_vip(self, vip: VipAddress) -> VipState:
        found = self.vip(vip)
        if found is None:
            raise InputError(f"unknown VIP {vip} (see: lbctl list)")
        return found
