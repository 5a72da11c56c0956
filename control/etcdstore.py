"""The desired state in etcd (3.4+), behind the same Store interface as SQLite.

`etcd://HOST:PORT/PREFIX` keeps the whole State as one JSON document under the
key /PREFIX/state, for now: the split into a shared part and each node's own
part (interfaces, map ids, health observations) comes later.

A transaction must not be run twice: its block updates the BPF maps as it goes.
So writers are serialised the way SQLite's BEGIN IMMEDIATE does it: a lock key
(/PREFIX/lock, on a lease, so a writer that dies frees it) is taken before the
state is read, waiting a bounded time and retrying. The save is then a
compare-and-swap on the state key's mod_revision, which also checks that the
lock is still ours: a writer whose lease ran out, or one that ignores the lock,
can never overwrite a newer state, it fails with a clear error and nothing is saved.

etcd3gw talks to etcd's HTTP/JSON gateway (no gRPC build); it finds the API path
itself (/v3/ on etcd 3.4)."""
from __future__ import annotations

import base64
import contextlib
import json
import time
import uuid
import threading
from typing import Any, Callable, Iterator
from urllib.parse import urlsplit

from control.errors import InputError, LbError
from control.model import State
from control.store import state_from_doc, state_to_doc

LOCK_TTL = 120  # s: longer than any transaction (an attach compiles the data plane inside one)


class StoreUnreachable(LbError):
    """The shared store does not answer: nothing was read or changed."""


class StoreConflict(LbError):
    """The stored state changed under a transaction: nothing was saved."""


def _b64(data: str | bytes) -> str:
    return base64.b64encode(data.encode() if isinstance(data, str) else data).decode()


def parse_url(url: str) -> tuple[str, int, str]:
    """etcd://HOST:PORT/PREFIX -> (host, port, prefix); the prefix defaults to lb."""
    parts = urlsplit(url)
    try:
        port = parts.port or 2379
    except ValueError:
        raise InputError(f"--store {url}: the port is not a number 1-65535") from None
    if parts.scheme != "etcd" or not parts.hostname or parts.query or parts.fragment:
        raise InputError(f"--store {url}: expected etcd://HOST:PORT/PREFIX")
    return parts.hostname, port, parts.path.strip("/") or "lb"


class EtcdStore:
    def __init__(self, host: str, port: int, prefix: str, timeout: float = 5.0, lock_wait: float = 30.0):
        import etcd3gw  # only etcd users need it imported

        self.path = f"etcd://{host}:{port}/{prefix}"  # what the daemon reports as its state
        self.key = f"/{prefix}/state"
        self.lock_key = f"/{prefix}/lock"
        self.lock_wait = lock_wait
        self.written_revision = 0  # of the last save through this object: watch() skips its own writes
        self._saving = threading.Lock()
        self._client = etcd3gw.Etcd3Client(host=host, port=port, timeout=timeout)

    @classmethod
    def from_url(cls, url: str) -> "EtcdStore":
        return cls(*parse_url(url))

    def _call(self, what: str, *args: Any) -> Any:
        """One request to etcd; a failure to reach it becomes one line for the operator."""
        from etcd3gw import exceptions

        try:
            if what == "post":  # a raw gateway call: (path, JSON body)
                path, body = args
                return self._client.post(self._client.get_url(path), json=body)
            return getattr(self._client, what)(*args)
        except exceptions.ConnectionTimeoutError:
            raise StoreUnreachable(f"etcd at {self.path}: no answer in time; nothing was changed") from None
        except exceptions.ConnectionFailedError:
            raise StoreUnreachable(f"etcd at {self.path} is unreachable; nothing was changed") from None
        except exceptions.Etcd3Exception as e:
            detail = " ".join(str(e.detail_text or e).split())[:200]
            raise LbError(f"etcd at {self.path} refused the request: {detail}") from None

    def _load(self) -> tuple[State, int]:
        """The stored State and its key's mod_revision (0: no state stored yet)."""
        found = self._call("get", self.key, True)
        if not found:
            return State(), 0
        value, meta = found[0]
        doc = json.loads(value)
        state = state_from_doc(doc)
        state.revision = doc.get("revision", 0)  # the document's own count of saves, as SQLite's row keeps
        return state, int(meta["mod_revision"])

    def read(self) -> State:
        return self._load()[0]

    def _lock(self) -> tuple[str, str]:
        """Take the writers' lock: (lease id, our token). Retries until lock_wait runs out."""
        lease = self._call("post", "/lease/grant", {"TTL": LOCK_TTL})
        lease_id, token = lease["ID"], uuid.uuid4().hex
        txn = {"compare": [{"key": _b64(self.lock_key), "result": "EQUAL", "target": "CREATE",
                            "create_revision": 0}],
               "success": [{"request_put": {"key": _b64(self.lock_key), "value": _b64(token), "lease": lease_id}}]}
        deadline, pause = time.monotonic() + self.lock_wait, 0.005
        while not self._call("transaction", txn).get("succeeded", False):
            if time.monotonic() > deadline:
                self._revoke(lease_id)
                raise StoreConflict(f"etcd at {self.path}: another writer held {self.lock_key} for more than "
                                    f"{self.lock_wait:g} s; nothing was changed")
            time.sleep(pause)
            pause = min(pause * 2, 0.1)
        return lease_id, token

    def _revoke(self, lease_id: str) -> None:
        # Revoking the lease deletes the lock key with it.
        self._call("post", "/kv/lease/revoke", {"ID": lease_id})

    @contextlib.contextmanager
    def transaction(self) -> Iterator[State]:
        lease_id, token = self._lock()
        try:
            state, revision = self._load()
            loaded, loaded_revision = json.dumps(state_to_doc(state), sort_keys=True), state.revision
            yield state
            saved = state_to_doc(state)
            if json.dumps(saved, sort_keys=True) == loaded:
                return  # nothing changed: no new revision, so watchers are not woken for nothing
            # What a transaction saves is revision + 1: the data plane's applied mark (control/recovery.py)
            saved["revision"] = loaded_revision + 1
            doc = json.dumps(saved, sort_keys=True)
            txn = {"compare": [{"key": _b64(self.key), "result": "EQUAL", "target": "MOD",
                                "mod_revision": revision},
                               {"key": _b64(self.lock_key), "result": "EQUAL", "target": "VALUE",
                                "value": _b64(token)}],
                   "success": [{"request_put": {"key": _b64(self.key), "value": _b64(doc)}}]}
            with self._saving:  # the watch waits for written_revision before it judges the event
                result = self._call("transaction", txn)
                if result.get("succeeded", False):
                    self.written_revision = int(result["header"]["revision"])
            if not result.get("succeeded", False):
                raise StoreConflict(f"etcd at {self.path}: the state changed during this change (the lock's "
                                    f"{LOCK_TTL} s lease ran out, or a writer ignored {self.lock_key}); "
                                    "nothing was saved, run the command again")
        finally:
            with contextlib.suppress(LbError):  # an unreachable etcd frees the lock when the lease ends
                self._revoke(lease_id)

    def watch(self, stop: threading.Event, on_change: Callable[[], None],
              on_error: Callable[[str], None]) -> None:
        """Call on_change() when another writer changes the state, until `stop` is set: once when
        the watch starts (to catch up on what changed before), then on every write not made
        through this object. Reconnects after etcd was unreachable, calling on_error once per outage.
        The stream blocks between events: run this on a daemon thread, which the process's exit ends."""
        import requests

        failed = False
        while not stop.is_set():
            try:
                url = self._client.get_url("/watch")
                body = {"create_request": {"key": _b64(self.key)}}
                with self._client.session.post(url, json=body, stream=True, timeout=(5, None)) as response:
                    response.raise_for_status()
                    for line in response.iter_lines():
                        if stop.is_set():
                            return
                        result = json.loads(line).get("result", {}) if line.strip() else {}
                        if result.get("created"):
                            failed = False
                            on_change()  # the watch is in place: what changed before it is read now
                        revisions = [int(e["kv"].get("mod_revision", 0)) for e in result.get("events", [])]
                        with self._saving:
                            own = self.written_revision
                        if any(r != own for r in revisions):
                            on_change()
            except (requests.RequestException, ValueError, LbError) as e:
                if stop.is_set():
                    return
                if not failed:
                    on_error(f"etcd at {self.path}: watch lost ({type(e).__name__}); retrying every second")
                failed = True
            stop.wait(1.0)

