"""Maglev table population: full, weighted, deterministic, minimally disruptive."""
from __future__ import annotations

import random
import subprocess
import sys
from collections import Counter

import pytest

from lb.maglev import MaglevBackend, build_table, is_prime

SIZE = 65537


def backends(n: int, prefix: str = "10.0") -> list[MaglevBackend]:
    return [MaglevBackend(f"{prefix}.{i // 256}.{i % 256}:80") for i in range(n)]


@pytest.mark.parametrize("n", [1, 3, 10, 100])
def test_every_slot_filled_and_equal_shares(n):
    table = build_table(backends(n), SIZE)
    counts = Counter(table)
    assert -1 not in counts
    assert set(counts) == set(range(n))
    assert max(counts.values()) - min(counts.values()) <= 1


def test_weights_give_proportional_shares():
    table = build_table([MaglevBackend("a", 1), MaglevBackend("b", 2), MaglevBackend("c", 5)], SIZE)
    counts = Counter(table)
    for index, weight in enumerate((1, 2, 5)):
        assert counts[index] == pytest.approx(SIZE * weight / 8, rel=0.01)


def test_weight_zero_takes_no_slot_and_empty_set_gives_empty_table():
    table = build_table([MaglevBackend("a", 0), MaglevBackend("b", 1)], SIZE)
    assert set(table) == {1}
    assert set(build_table([], SIZE)) == {-1}


@pytest.mark.parametrize("n", [3, 10, 50])
def test_removing_one_backend_moves_about_one_nth(n):
    before = build_table(backends(n), SIZE)
    rest = backends(n)[1:]
    after = build_table(rest, SIZE)
    before_keys = [backends(n)[i].key for i in before]
    after_keys = [rest[i].key for i in after]
    gone = backends(n)[0].key
    moved = sum(1 for b, a in zip(before_keys, after_keys) if b != a and b != gone)
    must_move = sum(1 for b in before_keys if b == gone)
    assert must_move == pytest.approx(SIZE / n, rel=0.01)
    # Slots of surviving backends that changed hands: a small fraction (Maglev's trade-off).
    assert moved <= 0.02 * SIZE


def test_order_of_input_does_not_matter():
    bs = backends(20)
    t1 = [bs[i].key for i in build_table(bs, SIZE)]
    rev = list(reversed(bs))
    t2 = [rev[i].key for i in build_table(rev, SIZE)]
    assert t1 == t2


def test_deterministic_across_processes():
    code = ("from lb.maglev import MaglevBackend, build_table;"
            "import hashlib;"
            "t = build_table([MaglevBackend(f'10.1.0.{i}:80') for i in range(7)], 65537);"
            "print(hashlib.sha256(str(t).encode()).hexdigest())")
    runs = {subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True,
                           env={"PYTHONHASHSEED": str(seed)}).stdout for seed in (1, 2)}
    assert len(runs) == 1


def test_table_size_must_be_prime():
    assert is_prime(65537) and is_prime(251) and not is_prime(65536)
    with pytest.raises(ValueError):
        build_table(backends(3), 65536)


def test_the_c_fill_loop_is_built_and_gives_the_python_loops_tables(monkeypatch):
    """setup.sh builds lb/_maglev_fill.so; it must fill every table exactly as the Python loop does."""
    from lb import maglev
    assert maglev._native_fill() is not None, "lb/_maglev_fill.so is missing or older than its source"
    rng = random.Random(7)
    cases = []
    for _ in range(40):
        n = rng.randint(1, 50)
        backends = [MaglevBackend(f"10.{rng.randint(0, 255)}.0.{i}:80", rng.choice([0, 1, 1, 2, 7, 100]))
                    for i in range(n)]
        cases.append((backends, rng.choice([7, 13, 251, 65537])))
    native = [build_table(b, size) for b, size in cases]
    monkeypatch.setattr(maglev, "_native_fill", lambda: None)
    assert [build_table(b, size) for b, size in cases] == native
