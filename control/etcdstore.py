"""The desired state of a cluster of nodes in etcd (3.4+), behind the same Store interface as SQLite.

`etcd://HOST:PORT/PREFIX` keeps what every node shares (control/shared.py: VIPs, backends by
endpoint and weight, modes, ACLs, health-check definitions, unserved settings) as one JSON document
under /PREFIX/state. Each node keeps its own part (data plane, map ids, health observations, removed
backends still carrying flows) in a SQLite file of its own (`--state`, default
/var/lib/lb/NETNS.node.db): a node must be able to restart and forward with its last state while
etcd is away, and nothing in that part is another node's business. Each node also writes
/PREFIX/nodes/NAME (what it applied last, and when): the cluster's members.

A transaction must not be run twice: its block updates the BPF maps as it goes. So writers are
serialised as SQLite's BEGIN IMMEDIATE does it: a lock key (/PREFIX/lock, on a lease, so a writer
that dies frees it) is taken before the state is read, waiting a bounded time and retrying. The save
is then a compare-and-swap on the shared key's mod_revision, which also checks that the lock is
still ours: a writer whose lease ran out, or one that ignores the lock, can never overwrite a newer
state; it fails with a clear error and nothing is saved, here or in the node's file.

etcd3gw talks to etcd's HTTP/JSON gateway (no gRPC build); it finds the API path itself (/v3/ on
etcd 3.4)."""
from __future__ import annotations

import base64
import contextlib
import json
import os
import socket
import threading
import time
import uuid
from dataclasses import dataclass
from typing import Any, Callable, Iterator
from urllib.parse import parse_qs, quote, urlsplit

from control.errors import InputError, LbError, StoreUnreachable
from control.model import State
from control.shared import merge, normalise, plain_nat_vips, shared_doc
from control.store import SqliteStore
from lb.pins import STATE_DIR

LOCK_TTL = 10  # s: how long a writer that died (kill -9, a frozen host) can keep the others waiting
LOCK_REFRESH = LOCK_TTL / 4  # s: a live writer keeps its lease alive, however long it takes (an attach compiles)
FORMAT = 2  # of the shared document: 1 (no "format" key) held the whole State of the writer


class StoreConflict(LbError):
    """The stored state changed under a transaction: nothing was saved."""


def _b64(data: str | bytes) -> str:
    return base64.b64encode(data.encode() if isinstance(data, str) else data).decode()


@dataclass(frozen=True)
class Location:
    """etcd://HOST:PORT/PREFIX[?node=NAME&local=FILE]: where the shared part is, and this node's name and file
    (None: the defaults, from the network namespace lbctl runs in)."""

    host: str
    port: int
    prefix: str
    node: str | None = None
    local: str | None = None

    @property
    def shared(self) -> str:
        return f"etcd://{self.host}:{self.port}/{self.prefix}"

    def with_node(self, node: str | None, local: str | None) -> str:
        query = "&".join(f"{k}={quote(v, safe='/')}" for k, v in (("node", node), ("local", local)) if v)
        return self.shared + (f"?{query}" if query else "")


def parse_url(url: str) -> Location:
    """etcd://HOST:PORT/PREFIX -> its Location; the prefix defaults to lb."""
    parts = urlsplit(url)
    try:
        port = parts.port or 2379
    except ValueError:
        raise InputError(f"--store {url}: the port is not a number 1-65535") from None
    query = parse_qs(parts.query)
    if parts.scheme != "etcd" or not parts.hostname or parts.fragment or set(query) - {"node", "local"}:
        raise InputError(f"--store {url}: expected etcd://HOST:PORT/PREFIX")
    node = query.get("node", [None])[-1]
    if node is not None and not valid_node_name(node):
        raise InputError(f"--node {node!r}: a node name is 1-63 letters, digits, '.', '_' or '-'")
    return Location(parts.hostname, port, parts.path.strip("/") or "lb", node, query.get("local", [None])[-1])


def valid_node_name(name: str) -> bool:
    return 0 < len(name) <= 63 and name.isascii() and all(c.isalnum() or c in "._-" for c in name)


def default_node_name(netns: str) -> str:
    """The host's name; in a named network namespace, with the namespace's name after it (so that
    namespaces of one host, as in the lab, are nodes of their own)."""
    host = socket.gethostname().split(".")[0] or "node"
    name = host if netns == "default" else f"{host}-{netns}"
    return "".join(c if c.isalnum() or c in "._-" else "-" for c in name)[:63]


class EtcdDocument:
    """One JSON document at a key of etcd, changed under a lease lock by compare-and-swap, and watched."""

    def __init__(self, host: str, port: int, prefix: str, timeout: float = 5.0, lock_wait: float = 30.0):
        import etcd3gw  # only etcd users need it imported

        self.path = f"etcd://{host}:{port}/{prefix}"
        self.prefix = prefix
        self.key = f"/{prefix}/state"
        self.lock_key = f"/{prefix}/lock"
        self.nodes_key = f"/{prefix}/nodes/"
        self.lock_wait = lock_wait
        self.written_revision = 0  # of the last save through this object: watch() skips its own writes
        self._saving = threading.Lock()
        self._client = etcd3gw.Etcd3Client(host=host, port=port, timeout=timeout)

    def call(self, what: str, *args: Any) -> Any:
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

    def load(self) -> tuple[dict[str, Any] | None, int]:
        """The stored document and its key's mod_revision ((None, 0): nothing stored yet)."""
        found = self.call("get", self.key, True)
        if not found:
            return None, 0
        value, meta = found[0]
        return json.loads(value), int(meta["mod_revision"])

    def lock(self) -> tuple[str, str]:
        """Take the writers' lock: (lease id, our token). Retries until lock_wait runs out."""
        lease = self.call("post", "/lease/grant", {"TTL": LOCK_TTL})
        lease_id, token = lease["ID"], uuid.uuid4().hex
        txn = {"compare": [{"key": _b64(self.lock_key), "result": "EQUAL", "target": "CREATE",
                            "create_revision": 0}],
               "success": [{"request_put": {"key": _b64(self.lock_key), "value": _b64(token), "lease": lease_id}}]}
        deadline, pause = time.monotonic() + self.lock_wait, 0.005
        refreshed = time.monotonic()
        while not self.call("transaction", txn).get("succeeded", False):
            now = time.monotonic()
            if now > deadline:
                self.unlock(lease_id)
                raise StoreConflict(f"etcd at {self.path}: another writer held {self.lock_key} for more than "
                                    f"{self.lock_wait:g} s; nothing was changed")
            if now - refreshed > LOCK_REFRESH:  # our own lease must outlive the wait
                self.call("post", "/lease/keepalive", {"ID": lease_id})
                refreshed = now
            time.sleep(pause)
            pause = min(pause * 2, 0.1)
        return lease_id, token

    @contextlib.contextmanager
    def kept_alive(self, lease_id: str) -> Iterator[None]:
        """Keep the lock's lease alive while the block runs: a short lease frees the lock soon after a
        writer dies, and a live writer's long change (an attach compiles) keeps it."""
        stop = threading.Event()

        def refresh() -> None:
            while not stop.wait(LOCK_REFRESH):
                with contextlib.suppress(LbError):  # a missed refresh: the save's compare-and-swap tells
                    self.call("post", "/lease/keepalive", {"ID": lease_id})

        keeper = threading.Thread(target=refresh, name="etcd-lock-keepalive", daemon=True)
        keeper.start()
        try:
            yield
        finally:
            stop.set()
            keeper.join(timeout=LOCK_REFRESH + 5)

    def unlock(self, lease_id: str) -> None:
        # Revoking the lease deletes the lock key with it.
        self.call("post", "/kv/lease/revoke", {"ID": lease_id})

    def save(self, doc: dict[str, Any], mod_revision: int, token: str) -> int:
        """Store `doc` if the key is still at `mod_revision` and the lock still ours; its new revision."""
        txn = {"compare": [{"key": _b64(self.key), "result": "EQUAL", "target": "MOD", "mod_revision": mod_revision},
                           {"key": _b64(self.lock_key), "result": "EQUAL", "target": "VALUE", "value": _b64(token)}],
               "success": [{"request_put": {"key": _b64(self.key), "value": _b64(json.dumps(doc, sort_keys=True))}}]}
        with self._saving:  # the watch waits for written_revision before it judges the event
            result = self.call("transaction", txn)
            if result.get("succeeded", False):
                self.written_revision = int(result["header"]["revision"])
                return self.written_revision
        raise StoreConflict(f"etcd at {self.path}: the state changed during this change (the lock's "
                            f"{LOCK_TTL} s lease ran out, or a writer ignored {self.lock_key}); "
                            "nothing was saved, run the command again")

    def put_node(self, name: str, record: dict[str, Any]) -> None:
        self.call("put", self.nodes_key + name, json.dumps(record, sort_keys=True))

    def nodes(self) -> dict[str, dict[str, Any]]:
        """Every registered node's record, by name."""
        return {key["key"].decode()[len(self.nodes_key):] if isinstance(key["key"], bytes)
                else key["key"][len(self.nodes_key):]: json.loads(value)
                for value, key in self.call("get_prefix", self.nodes_key)}

    def watch(self, stop: threading.Event, on_change: Callable[[], None],
              on_error: Callable[[str], None]) -> None:
        """Call on_change() when another writer changes the document, until `stop` is set: once when
        the watch starts (to catch up on what changed before), then on every write not made
        through this object. Reconnects after etcd was unreachable, calling on_error once per outage.
        The stream blocks between events: run this on a daemon thread, which the process's exit ends."""
        import requests
        from etcd3gw import exceptions

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
            # Etcd3Exception: get_url asks etcd for its API path the first time (a daemon started without etcd)
            except (requests.RequestException, exceptions.Etcd3Exception, ValueError, LbError) as e:
                if stop.is_set():
                    return
                if not failed:
                    on_error(f"etcd at {self.path}: watch lost ({type(e).__name__}); retrying every second")
                failed = True
            stop.wait(1.0)


class EtcdStore:
    """A node of a cluster: the shared part in etcd, this node's own part in its SQLite file (see above).

    `reachable` is what the last contact with etcd found (None before any): while etcd is away,
    read() answers with the node's last state (the maps keep forwarding it), changes to the shared
    part are refused, and changes to the node's own part alone (health verdicts) go on."""

    def __init__(self, location: Location, node: str, local_path: str):
        self.location = location
        self.path = location.shared  # what the daemon reports as its state
        self.node = node
        self.local = SqliteStore(local_path)
        self.shared = EtcdDocument(location.host, location.port, location.prefix)
        self.reachable: bool | None = None
        self.unreachable_since: float | None = None
        self._normalised: tuple[int, dict[str, Any]] = (0, shared_doc(State()))  # (mod_revision, its document)

    @classmethod
    def from_url(cls, url: str, netns: str = "default") -> "EtcdStore":
        """The node of `url`; its name and file default from `netns`, the namespace lbctl runs in."""
        location = parse_url(url)
        node = location.node or default_node_name(netns)
        return cls(location, node, location.local or os.path.join(STATE_DIR, f"{netns}.node.db"))

    def _contact(self, ok: bool) -> None:
        if ok:
            self.reachable, self.unreachable_since = True, None
        else:
            if self.reachable is not False:
                self.unreachable_since = time.time()
            self.reachable = False

    def _shared_doc(self) -> tuple[dict[str, Any], int]:
        try:
            doc, mod_revision = self.shared.load()
        except StoreUnreachable:
            self._contact(False)
            raise
        self._contact(True)
        if self._normalised[0] != mod_revision:  # a daemon reads often, the document changes seldom
            self._normalised = (mod_revision, normalise(doc) if doc is not None else shared_doc(State()))
        return self._normalised[1], mod_revision

    @staticmethod
    def _follow(state: State, doc: dict[str, Any]) -> None:
        """Bring `state` (this node's, as loaded) up to the shared document in place. When that changes
        anything, its revision goes up one: the maps' mark (control/recovery.py) no longer equals it,
        so the maps are repaired to the merged state before a change builds on them."""
        merged = merge(state, doc)
        if merged != state:
            state.vips, state.pass_unserved, state.generations = merged.vips, merged.pass_unserved, merged.generations
            state.revision += 1

    def read(self) -> State:
        state = self.local.read()
        try:
            doc, _ = self._shared_doc()
        except StoreUnreachable:
            return state  # the node's last state: what its maps forward with until etcd returns
        self._follow(state, doc)
        return state

    @contextlib.contextmanager
    def transaction(self) -> Iterator[State]:
        try:
            lease_id, token = self.shared.lock()
        except StoreUnreachable as e:
            self._contact(False)
            with self._node_only(e) as state:
                yield state
            return
        try:
            with self.shared.kept_alive(lease_id), self.local.transaction() as state:
                doc, mod_revision = self._shared_doc()
                self._follow(state, doc)
                yield state
                changed = shared_doc(state)
                if changed != doc:
                    self._refuse_plain_nat(doc, changed)
                    mod_revision = self.shared.save({"format": FORMAT, **changed}, mod_revision, token)
            saved = state.revision + 1
            with contextlib.suppress(LbError):  # the change is made; the record catches up with the next one
                self.shared.put_node(self.node, {"node": self.node, "revision": saved,
                                                 "shared_revision": mod_revision, "time": round(time.time(), 3)})
        finally:
            with contextlib.suppress(LbError):  # an unreachable etcd frees the lock when the lease ends
                self.shared.unlock(lease_id)

    def _refuse_plain_nat(self, before: dict[str, Any], after: dict[str, Any]) -> None:
        """InputError for a change that makes a VIP plain nat in a cluster (more than one node registered):
        its replies leave the backends for one node, while the router spreads its flows over all of them.
        VIPs that were plain nat before the cluster formed stay as they are."""
        new = sorted(plain_nat_vips(after) - plain_nat_vips(before))
        if not new:
            return
        nodes = set(self.nodes()) | {self.node}
        if len(nodes) > 1:
            raise InputError(f"VIP {new[0]}: plain nat in a cluster of {len(nodes)} nodes ({', '.join(sorted(nodes))}) "
                             "would send replies back through whichever node the backends route to; use --mode "
                             "tunnel or dsr, or route the replies through this node and say so: "
                             "--replies-via-this-node")

    @contextlib.contextmanager
    def _node_only(self, unreachable: StoreUnreachable) -> Iterator[State]:
        """A transaction on this node's own part alone, while etcd is away: health verdicts, the data
        plane's attachment go on; a change to the shared part raises `unreachable`, and nothing is saved."""
        with self.local.transaction() as state:
            before = shared_doc(state)
            yield state
            if shared_doc(state) != before:
                raise unreachable

    def nodes(self) -> dict[str, dict[str, Any]]:
        return self.shared.nodes()

    def watch(self, stop: threading.Event, on_change: Callable[[], None],
              on_error: Callable[[str], None]) -> None:
        def changed() -> None:
            self._contact(True)
            on_change()

        def lost(message: str) -> None:
            self._contact(False)
            on_error(message)

        self.shared.watch(stop, changed, lost)

    def status(self, with_nodes: bool = False) -> dict[str, Any]:
        """How this node stands with the shared store, for metrics and (with the registered nodes' names
        and what each applied last, while etcd answers) for `lbctl status`."""
        found: dict[str, Any] = {"store": self.path, "node": self.node, "local": self.local.path,
                                 "reachable": self.reachable, "unreachable_since": self.unreachable_since}
        if with_nodes and self.reachable:
            with contextlib.suppress(LbError):
                found["nodes"] = self.nodes()
        return found
