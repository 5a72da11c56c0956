"""A cluster's desired state, split in two: what every node must agree on, and what is each node's own.

Shared (one document in the shared store, etcd): the VIPs with their mode, hash, ACL, health-check
definition and all-down policy, each VIP's configured backends by endpoint and weight, and the
addresses whose unserved traffic goes to the host. Nothing in it is a map index.

Node-local (the node's own SQLite file): the data plane (interfaces, hook, pins, sizes), the ids
that index the maps (VIP ids, backend ids, backend generations), health observations, and removed
backends kept while this node's flows of theirs go on. Two nodes may give the same backend
different ids; their Maglev tables still send a flow to the same endpoint, as a table is built from
endpoints and weights (control/reconcile.py: maglev_table), never from ids.

merge() brings a node's last State up to a shared document, keeping every id it can."""
from __future__ import annotations

import ipaddress
import time
from typing import Any

from control.errors import InputError
from control.model import (BackendAddress, BackendState, HealthCheck, IdPool, State, VipAddress, VipState,
                           address_sort_key)

# Ids when the node has no data plane yet (its limits are unknown): attach checks them against its sizes.
_UNATTACHED_LIMIT = 1 << 16


def shared_doc(state: State) -> dict[str, Any]:
    """The part of `state` every node shares, as JSON-ready values (sorted, so equal states give equal text)."""
    vips = []
    for v in sorted(state.vips, key=lambda v: v.vip.sort_key()):
        backends = sorted(((b.address, b.weight) for b in v.active_backends()),
                          key=lambda item: (address_sort_key(item[0].address), item[0].port))
        vips.append({"vip": str(v.vip), "mode": v.mode, "hash": v.hash, "acl": dict(sorted(v.acl.items())),
                     "health": vars(v.health), "all_down": v.all_down, "min_healthy": v.min_healthy,
                     **({"replies_via": v.replies_via} if v.replies_via is not None else {}),
                     "backends": [{"address": str(a.address), "port": a.port, "weight": w} for a, w in backends]})
    return {"vips": vips, "pass_unserved": [str(a) for a in sorted(state.pass_unserved, key=address_sort_key)]}


def plain_nat_vips(doc: dict[str, Any]) -> set[str]:
    """The document's NAT VIPs whose replies no one said how they come back (replies_via unset)."""
    return {v["vip"] for v in doc.get("vips", []) if v["mode"] == "nat" and v.get("replies_via") is None}


def normalise(doc: dict[str, Any]) -> dict[str, Any]:
    """A stored shared document in today's shape. Documents written before the split held the whole
    State (ids, the writer's data plane, removed backends, health): only the shared part is read."""
    vips = []
    for v in doc.get("vips", []):
        backends = [{"address": b["address"], "port": b["port"], "weight": b["weight"]}
                    for b in v.get("backends", []) if b.get("retired_at") is None]
        vips.append({"vip": v["vip"], "mode": v.get("mode", "nat"), "hash": v.get("hash", "flow"),
                     "acl": v.get("acl", {}), "health": vars(HealthCheck(**v.get("health", {}))),
                     "all_down": v.get("all_down", "open"), "min_healthy": v.get("min_healthy", 1),
                     "backends": backends,
                     **({"replies_via": v["replies_via"]} if v.get("replies_via") is not None else {})})
    # through the State and back: the same sort order whatever wrote it
    return shared_doc(merge(State(), {"vips": vips, "pass_unserved": doc.get("pass_unserved", [])}))


def merge(local: State, doc: dict[str, Any], now: float | None = None) -> State:
    """`local` (this node's last State: data plane, ids, health) brought up to the shared document `doc`.

    A VIP keeps its id while its address stays; a backend keeps its id, generation and health while
    it stays configured. A new VIP or backend takes the lowest free id here; a backend added back
    after its removal gets its id back, as on one node (VipState.revive). Backends the document no
    longer has are retired on this node (kept for its established flows), and VIPs it no longer has
    are removed, as `lbctl remove-backend` and `remove-vip` do. `local` itself is not changed."""
    now = time.time() if now is None else now
    state = local.copy()
    by_address = {v.vip: v for v in state.vips}
    limits = state.dataplane.config if state.dataplane is not None else {}
    # Ids of VIPs removed here are not reused in the same merge (their counters would carry over), as in apply.
    vip_ids = IdPool({v.id for v in state.vips}, 0, limits.get("max_vips", _UNATTACHED_LIMIT))
    backend_ids = IdPool(state.backend_ids(), 1, limits.get("max_backends", _UNATTACHED_LIMIT))
    vips = []
    for item in doc.get("vips", []):
        address = VipAddress.parse(item["vip"], usable=False)  # as stored, even from before a check
        v = by_address.get(address)
        if v is None:
            vid = vip_ids.take()
            if vid is None:
                raise InputError(f"VIP {address}: this node's VIP limit ({limits.get('max_vips')}) is reached; "
                                 "attach with a larger --max-vips")
            v = VipState(address, vid)
        v.mode, v.hash, v.acl, v.all_down = item["mode"], item["hash"], dict(item["acl"]), item["all_down"]
        v.health, v.replies_via = HealthCheck(**item["health"]), item.get("replies_via")
        v.min_healthy = item.get("min_healthy", 1)
        wanted = {BackendAddress(ipaddress.ip_address(b["address"]), b["port"]): b["weight"] for b in item["backends"]}
        for b in v.backends:
            if b.active and b.address not in wanted:
                b.retired_at = now
        for endpoint, weight in wanted.items():
            b = v.backend(endpoint) or v.revive(endpoint, weight)
            if b is None:
                bid = backend_ids.take()
                if bid is None:
                    raise InputError(f"backend {endpoint} of VIP {address}: this node's backend limit "
                                     f"({limits.get('max_backends')}) is reached; attach with a larger --max-backends")
                b = BackendState(endpoint, bid, weight, generation=state.new_generation())
                v.backends.append(b)
            b.weight = weight
        vips.append(v)
    state.vips = vips
    state.pass_unserved = {ipaddress.ip_address(a) for a in doc.get("pass_unserved", [])}
    return state
