"""Raw frames in and out of lab interfaces (AF_PACKET), for byte-exact checks with scapy."""
from __future__ import annotations

import contextlib
import select
import socket
import time
from typing import Callable, Iterator

from netns.nsenter import socket_in

ETH_P_ALL = 0x0003
PACKET_OUTGOING = 4


@contextlib.contextmanager
def capture(ns: str, ifname: str) -> Iterator["Capture"]:
    """Start capturing before sending, so no frame is missed."""
    sock = socket_in(ns, socket.AF_PACKET, socket.SOCK_RAW, socket.htons(ETH_P_ALL))
    try:
        sock.bind((ifname, 0))
        sock.setblocking(False)
        yield Capture(sock)
    finally:
        sock.close()


class Capture:
    def __init__(self, sock: socket.socket):
        self.sock = sock

    def next(self, match: Callable[[bytes], bool], timeout: float = 2.0) -> bytes | None:
        """The first received (not sent) frame for which match() holds, or None at the timeout."""
        deadline = time.monotonic() + timeout
        while (left := deadline - time.monotonic()) > 0:
            ready, _, _ = select.select([self.sock], [], [], left)
            if not ready:
                break
            frame, meta = self.sock.recvfrom(65535)
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
