# `make run`  : create .venv if missing, install, run the embedded federation + final evaluation
# `make test` : install what the suite needs (Prometheus included), create .venv, run the suite
PYTHON ?= python3
VENV   := .venv
BIN    := $(VENV)/bin
STAMP  := $(VENV)/.installed
EXTRAS ?= dev,interop

.PHONY: run test bench lint clean system-test

$(STAMP): pyproject.toml constraints.txt
	@$(PYTHON) -c 'import sys; sys.exit(sys.version_info < (3, 11))' || \
		{ echo "error: spikefed needs Python >= 3.11 as $(PYTHON) (make PYTHON=python3.11 ...)" >&2; exit 1; }
	@$(PYTHON) -c 'import venv, ensurepip' 2>/dev/null || \
		{ echo "error: $(PYTHON) lacks venv/ensurepip: install Debian's python3-venv" >&2; exit 1; }
	test -x $(BIN)/python || $(PYTHON) -m venv $(VENV)
	$(BIN)/python -m pip install --quiet --upgrade pip
	$(BIN)/python -m pip install --quiet -c constraints.txt -e '.[$(EXTRAS)]'
	touch $@

run: $(STAMP)
	$(BIN)/spikefed-run $(ARGS)

# Debian packages the tests run for real, each started by the tests themselves on loopback (the
# packages' own services are never used): prometheus + promtool (the monitoring tests) and nginx
# (spikefed-server's reverse proxy, which keeps Flower's admin APIs off the devices' address;
# nginx-light is Debian's smallest nginx build with SSL and proxying)
system-test:
	@missing=""; \
	command -v prometheus >/dev/null && command -v promtool >/dev/null || missing=" prometheus"; \
	command -v nginx >/dev/null || [ -x /usr/sbin/nginx ] || missing="$$missing nginx-light"; \
	[ -z "$$missing" ] || { \
		command -v apt-get >/dev/null || { echo "error: the tests need$$missing (prometheus, promtool and nginx on PATH); install them (no apt-get here)" >&2; exit 1; }; \
		sudo=""; [ "$$(id -u)" -eq 0 ] || { command -v sudo >/dev/null && sudo="sudo -n"; } || \
			{ echo "error: the tests need Debian's$$missing: run 'sudo apt-get install$$missing' (not root, no sudo)" >&2; exit 1; }; \
		echo "installing Debian's$$missing (for the monitoring and deployment tests)"; \
		$$sudo apt-get update -qq && \
		$$sudo env DEBIAN_FRONTEND=noninteractive apt-get install -y -qq --no-install-recommends $$missing >/dev/null || \
			{ echo "error: could not install Debian's$$missing; install it (apt-get install$$missing) and rerun" >&2; exit 1; }; }

test: system-test $(STAMP)
	FLWR_TELEMETRY_ENABLED=0 FLWR_DISABLE_UPDATE_CHECK=1 $(BIN)/python -m pytest $(ARGS)

bench: $(STAMP)
	$(BIN)/python -m pip install --quiet -c constraints.txt -e '.[dev,bench]'
	$(BIN)/python bench/train_throughput.py $(ARGS)

lint: $(STAMP)
	$(BIN)/ruff check .

clean:
	rm -rf $(VENV) runs .pytest_cache
