"""Taking over a running data plane when the daemon starts (hitless restart and upgrade).

The program and its maps outlive any process through their pins, so a starting
daemon adopts them as they are: packets and established flows never notice. It
recompiles only when the program's sources or build options changed (its digest
differs from the one recorded in the state), and then swaps the new program in
atomically on the same maps, connection table included. Maps the new program must
not be loaded on (lb/layout.py: another layout version, type or size) are migrated
on the way: new ones, filled before the swap. Last, it makes the maps match the
stored state again and reports every entry it had to correct (a crash between a
map write and the save, a hand edit)."""
from __future__ import annotations

import contextlib
import os
from dataclasses import dataclass, field
from typing import Any

from control.errors import LbError
from control.model import DataPlaneState, State
from control.reconcile import mark_applied
from control.recovery import repair_maps
from control.service import Controller
from lb import layout, loader
from lb.maps import U32, BpfMap, DataPlaneMaps, MapLayoutError
from lb.structs import LAYOUT_VERSION


@dataclass
class AdoptReport:
    attached: bool = False
    program: str = "none"  # "kept", "replaced", "loaded" (pins were gone) or "none" (not attached)
    program_id: int = 0
    reattached: list[str] = field(default_factory=list)  # interfaces that had lost the program
    corrected: dict[str, int] = field(default_factory=dict)  # map -> entries rewritten
    migrated: dict[str, str] = field(default_factory=dict)  # map -> why it was replaced, what it kept

    def as_dict(self) -> dict[str, Any]:
        return {"attached": self.attached, "program": self.program, "program_id": self.program_id,
                "reattached": self.reattached, "corrected": self.corrected, "migrated": self.migrated}


def adopt(ctl: Controller) -> AdoptReport:
    """Take over the data plane the stored state describes (nothing if it is not attached)."""
    report = AdoptReport()
    dp = ctl.store.read().dataplane
    if dp is None:
        return report
    report.attached = True
    if not ctl.pins_alive(dp):  # a reboot took program and maps: build them again, as attach does
        modes = {i.mode for i in dp.interfaces}
        xdp_mode = modes.pop() if dp.hook == "xdp" and len(modes) == 1 else "auto"  # mixed: chosen again
        ctl.attach([i.name for i in dp.interfaces], xdp_mode, loader.DataPlaneConfig(**dp.config), dp.hook)
        report.program, report.program_id = "loaded", ctl.program_id(ctl.store.read().dataplane) or 0
        return report
    with ctl.store.transaction() as state:
        dp = ctl.require_attached(state)
        config = loader.DataPlaneConfig(**dp.config)
        digest = loader.program_digest(config, dp.pin_dir)
        ours = ctl.program_id(dp)
        version = layout.pinned_version(dp.pin_dir)
        if version > LAYOUT_VERSION:
            raise LbError(f"the maps pinned in {dp.pin_dir} have layout version {version}, newer than this lb's "
                          f"{LAYOUT_VERSION}: run the newer lb, or 'lbctl detach' and 'lbctl attach' (drops all flows)")
        stale = layout.incompatible(config, dp.pin_dir)
        if digest != dp.program_digest or stale:
            ours = _replace(ctl, state, config, stale, report)
            dp.program_digest = digest
            report.program = "replaced"
        else:
            report.program = "kept"
            report.reattached = _reattach_missing(dp, ours)
        report.program_id = ours or 0
        with DataPlaneMaps.open(dp.pin_dir) as maps:
            report.corrected = repair_maps(maps, state)
            mark_applied(maps, state.revision + 1)  # what this transaction's commit saves
    return report


def _replace(ctl: Controller, state: State, config: loader.DataPlaneConfig, stale: dict[str, str],
             report: AdoptReport) -> int:
    """Swap in the program built from today's sources. Maps it must not be loaded on (`stale`) are set
    aside, so that it gets new ones, filled before the swap: configuration from the desired state,
    counters copied when their layout allows; a new connection table starts empty (NAT flows keep
    their backend through the Maglev tables, unchanged). The old program runs on the old maps
    until the swap."""
    pin_dir = state.dataplane.pin_dir
    aside = {name: os.path.join(pin_dir, name + "_old") for name in stale}  # bpffs names take no dots
    for name, path in aside.items():
        if os.path.exists(path):
            os.unlink(path)  # an earlier migration's, interrupted
        os.rename(os.path.join(pin_dir, name), path)

    def fill() -> None:
        with DataPlaneMaps.open(pin_dir) as maps:
            repair_maps(maps, state)
            for name in stale:
                report.migrated[name] = f"{stale[name]}: " + _carry_over(maps, name, aside[name])

    try:
        ours = loader.replace_program(config, pin_dir, [(i.ifindex, i.mode) for i in state.dataplane.interfaces],
                                      before_swap=fill)
    except BaseException:
        for name, path in aside.items():  # the old program stays, on its old maps
            with contextlib.suppress(FileNotFoundError):
                os.unlink(os.path.join(pin_dir, name))
            os.rename(path, os.path.join(pin_dir, name))
        raise
    for path in aside.values():
        os.unlink(path)
    return ours


def _carry_over(maps: DataPlaneMaps, name: str, old_path: str) -> str:
    """What a migrated map's new instance keeps of the old one, in words (for the log)."""
    if name == "conn_table":
        return "recreated empty; established NAT flows keep their backend through the unchanged Maglev tables"
    if name not in layout.COUNTERS:
        return "rebuilt from the desired state"
    new = maps.maps[name]
    try:
        old = BpfMap(old_path, new.key_type, new.value_type)
    except MapLayoutError:
        return "counters start from zero (their layout changed)"
    try:
        for index in range(min(old.max_entries, new.max_entries)):
            value = old.get(U32(index))
            if value is not None:
                new.set(U32(index), (new.value_type * new.ncpus)(*value))
    finally:
        old.close()
    return "counters copied"


def _reattach_missing(dp: DataPlaneState, ours: int | None) -> list[str]:
    """Attach the pinned programs where they are not attached any more (someone ran
    `ip link set dev X xdp off` or deleted a TC filter)."""
    done = []
    for iface in dp.interfaces:
        missing = []
        if not Controller.ours_attached(iface, dp, ours):
            missing.append(loader.ingress_pin(dp.hook))
        if not loader.tc_attached(iface.ifindex, loader.TC_EGRESS):
            missing.append(loader.EGRESS_PROGRAM_PIN)
        for pin in missing:
            fd = loader.pinned_program(dp.pin_dir, pin)
            try:
                loader.attach_pinned(pin, iface.ifindex, iface.name, fd, iface.mode)
            finally:
                os.close(fd)
        if missing:
            done.append(iface.name)
    return done
