"""Which interfaces can hand native XDP frames whose checksum is only partial.

A local sender that offloads TX checksums (a veth's peer, a VM behind a tap)
passes its frames on with a partial checksum (CHECKSUM_PARTIAL: the field holds
only the pseudo-header sum, the rest is left to the egress). Native XDP's
XDP_TX/XDP_REDIRECT turns the frame into a bare buffer and loses that state, so
the receiver verifies a checksum nobody completed. Generic (skb) XDP keeps it.
Frames from a physical NIC's wire always carry full checksums.

How each kind of interface is judged:
- veth: partial when its peer has TX checksum offload on (the peer is found by
  IFLA_LINK in the namespace IFLA_LINK_NETNSID names, read from a thread
  entered there);
- tun/tap: the writer (a VM, a container runtime) may hand over partial
  checksums: always;
- macvlan, macvtap, ipvlan: local siblings deliver their frames unfinished: always;
- bridge: its local ports (veths of containers) do the same: always (a bridge has no native XDP anyway);
- VLAN: as the device below it;
- anything else (NICs, bonds of NICs): never."""
from __future__ import annotations

import ctypes
import fcntl
import os
import socket
import struct
import threading
from dataclasses import dataclass

from pyroute2 import IPRoute

CLONE_NEWNET = 0x40000000
SIOCETHTOOL = 0x8946
SIOCGIFNAME = 0x8910
ETHTOOL_GTXCSUM = 0x16
RTM_NEWNSID, RTM_GETNSID = 88, 90
NETNSA_NSID, NETNSA_FD = 1, 3
NLM_F_REQUEST = 1

ALWAYS_PARTIAL = {
    "tun": "a tun/tap's writer (a VM) may hand over partial checksums",
    "macvlan": "local macvlan siblings deliver unfinished checksums",
    "macvtap": "local macvtap siblings deliver unfinished checksums",
    "ipvlan": "local ipvlan siblings deliver unfinished checksums",
    "bridge": "a bridge's local ports (containers' veths) deliver unfinished checksums",
}

_libc = ctypes.CDLL(None, use_errno=True)


class _EthtoolValue(ctypes.Structure):
    _fields_ = [("cmd", ctypes.c_uint32), ("data", ctypes.c_uint32)]


class _IfReq(ctypes.Structure):
    _fields_ = [("name", ctypes.c_char * 16), ("data", ctypes.c_void_p), ("pad", ctypes.c_char * 16)]


class _IfIndexReq(ctypes.Structure):
    _fields_ = [("name", ctypes.c_char * 16), ("ifindex", ctypes.c_int), ("pad", ctypes.c_char * 20)]


@dataclass
class PartialChecksums:
    """Frames arriving on an interface may carry partial checksums: why, and the veth peer whose
    offload is the cause (None for other kinds)."""

    reason: str
    peer: str | None = None

    def fix(self) -> str:
        sender = f"'ethtool -K {self.peer} tx off' on the peer" if self.peer else "TX checksum offload off on the sender"
        return f"{sender}, or --hook tc"


def partial_checksums(ifindex: int) -> PartialChecksums | None:
    """Whether frames arriving on ifindex (this namespace) may carry partial checksums."""
    with IPRoute() as ipr:
        link = ipr.link("get", index=ifindex)[0]
    info = link.get_attr("IFLA_LINKINFO")
    kind = info.get_attr("IFLA_INFO_KIND") if info else None
    if kind in ALWAYS_PARTIAL:
        return PartialChecksums(ALWAYS_PARTIAL[kind])
    peer = link.get_attr("IFLA_LINK")
    if kind == "vlan" and peer and link.get_attr("IFLA_LINK_NETNSID") is None:
        return partial_checksums(peer)  # the device it is stacked on
    if kind != "veth":
        return None
    nsid = link.get_attr("IFLA_LINK_NETNSID")
    try:
        name, tx_csum = _peer_tx_checksum(peer, nsid)
    except OSError as e:
        return PartialChecksums(f"its veth peer (ifindex {peer}) could not be inspected ({e.strerror or e})")
    if tx_csum:
        return PartialChecksums(f"its veth peer {name} offloads TX checksums", name)
    return None


def _peer_tx_checksum(ifindex: int, nsid: int | None) -> tuple[str, bool]:
    """The name of interface ifindex in the namespace with that nsid (None: this one), and whether
    it offloads TX checksums."""
    if nsid is None:
        return _tx_checksum_here(ifindex)
    fd = _netns_with_nsid(nsid)
    if fd is None:
        raise OSError(0, f"no namespace with nsid {nsid} found")
    result: list[tuple[str, bool]] = []
    error: list[BaseException] = []

    def inside() -> None:  # setns moves this thread only; it ends with the answer
        try:
            if _libc.setns(fd, CLONE_NEWNET) != 0:
                err = ctypes.get_errno()
                raise OSError(err, os.strerror(err))
            result.append(_tx_checksum_here(ifindex))
        except BaseException as e:  # handed to the caller's thread
            error.append(e)

    try:
        t = threading.Thread(target=inside, name="lb-offload-probe")
        t.start()
        t.join()
    finally:
        os.close(fd)
    if error:
        raise error[0]
    return result[0]


def _tx_checksum_here(ifindex: int) -> tuple[str, bool]:
    """Interface ifindex of the calling thread's namespace: its name, and its TX checksum offload."""
    with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as s:
        req = _IfIndexReq(ifindex=ifindex)
        fcntl.ioctl(s.fileno(), SIOCGIFNAME, req)
        value = _EthtoolValue(cmd=ETHTOOL_GTXCSUM)
        ifr = _IfReq(name=req.name, data=ctypes.addressof(value))
        fcntl.ioctl(s.fileno(), SIOCETHTOOL, ifr)
        return req.name.decode(), bool(value.data)


def _netns_with_nsid(nsid: int) -> int | None:
    """An open fd of the namespace this one calls nsid: named ones first, then every process's."""
    seen: set[tuple[int, int]] = set()
    for path in _netns_candidates():
        try:
            fd = os.open(path, os.O_RDONLY)
        except OSError:
            continue
        st = os.fstat(fd)
        if (st.st_dev, st.st_ino) in seen or _nsid_of(fd) != nsid:
            seen.add((st.st_dev, st.st_ino))
            os.close(fd)
            continue
        return fd
    return None


def _netns_candidates():
    if os.path.isdir("/run/netns"):
        for name in sorted(os.listdir("/run/netns")):
            yield os.path.join("/run/netns", name)
    for pid in os.listdir("/proc"):
        if pid.isdigit():
            yield f"/proc/{pid}/ns/net"


def _nsid_of(fd: int) -> int | None:
    """The id this namespace gives the namespace of fd (RTM_GETNSID), None if it has none."""
    attr = struct.pack("HHI", 8, NETNSA_FD, fd)
    body = struct.pack("Bxxx", socket.AF_UNSPEC) + attr
    msg = struct.pack("IHHII", 16 + len(body), RTM_GETNSID, NLM_F_REQUEST, 1, 0) + body
    with socket.socket(socket.AF_NETLINK, socket.SOCK_RAW, socket.NETLINK_ROUTE) as s:
        s.sendto(msg, (0, 0))
        reply = s.recv(4096)
    length, kind = struct.unpack_from("IH", reply)
    if kind != RTM_NEWNSID:
        return None
    off = 16 + 4
    while off + 4 <= length:
        alen, atype = struct.unpack_from("HH", reply, off)
        if atype == NETNSA_NSID:
            (value,) = struct.unpack_from("i", reply, off + 4)
            return value if value >= 0 else None
        off += (alen + 3) & ~3
    return None
