# The README's commands. Each creates .venv on first use.
PYTHON ?= python3
VENV := .venv
BIN := $(VENV)/bin
STAMP := $(VENV)/.installed

.PHONY: run test lint bench clean

$(BIN)/python:
	$(PYTHON) -m venv $(VENV)

$(STAMP): pyproject.toml | $(BIN)/python
	$(BIN)/pip install -q --upgrade pip
	$(BIN)/pip install -q -e '.[test]'
	touch $(STAMP)

run: $(STAMP)
	$(BIN)/lastmile serve --config config/gateway.yaml --rules bridge-rules

# Everything, the slow outage and crash tests included (-m "not slow" leaves them out
# while iterating); the ten slowest are listed at the end.
test: $(STAMP)
	$(BIN)/pytest -q -p no:cacheprovider --durations=10

lint: $(STAMP)
	$(BIN)/ruff check gateway tests benchmarks
	$(BIN)/mypy gateway

bench: $(STAMP)
	$(BIN)/python -m benchmarks.run $(if $(QUICK),--quick,)
	$(BIN)/python -m benchmarks.bench_neighbours $(if $(QUICK),--quick,)
	$(BIN)/python -m benchmarks.bench_http $(if $(QUICK),--duration 4,)

clean:
	rm -rf $(VENV) var .pytest_cache .mypy_cache .ruff_cache
