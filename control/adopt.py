"""Taking over a running data plane when the daemon starts (hitless restart and upgrade).

The program and its maps outlive any process through their pins, so a starting
daemon adopts them as they are: packets and established flows never notice. It
recompiles only when the program's sources or build options changed (its digest
differs from the one recorded in the state), and then swaps the new program in
atomically on the same maps, connection table included. Last, it makes the maps
match the stored state again and reports every entry it had to correct (a crash
between a map write and the save, a hand edit)."""
from __future__ import annotations

import os
from dataclasses import dataclass, field
from typing import Any

from control.model import DataPlaneState
from control.reconcile import Reconciler
from control.routes import sync_routes
from control.service import Controller
from lb import loader
from lb.maps import I32, DataPlaneMaps


@dataclass
class AdoptReport:
    attached: bool = False
    program: str = "none"  # "kept", "replaced", "loaded" (pins were gone) or "none" (not attached)
    program_id: int = 0
    reattached: list[str] = field(default_factory=list)  # interfaces that had lost the program
    corrected: dict[str, int] = field(default_factory=dict)  # map -> entries rewritten

    def as_dict(self) -> dict[str, Any]:
        return {"attached": self.attached, "program": self.program, "program_id": self.program_id,
                "reattached": self.reattached, "corrected": self.corrected}


def adopt(ctl: Controller) -> AdoptReport:
    """Take over the data plane the stored state describes (nothing if it is not attached)."""
    report = AdoptReport()
    dp = ctl.store.read().dataplane
    if dp is None:
        return report
    report.attached = True
    if not ctl.pins_alive(dp):  # a reboot took program and maps: build them again, as attach does
        xdp_mode = dp.interfaces[0].mode if dp.hook == "xdp" else "native"
        ctl.attach([i.name for i in dp.interfaces], xdp_mode, loader.DataPlaneConfig(**dp.config), dp.hook)
        report.program, report.program_id = "loaded", ctl.program_id(ctl.store.read().dataplane) or 0
        return report
    with ctl.store.transaction() as state:
        dp = ctl.require_attached(state)
        config = loader.DataPlaneConfig(**dp.config)
        digest = loader.program_digest(config, dp.pin_dir)
        ours = ctl.program_id(dp)
        if digest != dp.program_digest:
            ours = loader.replace_program(config, dp.pin_dir, [(i.ifindex, i.mode) for i in dp.interfaces])
            dp.program_digest = digest
            report.program = "replaced"
        else:
            report.program = "kept"
            report.reattached = _reattach_missing(dp, ours)
        report.program_id = ours or 0
        with DataPlaneMaps.open(dp.pin_dir) as maps:
            for iface in dp.interfaces:
                maps.tx_ports.set(I32(iface.ifindex), I32(iface.ifindex))
            sync_routes(maps, {i.ifindex for i in dp.interfaces})
            report.corrected = Reconciler(maps, config.ring_size).repair(state)
    return report


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
