"""The kernel settings the data plane leans on, read from /proc/sys (per network namespace).

lb forwards most packets itself, but hands some to the kernel to forward: NAT and tunnel packets
towards a neighbour whose MAC is unknown, or out of an interface lb is not attached to. That needs
IP forwarding (IPv6 too for IPv6 VIPs). And dsr and tunnel backends' replies, or NAT replies the
kernel routes, may cross the LB host with a VIP as their source: strict reverse-path filtering on
the interface they arrive on drops them."""
from __future__ import annotations

from pathlib import Path

SYSCTL = Path("/proc/sys")


def read_sysctl(key: str, root: Path = SYSCTL) -> str | None:
    """A sysctl's value (key as in sysctl(8): net.ipv4.ip_forward), None if it does not exist."""
    try:
        return (root / key.replace(".", "/")).read_text().strip()
    except OSError:
        return None


def missing_settings(ifnames: list[str], ipv6: bool, root: Path = SYSCTL) -> list[str]:
    """The settings to change, each as `sysctl -w` takes it; empty when all is well."""
    missing = []
    if read_sysctl("net.ipv4.ip_forward", root) != "1":
        missing.append("net.ipv4.ip_forward=1")
    if ipv6 and read_sysctl("net.ipv6.conf.all.forwarding", root) not in (None, "1"):
        missing.append("net.ipv6.conf.all.forwarding=1")
    # the kernel applies the larger of "all" and the interface's: 1 is strict, 2 (loose) lets them by
    strict_all = read_sysctl("net.ipv4.conf.all.rp_filter", root) == "1"
    if strict_all:
        missing.append("net.ipv4.conf.all.rp_filter=0")
    for name in ifnames:
        if read_sysctl(f"net.ipv4.conf.{name}.rp_filter", root) == "1":
            missing.append(f"net.ipv4.conf.{name}.rp_filter=0")
    return missing


def describe(missing: list[str]) -> str | None:
    """One line for the operator, or None."""
    if not missing:
        return None
    return ("the kernel forwards some of lb's packets (towards unresolved neighbours, out of interfaces lb is "
            "not attached to) and sees replies from VIPs: set " + " ".join(missing) + " (sysctl -w)")
