"""Ask the loaded data plane what it does with one packet: action, output, reason, backend.

The packet runs through the real program (BPF_PROG_TEST_RUN) with its real maps,
so a packet to a VIP creates its flow like any other. The program writes the
reason of its verdict into the probe's XDP metadata (struct probe_meta)."""
from __future__ import annotations

import ctypes
from dataclasses import dataclass

from lb.refmodel import ICMP, ICMPV6, DataPlaneModel, Parsed, decapsulated
from lb.structs import PROBE_MAGIC, REASONS, ProbeMeta
from lb.testrun import run_xdp


@dataclass(frozen=True)
class Probe:
    action: str
    packet: bytes
    reason: str | None
    backend: tuple[bytes, int] | None  # (16-byte lb_addr, port)


def backend_of(before: bytes, after: bytes, reason: str | None = None) -> tuple[bytes, int] | None:
    """The backend a rewrite involved: the new destination (NAT, full NAT), the outer one (tunnel), or the
    source a reply came from (a full-NAT reply changes its destination too). DSR changes no address: its
    backend shows only in the MAC."""
    tunnel = decapsulated(after) if len(after) > len(before) else None
    p_in, p_out = DataPlaneModel.parse(before), DataPlaneModel.parse(tunnel[1] if tunnel else after)
    if tunnel and isinstance(p_out, Parsed):
        return tunnel[0], p_out.dport
    if not isinstance(p_in, Parsed) or not isinstance(p_out, Parsed) or p_in.proto in (ICMP, ICMPV6):
        return None
    if reason == "fwd_fullnat_reply":
        return p_in.src, p_in.sport
    if (p_in.dst, p_in.dport) != (p_out.dst, p_out.dport):
        return p_out.dst, p_out.dport
    if (p_in.src, p_in.sport) != (p_out.src, p_out.sport):
        return p_in.src, p_in.sport
    return None


def probe(prog_fd: int, frame: bytes, ingress_ifindex: int) -> Probe:
    asked = ProbeMeta(magic=PROBE_MAGIC, reason=0xFFFFFFFF)
    result = run_xdp(prog_fd, frame, ingress_ifindex, meta=bytes(asked))
    answer = ProbeMeta.from_buffer_copy(result.meta) if len(result.meta) == ctypes.sizeof(ProbeMeta) else asked
    reason = REASONS[answer.reason].removeprefix("LB_").lower() if answer.reason < len(REASONS) else None
    return Probe(result.action, result.packet, reason, backend_of(frame, result.packet, reason))
