"""Simulator invariants, a hand-computed case, trace loading and a small sweep end to end."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest

from caps_vllm.strategies import STRATEGIES, make_strategy
from sim import evaluate
from sim.engine import ServerConfig, simulate
from sim.execution import CVModel
from sim.metrics import summarize
from sim.workload import Workload, WorkloadConfig, bursty, expert_vectors, load_trace, poisson, trace

SHARED_TRACE = Path(__file__).resolve().parents[1].parent / "shared/data/traces/azure_llm_2023_conv.csv"


def _workload(pattern, rate=250.0, n=400, seed=5, cfg=None):
    cfg = cfg or WorkloadConfig()
    rng = np.random.default_rng(seed)
    wl = pattern(rate, n, cfg, rng)
    return wl, expert_vectors(wl, cfg, rng)


@pytest.mark.parametrize("name", sorted(STRATEGIES))
@pytest.mark.parametrize("pattern", [bursty, poisson])
def test_every_request_completes_exactly_once(name, pattern):
    wl, vecs = _workload(pattern)
    run = simulate(wl, vecs, make_strategy(name, seed=1), ServerConfig(), CVModel())
    assert np.isfinite(run.completion).all()
    assert run.batch_sizes.sum() == len(wl)
    assert (run.batch_sizes <= ServerConfig().max_batch).all()
    assert (run.latency > 0).all()
    np.testing.assert_allclose(run.batch_loads.sum(axis=0), vecs.sum(axis=0))


def test_without_imbalance_cost_every_strategy_matches_fcfs():
    """Zero sensitivity, equal sizes: batch times are all equal, so the schedule's shape is too."""
    cfg = WorkloadConfig()
    rng = np.random.default_rng(9)
    wl = bursty(260.0, 600, cfg, rng)
    wl.prompt_tokens[:] = 100
    wl.output_tokens[:] = 20
    vecs = expert_vectors(wl, cfg, rng)
    model = CVModel(sensitivity=0.0)
    ref = summarize(simulate(wl, vecs, make_strategy("fcfs"), ServerConfig(), model))
    for name in STRATEGIES:
        got = summarize(simulate(wl, vecs, make_strategy(name, seed=4), ServerConfig(), model))
        assert got["throughput"] == pytest.approx(ref["throughput"], rel=1e-12)
        assert got["mean_latency"] == pytest.approx(ref["mean_latency"], rel=1e-12)


class FixedTime:
    def batch_time(self, prompt_tokens, output_tokens, vectors):
        return 1.0


def test_tiny_case_by_hand():
    """Trigger 2, batch 2, flush 100 ms, every batch 1 s.

    t=0.00 r0 arrives, alone: waits for the flush deadline 0.10 -> batch [r0] runs 0.10..1.10
    t=0.50 r1, t=0.60 r2 arrive; at 1.10 two wait -> batch [r1, r2] runs 1.10..2.10
    t=3.00 r3 arrives alone, no more arrivals will come -> runs at once 3.00..4.00
    """
    wl = Workload(np.array([0.0, 0.5, 0.6, 3.0]), np.full(4, 10), np.full(4, 5), np.zeros(4, dtype=int))
    vecs = np.ones((4, 3))
    run = simulate(
        wl,
        vecs,
        make_strategy("fcfs"),
        ServerConfig(max_batch=2, window=4, min_batch_trigger=2, flush_ms=100),
        FixedTime(),
    )
    np.testing.assert_allclose(run.completion, [1.1, 2.1, 2.1, 4.0])
    np.testing.assert_allclose(run.latency, [1.1, 1.6, 1.5, 1.0])
    m = summarize(run)
    assert m["p50"] == pytest.approx(1300.0)  # median of 1.0, 1.1, 1.5, 1.6 s
    assert m["throughput"] == pytest.approx(1.0)
    assert m["imbalance"] == pytest.approx(1.0)


def test_cv_model_costs_imbalance():
    model = CVModel(fixed_s=0.0, prefill_s_per_token=0.0, decode_s_per_step=0.01, sensitivity=2.0)
    even = model.batch_time(np.array([5]), np.array([10]), np.array([[2.0, 2, 2, 2]]))
    skew = model.batch_time(np.array([5]), np.array([10]), np.array([[8.0, 0, 0, 0]]))
    assert even == pytest.approx(0.1)
    assert skew == pytest.approx(0.1 * (1 + np.sqrt(3) * 2))


def test_bursty_comes_in_topic_runs_and_poisson_does_not():
    cfg = WorkloadConfig()
    b = bursty(100.0, 3000, cfg, np.random.default_rng(0))
    p = poisson(100.0, 3000, cfg, np.random.default_rng(0))
    switches = lambda wl: np.count_nonzero(np.diff(wl.topic))  # noqa: E731
    assert switches(b) < 3000 / cfg.burst_len * 2
    assert switches(p) > 3000 * 0.7
    assert np.all(np.diff(b.arrival) >= 0)
    assert 3000 / b.arrival[-1] == pytest.approx(100.0, rel=0.1)


def test_per_token_vectors_have_equal_mass():
    rng = np.random.default_rng(0)
    cfg = WorkloadConfig(vectors="per_token", layers=3)
    wl = poisson(100.0, 50, cfg, rng)
    vecs = expert_vectors(wl, cfg, rng)
    assert vecs.shape == (50, 180)
    np.testing.assert_allclose(vecs.sum(axis=1), cfg.top_k * cfg.layers)


def test_plain_trace_and_malformed_rows(tmp_path):
    good = tmp_path / "plain.csv"
    good.write_text("arrival_s,prompt_tokens,output_tokens\n1.5,10,3\n0.5,20,4\n\n2.0,30,5\n")
    t, p, o = load_trace(good)
    np.testing.assert_allclose(t, [0.0, 1.0, 1.5])
    assert list(p) == [20, 10, 30] and list(o) == [4, 3, 5]

    bad = tmp_path / "bad.csv"
    bad.write_text("arrival_s,prompt_tokens,output_tokens\n0.0,10,3\n0.1,ten,3\n")
    with pytest.raises(ValueError, match=r"bad\.csv:3: malformed"):
        load_trace(bad)
    neg = tmp_path / "neg.csv"
    neg.write_text("TIMESTAMP,ContextTokens,GeneratedTokens\n2023-11-16 18:15:46.68,10,3\n2023-11-16 18:15:47,-1,3\n")
    with pytest.raises(ValueError, match=r"neg\.csv:3"):
        load_trace(neg)
    hdr = tmp_path / "hdr.csv"
    hdr.write_text("a,b,c\n")
    with pytest.raises(ValueError, match=r"hdr\.csv:1"):
        load_trace(hdr)


@pytest.mark.skipif(not SHARED_TRACE.exists(), reason="../shared trace not present")
def test_azure_trace_replay():
    t, p, o = load_trace(SHARED_TRACE)
    assert t.shape[0] == 19366 and t[0] == 0.0 and np.all(np.diff(t) >= 0)
    assert 3500 < t[-1] < 3700  # one hour
    wl = trace(SHARED_TRACE, 200.0, 1000, WorkloadConfig(), np.random.default_rng(0))
    assert len(wl) == 1000 and 999 / wl.arrival[-1] == pytest.approx(200.0)
    assert list(wl.prompt_tokens[:3]) == [374, 396, 879]


def test_small_sweep_end_to_end(tmp_path):
    out = tmp_path / "sweep"
    rc = evaluate.main(
        [
            "--requests",
            "200",
            "--seeds",
            "1",
            "2",
            "--rates",
            "150",
            "300",
            "--strategies",
            "fcfs",
            "greedy_dot_product",
            "random",
            "--out",
            str(out),
            "--jobs",
            "2",
            "--no-progress",
        ]
    )
    assert rc == 0
    doc = json.loads((out / "results.json").read_text())
    assert doc["config"]["seeds"] == [1, 2] and doc["strategies"] == ["fcfs", "greedy_dot_product", "random"]
    for pattern in ("bursty", "poisson"):
        for rate in ("150", "300"):
            cell = doc[pattern][rate]
            for name in doc["strategies"]:
                assert set(cell[name]) == {
                    f"{m}_{s}" for m in ("p50", "p90", "p99", "throughput", "imbalance") for s in ("mean", "std")
                }
                assert cell[name]["p50_mean"] <= cell[name]["p90_mean"] <= cell[name]["p99_mean"]
            imp = cell["_improvements"]["random"]
            expect = 100 * (cell["fcfs"]["p99_mean"] - cell["random"]["p99_mean"]) / cell["fcfs"]["p99_mean"]
            assert imp["p99_reduction_pct"] == pytest.approx(expect, abs=0.051)
    for stem in ("fig_p99_vs_rate", "fig_improvement_heatmap"):
        for ext in ("png", "pdf"):
            assert (out / f"{stem}.{ext}").stat().st_size > 1000


def test_sweep_rejects_bad_options(tmp_path, capsys):
    with pytest.raises(SystemExit):
        evaluate.main(["--strategies", "nope", "--out", str(tmp_path)])
    assert "valid names" in capsys.readouterr().err
    with pytest.raises(SystemExit):
        evaluate.main(["--patterns", "trace", "--out", str(tmp_path)])
