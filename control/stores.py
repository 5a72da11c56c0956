"""Choose the Store for a location: etcd://HOST:PORT/PREFIX is etcd, anything else a SQLite file."""
from __future__ import annotations

import os

from control.store import SqliteStore, Store


def open_store(location: str, netns: str = "default") -> Store:
    """The store at `location`; `netns` (the namespace lbctl runs in) names an etcd node's defaults."""
    if location.startswith("etcd:"):
        from control.etcdstore import EtcdStore  # SQLite users need no etcd client
        return EtcdStore.from_url(location, netns)
    return SqliteStore(location)


def same_location(a: str, b: str) -> bool:
    """Whether two --state/--store values name the same store (a file by its real path, etcd by endpoint
    and prefix)."""
    if a.startswith("etcd:") or b.startswith("etcd:"):
        from control.etcdstore import parse_url
        return a.startswith("etcd:") and b.startswith("etcd:") and parse_url(a).shared == parse_url(b).shared
    return os.path.realpath(a) == os.path.realpath(b)
