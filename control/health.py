"""Health checks of backends: TCP connect or HTTP GET, per each VIP's HealthCheck.

HealthMonitor.run() reads the desired state from the store, runs each backend's
check every `interval`, counts successes and failures in a row, and records the
verdicts through Controller.set_health_many after `rise` successes or `fall`
failures (all those of one pass in one change). An unhealthy backend leaves the
Maglev table: its established flows stay in the connection table and go on;
only new flows move.

Checks run concurrently on one asyncio event loop (CheckRunner), each bounded by
its `timeout`: a check waiting on a backend that accepts and never answers holds
a socket, not a thread, so a third of 1,000 backends black-holing delays no
other check (a pool of 32 threads with 1 s timeouts saturated at about 64).

A dsr or tunnel backend answers only on the VIP's address: its check connects to
the VIP with SO_MARK = backend_mark(backend id), which the data plane's TC egress
program steers to that backend. The LB host needs a route to the VIP out of an
interface the data plane is attached to (README).

Sockets belong to the network namespace of the thread that made them: run the
monitor on a thread inside the LB's namespace (the pool's threads are created
from it and inherit its namespace)."""
from __future__ import annotations

import asyncio
import collections
import dataclasses
import logging
import socket
import threading
import time
from concurrent.futures import Future
from dataclasses import dataclass
from typing import TYPE_CHECKING, Callable

from control.model import BackendState, HealthCheck, State, VipState
from lb.structs import backend_mark

if TYPE_CHECKING:
    from control.service import Controller

log = logging.getLogger("lb.health")

_MAX_STATUS_LINE = 1024


@dataclass(frozen=True)
class Target:
    """One backend of one VIP, and how to check it."""

    vip_id: int
    backend_id: int
    vip: str
    backend: str
    host: str  # where the check connects
    port: int
    mark: int | None  # SO_MARK for the socket, None for none
    kind: str
    path: str
    expect_status: int
    timeout: float

    @classmethod
    def of(cls, v: VipState, b: BackendState) -> "Target":
        check = v.health
        if v.mode in ("nat", "fullnat"):  # the backend answers on its own address
            host, port, mark = str(b.address.address), check.port or b.address.port, None
        else:  # dsr/tunnel: the backend answers only for the VIP's address. The mark has the data
            # plane's TC egress program (bpf/lb.c lb_egress) send the connection to this backend the
            # VIP's way; it leaves by the LB host's route to the VIP, which must use an LB interface.
            host, port, mark = str(v.vip.address), check.port or v.vip.port, backend_mark(b.id)
        return cls(v.id, b.id, str(v.vip), str(b.address), host, port, mark, check.kind, check.path,
                   check.expect_status, check.timeout)


@dataclass(frozen=True)
class CheckResult:
    ok: bool
    duration: float  # seconds
    error: str = ""


async def _http_status(loop: asyncio.AbstractEventLoop, sock: socket.socket, t: Target) -> int:
    host = f"[{t.host}]" if ":" in t.host else t.host
    await loop.sock_sendall(sock, f"GET {t.path} HTTP/1.1\r\nHost: {host}\r\nUser-Agent: lb-health\r\n"
                                  f"Connection: close\r\n\r\n".encode())
    data = b""
    while b"\r\n" not in data and len(data) < _MAX_STATUS_LINE:
        chunk = await loop.sock_recv(sock, _MAX_STATUS_LINE)
        if not chunk:
            break
        data += chunk
    parts = data.split(b"\r\n", 1)[0].split()
    if len(parts) < 2 or not parts[0].startswith(b"HTTP/") or not parts[1].isdigit():
        raise ValueError(f"not an HTTP answer: {data[:60]!r}")
    return int(parts[1])


async def check(t: Target, deadline: float | None = None) -> CheckResult:
    """One check on the running event loop, until `deadline` (time.monotonic(); default: the
    target's timeout from now)."""
    loop = asyncio.get_running_loop()
    start = time.monotonic()
    deadline = start + t.timeout if deadline is None else deadline
    sock = socket.socket(socket.AF_INET6 if ":" in t.host else socket.AF_INET, socket.SOCK_STREAM)
    try:
        sock.setblocking(False)
        if t.mark is not None:
            sock.setsockopt(socket.SOL_SOCKET, socket.SO_MARK, t.mark)
        async with asyncio.timeout(max(deadline - time.monotonic(), 0.0)):
            await loop.sock_connect(sock, (t.host, t.port))
            if t.kind == "http":
                status = await _http_status(loop, sock, t)
                if status != t.expect_status:
                    return CheckResult(False, time.monotonic() - start, f"HTTP {status}, expected {t.expect_status}")
        return CheckResult(True, time.monotonic() - start)
    except TimeoutError:
        return CheckResult(False, time.monotonic() - start, "timed out")
    except Exception as e:  # noqa: BLE001 (whatever goes wrong, the check failed; the monitor goes on)
        return CheckResult(False, time.monotonic() - start, str(e) or type(e).__name__)
    finally:
        sock.close()


class CheckRunner:
    """An event loop on its own thread that runs checks as they are submitted. Create it on a
    thread inside the LB's namespace: its thread, and so its sockets, are in that namespace."""

    def __init__(self) -> None:
        self.loop = asyncio.new_event_loop()
        self._thread = threading.Thread(target=self.loop.run_forever, name="lb-health-io", daemon=True)
        self._thread.start()

    def submit(self, t: Target, due: float) -> Future:
        """Check t, which was due at `due`: the check ends by due + timeout, so with a timeout as
        long as the interval it is over when the next one is due (were its time counted from a late
        start, every check of a silent backend would start later than the one before). One started
        very late still gets half its timeout."""
        deadline = max(due + t.timeout, time.monotonic() + t.timeout / 2)
        return asyncio.run_coroutine_threadsafe(check(t, deadline), self.loop)

    def close(self) -> None:
        async def cancel_all() -> None:
            tasks = [task for task in asyncio.all_tasks() if task is not asyncio.current_task()]
            for task in tasks:
                task.cancel()
            await asyncio.gather(*tasks, return_exceptions=True)

        try:
            asyncio.run_coroutine_threadsafe(cancel_all(), self.loop).result(timeout=10)
        finally:
            self.loop.call_soon_threadsafe(self.loop.stop)
            self._thread.join(timeout=10)
            if not self._thread.is_alive():
                self.loop.close()

    def __enter__(self) -> "CheckRunner":
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()


@dataclass
class _Tracker:
    """What the monitor knows of one target: its schedule and its run of results."""

    target: Target
    check: HealthCheck
    healthy: bool
    next_due: float
    successes: int = 0
    failures: int = 0
    in_flight: Future | None = None
    last: CheckResult | None = None

    def record(self, result: CheckResult) -> bool | None:
        """Count a result; the new verdict when rise/fall is reached, else None."""
        self.last = result
        if result.ok:
            self.successes, self.failures = self.successes + 1, 0
            if not self.healthy and self.successes >= self.check.rise:
                return True
        else:
            self.successes, self.failures = 0, self.failures + 1
            if self.healthy and self.failures >= self.check.fall:
                return False
        return None


class HealthMonitor:
    """Runs every backend's health check and records the verdicts; see the module's doc."""

    def __init__(self, controller_factory: Callable[[], "Controller"], refresh: float = 1.0,
                 on_check: Callable[[Target, CheckResult], None] | None = None):
        self.controller_factory = controller_factory
        self.refresh = refresh  # seconds between reads of the desired state
        self.on_check = on_check  # e.g. metrics: called after every check
        self._trackers: dict[tuple, _Tracker] = {}
        self._lock = threading.Lock()
        self._lateness: collections.deque[float] = collections.deque(maxlen=100_000)

    def take_lateness(self) -> list[float]:
        """How late each check started since the last call (seconds after it was due)."""
        with self._lock:
            found = list(self._lateness)
            self._lateness.clear()
        return found

    def timings(self) -> dict[str, dict[str, object]]:
        """The last result of each target, keyed "VIP BACKEND": ok, duration (s), error."""
        with self._lock:
            return {f"{t.target.vip} {t.target.backend}": dataclasses.asdict(t.last)
                    for t in self._trackers.values() if t.last is not None}

    def run(self, stop: threading.Event) -> None:
        """Check until `stop` is set."""
        ctl = self.controller_factory()
        next_refresh = 0.0
        with CheckRunner() as pool:
            try:
                while not stop.is_set():
                    now = time.monotonic()
                    if now >= next_refresh:
                        next_refresh = now + self.refresh
                        try:
                            self._sync(ctl.store.read(), now)
                        except Exception as e:  # noqa: BLE001 (keep checking what is known; retry)
                            log.error("cannot read the desired state: %s", e)
                    self._collect(ctl)
                    wake = self._submit(pool, now)
                    stop.wait(max(0.01, min(wake, next_refresh) - time.monotonic()))
            finally:
                for t in self._trackers.values():
                    if t.in_flight is not None:
                        t.in_flight.cancel()

    def _sync(self, state: State, now: float) -> None:
        """Follow the desired state: new targets start at once, gone ones are dropped, and a
        verdict changed elsewhere (apply, a second monitor) is taken over."""
        wanted: dict[tuple, tuple[Target, HealthCheck, bool]] = {}
        for v in state.vips:
            if not v.health.enabled:
                continue
            for b in v.active_backends():
                target = Target.of(v, b)
                wanted[(target, dataclasses.astuple(v.health))] = (target, v.health, b.healthy)
        with self._lock:
            for key in self._trackers.keys() - wanted.keys():
                del self._trackers[key]
            for key, (target, check, healthy) in wanted.items():
                tracker = self._trackers.get(key)
                if tracker is None:
                    self._trackers[key] = _Tracker(target, check, healthy, now)
                elif tracker.healthy != healthy:
                    tracker.healthy, tracker.successes, tracker.failures = healthy, 0, 0

    def _submit(self, pool: CheckRunner, now: float) -> float:
        """Start the checks that are due; returns when the next one is."""
        wake = now + self.refresh
        late = []
        for t in list(self._trackers.values()):
            if t.in_flight is None and t.next_due <= now:
                late.append(now - t.next_due)
                t.in_flight = pool.submit(t.target, t.next_due)
                t.next_due = max(t.next_due + t.check.interval, now)
            wake = min(wake, t.next_due)
        with self._lock:
            self._lateness.extend(late)
        return wake

    def _collect(self, ctl: "Controller") -> None:
        """Count finished checks and record the verdicts that change, all in one change (a
        reconcile per verdict would hold the checks up when many backends fail at once)."""
        verdicts: list[tuple[_Tracker, bool, CheckResult]] = []
        for t in list(self._trackers.values()):
            if t.in_flight is None or not t.in_flight.done():
                continue
            result, t.in_flight = t.in_flight.result(), None
            with self._lock:
                verdict = t.record(result)
            if self.on_check is not None:
                self.on_check(t.target, result)
            if verdict is not None:
                verdicts.append((t, verdict, result))
        if not verdicts:
            return
        try:
            ctl.set_health_many([(t.target.vip_id, t.target.backend_id, verdict) for t, verdict, _ in verdicts])
        except Exception as e:  # noqa: BLE001 (a failed write must not stop the checks; retried on the next result)
            log.error("cannot record %d health verdict(s) (%s %s first): %s", len(verdicts),
                      verdicts[0][0].target.vip, verdicts[0][0].target.backend, e)
            return
        for t, verdict, result in verdicts:
            t.healthy, t.successes, t.failures = verdict, 0, 0
            log.warning("backend %s of %s is %s (%s)", t.target.backend, t.target.vip,
                        "up" if verdict else "down", result.error or "check passed")


def main(argv: list[str] | None = None) -> int:
    """Run the monitor alone in this network namespace until SIGINT or SIGTERM
    (`ip netns exec NS python -m control.health`); the daemon runs the same on a thread."""
    import argparse
    import os
    import signal

    from control.logescape import EscapingFormatter
    from control.service import Controller

    parser = argparse.ArgumentParser(prog="python -m control.health", description=main.__doc__)
    parser.add_argument("--state", default=os.environ.get("LBCTL_STATE"), help="desired-state file, as for lbctl")
    args = parser.parse_args(argv)
    handler = logging.StreamHandler()
    handler.setFormatter(EscapingFormatter("%(asctime)s %(name)s %(levelname)s %(message)s"))
    logging.basicConfig(level=logging.INFO, handlers=[handler])
    stop = threading.Event()
    for sig in (signal.SIGINT, signal.SIGTERM):
        signal.signal(sig, lambda *_: stop.set())
    HealthMonitor(lambda: Controller.open(args.state)).run(stop)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
