# Every target creates .venv and installs the project into it when missing,
# so each command below works on a fresh machine.
VENV ?= .venv
PY := $(VENV)/bin/python
STAMP := $(VENV)/.installed

.PHONY: install sweep demo test test-fast system-deps clean

$(STAMP): pyproject.toml
	test -x $(PY) || python3 -m venv $(VENV)
	$(PY) -m pip install -q --upgrade pip
	$(PY) -m pip install -q -e '.[dev]'
	touch $(STAMP)

install: $(STAMP)

# The main job on embedded defaults: the hybrid sweep (local Ray, ./mlflow.db, generated corpus).
sweep: $(STAMP)
	$(PY) -m orchestrator.sweep search_spaces/hybrid.yaml

demo: sweep

# Debian packages the end-to-end tests need: PostgreSQL 15 server binaries for the local cluster
# stack (tests/test_stack.py). Only root (CI) installs them; anyone else gets one line naming the
# missing ones and goes on: the tests that need them skip (under CI=true they fail).
PG_CTL := /usr/lib/postgresql/15/bin/pg_ctl
# Headless Chromium for the MLflow UI page test (tests/test_mlflow_ui.py); Debian package.
CHROMIUM := chromium
system-deps:
	@missing=""; \
	test -x $(PG_CTL) || missing="$$missing postgresql-15"; \
	command -v $(CHROMIUM) >/dev/null 2>&1 || missing="$$missing chromium"; \
	if [ -z "$$missing" ]; then exit 0; fi; \
	if [ "$$(id -u)" = 0 ]; then \
		apt-get update -qq && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq $$missing; \
	else \
		echo "system-deps: not root, so not installing:$$missing (sudo apt-get install -y$$missing); the tests that need them skip (under CI=true they fail)"; \
	fi

# Everything, slow end-to-end tests included (what CI runs).
test: $(STAMP) system-deps
	$(PY) -m pytest -q

test-fast: $(STAMP)
	$(PY) -m pytest -q -m "not slow"

clean:
	rm -rf $(VENV) .pytest_cache
