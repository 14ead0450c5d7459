# Two entry points for a fresh machine: `make up` (the service, locally) and `make test`.
# Both create or reuse the virtual environment below and install what they need.
PYTHON ?= python3
VENV   ?= .venv
PY     := $(VENV)/bin/python
STAMP  := $(VENV)/.installed

.PHONY: test up bench clean redis-server

$(STAMP): pyproject.toml
	test -x $(PY) || $(PYTHON) -m venv $(VENV)
	$(PY) -m pip install --quiet --upgrade pip
	$(PY) -m pip install --quiet -e '.[test]'
	touch $(STAMP)

# The tests start their own redis-server; install it where the machine lacks one.
redis-server:
	@command -v redis-server >/dev/null || { apt-get update -qq && apt-get install -y -qq redis-server; }

test: $(STAMP) redis-server
	$(VENV)/bin/ruff check .
	$(PY) -m pytest

# The whole service on this machine with the bundled demo model (Ctrl-C stops it).
up: $(STAMP) redis-server
	$(VENV)/bin/smoothcert up

bench: $(STAMP)
	$(PY) benchmarks/sampler.py

clean:
	rm -rf $(VENV) .pytest_cache .hypothesis build *.egg-info
