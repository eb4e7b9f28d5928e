# Two commands: `make run` executes every notebook that can run here; `make test` runs the suite.
# Both create $(VENV) and install the pinned requirements first.
#
# Python: PYTHON=... if given, else the first of python3.11, python3.12, python3.10 that runs
# (on the PATH, or installed by pyenv). 3.13 is out: numpy 1.26.4 (tf2onnx 1.17 needs numpy < 2)
# has no wheel for it.
SUPPORTED := 3.11 3.12 3.10
# `name` if it runs, else the newest pyenv-installed `name` (pyenv's shims run only the
# versions `pyenv global` names); empty if neither.
runnable = $(shell p='$(1)'; if "$$p" -c '' 2>/dev/null; then echo "$$p"; \
  else for d in $$(pyenv root 2>/dev/null)/versions/*/bin; do \
    [ -x "$$d/$$p" ] && "$$d/$$p" -c '' 2>/dev/null && found="$$d/$$p"; done; echo "$$found"; fi)
ifdef PYTHON
PYTHON_EXE := $(or $(call runnable,$(PYTHON)),$(PYTHON))
else
PYTHON_EXE := $(firstword $(foreach v,$(SUPPORTED),$(call runnable,python$(v))))
endif
PY_VERSION := $(if $(PYTHON_EXE),$(shell '$(PYTHON_EXE)' -c 'import sys; print("%d.%d" % sys.version_info[:2])' 2>/dev/null))
VENV ?= .venv
BIN := $(VENV)/bin
# One stamp per Python version: another PYTHON with the same VENV re-creates it.
STAMP := $(BIN)/.installed-python$(PY_VERSION)
REQUIREMENTS := requirements.txt requirements-dev.txt requirements-triton.txt
BUILD := build/notebooks
# Notebooks `make run` executes, in order (the cloud steps explain themselves and stop cleanly
# without credentials).
NOTEBOOKS := $(sort $(wildcard notebooks/[0-9][0-9]_*.ipynb))

.PHONY: run test bench bench-stream family-bench export-memory readme-image lint format venv \
  which-python clean llamacpp-venv llamacpp-peer aiperf-venv aiperf

# Which Python, or why none: runs before anything is installed.
which-python:
	@if [ -z "$(PY_VERSION)" ]; then \
	  echo "No usable Python: $(if $(PYTHON),PYTHON=$(PYTHON) does not run,none of python3.11 python3.12 python3.10 runs). This tutorial's pins install on Python 3.10, 3.11 and 3.12 (not 3.13: numpy 1.26.4 has no wheel for it). Install one, or name it: make test PYTHON=/path/to/python3.11"; \
	  exit 1; fi
	@case " $(SUPPORTED) " in *" $(PY_VERSION) "*) ;; *) \
	  echo "$(PYTHON_EXE) is Python $(PY_VERSION); this tutorial's pins install on Python 3.10, 3.11 and 3.12 (not 3.13: numpy 1.26.4 has no wheel for it). Name another: make test PYTHON=python3.11"; \
	  exit 1;; esac
	@echo "Python $(PY_VERSION): $(PYTHON_EXE) -> $(VENV)"

# requirements-triton.txt (nvidia-pytriton: a local tritonserver, no Docker needed) has wheels
# for glibc >= 2.35 only; elsewhere (Oracle Linux 8 in OCI notebook sessions: 2.28) it is skipped.
$(STAMP): $(REQUIREMENTS) | which-python
	@if [ -x $(BIN)/python ] && ! [ "$$($(BIN)/python -c 'import sys; print("%d.%d" % sys.version_info[:2])')" = "$(PY_VERSION)" ]; then \
	  echo "$(VENV) holds another Python: re-creating it"; rm -rf $(VENV); fi
	'$(PYTHON_EXE)' -m venv $(VENV)
	$(BIN)/pip install --quiet --upgrade pip==25.3
	@glibc=$$($(BIN)/python -c 'import platform; print(platform.libc_ver()[1] or "none")'); \
	if $(BIN)/python -c 'import platform, sys; lib, v = platform.libc_ver(); sys.exit(not (lib == "glibc" and tuple(map(int, v.split(".")[:2])) >= (2, 35)))'; then \
	  echo "$(BIN)/pip install --quiet -r requirements-dev.txt -r requirements-triton.txt"; \
	  $(BIN)/pip install --quiet -r requirements-dev.txt -r requirements-triton.txt; \
	else \
	  echo "local Triton without Docker needs glibc >= 2.35; this machine has $$glibc: requirements-triton.txt is skipped, notebook 04 will serve with Docker if an engine answers, else run its checks in the kernel"; \
	  echo "$(BIN)/pip install --quiet -r requirements-dev.txt"; \
	  $(BIN)/pip install --quiet -r requirements-dev.txt; \
	fi
	$(BIN)/python -m ipykernel install --prefix $(VENV) --name python3 >/dev/null
	@rm -f $(BIN)/.installed*
	touch $@

venv: which-python $(STAMP)

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

# The generation benchmark (docs/performance.md): needs notebooks 01-03 run first (make run).
bench: venv
	$(BIN)/python benchmarks/bench_generation.py
	$(BIN)/python benchmarks/bench_streaming.py

# Time to first token, inter-token latency and tokens/s through generate_stream, alone.
bench-stream: venv
	$(BIN)/python benchmarks/bench_streaming.py

# The GPT-2 family measured one member after another (docs/family.md, docs/family.json):
# MEMBERS="gpt2-large" to choose; each member's work folder is under artifacts/family/.
# ARGS=--prune deletes each step's files once no later step reads them (the disk each member
# needs without it: docs/family.md).
family-bench: venv
	$(BIN)/python benchmarks/family_bench.py $(if $(MEMBERS),--members $(MEMBERS)) $(ARGS)

# Peak memory of each of notebook 02's export stages, printed (after notebook 01).
export-memory: venv
	$(BIN)/python benchmarks/export_memory.py

# The README's chart (images/latency_cpu_gpu.png): notebook 07's p50/p95 chart from the last
# `make run`. A maintainer step; check its title (model, weights, targets) before committing it.
readme-image: venv
	$(BIN)/python -c "import helpers; plots = helpers.paths()['results_dir'] / 'plots'; \
	print('wrote', helpers.copy_for_readme({'latency_bars': plots / 'latency_p50_p95_by_target.png'}, 'images/latency_cpu_gpu.png'))"

lint: venv
	$(BIN)/ruff check .
	$(BIN)/ruff format --check .

format: venv
	$(BIN)/ruff format .
	$(BIN)/ruff check --fix .

clean:
	rm -rf build artifacts

# Peers (docs/peers.md). Each in its own virtual environment, built on demand, never by `make test`.
PEER_PYTHON ?= $(firstword $(foreach v,3.11 3.12,$(call runnable,python$(v))))
# llama.cpp through llama-cpp-python: an sdist compiled here with -march=native (about 9 minutes
# on 2 idle cores, 26 with other work on them), niced.
LLAMACPP_VENV := .venv-llamacpp
LLAMACPP_STAMP := $(LLAMACPP_VENV)/.installed-llama-cpp-python-0.3.36

$(LLAMACPP_STAMP):
	@[ -n "$(PEER_PYTHON)" ] || { echo "llama-cpp-python needs Python 3.11 or 3.12: name one with PEER_PYTHON=/path/to/python3.11"; exit 1; }
	'$(PEER_PYTHON)' -m venv $(LLAMACPP_VENV)
	$(LLAMACPP_VENV)/bin/pip install --quiet --upgrade pip==25.3
	CMAKE_BUILD_PARALLEL_LEVEL=$$(nproc) nice -n 10 $(LLAMACPP_VENV)/bin/pip install \
	  'llama-cpp-python[server]==0.3.36' gguf==0.19.0 numpy==1.26.4
	touch $@

llamacpp-venv: $(LLAMACPP_STAMP)

# llama.cpp F32 and Q8_0 against our onnxruntime fp32 and int8, single stream, one run (after
# notebooks 01-02): logits checked first. ARGS="--rounds 3" to pass options; where llama.cpp dies
# of SIGILL (AMX that a virtual machine reports but does not run): ARGS=--no-extra-bufts.
llamacpp-peer: venv $(LLAMACPP_STAMP)
	$(BIN)/python benchmarks/llamacpp_peer.py $(ARGS)

# NVIDIA AIPerf, the outside load generator (Python >= 3.11, many dependencies: its own venv).
AIPERF_VENV := .venv-aiperf
AIPERF_STAMP := $(AIPERF_VENV)/.installed-aiperf-0.13.0

$(AIPERF_STAMP):
	@[ -n "$(PEER_PYTHON)" ] || { echo "AIPerf needs Python >= 3.11: name one with PEER_PYTHON=/path/to/python3.11"; exit 1; }
	'$(PEER_PYTHON)' -m venv $(AIPERF_VENV)
	$(AIPERF_VENV)/bin/pip install --quiet --upgrade pip==25.3
	nice -n 10 $(AIPERF_VENV)/bin/pip install --quiet aiperf==0.13.0
	touch $@

aiperf-venv: $(AIPERF_STAMP)

# AIPerf against our generate_stream beside our own client, one server (after notebooks 01-03):
# 32 requests at concurrency 8; the server is stopped at the end. ARGS="--concurrency 4" etc.
aiperf: venv $(AIPERF_STAMP)
	$(BIN)/python benchmarks/aiperf_peer.py $(ARGS)
