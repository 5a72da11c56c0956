# lb: every target that needs the toolchain runs `setup` first (idempotent).
PY := .venv/bin/python

.PHONY: setup test demo demo-cluster fuzz bench clean

setup:
	@bash setup.sh

# Modules run in parallel (each module's lab stays in one worker; labs carry per-run prefixes).
# LB_TEST_WORKERS=0 runs them one after another.
test: setup
	$(PY) -m pytest -q -n $${LB_TEST_WORKERS:-3} --dist loadfile --durations=15 tests

# Differential fuzzing of the data plane against its reference model, full budget.
fuzz: setup
	LB_FUZZ_EXAMPLES=$${LB_FUZZ_EXAMPLES:-100000} $(PY) -m pytest -q tests/test_fuzz.py

# Benchmarks (about 8 minutes; LB_BENCH_QUICK=1 for a smoke run): bench/results.json, docs/*.png, a summary
# with PASS/FAIL, lb beside Katran when its object is present (LB_BENCH_KATRAN=PATH or the shared path).
bench: setup
	$(PY) -m bench

demo: setup
	$(PY) -m netns.demo

# Three LB nodes behind a BGP router with ECMP: a node is killed, its connections move with their backends.
demo-cluster: setup
	$(PY) -m netns.demo_cluster

clean:
	rm -rf .venv .pytest_cache
