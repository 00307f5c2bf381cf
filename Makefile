# kvmrr - every entry point.  `make run` and `make test` do all set-up themselves
# (venv, pip packages, the C core and its binding, the guests, the Kafka jars) and cache it.

PYTHON      ?= python3
VENV        := .venv
PY          := $(VENV)/bin/python
BUILD       := build
KAFKACTL    := compose/kafka/kafkactl
KAFKA_PORT  ?= 19092
CORE_SRC    := $(wildcard libkvmrr/src/*.c libkvmrr/src/*.h libkvmrr/include/*.h)
CORE_CFLAGS := -O2 -g -Wall -Wextra -Werror -Wno-unused-parameter -std=gnu11 -Ilibkvmrr/include -Ilibkvmrr/src

ENGINE      := compose/images/engine
COMPOSE     := docker-compose -f compose/docker-compose.yml
CLUSTER     := kvmrr-kafka1 kvmrr-kafka2 kvmrr-kafka3 kvmrr-primary kvmrr-backup1 kvmrr-backup2 kvmrr-gateway
# the container tests: no Ryuk (its image cannot be pulled), local images only
export TESTCONTAINERS_RYUK_DISABLED := true

.PHONY: all build guests run test test-c test-py fuzz bench bench-core bench-log bench-ft bench-cluster \
        kafka kafka-cluster kafka-down images compose-up compose-down compose-demo clean distclean

all: build

# ---- set-up --------------------------------------------------------------------------
$(VENV)/.deps: pyproject.toml
	test -x $(PY) || $(PYTHON) -m venv $(VENV)
	$(PY) -m pip install -q --upgrade pip setuptools wheel cffi
	$(PY) -m pip install -q -e '.[test,bench]' --no-build-isolation
	touch $@

# The binding is rebuilt whenever the C core changes (setup.py's cffi_modules, in place).
$(VENV)/.core: $(VENV)/.deps $(CORE_SRC) libkvmrr/build_ffi.py setup.py
	$(PY) -m pip install -q -e . --no-deps --no-build-isolation
	touch $@

guests:
	$(MAKE) -s -C guests OUT=$(CURDIR)/$(BUILD)/guests

$(BUILD)/test_core: $(CORE_SRC) libkvmrr/tests/test_core.c
	mkdir -p $(BUILD)
	$(CC) $(CORE_CFLAGS) -o $@ libkvmrr/src/*.c libkvmrr/tests/test_core.c -lpthread

build: $(VENV)/.core guests $(BUILD)/test_core

# ---- the main job --------------------------------------------------------------------
run: build
	$(VENV)/bin/kvmrr demo

# ---- tests ---------------------------------------------------------------------------
test-c: $(BUILD)/test_core guests
	$(BUILD)/test_core

test-py: build
	$(PY) -m pytest -q -ra

# The container tests (tests/test_compose.py) run when a Docker engine can be started (the
# images are built first); otherwise they are skipped and say why.  An engine started here
# is stopped at the end.
test: build
	$(BUILD)/test_core
	$(MAKE) -s -C guests test OUT=$(CURDIR)/$(BUILD)/guests
	@if $(ENGINE) start; then $(MAKE) -s images || exit 1; \
	 else echo "make test: no Docker engine could be started; the container tests will be skipped"; fi
	$(PY) -m pytest -q -ra; rc=$$?; $(ENGINE) stop; exit $$rc

# Differential fuzzer of the core (issue 11): SEEDS random guests recorded with fast,
# replayed with fast and step, compared.
SEEDS ?= 20
fuzz: build
	$(PY) guests/fuzz/fuzz.py --seeds $(SEEDS)

# ---- benchmarks ----------------------------------------------------------------------
bench-core: build
	$(PY) -m kvmrr.bench core --out bench/core.json $(if $(QUICK),--quick)

# starts its own single node and 3-node cluster (kafkactl, free loopback ports), stops them
bench-log: build
	$(PY) -m kvmrr.bench log --out bench/log.json $(if $(QUICK),--quick)

# kvstore served through the gateway on its own single-node Kafka against a plain run,
# and failover time over 10 trials
bench-ft: build
	$(PY) -m kvmrr.bench ft --out bench/ft.json $(if $(QUICK),--quick)

# the overhead sweep (bench/sweep.json) -> bench/results.json, bench/report.md and plots
bench: build
	$(PY) -m kvmrr.sweep $(if $(QUICK),--quick)

# ---- the docker-compose cluster (compose/; settings in compose/.env) -----------------
# images: kvmrr/base (debootstrap + docker import), kvmrr/kafka, kvmrr/node; cached
images: build
	compose/images/build

compose-up: images
	$(COMPOSE) up -d
	$(PY) -m kvmrr.containers wait-healthy $(CLUSTER)

# the kill-the-primary demo against a fresh compose-up
compose-demo: build
	$(VENV)/bin/kvmrr demo --compose compose/.env --workdir $(BUILD)/compose-demo

compose-down:
	if $(ENGINE) check; then $(COMPOSE) down -v --remove-orphans; fi
	$(ENGINE) stop

# failover time and output commit latency in the compose cluster, over trials -> bench/cluster.json
bench-cluster: compose-up
	$(PY) -m kvmrr.bench cluster --out bench/cluster.json $(if $(QUICK),--quick); \
	rc=$$?; $(MAKE) -s compose-down; exit $$rc

# ---- Kafka (real Apache Kafka from Maven Central, KRaft, loopback) --------------------
kafka:
	KAFKA_PORT=$(KAFKA_PORT) $(PYTHON) $(KAFKACTL) start --nodes 1 --port $(KAFKA_PORT)

kafka-cluster:
	$(PYTHON) $(KAFKACTL) start --nodes 3 --port $(KAFKA_PORT)

kafka-down:
	$(PYTHON) $(KAFKACTL) stop --all

clean:
	rm -rf $(BUILD) libkvmrr/_kvmrr*.so libkvmrr/_kvmrr.c libkvmrr/_kvmrr.o

distclean: clean
	rm -rf $(VENV)
