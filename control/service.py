"""What lbctl can do, as plain methods: the CLI (and later the daemon's API) call these.

Every change runs in one store transaction: validate, update the maps, save.
Bad input raises InputError before anything is written; a failed map update is
rolled back by the Reconciler; a failed save rolls the maps back too. A process
killed midway is covered by the maps' mark (control/recovery.py): the next
command repairs the maps to the saved state before it reads or changes them."""
from __future__ import annotations

import contextlib
import dataclasses
import ipaddress
import logging
import os
import time
from dataclasses import dataclass
from typing import Any, Callable, TypeVar

from control.errors import InputError, LbError
from control import forwarding
from control.model import (ALL_DOWN, HASHES, MAX_MIN_HEALTHY, MAX_WEIGHT, MODES, BackendAddress, BackendState,
                           DataPlaneState, Interface, State, VipAddress, VipState, address_sort_key, format_endpoint,
                           parse_port_range,
                           parse_prefix, parse_vip_address)
from control.reconcile import Reconciler, mark_applied
from control.recovery import marked_revision, recover, repair_if_interrupted
from control.routes import keep_resolved, solicit_neighbour, sync_routes
from control.store import Store
from control.stores import open_store
from lb import loader, rtnl
from lb.bpfsys import prog_id
from lb.maps import I32, U32, DataPlaneMaps
from lb.pins import Instance
from lb.structs import IPAddress, MAX_IFINDEX, REASONS, VIP_HASH_SOURCE, FlowKey, LbAddr, VipKey, be16

log = logging.getLogger("lb.service")

T = TypeVar("T")

UNSERVED_ACTIONS = ("drop", "pass")  # what happens to traffic to a VIP's address that no VIP serves


def _ifindex(name: str) -> int:
    try:
        return loader.interface_index(name)
    except loader.UnknownInterface as e:
        raise InputError(str(e)) from None


def choose_xdp_mode(iface: Interface, requested: str) -> str | None:
    """Settle iface.mode for the mode asked for ("tc" and "generic" stay as they are; "auto" becomes
    native, or generic where frames may arrive with partial checksums, which native XDP's
    XDP_TX/REDIRECT would break: lb/offload.py). Returns the one line to tell the operator, if any."""
    if requested not in ("auto", "native"):
        return None
    from lb import offload
    partial = offload.partial_checksums(iface.ifindex)
    if requested == "auto":
        iface.mode = "generic" if partial else "native"
        return f"{iface.name}: generic XDP, which keeps partial checksums: {partial.reason}" if partial else None
    if partial:
        return (f"{iface.name}: warning: native XDP forced, but {partial.reason}: the packets it rewrites will "
                f"arrive with bad checksums; fix: {partial.fix()}")
    return None


def _refuse_local_backends(added: list[tuple[VipAddress, BackendAddress]]) -> None:
    """A backend must be another host: the data plane forwards, and cannot deliver to its own host."""
    if not added:
        return
    local = rtnl.addresses()
    for vip, backend in added:
        if backend.address in local:
            raise InputError(f"backend {backend} of VIP {vip}: {backend.address} is an address of this host; "
                             f"lb forwards to other hosts")


def _refuse_foreign_sources(state: State, added: set[IPAddress]) -> None:
    """Full NAT's source addresses must be this host's (replies to them must come to the LB), and no VIP's."""
    if not added:
        return
    local = rtnl.addresses()
    vip_addresses = {v.vip.address for v in state.vips}
    for address in sorted(added, key=address_sort_key):
        if address not in local:
            raise InputError(f"source address {address} is not an address of this host; full NAT's replies "
                             f"must come back to the LB (add it to an interface first)")
        if address in vip_addresses:
            raise InputError(f"source address {address} is a VIP's address; give full NAT an address of its own")


# Modes whose packets the kernel cannot forward for the data plane while a backend's MAC is unresolved:
# dsr's are addressed to the VIP, fullnat's come from an address of this host (a martian to it).
DIRECT_MODES = ("dsr", "fullnat")


def resolve_dsr_backends(state: State) -> None:
    """Have the kernel learn every DSR and full-NAT backend's MAC now, and keep it (a managed
    neighbour entry): the data plane drops such a packet whose next hop is unresolved (DIRECT_MODES)."""
    for v in state.vips:
        if v.mode in DIRECT_MODES:
            for b in v.active_backends():
                resolve_dsr_backend(b.address.address)


def resolve_dsr_backend(address: IPAddress) -> None:
    keep_resolved(address)
    solicit_neighbour(address)  # resolves it now (a managed entry is also resolved, but not at once)


@dataclass
class Controller:
    instance: Instance
    store: Store

    @classmethod
    def open(cls, state_path: str | None = None) -> "Controller":
        instance = Instance.current()
        return cls(instance, open_store(state_path or instance.state_path(), instance.name))

    # --- the data plane itself -------------------------------------------------

    def attach(self, ifnames: list[str], mode: str, config: loader.DataPlaneConfig,
               hook: str = "xdp") -> dict[str, Any]:
        if mode not in (*loader.XDP_MODES, "auto"):
            raise InputError(f"unknown XDP mode {mode!r} (expected auto, native or generic)")
        if hook not in loader.HOOKS:
            raise InputError(f"unknown hook {hook!r} (expected xdp or tc)")
        if hook == "tc":
            mode = "tc"
        if len(set(ifnames)) != len(ifnames):
            raise InputError("an interface is named twice")
        ifaces = [Interface(name, _ifindex(name), mode) for name in ifnames]
        for iface in ifaces:
            if iface.ifindex >= MAX_IFINDEX:
                raise InputError(f"{iface.name}: ifindex {iface.ifindex} is above the data plane's limit {MAX_IFINDEX - 1}")
        notes = [note for iface in ifaces if (note := choose_xdp_mode(iface, mode))]
        with self.store.transaction() as state:
            dp = state.dataplane
            if dp is not None and dp.netns_ino == self.instance.netns_ino and self.pins_alive(dp):
                names = ", ".join(i.name for i in dp.interfaces)
                raise InputError(f"already attached to {names}; run 'lbctl detach' first")
            pin_dir = self.instance.pin_dir()
            loader.unpin_all(pin_dir)  # leftovers of a data plane this state no longer knows
            prog_fd = loader.load_and_pin(config, pin_dir, hook)
            egress_fd = loader.pinned_program(pin_dir, loader.EGRESS_PROGRAM_PIN)
            done: list[Interface] = []
            try:
                for iface in ifaces:
                    loader.attach_pinned(loader.ingress_pin(hook), iface.ifindex, iface.name, prog_fd, iface.mode)
                    done.append(iface)
                    # steers the host's own packets marked for a backend (health checks)
                    loader.attach_pinned(loader.EGRESS_PROGRAM_PIN, iface.ifindex, iface.name, egress_fd,
                                         iface.mode)
                with DataPlaneMaps.open(pin_dir) as maps:
                    for iface in ifaces:
                        maps.tx_ports.set(I32(iface.ifindex), I32(iface.ifindex))
                    sync_routes(maps, {i.ifindex for i in ifaces})
                    mark_applied(maps, state.revision + 1)  # what the commit below saves
                    # the new data plane's settings (lb_config's timeouts) with the state's VIPs
                    new_dp = DataPlaneState(ifaces, pin_dir, self.instance.netns_ino, config.as_dict())
                    Reconciler(maps, config.ring_size).apply(State(), dataclasses.replace(state, dataplane=new_dp))
            except BaseException:
                for iface in done:
                    self.detach_interface(iface, hook)
                loader.unpin_all(pin_dir)
                raise
            finally:
                os.close(prog_fd)
                os.close(egress_fd)
            state.dataplane = DataPlaneState(ifaces, pin_dir, self.instance.netns_ino, config.as_dict(),
                                             loader.program_digest(config, pin_dir), hook)
            resolve_dsr_backends(state)  # after a reboot or a detach, the neighbour tables may have lost them
            modes = {i.mode for i in ifaces}
            warning = forwarding.describe(forwarding.missing_settings(
                [i.name for i in ifaces], any(v.vip.address.version == 6 for v in state.vips)))
            return {"attached": [i.name for i in ifaces], "mode": modes.pop() if len(modes) == 1 else "mixed",
                    "interfaces": [{"name": i.name, "mode": i.mode} for i in ifaces], "notes": notes,
                    "hook": hook, "pin_dir": pin_dir, "vips": len(state.vips), "warning": warning}

    @staticmethod
    def detach_interface(iface: Interface, hook: str) -> None:
        """Take lb's programs off the interface: the hook's, then the egress one."""
        from pyroute2.netlink.exceptions import NetlinkError
        if hook == "tc":
            with contextlib.suppress(NetlinkError):
                loader.detach_tc(iface.ifindex)
        else:
            loader.detach_xdp(iface.ifindex, iface.mode)
        with contextlib.suppress(NetlinkError):
            loader.detach_tc(iface.ifindex, loader.TC_EGRESS)

    @staticmethod
    def ours_attached(iface: Interface, dp: DataPlaneState, ours: int | None) -> bool:
        """Is this data plane's program still on the interface? (Not another one attached since.)"""
        if dp.hook == "tc":
            return loader.tc_attached(iface.ifindex)
        attached = loader.attached_prog_id(iface.ifindex)
        return bool(attached) and (ours is None or attached == ours)

    def detach(self) -> dict[str, Any]:
        with self.store.transaction() as state:
            dp = state.dataplane
            if dp is None:
                raise InputError("the data plane is not attached")
            self._check_netns(dp)
            ours = self.program_id(dp)
            detached = []
            for iface in dp.interfaces:
                try:
                    attached = self.ours_attached(iface, dp, ours)
                except Exception:
                    continue  # the interface is gone
                if attached:
                    self.detach_interface(iface, dp.hook)
                    detached.append(iface.name)
                elif loader.tc_attached(iface.ifindex, loader.TC_EGRESS):
                    loader.detach_tc(iface.ifindex, loader.TC_EGRESS)
            loader.unpin_all(dp.pin_dir)
            state.dataplane = None
            return {"detached": detached}

    # --- VIPs and backends -----------------------------------------------------

    def add_vip(self, vip_text: str, mode: str = "nat", hash_on: str = "flow",
                all_down: str = "open", replies_via_this_node: bool = False,
                min_healthy: int = 1, snat: list[str] | None = None) -> dict[str, Any]:
        vip = VipAddress.parse(vip_text)
        if not 0 <= min_healthy <= MAX_MIN_HEALTHY:
            raise InputError(f"min-healthy {min_healthy} is out of range 0-{MAX_MIN_HEALTHY}")
        node = self._node()
        if replies_via_this_node and (mode != "nat" or node is None):
            raise InputError("--replies-via-this-node is for a nat VIP on a node of a cluster (--store etcd://...)")
        if mode not in MODES:
            raise InputError(f"unknown mode {mode!r} (expected one of: {', '.join(MODES)})")
        sources = list(dict.fromkeys(parse_vip_address(a) for a in snat or []))
        if sources and mode != "fullnat":
            raise InputError(f"--snat names full NAT's source addresses; VIP {vip} is {mode}, not fullnat")
        if sources and node is not None:
            raise InputError("--snat: in a cluster a full-NAT VIP takes each node's own source addresses "
                             "(lbctl snat add ADDR on every node), so that replies return to the node of the flow")
        if hash_on not in HASHES:
            raise InputError(f"unknown hash {hash_on!r} (expected one of: {', '.join(HASHES)})")
        if all_down not in ALL_DOWN:
            raise InputError(f"unknown all-down choice {all_down!r} (expected one of: {', '.join(ALL_DOWN)})")

        def change(state: State) -> dict[str, Any]:
            if state.vip(vip) is not None:
                raise InputError(f"VIP {vip} already exists")
            free = state.allocate_vip_id()
            added = VipState(vip, free, mode, hash=hash_on, all_down=all_down, min_healthy=min_healthy,
                             replies_via=node if replies_via_this_node else None, snat=sources)
            state.add_vip(added)
            warning = None
            if vip.address.version == 6:  # attach checked IPv4's
                warning = forwarding.describe([s for s in forwarding.missing_settings([], True) if "ipv6" in s])
            return {"vip": str(vip), "id": free, "mode": mode, "hash": hash_on, "all_down": all_down,
                    "min_healthy": min_healthy,
                    "warning": warning, "snat": [str(a) for a in state.snat_sources(added)]
                    if mode == "fullnat" else []}

        return self._change(change)

    def remove_vip(self, vip_text: str) -> dict[str, Any]:
        vip = VipAddress.parse(vip_text)

        def change(state: State) -> dict[str, Any]:
            state.remove_vip(state.require_vip(vip))
            return {"removed": str(vip)}

        return self._change(change)

    def add_backend(self, vip_text: str, backend_text: str, weight: int = 1) -> dict[str, Any]:
        vip = VipAddress.parse(vip_text)
        backend = BackendAddress.parse(backend_text, vip)
        if not 0 <= weight <= MAX_WEIGHT:
            raise InputError(f"weight {weight} is out of range 0-{MAX_WEIGHT}")
        if backend.address.version != vip.address.version:
            raise InputError(f"backend {backend} and VIP {vip} are of different IP versions")

        def change(state: State) -> dict[str, Any]:
            v = state.require_vip(vip)
            v.check_backend(backend)
            if v.backend(backend) is not None:
                raise InputError(f"backend {backend} already exists in VIP {vip}")
            b = v.revive(backend, weight)
            if b is None:
                b = BackendState(backend, state.allocate_backend_id(), weight, generation=state.new_generation())
                v.backends.append(b)
            return {"vip": str(vip), "backend": str(backend), "id": b.id, "weight": weight, "mode": v.mode}

        result = self._change(change)
        if result.get("mode") in DIRECT_MODES:
            resolve_dsr_backend(backend.address)
        return result

    def remove_backend(self, vip_text: str, backend_text: str) -> dict[str, Any]:
        def retire(b: BackendState) -> dict[str, Any]:
            b.retired_at = time.time()
            return {"removed": str(b.address)}

        return self._change_backend(vip_text, backend_text, retire)

    def unserved(self, address_text: str, action: str) -> dict[str, Any]:
        """What happens to traffic to a VIP's address that none of its VIPs serves: "drop"
        (the default) or "pass" to the host (for SSH to the LB, say). The address need not
        have a VIP yet: set it before putting a VIP on an address the host uses."""
        address = parse_vip_address(address_text)
        if action not in UNSERVED_ACTIONS:
            raise InputError(f"unknown action {action!r} (expected one of: {', '.join(UNSERVED_ACTIONS)})")

        def change(state: State) -> dict[str, Any]:
            was = "pass" if address in state.pass_unserved else "drop"
            if action == "pass":
                state.pass_unserved.add(address)
            else:
                state.pass_unserved.discard(address)
            return {"address": str(address), "unserved": action, "previous": was,
                    "vips": sum(v.vip.address == address for v in state.vips)}

        return self._change(change)

    def snat_add(self, addresses: list[str]) -> dict[str, Any]:
        """Add addresses of this host to full NAT's pool (the source of full-NAT VIPs without their own)."""
        parsed = [parse_vip_address(a) for a in addresses]
        if not parsed:
            raise InputError("name at least one address")

        def change(state: State) -> dict[str, Any]:
            new = [a for a in dict.fromkeys(parsed) if a not in state.snat]
            state.snat.update(new)
            return {"added": [str(a) for a in new], **self._snat_view(state)}

        return self._change(change)

    def snat_remove(self, addresses: list[str]) -> dict[str, Any]:
        """Take addresses out of the pool (refused while a full-NAT VIP would be left without one)."""
        parsed = [parse_vip_address(a) for a in addresses]

        def change(state: State) -> dict[str, Any]:
            for a in parsed:
                if a not in state.snat:
                    raise InputError(f"{a} is not in full NAT's source pool")
            state.snat.difference_update(parsed)
            return {"removed": [str(a) for a in parsed], **self._snat_view(state)}

        return self._change(change)

    def snat_ports(self, port_range: str) -> dict[str, Any]:
        """The source ports full NAT allocates on each address (FIRST-LAST)."""
        ports = parse_port_range(port_range)

        def change(state: State) -> dict[str, Any]:
            state.snat_ports = ports
            return self._snat_view(state)

        return self._change(change)

    def snat_list(self) -> dict[str, Any]:
        return self._snat_view(self.read_state())

    @staticmethod
    def _snat_view(state: State) -> dict[str, Any]:
        return {"pool": [str(a) for a in sorted(state.snat, key=address_sort_key)],
                "ports": f"{state.snat_ports[0]}-{state.snat_ports[1]}",
                "vips": [{"vip": str(v.vip), "sources": [str(a) for a in state.snat_sources(v)], "own": bool(v.snat)}
                         for v in sorted(state.vips, key=lambda v: v.vip.sort_key()) if v.mode == "fullnat"]}

    def acl_add(self, vip_text: str, prefix_text: str, action: str) -> dict[str, Any]:
        vip = VipAddress.parse(vip_text)
        prefix = parse_prefix(prefix_text)
        if prefix.version != vip.address.version:
            raise InputError(f"prefix {prefix} and VIP {vip} are of different IP versions")
        if action not in ("allow", "deny"):
            raise InputError(f"unknown ACL action {action!r} (expected allow or deny)")

        def change(state: State) -> dict[str, Any]:
            v = state.require_vip(vip)
            if str(prefix) in v.acl:
                raise InputError(f"VIP {vip} already has a rule for {prefix} ({v.acl[str(prefix)]}); remove it first")
            v.acl[str(prefix)] = action
            return {"vip": str(vip), "prefix": str(prefix), "action": action}

        return self._change(change)

    def acl_remove(self, vip_text: str, prefix_text: str) -> dict[str, Any]:
        vip = VipAddress.parse(vip_text)
        prefix = parse_prefix(prefix_text)

        def change(state: State) -> dict[str, Any]:
            v = state.require_vip(vip)
            if v.acl.pop(str(prefix), None) is None:
                raise InputError(f"VIP {vip} has no rule for {prefix}")
            return {"vip": str(vip), "prefix": str(prefix), "removed": True}

        return self._change(change)

    def drain(self, vip_text: str, backend_text: str) -> dict[str, Any]:
        """Weight 0: out of the Maglev table, so no new flows; established ones go on."""
        return self.set_weight(vip_text, backend_text, 0)

    def set_weight(self, vip_text: str, backend_text: str, weight: int) -> dict[str, Any]:
        """A backend's share of new flows; 0 drains it (established flows go on), above 0 undoes that."""
        if not 0 <= weight <= MAX_WEIGHT:
            raise InputError(f"weight {weight} is out of range 0-{MAX_WEIGHT}")

        def weigh(b: BackendState) -> dict[str, Any]:
            was, b.weight = b.weight, weight
            return {"backend": str(b.address), "previous_weight": was, "weight": weight}

        return self._change_backend(vip_text, backend_text, weigh)

    def set_health(self, vip_id: int, backend_id: int, healthy: bool) -> bool:
        """Record a health checker's verdict; True if it changed the state (and the Maglev table)."""
        return bool(self.set_health_many([(vip_id, backend_id, healthy)]))

    def set_health_many(self, verdicts: list[tuple[int, int, bool]]) -> int:
        """Record health checkers' verdicts (vip id, backend id, healthy) as one change, so one
        reconcile however many; returns how many changed the state. A backend removed or
        re-checked meanwhile is left alone."""
        def found(state: State) -> list[tuple[VipState, BackendState, bool]]:
            vips = state.vips_by_id({vip_id for vip_id, _, _ in verdicts})
            out = []
            for vip_id, backend_id, healthy in verdicts:
                v = vips.get(vip_id)
                b = next((b for b in v.backends if b.id == backend_id and b.active), None) if v else None
                if b is not None and b.healthy != healthy:
                    out.append((v, b, healthy))
            return out

        if not found(self.store.read()):
            return 0
        turned: list[VipState] = []  # VIPs these verdicts start or end failing open

        def change(state: State) -> int:
            changes = found(state)
            was_open = {v.id: v.failing_open for v, _, _ in changes}
            for _, b, healthy in changes:
                b.healthy = healthy
            turned.extend({v.id: v for v, _, _ in changes if v.failing_open != was_open[v.id]}.values())
            return len(changes)

        changed = self._change(change)
        for v in turned:  # said once the change is in the maps
            _log_fail_open(v)
        return changed

    # --- the whole configuration at once -------------------------------------------

    def apply(self, text: str, dry_run: bool = False, source: str = "<file>") -> dict[str, Any]:
        """Make the running state equal to a configuration file, as one change; or, with
        dry_run, only say what that would do. An invalid file changes nothing."""
        from control import config as declarative
        wanted = declarative.parse(text, source)
        cluster = self._node() is not None
        if cluster and wanted.names_snat():
            raise InputError(f"{source}: full NAT's source addresses and ports (snat) are each node's own in a "
                             "cluster, never in the shared state: set them on each node with lbctl snat")
        if not cluster and any(v.replies_via is not None for v in wanted.vips):
            raise InputError(f"{source}: replies_via names the node of a cluster a nat VIP's replies come back "
                             "through; this state is one node's (a cluster's is --store etcd://...)")

        def change(state: State) -> dict[str, Any]:
            old = state.copy()
            declarative.merge(state, wanted, time.time(), node_own=not cluster)
            if dry_run:  # (a real apply is checked by _change)
                _refuse_local_backends(state.new_backends(old))
            return {"dry_run": dry_run, **declarative.plan(old, state, state.dataplane.config["ring_size"])}

        if dry_run:
            state = self.read_state()
            self.require_attached(state)
            return change(state)
        result = self._change(change)
        resolve_dsr_backends(self.store.read())
        return result

    def export(self) -> dict[str, Any]:
        """The state as a configuration file; on a node of a cluster, the shared part alone (what
        apply -f through any node makes every node's), without this node's full NAT sources."""
        from control import config as declarative
        config = declarative.config_of(self.read_state())
        return {"yaml": declarative.to_yaml(config.shared_part() if self._node() is not None else config)}

    def _node(self) -> str | None:
        """This node's name when the store is a cluster's (etcd); None for one node's own state."""
        return getattr(self.store, "node", None)

    # --- reading ---------------------------------------------------------------

    def read_state(self) -> State:
        """The stored state, once the maps are known to hold it (a change killed midway is repaired
        first: control/recovery.py)."""
        recover(self.store, self.instance)
        return self.store.read()

    def list(self) -> dict[str, Any]:
        state = self.read_state()
        dp = state.dataplane
        return {
            "dataplane": None if dp is None else {
                "interfaces": [{"name": i.name, "mode": i.mode} for i in dp.interfaces],
                "hook": dp.hook,
                "pin_dir": dp.pin_dir,
                **dp.config,
            },
            "vips": [
                {
                    "vip": str(v.vip),
                    "mode": v.mode,
                    "hash": v.hash,
                    "acl": dict(v.acl),
                    **({"replies_via": v.replies_via} if v.replies_via is not None else {}),
                    "backends": [{"backend": str(b.address), "weight": b.weight} for b in v.active_backends()],
                    **({"snat": [str(a) for a in state.snat_sources(v)]} if v.mode == "fullnat" else {}),
                }
                for v in sorted(state.vips, key=lambda v: v.vip.sort_key())
            ],
            "pass_unserved": [str(a) for a in sorted(state.pass_unserved, key=address_sort_key)],
            "snat": {"pool": [str(a) for a in sorted(state.snat, key=address_sort_key)],
                     "ports": f"{state.snat_ports[0]}-{state.snat_ports[1]}"},
        }

    def status(self) -> dict[str, Any]:
        """Each backend's health, weight, whether new flows reach it, and its connections; removed
        backends too while the connection table still holds flows of theirs (health "removed")."""
        state = self.read_state()
        dp = self.require_attached(state)
        with DataPlaneMaps.open(dp.pin_dir) as maps:
            connections = maps.connections_per_backend()
        vips = []
        for v in sorted(state.vips, key=lambda v: v.vip.sort_key()):
            backends = []
            for b in v.backends:
                if not b.active and not connections.get(b.id):
                    continue
                health = ("removed" if not b.active else "unchecked" if not v.health.enabled
                          else "up" if b.healthy else "down")
                backends.append({"backend": str(b.address), "id": b.id, "weight": b.weight, "health": health,
                                 "serving": v.takes_new_flows(b), "connections": connections.get(b.id, 0)})
            vips.append({"vip": str(v.vip), "mode": v.mode, "health_check": v.health.kind, "all_down": v.all_down,
                         "failing_open": v.failing_open, "backends": backends,
                         **({"snat": [str(a) for a in state.snat_sources(v)]} if v.mode == "fullnat" else {})})
        shared = getattr(self.store, "status", None)  # a node of a cluster: how it stands with etcd
        return {"vips": vips, "interfaces": [{"name": i.name, "mode": i.mode} for i in dp.interfaces],
                **({"store": shared(with_nodes=True)} if shared is not None else {}),
                "connections_note": "connections = connection-table entries, which include closed connections "
                                    "the LRU table has not evicted yet"}

    def connections(self, vip: str | None = None, backend: str | None = None,
                    limit: int | None = None) -> dict[str, Any]:
        """The connection table's entries (control/connections.py), filtered, at most `limit`."""
        from control.connections import Filters, list_connections
        filters = Filters.parse(vip, backend, limit)  # bad filters: refused before anything is read
        state = self.read_state()
        dp = self.require_attached(state)
        with DataPlaneMaps.open(dp.pin_dir) as maps:
            return list_connections(maps, state, filters)

    def stats(self) -> dict[str, Any]:
        state = self.read_state()
        dp = self.require_attached(state)
        with DataPlaneMaps.open(dp.pin_dir) as maps:
            def total(map_name: str, index: int) -> dict[str, int]:
                per_cpu = maps.maps[map_name].get(U32(index)) or []
                fields = ("packets", "bytes", "reply_packets", "reply_bytes", "new_flows")
                return {f: sum(getattr(c, f) for c in per_cpu) for f in fields}

            vips = []
            for v in sorted(state.vips, key=lambda v: v.vip.sort_key()):
                backends = [{"backend": str(b.address), "active": b.active, **total("backend_stats", b.id)}
                            for b in v.backends]
                vips.append({"vip": str(v.vip), **total("vip_stats", v.id), "backends": backends})
            reasons = {}
            for code, name in enumerate(REASONS):
                per_cpu = maps.reason_stats.get(U32(code)) or []
                reasons[name.removeprefix("LB_").lower()] = sum(per_cpu)
        return {"vips": vips, "reasons": reasons}

    def test_packet(self, frame: bytes, ingress: str | None = None) -> dict[str, Any]:
        """Run one packet through the loaded program; see lb/probe.py."""
        state = self.read_state()
        dp = self.require_attached(state)
        ifname = ingress or dp.interfaces[0].name
        from lb.probe import probe
        ifindex = _ifindex(ifname)
        if len(frame) < 14:
            raise InputError(f"a packet needs at least an Ethernet header (14 bytes), got {len(frame)}")
        prog_fd = loader.pinned_program(dp.pin_dir)
        try:
            result = probe(prog_fd, frame, ifindex)
        finally:
            os.close(prog_fd)
        backend = None
        if result.reason == "fwd_icmp_error":  # about a flow: its entry names the backend, in every mode
            backend = self._flow_backend(state, dp, frame)
        elif result.backend is not None:
            addr, port = result.backend
            backend = format_endpoint(LbAddr.from_buffer_copy(addr).address(), port)
        elif result.reason == "fwd_dsr":  # no address changed: the flow's entry names the backend
            backend = self._flow_backend(state, dp, frame)
        return {"action": result.action, "packet_hex": result.packet.hex(), "backend": backend,
                "reason": result.reason, "ingress": ifname}

    def refresh_routes(self) -> int:
        """Mirror the kernel's routes and neighbours again (the daemon, on netlink notifications);
        returns the map writes (0: nothing changed). Nothing to do while detached."""
        state = self.store.read()
        dp = state.dataplane
        if dp is None or dp.netns_ino != self.instance.netns_ino or not self.pins_alive(dp):
            return 0
        with DataPlaneMaps.open(dp.pin_dir) as maps:
            return sync_routes(maps, {i.ifindex for i in dp.interfaces})

    # --- helpers ---------------------------------------------------------------

    @staticmethod
    def _flow_backend(state: State, dp: DataPlaneState, frame: bytes) -> str | None:
        """The backend the connection table holds for a client's packet (or an ICMP error about it),
        or, when the packet opened no entry (a SYN), the one the VIP's Maglev table picked for it."""
        from lb.flowhash import ring_index
        from lb.refmodel import DataPlaneModel
        p = DataPlaneModel.client_flow(frame)
        if p is None:
            return None
        key = FlowKey(src=LbAddr.from_buffer_copy(p.src), dst=LbAddr.from_buffer_copy(p.dst), sport=be16(p.sport),
                      dport=be16(p.dport), proto=p.proto)
        with DataPlaneMaps.open(dp.pin_dir) as maps:
            flow = maps.conn_table.get(key)
            backend_id = flow.backend_id if flow is not None else None
            vip = maps.vips.get(VipKey(addr=key.dst, port=key.dport, proto=p.proto)) or \
                maps.vips.get(VipKey(addr=key.dst, port=0, proto=p.proto))
            if backend_id is None and vip is not None and vip.ring_size:  # as lb.c new_flow picks it
                slot = vip.ring_base + ring_index(p.src, p.dst, p.sport, p.dport, p.proto, vip.ring_size,
                                                  bool(vip.flags & VIP_HASH_SOURCE))
                picked = maps.maglev.get(U32(slot))
                backend_id = picked.value if picked is not None else None
        names = {b.id: str(b.address) for v in state.vips for b in v.backends}
        return names.get(backend_id) if backend_id is not None else None

    def _change(self, change: Callable[[State], T]) -> T:
        """Run `change` on the stored State and bring the maps along, all or nothing. A crash
        anywhere leaves the maps' mark unequal to the store's revision: the next command
        repairs them to whichever state was saved (control/recovery.py)."""
        applied: tuple[str, int, State, State] | None = None
        try:
            with self.store.transaction() as state:
                dp = self.require_attached(state)
                marked_revision(dp)  # maps of another layout: refused before anything is opened
                with DataPlaneMaps.open(dp.pin_dir) as maps:
                    if repair_if_interrupted(maps, state) is not None:
                        mark_applied(maps, state.revision)  # repaired: true as long as this change is not saved
                    old = state.unedited()  # the store's own copy, when it hands out a draft over it
                    if old is None:
                        old = state.copy()
                    result = change(state)
                    state.done_editing()  # from here on the state is only read (its unchanged VIPs are old's)
                    state.require_no_new_backend_vips(old)
                    _refuse_local_backends(state.new_backends(old))
                    state.require_snat()
                    _refuse_foreign_sources(state, state.new_snat_addresses(old))
                    mark_applied(maps, state.revision + 1)  # before the first write; the commit makes it true
                    sync_routes(maps, {i.ifindex for i in dp.interfaces})
                    Reconciler(maps, dp.config["ring_size"]).apply(old, state)
                applied = (dp.pin_dir, dp.config["ring_size"], old, state)  # not changed after this
            return result
        except BaseException:
            if applied is not None:  # the save failed after the maps changed: undo them
                pin_dir, ring_size, old, new = applied
                with DataPlaneMaps.open(pin_dir) as maps:
                    Reconciler(maps, ring_size).apply(new, old)
                    mark_applied(maps, old.revision)
            raise

    def _change_backend(self, vip_text: str, backend_text: str,
                        edit: Callable[[BackendState], dict[str, Any]]) -> dict[str, Any]:
        """Run `edit` on an existing backend of a VIP, as one change."""
        vip = VipAddress.parse(vip_text)
        backend = BackendAddress.parse(backend_text, vip)

        def change(state: State) -> dict[str, Any]:
            b = state.require_vip(vip).backend(backend)
            if b is None:
                raise InputError(f"unknown backend {backend} in VIP {vip}")
            return {"vip": str(vip), **edit(b)}

        return self._change(change)

    def require_attached(self, state: State) -> DataPlaneState:
        dp = state.dataplane
        if dp is None:
            raise InputError("the data plane is not attached; run 'lbctl attach IFACE' first")
        self._check_netns(dp)
        if not self.pins_alive(dp):
            raise LbError(f"the data plane's pins in {dp.pin_dir} are gone (was the host rebooted?); "
                          f"run 'lbctl detach' and 'lbctl attach' again")
        return dp

    def _check_netns(self, dp: DataPlaneState) -> None:
        if dp.netns_ino != self.instance.netns_ino:
            raise InputError(f"this state belongs to a data plane in another network namespace "
                             f"(netns inode {dp.netns_ino}); run lbctl inside that namespace")

    @staticmethod
    def pins_alive(dp: DataPlaneState) -> bool:
        return os.path.exists(os.path.join(dp.pin_dir, loader.PROGRAM_PIN))

    @staticmethod
    def program_id(dp: DataPlaneState) -> int | None:
        try:
            fd = loader.pinned_program(dp.pin_dir)
        except OSError:
            return None
        try:
            return prog_id(fd)
        finally:
            os.close(fd)


def _log_fail_open(v: VipState) -> None:
    if v.failing_open:
        log.warning("VIP %s: every backend fails its health check; failing open: new flows go to all %d of them "
                    "(all_down: open)", v.vip, len(v.maglev_backends()))
    else:
        log.warning("VIP %s: a backend passes its health check again; no longer failing open", v.vip)
