"""The daemon follows changes other writers make to a shared store (etcd): each one brings this
node's maps in line with the stored state, as a start does (control/adopt.py)."""
from __future__ import annotations

import logging
import threading
import time
from typing import Any

from control.adopt import adopt
from control.errors import LbError
from control.service import Controller, resolve_dsr_backends

log = logging.getLogger("lb.watch")


def start_store_watch(ctl: Controller, stop: threading.Event) -> threading.Thread | None:
    """Watch ctl's store on a daemon thread when it can be watched (SQLite cannot: one host, one writer
    at a time through this daemon); None otherwise."""
    watch = getattr(ctl.store, "watch", None)
    if watch is None:
        return None

    lost = threading.Event()  # set from an outage's report until the watch is back

    def on_change() -> None:
        if lost.is_set():
            lost.clear()
            log.info("the store answers again: catching up with it", extra={"fields": {"store": ctl.store.path}})
        start = time.monotonic()
        try:
            report = adopt(ctl)
            # DSR backends another node added: this node's kernel must know their MACs too (service.py)
            resolve_dsr_backends(ctl.store.read())
        except (LbError, OSError, RuntimeError) as e:
            log.warning("state changed in the store, maps not reconciled", extra={"fields": {"error": str(e)}})
            return
        fields: dict[str, Any] = {"corrected": report.corrected, "seconds": round(time.monotonic() - start, 4)}
        log.info("state changed in the store: maps reconciled", extra={"fields": fields})

    def on_error(message: str) -> None:
        lost.set()
        log.warning(message + "; forwarding with this node's last state", extra={"fields": {}})

    thread = threading.Thread(target=watch, args=(stop, on_change, on_error), name="store-watch", daemon=True)
    thread.start()
    return thread
