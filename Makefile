# kvmrr - every entry point.  `make run` and `make test` do all set-up themselves
# (the Debian programs, venv, pip packages, the C core and its binding, the guests, the
# Kafka jars) and cache it.

PYTHON      ?= python3
VENV        := .venv
PY          := $(VENV)/bin/python
BUILD       := build
KAFKACTL    := compose/kafka/kafkactl
# the Kafka version: written once, in compose/kafka/pom.xml (<kafka.version>); the image tag
# kvmrr/kafka:$(KAFKA_VERSION) in compose/docker-compose.yml
export KAFKA_VERSION := $(shell $(PYTHON) $(KAFKACTL) version)
KAFKA_PORT  ?= 19092
CORE_SRC    := $(wildcard libkvmrr/src/*.c libkvmrr/src/*.h libkvmrr/include/*.h)
CORE_CFLAGS := -O2 -g -Wall -Wextra -Werror -Wno-unused-parameter -std=gnu11 -Ilibkvmrr/include -Ilibkvmrr/src

DOCTOR      := setup/doctor
ENGINE      := compose/images/engine
COMPOSE     := docker-compose -f compose/docker-compose.yml
CLUSTER     := kvmrr-kafka1 kvmrr-kafka2 kvmrr-kafka3 kvmrr-primary kvmrr-backup1 kvmrr-backup2 kvmrr-gateway
# the container tests: no Ryuk (its image cannot be pulled), local images only
export TESTCONTAINERS_RYUK_DISABLED := true

.PHONY: all doctor build guests linux-guest linux-slow run run-linux test test-c test-py fault-rounds fuzz bench bench-core bench-log bench-ft bench-cluster bench-gdb bench-security bench-linux \
        kafka kafka-cluster kafka-down secrets images compose-up compose-down compose-demo clean distclean

all: build

# ---- set-up --------------------------------------------------------------------------
# Every program the project calls is in setup/programs.tsv; the doctor installs what is
# missing (apt-get) or stops with the reason.  `make doctor` shows every program; the other
# targets check a group once and keep a stamp, redone when the list or the doctor changes.
doctor:
	$(DOCTOR)

$(BUILD)/.doctor-%: setup/programs.tsv $(DOCTOR)
	$(DOCTOR) -q $*
	mkdir -p $(BUILD) && touch $@

# order-only: a new list re-runs the doctor, not the builds that follow it
$(VENV)/.deps: pyproject.toml | $(BUILD)/.doctor-core
	test -x $(PY) || $(PYTHON) -m venv $(VENV)
	$(PY) -m pip install -q --upgrade pip setuptools wheel cffi
	$(PY) -m pip install -q -e '.[test,bench]' --no-build-isolation
	touch $@

# The binding is rebuilt whenever the C core changes (setup.py's cffi_modules, in place).
$(VENV)/.core: $(VENV)/.deps $(CORE_SRC) libkvmrr/build_ffi.py setup.py
	$(PY) -m pip install -q -e . --no-deps --no-build-isolation
	touch $@

guests: | $(BUILD)/.doctor-core
	$(MAKE) -s -C guests OUT=$(CURDIR)/$(BUILD)/guests

$(BUILD)/test_core: $(CORE_SRC) libkvmrr/tests/test_core.c | $(BUILD)/.doctor-core
	mkdir -p $(BUILD)
	$(CC) $(CORE_CFLAGS) -o $@ libkvmrr/src/*.c libkvmrr/tests/test_core.c -lpthread

$(BUILD)/test_pc_devices: $(CORE_SRC) libkvmrr/tests/test_pc_devices.c | $(BUILD)/.doctor-core
	mkdir -p $(BUILD)
	$(CC) $(CORE_CFLAGS) -o $@ libkvmrr/src/*.c libkvmrr/tests/test_pc_devices.c -lpthread

build: $(VENV)/.core guests $(BUILD)/test_core $(BUILD)/test_pc_devices

# The Linux guest (docs/guests.md, "Linux"): Debian's linux-source-6.1 configured from
# guests/linux/config and built once into ~/.cache/kvmrr (minutes on two cores; then
# instant); build/guests/linux.vmlinux points at it, for `kvmrr record linux`.
linux-guest: $(BUILD)/.doctor-linux
	mkdir -p $(BUILD)/guests
	guests/linux/build > $(BUILD)/guests/linux.path
	ln -sfn "$$(cat $(BUILD)/guests/linux.path)" $(BUILD)/guests/linux.vmlinux

# ---- the main job --------------------------------------------------------------------
run: build
	$(VENV)/bin/kvmrr demo

# the Linux guest's boot on the embedded Kafka, its step primary killed mid-boot: a backup
# takes over (kvmrr/linux_demo.py; a 2.5 M-instruction budget, about a minute here)
run-linux: build linux-guest
	$(VENV)/bin/kvmrr demo --guest linux

# ---- tests ---------------------------------------------------------------------------
test-c: $(BUILD)/test_core $(BUILD)/test_pc_devices guests
	$(BUILD)/test_core
	$(BUILD)/test_pc_devices

test-py: build
	$(PY) -m pytest -q -ra

# the 20 seeded rounds of random faults (SIGKILL, SIGSTOP/SIGCONT, network cut, broker
# kill), left out of `make test` for their time (4-5 min here when quiet, more under load);
# make test runs 3
fault-rounds: build
	$(PY) -m pytest -q -ra -s -m fault_rounds tests/test_fault_rounds.py

# the Linux guest's whole boot and KUnit recorded with step and replayed with fast (about
# 10 min recording here), and a takeover past the early boot (about 3 min), left out of
# `make test` for their time
linux-slow: build linux-guest
	$(PY) -m pytest -q -ra -s -m linux_slow tests/test_linux_guest.py tests/test_linux_takeover.py

# The container tests (tests/test_compose.py) run when a Docker engine can be started (the
# images are built first); otherwise they are skipped and say why.  An engine started here
# is stopped at the end.  The Docker tier's programs are installed first, so on a machine
# where dockerd can run the container tests do run.
test: build linux-guest $(BUILD)/.doctor-containers
	$(BUILD)/test_core
	$(BUILD)/test_pc_devices
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
	$(PY) -m bench core --out bench/core.json $(if $(QUICK),--quick)

# time-travel debugging: reverse-stepi / reverse-continue latency on a 10 M instruction
# kvstore log per automatic snapshot interval (docs/debugging.md)
bench-gdb: build
	$(PY) -m bench gdb --out bench/gdb.json $(if $(QUICK),--quick)

# the Linux guest (issue 13): plain run, step record, fast replay to the end of KUnit, a
# step replay of a prefix, a takeover mid-boot on an embedded Kafka -> bench/linux.json and
# bench/linux_events.png (the full run records about 40 M instructions under step: 10-15 min)
bench-linux: build linux-guest
	$(PY) -m bench linux --out bench/linux.json $(if $(QUICK),--quick)

# starts its own single node and 3-node cluster (kafkactl, free loopback ports), stops them
bench-log: build
	$(PY) -m bench log --out bench/log.json $(if $(QUICK),--quick)

# TLS + SASL/SCRAM + ACLs + record MACs against a plain broker, side by side in one run
# (two single nodes, alternating runs): replicated write, record commit, served commit
bench-security: build
	$(PY) -m bench security --out bench/security.json $(if $(QUICK),--quick)

# kvstore served through the gateway on its own single-node Kafka against a plain run,
# and failover time over 10 trials
bench-ft: build
	$(PY) -m bench ft --out bench/ft.json $(if $(QUICK),--quick)

# the overhead sweep (bench/sweep.json) -> bench/results.json, bench/report.md and plots
bench: build
	$(PY) -m bench.sweep $(if $(QUICK),--quick)

# ---- the docker-compose cluster (compose/; settings in compose/.env) -----------------
# images: kvmrr/base (debootstrap + docker import), kvmrr/kafka, kvmrr/node; cached
images: build $(BUILD)/.doctor-containers
	compose/images/build

compose-up: images secrets
	$(COMPOSE) up -d
	$(PY) -m harness.containers wait-healthy $(CLUSTER)

# the kill-the-primary demo against a fresh compose-up
compose-demo: build
	$(VENV)/bin/kvmrr demo --compose compose/.env --workdir $(BUILD)/compose-demo

compose-down:
	if $(ENGINE) check; then $(COMPOSE) down -v --remove-orphans; fi
	$(ENGINE) stop

# failover time and output commit latency in the compose cluster, over trials -> bench/cluster.json
bench-cluster: compose-up
	$(PY) -m bench cluster --out bench/cluster.json $(if $(QUICK),--quick); \
	rc=$$?; $(MAKE) -s compose-down; exit $$rc

# ---- Kafka (real Apache Kafka from Maven Central, KRaft, loopback) --------------------
# The secrets of a secure Kafka (docs/operating.md §6): a local CA, the brokers' certificate,
# SCRAM users (admin, broker, vm-<vm> and gateway-<vm> per VM) and each VM's record key, in
# $(SECRETS) (git ignores build/), mode 0600; made when missing, never remade.
SECRETS     ?= $(BUILD)/secrets
VMS         ?= vm1
secrets: | $(BUILD)/.doctor-core
	$(PYTHON) $(KAFKACTL) secrets --dir $(SECRETS) $(foreach v,$(VMS),--vm $(v))

# the single node is PLAINTEXT unless SECURE=1: it is the README's walk-through and a
# loopback-only scratch broker (docs/operating.md §6.5); the cluster is secure by default
# (SECURE=0 for a plain one).  Secure: provision each VM as the admin, then run every
# kvmrr process with its principal's file, e.g.
#   KVMRR_KAFKA_CONFIG=build/secrets/admin.conf kvmrr provision --log kafka://127.0.0.1:19092/vm1
#   KVMRR_KAFKA_CONFIG=build/secrets/vm-vm1.conf kvmrr record ... --log kafka://127.0.0.1:19092/vm1
kafka: | $(BUILD)/.doctor-core $(if $(filter 1,$(SECURE)),secrets)
	KAFKA_PORT=$(KAFKA_PORT) $(PYTHON) $(KAFKACTL) start --nodes 1 --port $(KAFKA_PORT) \
	  $(if $(filter 1,$(SECURE)),--secrets $(SECRETS))

kafka-cluster: | $(BUILD)/.doctor-core $(if $(filter 0,$(SECURE)),,secrets)
	$(PYTHON) $(KAFKACTL) start --nodes 3 --port $(KAFKA_PORT) \
	  $(if $(filter 0,$(SECURE)),,--secrets $(SECRETS))

kafka-down:
	$(PYTHON) $(KAFKACTL) stop --all

clean:
	rm -rf $(BUILD) libkvmrr/_kvmrr*.so libkvmrr/_kvmrr.c libkvmrr/_kvmrr.o

distclean: clean
	rm -rf $(VENV)
