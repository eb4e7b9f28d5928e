# Two commands: `make run` executes every notebook that can run here; `make test` runs the suite.
# Both create .venv with Python 3.11 and install the pinned requirements first.
PYTHON ?= python3.11
VENV := .venv
BIN := $(VENV)/bin
BUILD := build/notebooks
# Notebooks `make run` executes, in order (the cloud steps explain themselves and stop cleanly
# without credentials).
NOTEBOOKS := $(sort $(wildcard notebooks/[0-9][0-9]_*.ipynb))

.PHONY: run test bench lint format venv clean

$(BIN)/.installed: requirements.txt requirements-dev.txt
	@command -v $(PYTHON) >/dev/null || { echo "$(PYTHON) not found: install Python 3.11 (see README)"; exit 1; }
	$(PYTHON) -m venv $(VENV)
	$(BIN)/pip install --quiet --upgrade pip==25.3
	$(BIN)/pip install --quiet -r requirements-dev.txt
	$(BIN)/python -m ipykernel install --prefix $(VENV) --name python3 >/dev/null
	touch $@

venv: $(BIN)/.installed

run: venv
	@mkdir -p $(BUILD)
	@for nb in $(NOTEBOOKS); do \
	  echo "=== $$nb"; \
	  start=$$(date +%s); \
	  $(BIN)/papermill --cwd notebooks --kernel python3 "$$nb" "$(BUILD)/$$(basename $$nb)" || exit 1; \
	  echo "=== $$nb done in $$(( $$(date +%s) - start )) s"; \
	done
	@echo "Executed notebooks are in $(CURDIR)/$(BUILD)/"

test: venv
	$(BIN)/python -m pytest $(PYTEST_ARGS)

# The generation benchmark (README, "Performance"): needs notebooks 01-03 run first (make run).
bench: venv
	$(BIN)/python benchmarks/bench_generation.py

lint: venv
	$(BIN)/ruff check .
	$(BIN)/ruff format --check .

format: venv
	$(BIN)/ruff format .
	$(BIN)/ruff check --fix .

clean:
	rm -rf build artifacts
