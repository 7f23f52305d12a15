# Karri: `make up` runs the cloud on this machine, `make test` is what CI runs.
SHELL := /bin/bash
.SHELLFLAGS := -euo pipefail -c
# Steps depend on each other (setup installs what build needs); cargo parallelises itself.
.NOTPARALLEL:

CARGO ?= cargo
STATE_DIR ?= $(CURDIR)/.state
export STATE_DIR
# awscli/boto3 from the project venv come first for tests and scripts.
export PATH := $(CURDIR)/.venv/bin:$(PATH)

.PHONY: help setup build up down test bench crds fuzz

help:
	@echo "make setup  install Debian packages, .venv (awscli, boto3, moto[server]), cargo-nextest"
	@echo "make build  cargo build --workspace --bins (debug)"
	@echo "make up     setup + build, then etcd, api-gateway, operator, a node agent on a simulated host, the micro image (state in $(STATE_DIR))"
	@echo "make down   stop what 'make up' started (state is kept)"
	@echo "make test   setup, build, libvirtd, nextest (real etcd/gateway/QEMU), fmt check, clippy"
	@echo "make bench  registry, EC2 (against moto), cloud, guest-launch and S3 (against moto and the raw disk) benchmarks (release)"
	@echo "make crds   print the CRD manifests (crdgen)"
	@echo "make fuzz   fuzz FUZZ_TARGET (ec2_query, default, or s3_request) for FUZZ_SECONDS (default 600; nightly, cargo-fuzz)"

setup:
	bash scripts/setup.sh

build:
	$(CARGO) build --workspace --bins

up: setup build
	bash scripts/up.sh

down:
	bash scripts/down.sh

# libvirtd must answer on qemu:///system for the QEMU e2e test (e2e/tests/qemu.rs). nextest, fmt
# and clippy all run even when an earlier one fails, so that one CI run reports every failure.
test: setup
	$(CARGO) build --workspace --bins
	bash scripts/libvirtd.sh
	failed=""; \
	KARRI_BIN_DIR="$(CURDIR)/target/debug" $(CARGO) nextest run --workspace --no-fail-fast || failed="$$failed nextest"; \
	$(CARGO) fmt --all -- --check || failed="$$failed fmt"; \
	$(CARGO) clippy --workspace --all-targets -- -D warnings || failed="$$failed clippy"; \
	if [ -n "$$failed" ]; then echo "make test: failed:$$failed" >&2; exit 1; fi; \
	echo "make test: nextest, fmt and clippy passed"

# The benchmarks drive release-built services, so they measure Karri, not debug code.
bench: setup
	$(CARGO) build --release -p api-gateway --bin api-gateway
	KARRI_BIN_DIR="$(CURDIR)/target/release" $(CARGO) run --release -p karri-e2e --bin bench-registry
	KARRI_BIN_DIR="$(CURDIR)/target/release" $(CARGO) run --release -p karri-e2e --bin bench-ec2
	$(CARGO) build --release -p api-gateway -p operator --bin api-gateway --bin operator
	# The node agent is built on its own, as it is shipped to each host: built in one invocation
	# with the gateway it would carry the gateway's features of shared crates (about 0.8 MB more
	# code, all of it resident). Its dependencies are optimised for size too (text 10.0 -> 8.4 MB,
	# about 0.5 MB less resident), which a profile cannot say for one binary alone.
	$(CARGO) build --release -p node-agent --bin node-agent --config 'profile.release.package."*".opt-level="s"'
	KARRI_BIN_DIR="$(CURDIR)/target/release" $(CARGO) run --release -p karri-e2e --bin bench-cloud
	KARRI_BIN_DIR="$(CURDIR)/target/release" $(CARGO) run --release -p karri-e2e --bin bench-guests
	KARRI_BIN_DIR="$(CURDIR)/target/release" $(CARGO) run --release -p karri-e2e --bin bench-s3

crds:
	$(CARGO) run -p karri-crds --bin crdgen

# Fuzzes FUZZ_TARGET: ec2_query (the EC2 Query parser, router, error XML and SigV4 parsing) or
# s3_request (face routing, s3s's S3 router and XML bodies) (api-gateway/fuzz, a crate
# outside the workspace). Needs nightly; installs cargo-fuzz if missing. Not part of `make test`.
# The seeds are copied into the (git-ignored) corpus, which keeps growing across runs; a crash
# is written to api-gateway/fuzz/artifacts/ec2_query/ and fails the target.
FUZZ_SECONDS ?= 600
FUZZ_TARGET ?= ec2_query
FUZZ_DIR := $(CURDIR)/api-gateway/fuzz
fuzz:
	@rustup toolchain list | grep '^nightly' >/dev/null || rustup toolchain install nightly --profile minimal
	@if $(CARGO) fuzz --version >/dev/null 2>&1; then echo "fuzz: cargo-fuzz present"; \
	else echo "fuzz: installing cargo-fuzz"; $(CARGO) install cargo-fuzz --locked; fi
	mkdir -p "$(FUZZ_DIR)/corpus/$(FUZZ_TARGET)" "$(FUZZ_DIR)/artifacts"
	cp -f "$(FUZZ_DIR)/seeds/$(FUZZ_TARGET)"/* "$(FUZZ_DIR)/corpus/$(FUZZ_TARGET)/"
	cd "$(FUZZ_DIR)" && status=0; \
	{ $(CARGO) +nightly fuzz run $(FUZZ_TARGET) -- -max_total_time=$(FUZZ_SECONDS) -timeout=10 \
	    -print_final_stats=1 2>&1 | tee "$(FUZZ_DIR)/artifacts/$(FUZZ_TARGET).log"; } || status=$$?; \
	echo "fuzz: $(FUZZ_TARGET) final stats (exit status $$status):"; \
	grep -E '^(Done [0-9]+ runs|stat::(number_of_executed_units|average_exec_per_sec|new_units_added|peak_rss_mb))' \
	    "$(FUZZ_DIR)/artifacts/$(FUZZ_TARGET).log" || echo "fuzz: no final stats (the build or the run failed)"; \
	exit $$status
