# The two commands: `make demo` and `make test`. Both install what is missing first.
PY := .venv/bin/python
PYTEST := $(PY) -m pytest

.PHONY: setup demo test test-unit test-packet test-e2e lint fuzz bench bench-quick k8s clean

setup:
	@bash tools/setup.sh

demo: setup
	@$(PY) -m lb.demo

test: setup k8s lint
	$(PYTEST) -q -p no:cacheprovider --ignore=tests/differential tests

test-unit: setup
	$(PYTEST) -q tests/unit

test-packet: setup
	$(PYTEST) -q tests/packet

test-e2e: setup
	$(PYTEST) -q tests/e2e

lint: setup
	.venv/bin/ruff check lb loader tests
	.venv/bin/mypy --strict lb loader

k8s: setup
	@bash tools/k8s-build.sh >/dev/null

clean:
	rm -rf .venv .pytest_cache .mypy_cache .ruff_cache

# Kernel vs userspace datapath on random tables and packets (Hypothesis).
test-differential: setup
	$(PYTEST) -q tests/differential
