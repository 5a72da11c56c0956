# lb: every target that needs the toolchain runs `setup` first (idempotent).
PY := .venv/bin/python

.PHONY: setup test demo clean

setup:
	@bash setup.sh

test: setup
	$(PY) -m pytest -q tests

demo: setup
	$(PY) -m netns.demo

clean:
	rm -rf .venv .pytest_cache
