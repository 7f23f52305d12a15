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

.PHONY: help setup build up down test bench crds

help:
	@echo "make setup  install Debian packages, .venv (awscli, boto3), cargo-nextest"
	@echo "make build  cargo build --workspace --bins (debug)"
	@echo "make up     setup + build, then start etcd + api-gateway (state in $(STATE_DIR))"
	@echo "make down   stop what 'make up' started (state is kept)"
	@echo "make test   setup, build, libvirtd, nextest (real etcd/gateway/QEMU), fmt check, clippy"
	@echo "make bench  registry and cloud benchmarks (release)"
	@echo "make crds   print the CRD manifests (crdgen)"

setup:
	bash scripts/setup.sh

build:
	$(CARGO) build --workspace --bins

up: setup build
	bash scripts/up.sh

down:
	bash scripts/down.sh

# libvirtd must answer on qemu:///system for the QEMU e2e test (e2e/tests/qemu.rs).
test: setup
	$(CARGO) build --workspace --bins
	bash scripts/libvirtd.sh
	KARRI_BIN_DIR=$(CURDIR)/target/debug $(CARGO) nextest run --workspace --no-fail-fast
	$(CARGO) fmt --all -- --check
	$(CARGO) clippy --workspace --all-targets -- -D warnings

# The benchmarks drive release-built services, so they measure Karri, not debug code.
bench: setup
	$(CARGO) build --release -p api-gateway --bin api-gateway
	KARRI_BIN_DIR=$(CURDIR)/target/release $(CARGO) run --release -p karri-e2e --bin bench-registry
	$(CARGO) build --release -p api-gateway -p operator -p node-agent --bin api-gateway --bin operator --bin node-agent
	KARRI_BIN_DIR=$(CURDIR)/target/release $(CARGO) run --release -p karri-e2e --bin bench-cloud

crds:
	$(CARGO) run -p karri-crds --bin crdgen
