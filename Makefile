# p2pim: `make demo` shows it working, `make test` runs every test.
PYTHON ?= python3
VENV   := .venv
BIN    := $(VENV)/bin
export PATH := $(CURDIR)/$(BIN):$(PATH)

.PHONY: install system-deps test test-fast demo nat-demo lab-demo lint proto proto-check bench clean

install: $(VENV)/.installed

$(VENV)/.installed: pyproject.toml
	$(PYTHON) -m venv $(VENV)
	$(BIN)/pip install --quiet --upgrade pip
	$(BIN)/pip install --quiet -e ".[test]"
	touch $@

# Debian packages natlab and the interop tests use (as root; skipped otherwise).
system-deps:
	@if [ "$$(id -u)" = 0 ]; then \
	  missing=""; \
	  for p in iproute2 nftables conntrack stun-server iptux xvfb xdotool miniupnpd-nftables chromium chromium-driver postgresql nats-server; do dpkg -s $$p >/dev/null 2>&1 || missing="$$missing $$p"; done; \
	  if [ -n "$$missing" ]; then apt-get update -qq && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq --no-install-recommends $$missing; fi; \
	else echo "not root: skipping apt-get (lab tests will skip)"; fi

test: install system-deps
	$(BIN)/pytest -q

test-fast: install
	$(BIN)/pytest -q tests/unit tests/integration

demo: install
	scripts/demo.sh

nat-demo: install
	scripts/nat_demo.sh

lab-demo: install system-deps
	$(BIN)/natlab classify
	$(BIN)/natlab classify --hairpin --profiles full-cone,restricted,port-restricted,symmetric

lint: install
	$(BIN)/ruff check .
	$(BIN)/ruff format --check .
	$(BIN)/mypy

proto: install
	$(BIN)/python -m grpc_tools.protoc -I. --python_out=. \
	  --plugin=protoc-gen-mypy=$(BIN)/protoc-gen-mypy --mypy_out=. p2pim/wire/*.proto

bench: install system-deps
	$(BIN)/python bench/nat_bench.py
	$(BIN)/python bench/relay_bench.py
	$(BIN)/python bench/relay_bench.py --setup all
	$(BIN)/python bench/paths_bench.py
	$(BIN)/python bench/lan_bench.py
	$(BIN)/python bench/abuse_bench.py
	$(BIN)/python bench/traversal_bench.py
	$(BIN)/python bench/files_bench.py

clean:
	rm -rf $(VENV) .pytest_cache .mypy_cache .ruff_cache
