# The two commands: `make demo` and `make test`. Both install what is missing first.
PY := .venv/bin/python
PYTEST := $(PY) -m pytest

.PHONY: setup demo test test-unit test-packet test-e2e test-cluster test-differential lint fuzz soak \
	bench bench-quick k8s clean cluster-up cluster-down conformance

setup:
	@bash tools/setup.sh

demo: setup
	@$(PY) -m lab.demo

test: setup k8s lint
	$(PYTEST) -q -p no:cacheprovider tests

test-unit: setup
	$(PYTEST) -q tests/unit

test-packet: setup
	$(PYTEST) -q tests/packet

test-e2e: setup
	$(PYTEST) -q tests/e2e

lint: setup
	.venv/bin/ruff check lb loader lab tests bench
	.venv/bin/mypy --strict lb loader lab

test-cluster: setup k8s
	$(PYTEST) -q tests/cluster

# A million packets through both datapaths (Hypothesis profile "fuzz"), in
# chunks of 100,000, one process each, as many at once as there are CPUs.
fuzz: setup
	@bash tools/fuzz.sh

# Minutes of endpoint churn and agent restarts under wrk (LB_SOAK_SECONDS, default 300).
soak: setup
	$(PYTEST) -q -s -p no:cacheprovider tests/soak/soak_churn.py

# Every benchmark at full scale (about 70 minutes); writes bench/results and bench/RESULTS.md.
bench: setup
	$(PY) -m bench

# Every row at the smallest scale, in under 5 minutes.
bench-quick: setup
	$(PY) -m bench --quick

k8s: setup
	@bash tools/k8s-build.sh >/dev/null

# Two real nodes in namespaces (tools/cluster/cluster.sh); PROXY=kube-proxy|xdplb|none,
# CNI=bridge|flannel.
PROXY ?= xdplb
CNI ?= bridge
cluster-up: setup k8s
	@bash tools/cluster/cluster.sh up --proxy $(PROXY) --cni $(CNI)

cluster-down:
	@bash tools/cluster/cluster.sh down

# The sig-network e2e selection with kube-proxy and with xdplb; writes CONFORMANCE.md.
# SELECTION=full (hours), conformance (the 45 sig-network conformance tests) or smoke;
# ONLY=REGEX narrows it (results merge into tests/cluster/results); PROXIES=kube-proxy,xdplb;
# PROCS=N runs N e2e.test processes in parallel; CNI as above.
SELECTION ?= full
ONLY ?=
PROXIES ?= kube-proxy,xdplb
PROCS ?= 1
conformance: setup k8s
	@bash tools/cluster/cluster.sh down
	@bash tools/cluster/cluster.sh up --proxy none --cni $(CNI)
	$(PY) -m tests.cluster.conformance --selection $(SELECTION) --only '$(ONLY)' \
		--proxies $(PROXIES) --procs $(PROCS); rc=$$?; \
	bash tools/cluster/cluster.sh down; exit $$rc

clean:
	rm -rf .venv .pytest_cache .mypy_cache .ruff_cache

# Kernel vs userspace datapath on random tables and packets (Hypothesis).
test-differential: setup
	$(PYTEST) -q tests/differential
