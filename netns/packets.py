"""Raw frames in and out of lab interfaces (AF_PACKET), for byte-exact checks with scapy."""
from __future__ import annotations

import contextlib
import select
import socket
import struct
import time
from typing import Callable, Iterator

from netns.nsenter import socket_in

ETH_P_ALL = 0x0003
PACKET_OUTGOING = 4
SOL_PACKET, PACKET_AUXDATA = 263, 8
# struct tpacket_auxdata: status, len, snaplen, mac, net, vlan_tci, vlan_tpid
_AUXDATA = struct.Struct("=IIIHHHH")
TP_STATUS_VLAN_VALID, TP_STATUS_VLAN_TPID_VALID = 1 << 4, 1 << 6


@contextlib.contextmanager
def capture(ns: str, ifname: str, tags: bool = False) -> Iterator["Capture"]:
    """Start capturing before sending, so no frame is missed. tags: frames come with their VLAN tag
    where the wire had it (the kernel moves a received tag out of the frame, into the packet's
    metadata, before a capture sees it; tcpdump puts it back the same way)."""
    sock = socket_in(ns, socket.AF_PACKET, socket.SOCK_RAW, socket.htons(ETH_P_ALL))
    try:
        sock.bind((ifname, 0))
        sock.setblocking(False)
        if tags:
            sock.setsockopt(SOL_PACKET, PACKET_AUXDATA, 1)
        yield Capture(sock, tags)
    finally:
        sock.close()


def _with_tag(frame: bytes, ancillary: list) -> bytes:
    """The frame with the VLAN tag the kernel took out of it (PACKET_AUXDATA) put back after the MACs."""
    for level, kind, data in ancillary:
        if (level, kind) != (SOL_PACKET, PACKET_AUXDATA) or len(data) < _AUXDATA.size:
            continue
        status, _, _, _, _, tci, tpid = _AUXDATA.unpack_from(data)
        if status & TP_STATUS_VLAN_VALID:
            tpid = tpid if status & TP_STATUS_VLAN_TPID_VALID else 0x8100
            return frame[:12] + struct.pack("!HH", tpid, tci) + frame[12:]
    return frame


class Capture:
    def __init__(self, sock: socket.socket, tags: bool = False):
        self.sock = sock
        self.tags = tags

    def next(self, match: Callable[[bytes], bool], timeout: float = 2.0) -> bytes | None:
        """The first received (not sent) frame for which match() holds, or None at the timeout."""
        deadline = time.monotonic() + timeout
        while (left := deadline - time.monotonic()) > 0:
            ready, _, _ = select.select([self.sock], [], [], left)
            if not ready:
                break
            frame, ancillary, _, meta = self.sock.recvmsg(65535, socket.CMSG_SPACE(_AUXDATA.size))
            if self.tags:
                frame = _with_tag(frame, ancillary)
            if meta[2] != PACKET_OUTGOING and match(frame):
                return frame
        return None


def send_frame(ns: str, ifname: str, frame: bytes) -> None:
    sock = socket_in(ns, socket.AF_PACKET, socket.SOCK_RAW, 0)
    try:
        sock.bind((ifname, 0))
        sock.send(frame)
    finally:
        sock.close()
