# kache: one entry point for building and testing.
#   make run    - start a local kache-node on 127.0.0.1:11211 (no cluster needed)
#   make test   - install missing test dependencies, then fmt check, clippy, and every test

CARGO ?= cargo
PYTHON ?= /usr/bin/python3

.PHONY: test deps fmt-check clippy cargo-test python-test chart-check run build bench

test: deps fmt-check clippy cargo-test chart-check python-test

deps:
	./scripts/install-test-deps.sh

fmt-check:
	$(CARGO) fmt --all -- --check

clippy:
	$(CARGO) clippy --workspace --all-targets -- -D warnings

build:
	$(CARGO) build --release -p kache-node

cargo-test:
	$(CARGO) test --workspace

chart-check:
	bash scripts/check-chart.sh

python-test: build
	KACHE_NODE_BIN=$(CURDIR)/target/release/kache-node $(PYTHON) -m pytest -q -p no:cacheprovider tests/cluster
	KACHE_NODE_BIN=$(CURDIR)/target/release/kache-node $(PYTHON) -m pytest -q -p no:cacheprovider tests/python
	KACHE_NODE_BIN=$(CURDIR)/target/release/kache-node $(PYTHON) -m pytest -q -p no:cacheprovider tests/netfault

run:
	$(CARGO) run --release -p kache-node -- -l 127.0.0.1 -p 11211

bench: build
	$(PYTHON) bench/compare.py
	$(PYTHON) bench/proxy_compare.py
	$(PYTHON) bench/partition_compare.py
