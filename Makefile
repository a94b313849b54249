# Two commands on a fresh machine: `make run` (install + start on :9081), `make test`.
PYTHON ?= python3
VENV   := .venv
PY     := $(VENV)/bin/python

.PHONY: run test lint format demo reload bench soak system-deps clean

# Where `make run` and `make demo` have the server write its process id, which `make reload` signals.
PID_FILE ?= chat_gpt_proxy.pid

$(VENV)/.runtime: requirements.txt
	$(PYTHON) -m venv $(VENV)
	$(PY) -m pip install -q --upgrade pip
	$(PY) -m pip install -q -r requirements.txt
	touch $@

$(VENV)/.dev: requirements.txt requirements-dev.txt requirements-bench.txt $(VENV)/.runtime
	$(PY) -m pip install -q -r requirements-bench.txt
	touch $@

run: $(VENV)/.runtime ## install and start the proxy on port 9081
	PID_FILE=$(PID_FILE) $(PY) server.py

demo: $(VENV)/.runtime ## the proxy with the built-in fake OpenAI: no key, no internet needed
	DEMO_UPSTREAM=true PID_FILE=$(PID_FILE) $(PY) server.py

# Only a process that is this proxy gets the signal: a stale file may name a PID reused since.
reload: ## reread ACCESS_TOKENS_FILE and UPSTREAMS_FILE in the proxy `make run` started (SIGHUP)
	@pid=$$(cat "$(PID_FILE)" 2>/dev/null) && grep -qa server.py "/proc/$$pid/cmdline" 2>/dev/null || { \
	  echo "make reload: no proxy running with its PID in $(PID_FILE); start it with make run" >&2; exit 1; }; \
	kill -HUP "$$pid" && echo "make reload: sent SIGHUP to the proxy (pid $$pid); its log says what it reloaded"

# The tests run the JavaScript snippet of docs/api.md with the official openai package, and the
# official Anthropic clients (@anthropic-ai/sdk, Claude Code: its platform package holds the binary).
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
