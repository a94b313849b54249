# Two commands on a fresh machine: `make run` (install + start on :9081), `make test`.
PYTHON ?= python3
VENV   := .venv
PY     := $(VENV)/bin/python

.PHONY: run test lint format demo bench soak system-deps clean

$(VENV)/.runtime: requirements.txt
	$(PYTHON) -m venv $(VENV)
	$(PY) -m pip install -q --upgrade pip
	$(PY) -m pip install -q -r requirements.txt
	touch $@

$(VENV)/.dev: requirements.txt requirements-dev.txt requirements-bench.txt $(VENV)/.runtime
	$(PY) -m pip install -q -r requirements-bench.txt
	touch $@

run: $(VENV)/.runtime ## install and start the proxy on port 9081
	$(PY) server.py

demo: $(VENV)/.runtime ## the proxy with the built-in fake OpenAI: no key, no internet needed
	DEMO_UPSTREAM=true $(PY) server.py

# The JavaScript snippet of docs/api.md is run by the tests with the official openai package.
tests/js/node_modules/.installed: tests/js/package.json tests/js/package-lock.json
	cd tests/js && npm ci --silent --no-audit --no-fund
	touch $@

system-deps: ## the Debian packages the tests use (nginx, wrk, shellcheck, chromium, node)
	@bash .ci/system-deps

test: system-deps $(VENV)/.dev tests/js/node_modules/.installed ## install and run the whole test suite and lint
	$(VENV)/bin/ruff check .
	$(VENV)/bin/ruff format --check .
	$(PY) -m pytest

lint: $(VENV)/.dev
	$(VENV)/bin/ruff check .
	$(VENV)/bin/ruff format --check .

format: $(VENV)/.dev
	$(VENV)/bin/ruff check --fix .
	$(VENV)/bin/ruff format .

bench: system-deps $(VENV)/.dev ## the benchmark suite: direct vs nginx vs this proxy
	$(PY) bench/run.py

soak: $(VENV)/.dev ## ten minutes of mixed traffic; checks RSS and descriptors
	$(PY) bench/soak.py --seconds 600

clean:
	rm -rf $(VENV) .pytest_cache .ruff_cache .hypothesis
