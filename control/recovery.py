"""The maps follow the stored state through crashes, with or without a daemon.

A change writes in the pinned lb_state map the store revision it is about to commit
before its first map write (reconcile.py: mark_applied), then the maps, then commits.
A process killed anywhere in between leaves a mark unequal to the store's revision,
and the next command repairs the maps to the stored state -- the old one or the new
one, whichever was committed -- before it reads or changes anything. When the mark
and the revision are equal, that costs a store read and one map lookup.

repair_maps is the one repair: a daemon's start (adopt.py) runs it too."""
from __future__ import annotations

import os

from control.errors import LbError
from control.model import DataPlaneState, State
from control.reconcile import Reconciler, applied_revision, mark_applied
from control.routes import sync_routes
from control.store import Store
from lb.maps import I32, U32, BpfMap, DataPlaneMaps
from lb.pins import Instance
from lb.structs import LAYOUT_VERSION, LbState


def repair_maps(maps: DataPlaneMaps, state: State) -> dict[str, int]:
    """Make the maps hold exactly `state`, whatever they hold now (a crashed change, a hand edit,
    a daemon's start): orphan VIP keys, backends, Maglev slots, reply, ACL and address entries go.
    Returns the entries corrected per map."""
    dp = state.dataplane
    for iface in dp.interfaces:
        maps.tx_ports.set(I32(iface.ifindex), I32(iface.ifindex))
    sync_routes(maps, {i.ifindex for i in dp.interfaces})
    return Reconciler(maps, dp.config["ring_size"]).repair(state)


def repair_if_interrupted(maps: DataPlaneMaps, state: State) -> dict[str, int] | None:
    """Holding the store's lock: repair the maps to `state` if their mark is not its revision
    (a change was interrupted, or they were never marked); None if it is. Marks nothing."""
    if state.revision and applied_revision(maps) == state.revision:
        return None
    return repair_maps(maps, state)


def recover(store: Store, instance: Instance) -> dict[str, int]:
    """What every command does before it reads or changes the maps; returns what it corrected."""
    state = store.read()
    dp = state.dataplane
    if dp is None or dp.netns_ino != instance.netns_ino or not os.path.exists(dp.pin_dir):
        return {}  # nothing to repair here; the command itself says what is wrong
    if marked_revision(dp) == state.revision:
        return {}
    with store.transaction() as state:
        dp = state.dataplane
        if dp is None or not os.path.exists(dp.pin_dir):
            return {}
        with DataPlaneMaps.open(dp.pin_dir) as maps:
            corrected = repair_if_interrupted(maps, state)
            mark_applied(maps, state.revision + 1)  # what this transaction's commit saves
            return corrected or {}


def marked_revision(dp: DataPlaneState) -> int:
    """The maps' mark, read without opening every map; refuses, in one line, maps of another
    layout version (or an older lb's, which had no mark)."""
    path = os.path.join(dp.pin_dir, "lb_state")
    if not os.path.exists(path):
        raise LbError(f"the data plane in {dp.pin_dir} was loaded by an older lb (no lb_state map); "
                      f"start 'lbctl daemon' once to upgrade it, or run 'lbctl detach' and 'lbctl attach'")
    m = BpfMap(path, U32, LbState)
    try:
        mark = m.get(U32(0))
    finally:
        m.close()
    if mark.layout != LAYOUT_VERSION:  # never read maps of another meaning
        raise LbError(f"the data plane's maps in {dp.pin_dir} have layout version {mark.layout}, this lb "
                      f"uses {LAYOUT_VERSION}: start 'lbctl daemon' once to migrate them")
    return mark.revision
