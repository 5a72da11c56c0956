"""Every lbctl command as one function of (command, params): the single code path behind both
transports, lbctl working on the pinned maps itself and the daemon's API.

params are JSON values (what lbctl's arguments parse to), so a command reads the same
whether it came from a command line or over the daemon's socket."""
from __future__ import annotations

import json
from typing import Any

from control.errors import InputError
from control.service import Controller
from lb.loader import DataPlaneConfig

# Commands that change desired state (their timing is the reconcile time).
CHANGES = frozenset({"attach", "detach", "add-vip", "remove-vip", "add-backend", "remove-backend", "acl", "apply",
                     "drain", "set-weight", "unserved", "snat"})
ACL_COMMANDS = ("add", "remove")
SNAT_COMMANDS = ("add", "remove", "ports", "list")


def _param(params: dict[str, Any], name: str, default: Any = ...) -> Any:
    if name in params and params[name] is not None:
        return params[name]
    if default is ...:
        raise InputError(f"missing parameter {name!r}")
    return default


def _typed(params: dict[str, Any], name: str, kinds: tuple[type, ...], what: str, default: Any) -> Any:
    """The parameter if it is of `kinds` (JSON from the API may hold anything); the default if absent."""
    value = _param(params, name, default)
    if value is not default and (not isinstance(value, kinds) or (bool not in kinds and isinstance(value, bool))):
        raise InputError(f"parameter {name!r} must be {what}, got {json.dumps(value)}")
    return value


def _str(params: dict[str, Any], name: str, default: Any = ...) -> Any:
    return _typed(params, name, (str,), "a string", default)


def _int(params: dict[str, Any], name: str, default: Any = ...) -> Any:
    return _typed(params, name, (int,), "a whole number", default)


def _bool(params: dict[str, Any], name: str, default: Any = ...) -> Any:
    return _typed(params, name, (bool,), "true or false", default)


def _strings(params: dict[str, Any], name: str) -> list[str]:
    value = _param(params, name)
    if not isinstance(value, list) or not all(isinstance(v, str) for v in value):
        raise InputError(f"parameter {name!r} must be a list of strings, got {json.dumps(value)}")
    return value


def _frame(params: dict[str, Any]) -> bytes:
    try:
        return bytes.fromhex(_str(params, "frame_hex"))
    except ValueError:
        raise InputError("the packet is not valid hex") from None


def dispatch(ctl: Controller, command: str, params: dict[str, Any]) -> dict[str, Any]:
    """Run one command on the Controller; returns its JSON-able result."""
    p = params
    match command:
        case "attach":
            defaults = DataPlaneConfig()
            try:
                config = DataPlaneConfig(ring_size=_int(p, "ring_size", defaults.ring_size),
                                         max_vips=_int(p, "max_vips", defaults.max_vips),
                                         max_backends=_int(p, "max_backends", defaults.max_backends),
                                         conn_table_size=_int(p, "conn_table_size", defaults.conn_table_size),
                                         fullnat_table_size=_int(p, "fullnat_table_size",
                                                                 defaults.fullnat_table_size),
                                         tcp_timeout=_int(p, "tcp_timeout", defaults.tcp_timeout),
                                         tcp_closing_timeout=_int(p, "tcp_closing_timeout",
                                                                  defaults.tcp_closing_timeout),
                                         udp_timeout=_int(p, "udp_timeout", defaults.udp_timeout))
            except ValueError as e:
                raise InputError(str(e)) from None
            return ctl.attach(_strings(p, "interfaces"), _str(p, "xdp_mode", "auto"), config,
                              _str(p, "hook", "xdp"))
        case "detach":
            return ctl.detach()
        case "add-vip":
            return ctl.add_vip(_str(p, "vip"), _str(p, "mode", "nat"), _str(p, "hash", "flow"),
                               _str(p, "all_down", "open"), _bool(p, "replies_via_this_node", False),
                               _int(p, "min_healthy", 1), _strings(p, "snat") if p.get("snat") else [])
        case "remove-vip":
            return ctl.remove_vip(_str(p, "vip"))
        case "add-backend":
            return ctl.add_backend(_str(p, "vip"), _str(p, "backend"), _int(p, "weight", 1))
        case "remove-backend":
            return ctl.remove_backend(_str(p, "vip"), _str(p, "backend"))
        case "set-weight":
            return ctl.set_weight(_str(p, "vip"), _str(p, "backend"), _int(p, "weight"))
        case "drain":
            return ctl.drain(_str(p, "vip"), _str(p, "backend"))
        case "list":
            return ctl.list()
        case "stats":
            return ctl.stats()
        case "connections":
            return ctl.connections(_str(p, "vip", None), _str(p, "backend", None), _int(p, "limit", None))
        case "test-packet":
            return ctl.test_packet(_frame(p), _str(p, "ingress", None))
        case "apply":
            return ctl.apply(_str(p, "text"), _bool(p, "dry_run", False), _str(p, "source", "<file>"))
        case "export":
            return ctl.export()
        case "status":
            return ctl.status()
        case "unserved":
            return ctl.unserved(_str(p, "address"), _str(p, "action"))
        case "snat":
            match _str(p, "snat_command", "list"):
                case "add":
                    return ctl.snat_add(_strings(p, "addresses"))
                case "remove":
                    return ctl.snat_remove(_strings(p, "addresses"))
                case "ports":
                    return ctl.snat_ports(_str(p, "ports"))
                case "list":
                    return ctl.snat_list()
                case other:
                    raise InputError(f"unknown snat command {other!r} (expected one of: {', '.join(SNAT_COMMANDS)})")
        case "acl":
            match _str(p, "acl_command"):
                case "add":
                    return ctl.acl_add(_str(p, "vip"), _str(p, "prefix"), _str(p, "action"))
                case "remove":
                    return ctl.acl_remove(_str(p, "vip"), _str(p, "prefix"))
                case other:
                    raise InputError(f"unknown acl command {other!r} (expected one of: {', '.join(ACL_COMMANDS)})")
    raise InputError(f"unknown command {command!r}")
