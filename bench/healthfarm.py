"""Many health-check targets on local listeners, for the health monitor at scale (a test and the bench).

Some listeners answer an HTTP GET with 200; the others black-hole: they accept the
connection and never answer, so each check of theirs runs into its timeout. The
monitor reads a State of one VIP over all of them from a stand-in controller and
records its verdicts there; `measure` reports how late checks started against
their schedule."""
from __future__ import annotations

import asyncio
import contextlib
import ipaddress
import statistics
import threading
import time
from collections import Counter
from dataclasses import dataclass, field
from typing import Iterator

from control.health import HealthMonitor
from control.model import BackendAddress, BackendState, HealthCheck, State, VipAddress, VipState

LISTEN = "127.0.0.1"
ANSWER = b"HTTP/1.1 200 OK\r\nContent-Length: 0\r\nConnection: close\r\n\r\n"


async def _answer(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
    with contextlib.suppress(Exception):
        await reader.readuntil(b"\r\n\r\n")
        writer.write(ANSWER)
        await writer.drain()
    writer.close()


async def _black_hole(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
    with contextlib.suppress(Exception):
        await reader.read()  # until the checker gives up and closes
    writer.close()


@contextlib.contextmanager
def listeners(answering: int, silent: int) -> Iterator[tuple[list[int], list[int]]]:
    """(ports that answer, ports that black-hole), served by one event loop on its own thread."""
    loop = asyncio.new_event_loop()
    thread = threading.Thread(target=loop.run_forever, name="healthfarm", daemon=True)
    thread.start()

    async def start() -> list:
        servers = []
        for handler, n in ((_answer, answering), (_black_hole, silent)):
            for _ in range(n):
                servers.append(await asyncio.start_server(handler, LISTEN, 0, backlog=64))
        return servers

    async def stop(servers: list) -> None:
        for s in servers:
            s.close()
        tasks = [t for t in asyncio.all_tasks() if t is not asyncio.current_task()]
        for t in tasks:
            t.cancel()
        await asyncio.gather(*tasks, return_exceptions=True)

    servers: list = []
    try:
        servers = asyncio.run_coroutine_threadsafe(start(), loop).result(timeout=120)
        ports = [s.sockets[0].getsockname()[1] for s in servers]
        yield ports[:answering], ports[answering:]
    finally:
        with contextlib.suppress(Exception):
            asyncio.run_coroutine_threadsafe(stop(servers), loop).result(timeout=30)
        loop.call_soon_threadsafe(loop.stop)
        thread.join(timeout=10)
        if not thread.is_alive():
            loop.close()


@dataclass
class _Store:
    state: State

    def read(self) -> State:
        return self.state


@dataclass
class StandInController:
    """What HealthMonitor uses of a Controller: the store to read, and where verdicts go."""

    store: _Store
    verdicts: list[tuple[int, int, bool]] = field(default_factory=list)

    def set_health_many(self, verdicts: list[tuple[int, int, bool]]) -> int:
        self.verdicts.extend(verdicts)
        return len(verdicts)


def farm_state(ports: list[int], check: HealthCheck) -> State:
    vip = VipAddress(ipaddress.ip_address("198.19.0.1"), 80, "tcp")
    backends = [BackendState(BackendAddress(ipaddress.ip_address(LISTEN), port), i + 1) for i, port in enumerate(ports)]
    return State(None, [VipState(vip, 0, "nat", backends, health=check)])


def measure(answering: int, silent: int, interval: float = 1.0, timeout: float = 1.0, duration: float = 6.0,
            warmup: float = 2.0) -> dict[str, float]:
    """Run the monitor over `answering` + `silent` targets for `duration` seconds; lateness (how long
    after its due time a check started) is counted after `warmup`."""
    check = HealthCheck("http", interval=interval, timeout=timeout, rise=2, fall=3)
    with listeners(answering, silent) as (good, bad):
        ctl = StandInController(_Store(farm_state(good + bad, check)))
        checked: Counter[str] = Counter()
        monitor = HealthMonitor(lambda: ctl, on_check=lambda t, r: checked.update([t.backend]))
        stop = threading.Event()
        thread = threading.Thread(target=monitor.run, args=(stop,), name="healthfarm-monitor", daemon=True)
        thread.start()
        try:
            time.sleep(warmup)  # the first round starts every check at once
            monitor.take_lateness()
            counted_from = checked.copy()
            start = time.monotonic()
            time.sleep(duration - warmup)
            late = sorted(monitor.take_lateness())
            window = time.monotonic() - start
            per_target = [checked[b] - counted_from[b] for b in (f"{LISTEN}:{p}" for p in good + bad)]
        finally:
            stop.set()
            thread.join(timeout=30)
    down = {bid for _, bid, healthy in ctl.verdicts if not healthy}
    return {
        "targets": answering + silent,
        "black_holed": silent,
        "interval_s": interval,
        "window_s": round(window, 3),
        "checks": len(late),
        "late_p50_s": round(statistics.median(late), 4) if late else 0.0,
        "late_p99_s": round(late[int(len(late) * 0.99)], 4) if late else 0.0,
        "late_max_s": round(late[-1], 4) if late else 0.0,
        "checks_per_target_min": min(per_target),
        "marked_down": len(down),
        "answering_marked_down": len(down & set(range(1, answering + 1))),  # ids follow the ports: answering first
    }
