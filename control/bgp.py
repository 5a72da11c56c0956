"""VIP announcements over BGP, for a cluster of LB nodes behind an ECMP router.

One job: decide which VIP addresses this node announces, and tell the speaker.
An address (its /32 or /128) of the session's IP version (the next hop is
this node's address on the session) is announced while this node's data plane is
attached and at least one VIP on it has `min_healthy` backends taking new flows
by this node's own health checks (VipState.ready_to_announce; a full-NAT VIP
also needs a source address of this node's pool; one ready VIP
keeps the address: withdrawing it would take the healthy VIPs of the address
down with the broken one), and only after `settle` seconds from the start, so
that a node that joins has its state before it draws flows. Everything is
withdrawn when the daemon stops; the data plane keeps forwarding meanwhile, so
flows in flight go on through it until the router moves them.

The speaker is ExaBGP (Debian's `exabgp`): a child process of the daemon,
configured from the daemon's options, which reads route commands
(`announce route 198.19.0.1/32 next-hop self`) from the standard output of a
helper it runs (`cat` of a FIFO the daemon writes to). It dies with the daemon
(PR_SET_PDEATHSIG): a node whose daemon is killed closes its sessions, and the
router withdraws its routes at once. ExaBGP has no BFD, so a frozen node is
noticed by the BGP hold timer: 3 s by default (the smallest RFC 4271 allows),
keepalives every second."""
from __future__ import annotations

import contextlib
import ctypes
import hashlib
import ipaddress
import logging
import os
import shutil
import signal
import socket
import subprocess
import threading
import time
from dataclasses import dataclass, field
from typing import Callable, Protocol

from control.errors import InputError, LbError
from control.model import State
from lb.structs import IPAddress

log = logging.getLogger("lb.bgp")

Prefix = ipaddress.IPv4Network | ipaddress.IPv6Network
MIN_HOLD_TIME = 3  # seconds: RFC 4271's smallest non-zero hold time
_PR_SET_PDEATHSIG = 1


@dataclass(frozen=True)
class BgpOptions:
    """The daemon's --bgp-* options, checked."""

    peer: IPAddress
    local_as: int
    peer_as: int
    router_id: ipaddress.IPv4Address | None = None  # default: default_router_id(the local address)
    local_address: IPAddress | None = None  # default: the source the kernel picks towards the peer
    hold_time: int = MIN_HOLD_TIME
    settle: float = 5.0
    runtime_dir: str = "/run/lb"
    name: str = "lb"  # the instance's (network namespace's) name: ExaBGP's files go to runtime_dir/bgp-NAME

    def __post_init__(self) -> None:
        for name in ("local_as", "peer_as"):
            if not 1 <= getattr(self, name) <= 4294967295:
                raise InputError(f"--bgp-{name.replace('_', '-')} {getattr(self, name)}: an AS number is 1-4294967295")
        if not (self.hold_time == 0 or MIN_HOLD_TIME <= self.hold_time <= 65535):
            raise InputError(f"--bgp-hold-time {self.hold_time}: 0 (no keepalives) or {MIN_HOLD_TIME}-65535 seconds")
        if not 0 <= self.settle <= 3600:
            raise InputError(f"--bgp-settle {self.settle}: 0-3600 seconds")

    @classmethod
    def parse(cls, peer: str, local_as: int | None, peer_as: int | None, router_id: str | None = None,
              local_address: str | None = None, hold_time: int = MIN_HOLD_TIME, settle: float = 5.0,
              runtime_dir: str = "/run/lb", name: str = "lb") -> "BgpOptions":
        if local_as is None or peer_as is None:
            raise InputError("--bgp-peer needs --bgp-local-as and --bgp-peer-as")

        def address(text: str, option: str) -> IPAddress:
            try:
                return ipaddress.ip_address(text)
            except ValueError:
                raise InputError(f"{option} {text!r} is not an IP address") from None

        rid = None
        if router_id is not None:
            rid = address(router_id, "--bgp-router-id")
            if rid.version != 4:
                raise InputError(f"--bgp-router-id {router_id!r}: a router id is written as an IPv4 address")
        local = address(local_address, "--bgp-local-address") if local_address else None
        return cls(address(peer, "--bgp-peer"), local_as, peer_as, rid, local, hold_time, settle, runtime_dir, name)

    def resolved_local_address(self) -> IPAddress:
        """The local address given, or the one the kernel's routes pick to reach the peer."""
        if self.local_address is not None:
            return self.local_address
        family = socket.AF_INET if self.peer.version == 4 else socket.AF_INET6
        with socket.socket(family, socket.SOCK_DGRAM) as probe:
            try:
                probe.connect((str(self.peer), 179))  # UDP: no packet leaves, the route is chosen
            except OSError as e:
                raise LbError(f"no route to BGP peer {self.peer}: {e.strerror}") from None
            return ipaddress.ip_address(probe.getsockname()[0])


def host_prefix(address: IPAddress) -> Prefix:
    return ipaddress.ip_network(f"{address}/{address.max_prefixlen}")


def wanted_prefixes(state: State | None, version: int | None = None) -> set[Prefix]:
    """The prefixes this node should announce for `state` (None: nothing, the node is not serving),
    of one IP version if given (a session's next hop is an address of its own family)."""
    if state is None or state.dataplane is None:
        return set()
    # a full-NAT VIP also needs a source address of this node's own (its pool: each node's, never shared),
    # or its new flows here would be dropped as the pool's exhaustion
    return {host_prefix(v.vip.address) for v in state.vips
            if v.ready_to_announce() and (v.mode != "fullnat" or state.snat_sources(v))
            and version in (None, v.vip.address.version)}


class Speaker(Protocol):
    def announce(self, prefix: Prefix) -> None: ...
    def withdraw(self, prefix: Prefix) -> None: ...


@dataclass
class Announcer:
    """Holds the set of announced prefixes in line with what the state calls for, once settled."""

    speaker: Speaker
    settle: float
    version: int | None = None  # announce only VIPs of this IP version (the session's): None for all
    clock: Callable[[], float] = time.monotonic
    started: float = field(default=0.0)
    announced: set[Prefix] = field(default_factory=set)

    def __post_init__(self) -> None:
        self.started = self.clock()

    @property
    def settled(self) -> bool:
        return self.clock() - self.started >= self.settle

    def update(self, state: State | None) -> tuple[list[Prefix], list[Prefix]]:
        """Announce and withdraw what differs; returns (announced, withdrawn) by this call."""
        wanted = wanted_prefixes(state, self.version) if self.settled else set()
        return self._set(wanted)

    def withdraw_all(self) -> list[Prefix]:
        return self._set(set())[1]

    def forget(self) -> None:
        """The speaker lost its routes (it was restarted): announce everything again next update."""
        self.announced.clear()

    def _set(self, wanted: set[Prefix]) -> tuple[list[Prefix], list[Prefix]]:
        key = lambda p: (p.version, int(p.network_address))  # noqa: E731
        added = sorted(wanted - self.announced, key=key)
        removed = sorted(self.announced - wanted, key=key)
        for prefix in removed:
            self.speaker.withdraw(prefix)
            self.announced.discard(prefix)
        for prefix in added:
            self.speaker.announce(prefix)
            self.announced.add(prefix)
        return added, removed


def default_router_id(local: ipaddress.IPv4Address | ipaddress.IPv6Address) -> ipaddress.IPv4Address:
    """A session's router id without --bgp-router-id: its IPv4 local address, else 32 bits hashed from
    its IPv6 one (its last 32 bits would be the same on nodes that differ only in their subnet,
    as fd00:18:11::2 and fd00:18:12::2 do), never 0.0.0.0 (peers refuse it)."""
    if local.version == 4:
        return local
    digest = int.from_bytes(hashlib.sha256(local.packed).digest()[:4], "big")
    return ipaddress.IPv4Address(digest or 1)


def _die_with_parent() -> None:
    """In the child before exec: SIGTERM when the thread that started it ends (the daemon's BGP
    thread, which ends only with the daemon; kill -9 of the daemon ends it too)."""
    ctypes.CDLL(None, use_errno=True).prctl(_PR_SET_PDEATHSIG, signal.SIGTERM, 0, 0, 0)


class ExaBgp:
    """An ExaBGP process with one neighbour, driven through a FIFO its API helper (cat) relays."""

    def __init__(self, options: BgpOptions):
        self.options = options
        self.local = options.resolved_local_address()
        self.router_id = options.router_id or default_router_id(self.local)
        exabgp = shutil.which("exabgp") or ("/usr/sbin/exabgp" if os.path.exists("/usr/sbin/exabgp") else None)
        if exabgp is None:
            raise LbError("exabgp is not installed (make setup installs Debian's exabgp)")
        # one directory per daemon (one daemon per namespace): what a killed daemon left goes now
        self.dir = os.path.join(options.runtime_dir, f"bgp-{options.name}")
        shutil.rmtree(self.dir, ignore_errors=True)
        os.makedirs(self.dir, mode=0o700)
        self.fifo = os.path.join(self.dir, "api")
        os.mkfifo(self.fifo, 0o600)
        self.config = os.path.join(self.dir, "exabgp.conf")
        with open(self.config, "w") as f:
            f.write(self._config_text())
        self.log_path = os.path.join(self.dir, "exabgp.log")
        env = {"PATH": "/usr/sbin:/usr/bin:/sbin:/bin",
               "exabgp_daemon_user": "root", "exabgp_daemon_drop": "false",  # it reads the daemon's FIFO
               "exabgp_api_ack": "false",  # nobody reads its answers
               "exabgp_api_cli": "false", "exabgp_log_destination": "stdout", "exabgp_daemon_daemonize": "false"}
        with open(self.log_path, "ab") as out:
            self.proc = subprocess.Popen([exabgp, self.config], stdin=subprocess.DEVNULL, stdout=out,
                                         stderr=subprocess.STDOUT, env=env, preexec_fn=_die_with_parent)
        self._pipe: int | None = None
        self._lock = threading.Lock()

    def _config_text(self) -> str:
        o = self.options
        families = "ipv4 unicast;" if o.peer.version == 4 else "ipv6 unicast;"
        return (f"process lb {{\n  run /bin/cat {self.fifo};\n  encoder text;\n}}\n"
                f"neighbor {o.peer} {{\n  router-id {self.router_id};\n  local-address {self.local};\n"
                f"  local-as {o.local_as};\n  peer-as {o.peer_as};\n  hold-time {o.hold_time};\n"
                f"  family {{ {families} }}\n  api {{ processes [ lb ]; }}\n}}\n")

    def alive(self) -> bool:
        return self.proc.poll() is None

    def _write(self, line: str, timeout: float = 10.0) -> None:
        with self._lock:
            deadline = time.monotonic() + timeout
            while self._pipe is None:  # the helper opens the FIFO once ExaBGP runs it
                try:
                    self._pipe = os.open(self.fifo, os.O_WRONLY | os.O_NONBLOCK)
                    os.set_blocking(self._pipe, True)
                except OSError:  # ENXIO: no reader yet
                    if not self.alive() or time.monotonic() > deadline:
                        raise LbError(f"exabgp is not reading its commands: {self.log_tail()}") from None
                    time.sleep(0.05)
            try:
                os.write(self._pipe, (line + "\n").encode())
            except OSError as e:  # the helper went away (ExaBGP stopped)
                os.close(self._pipe)
                self._pipe = None
                raise LbError(f"exabgp stopped taking commands ({e.strerror}): {self.log_tail()}") from None

    def announce(self, prefix: Prefix) -> None:
        self._write(f"announce route {prefix} next-hop self")

    def withdraw(self, prefix: Prefix) -> None:
        self._write(f"withdraw route {prefix} next-hop self")

    def log_tail(self, size: int = 600) -> str:
        with contextlib.suppress(OSError), open(self.log_path, "rb") as f:
            f.seek(max(os.fstat(f.fileno()).st_size - size, 0))
            return f.read().decode(errors="replace").strip().replace("\n", " | ")
        return ""

    def close(self, linger: float = 0.5) -> None:
        """Stop ExaBGP: it closes the session (the router drops what is left of our routes)."""
        if self._pipe is not None and self.alive():
            time.sleep(linger)  # the last withdrawals leave before the session closes
        if self.alive():
            self.proc.terminate()
            try:
                self.proc.wait(timeout=10)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait(timeout=10)
        if self._pipe is not None:
            with contextlib.suppress(OSError):
                os.close(self._pipe)
        shutil.rmtree(self.dir, ignore_errors=True)


def follow(options: BgpOptions, read_state: Callable[[], State | None], stop: threading.Event,
           interval: float = 0.25, speaker_factory: Callable[[BgpOptions], ExaBgp] = ExaBgp) -> None:
    """The daemon's BGP thread: start the speaker, keep its announcements in line with the state
    every `interval` until `stop`, then withdraw everything and stop the speaker. `read_state`
    raising (the store unreachable) keeps the announcements as they are: the data plane goes on
    forwarding with its last state. A speaker that dies is started again."""
    speaker = None
    while speaker is None:  # a speaker that cannot start (no route to the peer yet) is tried again
        try:
            speaker = speaker_factory(options)
        except (LbError, OSError) as e:
            _event("bgp speaker not started; trying again in 5 s", logging.ERROR, error=str(e))
            if stop.wait(5.0):
                return
    announcer = Announcer(speaker, options.settle, options.peer.version)
    _event("bgp speaker started", peer=str(options.peer), local=str(speaker.local), settle=options.settle,
           hold_time=options.hold_time, log=speaker.log_path)
    unreadable = False  # logged once per outage
    try:
        while not stop.wait(interval):
            if not speaker.alive():
                _event("bgp speaker died, starting it again", logging.WARNING, output=speaker.log_tail())
                speaker.close()
                speaker = speaker_factory(options)
                announcer.speaker = speaker
                announcer.forget()
            try:
                state = read_state()
            except Exception as e:  # noqa: BLE001 (whatever it is, the announcements stay as they are)
                if not unreadable:
                    _event("bgp: state unreadable, announcements kept", logging.WARNING, error=str(e))
                unreadable = True
                continue
            unreadable = False
            try:
                added, removed = announcer.update(state)
            except LbError as e:
                _event(str(e), logging.WARNING)
                continue
            if added or removed:
                _event("bgp announcements changed", announced=[str(p) for p in added],
                       withdrawn=[str(p) for p in removed])
    finally:
        with contextlib.suppress(LbError):
            removed = announcer.withdraw_all()
            _event("bgp: withdrawn all", withdrawn=[str(p) for p in removed])
        speaker.close()


def _event(msg: str, level: int = logging.INFO, **fields: object) -> None:
    log.log(level, msg, extra={"fields": fields})
