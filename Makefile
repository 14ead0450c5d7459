# Two entry points for a fresh machine: `make up` (the service, locally) and `make test`.
# Both create or reuse the virtual environment below and install what they need.
SHELL  := /bin/bash
PYTHON ?= python3
VENV   ?= .venv
PY     := $(VENV)/bin/python
STAMP  := $(VENV)/.installed

.PHONY: test up bench reliability clean redis-server chromium

$(STAMP): pyproject.toml
	test -x $(PY) || $(PYTHON) -m venv $(VENV)
	$(PY) -m pip install --quiet --upgrade pip
	$(PY) -m pip install --quiet -e '.[test]' --config-settings editable_mode=compat
	touch $(STAMP)

# The tests start their own redis-server; install it where the machine lacks one.
redis-server:
	@command -v redis-server >/dev/null || { apt-get update -qq && apt-get install -y -qq redis-server; }

# The console's browser test (tests/test_console.py) drives Debian's chromium through its driver.
chromium:
	@{ command -v chromium && command -v chromedriver; } >/dev/null || { apt-get update -qq && apt-get install -y -qq chromium chromium-driver; }

test: $(STAMP) redis-server chromium
	$(VENV)/bin/ruff check .
	$(PY) -m pytest

# The whole service on this machine with the bundled demo model (Ctrl-C stops it).
up: $(STAMP) redis-server
	$(VENV)/bin/smoothcert up

# Every benchmark (BENCHMARKS.md): each prints its ratios and PASS/FAIL lines and writes
# its numbers to $(BENCH_OUT)/<name>.json; the summary repeats the verdicts. Not part of test.
BENCH_OUT ?= benchmarks/results
BENCHMARKS ?= sampler batching adaptive adaptive_limits memory api remote
bench: $(STAMP) redis-server
	mkdir -p $(BENCH_OUT)
	@for b in $(BENCHMARKS); do \
	  echo "== benchmarks/$$b.py"; \
	  $(PY) benchmarks/$$b.py --json $(BENCH_OUT)/$$b.json 2>&1 | tee $(BENCH_OUT)/$$b.txt; \
	done
	@echo "== summary"; grep -H "^PASS\|^FAIL\|^INFO" $(BENCH_OUT)/*.txt || true

# Every reliability scenario at full size (RELIABILITY.md): faults, soak and soundness under
# load against the real stack; each prints PASS/FAIL lines and writes $(RELIABILITY_OUT)/<name>.json.
# Not part of test (tests/reliability runs each at a small size). Fails if any check failed.
RELIABILITY_OUT ?= reliability/results
SCENARIOS ?= worker_crash redis_restart api_restart timeouts cancellation soak soundness
reliability: $(STAMP) redis-server
	mkdir -p $(RELIABILITY_OUT)
	@status=0; for s in $(SCENARIOS); do \
	  echo "== reliability/$$s.py"; \
	  $(PY) reliability/$$s.py --json $(RELIABILITY_OUT)/$$s.json 2>&1 | tee $(RELIABILITY_OUT)/$$s.txt; \
	  test $${PIPESTATUS[0]} -eq 0 || status=1; \
	done; \
	echo "== summary"; grep -H "^PASS\|^FAIL" $(RELIABILITY_OUT)/*.txt || true; exit $$status

clean:
	rm -rf $(VENV) .pytest_cache .hypothesis build *.egg-info
