# One virtual environment for everything; `make test` and `make sim-paper` set it up themselves.
PYTHON ?= python3
VENV ?= .venv
PY := $(VENV)/bin/python
STAMP := $(VENV)/.installed

.PHONY: setup test test-fast bench sim-paper sim-trace clean

setup: $(STAMP)

$(STAMP): pyproject.toml
	$(PYTHON) -m venv $(VENV)
	$(PY) -m pip install -q --upgrade pip
	$(PY) -m pip install -q -e '.[sim,test]'
	touch $(STAMP)

# The README's test command.
test: setup
	$(PY) -m pytest -q

test-fast: setup
	$(PY) -m pytest -q -m "not engine and not server"

# Printed figures, not pass/fail: selection time per strategy and the full sweep's wall time.
bench: setup
	$(PY) tests/benchmarks/bench_strategies.py
	$(PY) tests/benchmarks/bench_sweep.py

# The prototype's full sweep; writes sim/results/paper (and the equal-mass variant).
sim-paper: setup
	$(PY) -m sim.evaluate --requests 3000 --seeds 42 123 456 789 --rates 150 200 250 300 \
		--patterns bursty poisson --out sim/results/paper
	$(PY) -m sim.evaluate --requests 3000 --seeds 42 123 456 789 --rates 150 200 250 300 \
		--patterns bursty poisson --vectors per_token --out sim/results/paper_per_token

# A small sweep on the real Azure trace, when ../shared is beside the checkout.
sim-trace: setup
	$(PY) -m sim.evaluate --requests 3000 --seeds 42 123 --rates 150 300 --patterns trace \
		--trace ../shared/data/traces/azure_llm_2023_conv.csv --out sim/results/trace

clean:
	rm -rf $(VENV) .pytest_cache .hypothesis
