"""Health checks at scale: 1,000 backends checked every second over HTTP (timeout 1 s), a third of
which accept and never answer. Reports how late checks started against their schedule (median,
p99, worst) and the fewest checks any backend got per second of the window; no lab needed
(local listeners, bench/healthfarm.py)."""
from __future__ import annotations

import logging

from bench.healthfarm import measure


def health_checks_at_scale(targets: int = 1000, quick: bool = False) -> dict[str, float]:
    silent = targets // 3
    logging.getLogger("lb.health").setLevel(logging.ERROR)  # a third going down logs a line each
    try:
        return measure(targets - silent, silent, interval=1.0, timeout=1.0,
                       duration=6.0 if quick else 12.0, warmup=2.0)
    finally:
        logging.getLogger("lb.health").setLevel(logging.NOTSET)


if __name__ == "__main__":
    print(health_checks_at_scale())
