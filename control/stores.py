"""Choose the Store for a location: etcd://HOST:PORT/PREFIX is etcd, anything else a SQLite file."""
from __future__ import annotations

from control.store import SqliteStore, Store


def open_store(location: str) -> Store:
    if location.startswith("etcd:"):
        from control.etcdstore import EtcdStore  # SQLite users need no etcd client
        return EtcdStore.from_url(location)
    return SqliteStore(location)
