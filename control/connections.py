"""`lbctl connections`: the connection table's entries as rows an operator reads (like
`ipvsadm -Lnc` or `conntrack -L`), named with the desired state's backends.

An entry names a backend binding by generation (never reused), so the state tells which backend
it was even when the data plane no longer trusts the entry (the backend removed with its VIP, its
id reused): such stale entries are listed as such, not hidden."""
from __future__ import annotations

from dataclasses import dataclass
from typing import Any

from control.errors import InputError
from control.model import BackendAddress, DataPlaneState, State, format_endpoint, parse_endpoint_filter
from lb.conntable import PROTOCOL_NAMES, Connection, ConnectionFilter, connections
from lb.maps import DataPlaneMaps
from lb.structs import PROTOCOLS, IPAddress

# JSON fields of one entry, in order (tests/test_connections.py holds the schema to this)
FIELDS = ("proto", "client", "vip", "vip_id", "mode", "via", "backend", "backend_id", "generation", "state",
          "local", "age", "expires_in", "valid", "stale")


@dataclass(frozen=True)
class Filters:
    """What --vip ADDR[:PORT][/PROTO], --backend ADDR[:PORT] and --limit N select, parsed and checked
    before anything is read."""
    vip: tuple[IPAddress, int | None, str | None] | None = None
    backend: tuple[IPAddress, int | None] | None = None
    limit: int | None = None

    @classmethod
    def parse(cls, vip: str | None, backend: str | None, limit: int | None) -> "Filters":
        if limit is not None and (isinstance(limit, bool) or not isinstance(limit, int) or limit < 1):
            raise InputError(f"--limit must be a positive whole number, got {limit!r}")
        return cls(None if vip is None else parse_endpoint_filter(vip, "--vip", with_proto=True),
                   None if backend is None else parse_endpoint_filter(backend, "--backend", with_proto=False)[:2],
                   limit)

    def of(self, state: State) -> ConnectionFilter:
        """The data plane's filter: backends are selected by their bindings (generations) in `state`."""
        vip_address = vip_port = proto = generations = None
        if self.vip is not None:
            vip_address, vip_port, proto_name = self.vip
            proto = PROTOCOLS[proto_name] if proto_name else None
        if self.backend is not None:
            address, port = self.backend
            generations = {}
            for v in state.vips:
                for b in v.backends:
                    if b.address.address != address:
                        continue
                    if port is None or b.address.port == port:
                        generations[b.generation] = None
                    elif b.address.port == 0:  # it keeps the client's port: only flows to that port
                        generations[b.generation] = port
        return ConnectionFilter(vip_address, vip_port, proto, generations)


def list_connections(maps: DataPlaneMaps, state: State, filters: Filters = Filters()) -> dict[str, Any]:
    """Entries matching the filters, at most filters.limit (reading stops there), sorted by VIP then client."""
    limit = filters.limit
    # generation -> (the backend as configured, its VIP's mode): known while the state keeps the binding
    bindings = {b.generation: (b.address, v.mode) for v in state.vips for b in v.backends}
    found = list(connections(maps, filters.of(state), None if limit is None else limit + 1))
    truncated = limit is not None and len(found) > limit
    found = found[:limit] if truncated else found
    found.sort(key=lambda c: (_endpoint_order(c.vip), c.proto, _endpoint_order(c.client)))
    rows = [_row(c, bindings) for c in found]
    return {"connections": rows, "shown": len(rows), "truncated": truncated,
            "stale": sum(not r["valid"] for r in rows), "table_size": maps.conn_table.max_entries}


def _endpoint_order(endpoint: tuple[IPAddress, int]) -> tuple[int, int, int]:
    return endpoint[0].version, int(endpoint[0]), endpoint[1]


def _row(c: Connection, bindings: dict[int, tuple[BackendAddress, str]]) -> dict[str, Any]:
    known = bindings.get(c.generation)
    if c.backend is not None:
        backend = format_endpoint(*c.backend)
    elif known is not None:  # the record changed, the state still knows the binding
        backend = format_endpoint(known[0].address, known[0].port or c.vip[1])
    else:
        backend = None
    proto = PROTOCOL_NAMES.get(c.proto, str(c.proto))
    return {
        "proto": proto,
        "client": format_endpoint(*c.client),
        "vip": f"{format_endpoint(*c.vip)}/{proto}",
        "vip_id": c.vip_id,
        "mode": known[1] if known is not None else None,
        "via": None,  # full NAT's source address:port towards the backend (issue 15); other modes have none
        "backend": backend,
        "backend_id": c.backend_id,
        "generation": c.generation,
        "state": c.state,
        "local": c.local,
        "age": round(c.age_seconds, 1),
        "expires_in": round(c.expires_in_seconds, 1),
        "valid": c.stale is None,
        "stale": c.stale,
    }


def format_connections(data: dict[str, Any]) -> str:
    """The text table: one line per entry. VIA is full NAT's source towards the backend ("-" in the
    other modes); ENTRY says whether the data plane still trusts the entry, and why not."""
    lines = []
    if data["connections"]:
        rows: list[list[Any]] = [["PROTO", "CLIENT", "VIP", "VIA", "BACKEND", "STATE", "AGE", "EXPIRES", "ENTRY"]]
        for r in data["connections"]:
            state = r["state"] + (" (local)" if r["local"] else "")
            entry = "valid" if r["valid"] else f"stale: {r['stale']}" if r["stale"] != "idle" else "expired"
            rows.append([r["proto"], r["client"], r["vip"].rsplit("/", 1)[0], r["via"] or "-",
                         r["backend"] or f"? (id {r['backend_id']})", state, f"{r['age']:.0f}s",
                         f"{r['expires_in']:.0f}s", entry])
        widths = [max(len(str(row[i])) for row in rows) for i in range(len(rows[0]))]
        lines += ["  ".join(str(c).ljust(w) for c, w in zip(row, widths)).rstrip() for row in rows]
    summary = f"{data['shown']} connection(s)"
    if data["stale"]:
        summary += f", {data['stale']} no longer trusted (a packet of theirs picks a backend again)"
    if data["truncated"]:
        summary += "; --limit reached, more entries match"
    lines.append(summary)
    return "\n".join(lines)
