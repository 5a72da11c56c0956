"""Every lbctl command as one function of (command, params): the single code path behind both
transports, lbctl working on the pinned maps itself and the daemon's API.

params are JSON values (what lbctl's arguments parse to), so a command reads the same
whether it came from a command line or over the daemon's socket."""
from __future__ import annotations

from typing import Any

from control.errors import InputError
from control.service import Controller
from lb.loader import DataPlaneConfig

# Commands that change desired state (their timing is the reconcile time).
CHANGES = frozenset({"attach", "detach", "add-vip", "remove-vip", "add-backend", "remove-backend", "acl", "apply",
                     "drain"})


def _param(params: dict[str, Any], name: str, default: Any = ...) -> Any:
    if name in params and params[name] is not None:
        return params[name]
    if default is ...:
        raise InputError(f"missing parameter {name!r}")
    return default


def _frame(params: dict[str, Any]) -> bytes:
    try:
        return bytes.fromhex(_param(params, "frame_hex"))
    except (TypeError, ValueError):
        raise InputError("the packet is not valid hex") from None


def dispatch(ctl: Controller, command: str, params: dict[str, Any]) -> dict[str, Any]:
    """Run one command on the Controller; returns its JSON-able result."""
    p = params
    match command:
        case "attach":
            defaults = DataPlaneConfig()
            try:
                config = DataPlaneConfig(ring_size=_param(p, "ring_size", defaults.ring_size),
                                         max_vips=_param(p, "max_vips", defaults.max_vips),
                                         max_backends=_param(p, "max_backends", defaults.max_backends),
                                         conn_table_size=_param(p, "conn_table_size", defaults.conn_table_size))
            except (TypeError, ValueError) as e:
                raise InputError(str(e)) from None
            return ctl.attach(list(_param(p, "interfaces")), _param(p, "xdp_mode", "native"), config,
                              _param(p, "hook", "xdp"))
        case "detach":
            return ctl.detach()
        case "add-vip":
            return ctl.add_vip(_param(p, "vip"), _param(p, "mode", "nat"), _param(p, "hash", "flow"))
        case "remove-vip":
            return ctl.remove_vip(_param(p, "vip"))
        case "add-backend":
            return ctl.add_backend(_param(p, "vip"), _param(p, "backend"), _param(p, "weight", 1))
        case "remove-backend":
            return ctl.remove_backend(_param(p, "vip"), _param(p, "backend"))
        case "list":
            return ctl.list()
        case "stats":
            return ctl.stats()
        case "test-packet":
            return ctl.test_packet(_frame(p), p.get("ingress"))
        case "apply":
            return ctl.apply(_param(p, "text"), bool(_param(p, "dry_run", False)), _param(p, "source", "<file>"))
        case "export":
            return ctl.export()
        case "drain":
            return ctl.drain(_param(p, "vip"), _param(p, "backend"))
        case "status":
            return ctl.status()
        case "acl" if _param(p, "acl_command") == "add":
            return ctl.acl_add(_param(p, "vip"), _param(p, "prefix"), _param(p, "action"))
        case "acl" if p["acl_command"] == "remove":
            return ctl.acl_remove(_param(p, "vip"), _param(p, "prefix"))
    raise InputError(f"unknown command {command!r}")
