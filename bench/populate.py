"""Add many VIPs or backends at once through the Controller (the code lbctl runs), in one process.

Run inside the LB's namespace: `ip netns exec NS python -m bench.populate vips COUNT` or
`... backends VIP HOST[,HOST...] COUNT`. A process of its own keeps the netlink library's
state out of the benchmark process, which moves between namespaces."""
from __future__ import annotations

import sys

from control.service import Controller


def main(argv: list[str]) -> None:
    ctl = Controller.open()
    if argv[0] == "vips":
        count = len(ctl.list()["vips"])
        while count < int(argv[1]):
            ctl.add_vip(f"198.19.{1 + count // 250}.{count % 250 + 1}:80/tcp")
            count += 1
    elif argv[0] == "backends":
        vip, hosts, target = argv[1], argv[2].split(","), int(argv[3])
        listed = next((v for v in ctl.list()["vips"] if v["vip"] == vip), None)
        if listed is None:
            ctl.add_vip(vip)
        added = len(listed["backends"]) if listed else 0
        while added < target:  # same hosts, new ports: every backend has a resolved next hop
            ctl.add_backend(vip, f"{hosts[added % len(hosts)]}:{9000 + added}")
            added += 1
    else:
        raise SystemExit(f"usage: {__doc__}")


if __name__ == "__main__":
    main(sys.argv[1:])
