"""Fault injection for crash tests: LB_FAULT=POINT:N kills this process with SIGKILL at the
Nth time it reaches POINT ("map_write": before a map write; "store_commit": before the
desired state's commit). Unset, it costs one dictionary lookup per call."""
from __future__ import annotations

import os
import signal

_counts: dict[str, int] = {}


def point(name: str) -> None:
    spec = os.environ.get("LB_FAULT")
    if not spec:
        return
    where, _, nth = spec.partition(":")
    if where != name:
        return
    _counts[name] = _counts.get(name, 0) + 1
    if _counts[name] >= int(nth or 1):
        os.kill(os.getpid(), signal.SIGKILL)  # as kill -9 does: no cleanup, no finally blocks
