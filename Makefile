# kache: one entry point for building and testing.
#   make run    - start a local kache-node on 127.0.0.1:11211 (no cluster needed)
#   make test   - install missing test dependencies, then fmt check, clippy, and every test
#   make images - the kache-node and kache-operator images (target/images/*.tar), no docker needed
#   make k8s-test - the real-cluster suite (tests/k8s/run.sh; skips, saying why, without a cluster)

CARGO ?= cargo
PYTHON ?= /usr/bin/python3

.PHONY: test deps fmt-check clippy cargo-test python-test chart-check run build bench release images k8s-test

test: deps fmt-check clippy cargo-test chart-check python-test k8s-test

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

release:
	$(CARGO) build --locked --release -p kache-node --bin kache-node -p kache-operator --bin kache-operator

images: release
	bash scripts/build-images.sh --no-build

k8s-test: release
	PYTHON=$(PYTHON) bash tests/k8s/run.sh

run:
	$(CARGO) run --release -p kache-node -- -l 127.0.0.1 -p 11211

bench: build
	$(PYTHON) bench/compare.py
	$(PYTHON) bench/proxy_compare.py
	$(PYTHON) bench/partition_compare.py
