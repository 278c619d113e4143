"""The side-by-side runner's arithmetic: run order, bootstrap intervals, verdicts, validity, the
report's first line, bad options (no server: the live runner is tested in test_loadtest.py)."""

from __future__ import annotations

import json
import math
import subprocess
import sys

import numpy as np
import pytest

from loadtest.compare import arm_args, plan_runs
from loadtest.records import classify, run_data
from loadtest.report import headline, report
from loadtest.stats import BY_NAME, FIGURES, Interval, RunData, compare, pooled, verdict
from tests.servers import ROOT


def test_runs_are_interleaved_and_every_arm_runs_once_per_repetition():
    assert plan_runs(["a", "b"], 3) == [(0, "a"), (0, "b"), (1, "b"), (1, "a"), (2, "a"), (2, "b")]
    order = plan_runs(["a", "b", "c"], 3)
    for rep in range(3):
        assert sorted(arm for r, arm in order if r == rep) == ["a", "b", "c"]
    positions = {arm: sorted(i % 3 for i, (_, a) in enumerate(order) if a == arm) for arm in "abc"}
    assert all(p == [0, 1, 2] for p in positions.values())  # each arm in each position once


def test_the_compared_strategys_params_stay_out_of_the_fcfs_arms():
    caps = {"strategy_params": {"cost": {"weight_ms": 1.0}}, "min_gain": 0.0}

    def of(arm):
        args = arm_args(arm, "fcfs", caps)
        return json.loads(args[args.index("--additional-config") + 1])["caps"] if args else None

    assert of("step_cost") == {**caps, "strategy": "step_cost"}
    assert of("fcfs") == of("fcfs-aa") == {"min_gain": 0.0, "strategy": "fcfs"}  # fcfs takes no parameters
    assert of("stock") is None


def _run(rng, scale=1.0, n=300, tput=8.0):
    samples = [
        {
            "error": None,
            "ttft_s": float(x),
            "e2e_s": float(2 * x + 0.1),
            "itl_s": list(rng.exponential(0.01, 7) * scale),
        }
        for x in rng.exponential(0.2, n) * scale
    ]
    samples.append({"error": "timeout", "ttft_s": None, "e2e_s": None, "itl_s": []})  # failures are left out
    return RunData.from_samples(
        samples,
        {
            "throughput_rps": tput,
            "throughput_tok_s": 7 * tput,
            "goodput_rps": tput,
            "engine_steps": 900.0,
            "distinct_experts": 12.0,
            "imbalance": None,
        },
    )


def _scaled(run: RunData, k: float, tput: float) -> RunData:
    return RunData(
        run.ttft_s * k,
        run.e2e_s * k,
        [g * k for g in run.itl_s],
        {**run.run, "throughput_rps": tput, "throughput_tok_s": 7 * tput},
    )


def test_pooled_quantiles_are_nearest_rank_over_all_runs():
    rng = np.random.default_rng(0)
    runs = [_run(rng) for _ in range(3)]
    allv = np.sort(np.concatenate([r.ttft_s for r in runs]))
    for q in (0.5, 0.9, 0.99):
        assert pooled(runs, BY_NAME[f"TTFT p{round(q * 100)}"]) == allv[math.ceil(q * len(allv)) - 1]
    gaps = np.sort(np.concatenate([g for r in runs for g in r.itl_s]))
    assert pooled(runs, BY_NAME["ITL p99"]) == gaps[math.ceil(0.99 * len(gaps)) - 1]
    assert pooled(runs, BY_NAME["TPOT (mean ITL)"]) == pytest.approx(gaps.mean())  # every gap once
    assert pooled(runs, BY_NAME["throughput"]) == 8.0 and pooled(runs, BY_NAME["actual imbalance max/mean"]) is None


def test_small_samples_widen_the_interval_about_the_ratio():
    rng = np.random.default_rng(6)
    base = [_run(rng) for _ in range(2)]
    arm = [_run(rng) for _ in range(2)]
    for name, iv in compare(base, arm, draws=300).items():
        if iv.lo is not None:
            assert iv.lo <= iv.point <= iv.hi, name


def test_identical_arms_show_no_difference_and_a_real_one_is_found():
    rng = np.random.default_rng(1)
    base = [_run(rng) for _ in range(3)]
    same = [_run(rng) for _ in range(3)]  # another draw of the same process: an A/A pair
    aa = compare(base, same, draws=400)
    for name in ("TTFT p50", "E2E p99", "ITL p50"):
        iv = aa[name]
        assert iv.lo <= 1.0 <= iv.hi, (name, iv)
        assert verdict(BY_NAME[name], iv) == "no significant difference"
    slow = [_scaled(r, 1.5, 10.0) for r in base]  # 1.5x every latency, more throughput
    iv = compare(base, slow, draws=400)
    for name in ("TTFT p50", "TTFT p99", "ITL p50", "E2E p90"):
        assert iv[name].point == pytest.approx(1.5) and iv[name].lo > 1.0
        assert verdict(BY_NAME[name], iv[name]) == "worse"
    assert (
        iv["throughput"].point == pytest.approx(1.25) and verdict(BY_NAME["throughput"], iv["throughput"]) == "better"
    )
    assert iv["actual imbalance max/mean"].point is None
    assert verdict(BY_NAME["actual imbalance max/mean"], iv["actual imbalance max/mean"]) == "no value"
    assert compare(base, slow, draws=400, seed=3) == compare(base, slow, draws=400, seed=3)  # seeded


def test_verdicts_are_withheld_where_the_evidence_cannot_carry_one():
    rng = np.random.default_rng(2)
    base = [_run(rng)]
    one = compare(base, [_scaled(base[0], 2.0, 8.0)], draws=200)
    assert one["E2E p99"].runs == 1 and one["E2E p99"].lo > 1.0
    assert verdict(BY_NAME["E2E p99"], one["E2E p99"]).startswith("not judged")
    fig = BY_NAME["E2E p99"]
    noisy_aa = Interval(1.3, 1.1, 1.5, 3)
    assert verdict(fig, Interval(1.4, 1.2, 1.6, 3), noisy_aa).startswith("inconclusive")
    assert verdict(fig, Interval(1.4, 1.2, 1.6, 3), Interval(1.0, 0.8, 1.2, 3)) == "worse"
    # A ratio no farther from 1 than identical arms moved in the same session is not an effect.
    assert verdict(fig, Interval(1.15, 1.05, 1.3, 3), Interval(1.0, 0.8, 1.2, 3)).endswith(
        "(within the A/A noise floor)"
    )
    assert verdict(BY_NAME["actual distinct experts/layer/step"], Interval(0.9, 0.85, 0.95, 3)) == "lower"
    with pytest.raises(ValueError):
        compare(base, [], draws=200)
    with pytest.raises(ValueError, match="without a completed request"):
        RunData.from_samples([{"error": "timeout"}], {})


def _summary(completed=10, lag=0.01, hold_error=None):
    q = {"p50": lag, "p90": lag, "p99": lag, "max": lag, "mean": lag, "n": completed}
    return {"completed": completed, "scheduled": 10, "lag_s": q, "hold": {"seconds": 0, "error": hold_error}}


def test_a_late_load_generator_or_a_broken_hold_disqualifies_the_run():
    assert classify(_summary(), 0.5) == ("ok", None)
    status, why = classify(_summary(lag=0.8), 0.5)
    assert status == "invalid" and "P99 lag 0.800 s > --max-lag 0.5 s" in why
    assert classify(_summary(completed=0), 0.5) == ("failed", "no request completed")
    assert classify(_summary(hold_error="--hold: no /pause"), 0.5)[0] == "failed"


def _doc(results, runs, aa=None):
    args = {
        "pattern": "bursty",
        "model": "m",
        "max_num_seqs": 8,
        "max_tokens": 32,
        "rate": 8.0,
        "duration": 60.0,
        "max_requests": 1000,
        "seed": 0,
        "repeats": 2,
        "concurrency": 64,
        "hold": 0.0,
        "caps_config": "{}",
        "bootstrap": 1000,
        "max_lag": 0.5,
    }
    meta = {
        "command": "python -m loadtest.compare ...",
        "args": args,
        "arms": ["fcfs", "step_cost"] + ([aa] if aa else []),
        "baseline": "fcfs",
        "aa": aa,
        "pinning": {"server_cpus": [0], "loadgen_cpus": [1]},
    }
    return {**meta, "headline": headline(results, runs, meta), "comparisons": results}


def _record(label, rep, rng, status="ok", reason=None):
    if status == "failed":
        return {
            "label": label,
            "repeat": rep,
            "seed": rep,
            "status": status,
            "reason": reason,
            "wall_s": 12.0,
            "summary": None,
            "metrics": None,
            "samples": [],
            "timeseries": [],
        }
    samples = [
        {"error": None, "ttft_s": float(x), "e2e_s": float(2 * x), "itl_s": [0.01] * 7}
        for x in rng.exponential(0.2, 50)
    ]
    q = {"p50": 0.1, "p90": 0.2, "p99": 0.3, "max": 0.4, "mean": 0.1, "n": 50}
    summary = {
        "completed": 50,
        "scheduled": 50,
        "failures": 0,
        "e2e_s": q,
        "lag_s": q,
        "held_share": 0.0,
        "throughput_rps": 8.0,
        "throughput_tok_s": 64.0,
        "goodput_rps": 8.0,
    }
    metrics = {
        "engine_steps": 400.0,
        "vllm:caps_actual_distinct_experts": 12.0,
        "vllm:caps_actual_load_max_over_mean": 2.0,
        "vllm:caps_ranked_requests_total": 5.0,
    }
    return {
        "label": label,
        "repeat": rep,
        "seed": rep,
        "status": status,
        "reason": reason,
        "wall_s": 40.0,
        "summary": summary,
        "metrics": metrics,
        "samples": samples,
        "timeseries": [],
    }


def test_the_report_leads_with_the_verdict_and_lists_every_run(tmp_path):
    rng = np.random.default_rng(4)
    runs = [
        _record("fcfs", 0, rng),
        _record("step_cost", 0, rng),
        _record("step_cost", 1, rng),
        _record("fcfs", 1, rng, "failed", "vllm serve exited with 1"),
    ]
    base, arm = (RunData.from_samples(r["samples"], {}) for r in runs[:2])
    ivs = compare([base], [arm], draws=200)
    results = {"step_cost": {f.name: {**ivs[f.name].to_json(), "verdict": verdict(f, ivs[f.name])} for f in FIGURES}}
    doc = _doc(results, runs)
    text = report(doc, runs, run_data(runs), tmp_path)
    first = text.splitlines()[0]
    assert first.startswith("step_cost vs fcfs on this machine: TPOT (mean ITL) ratio ") and ", 95 % CI " in first
    assert first.endswith(
        ": not judged (one run per arm: run-to-run noise not sampled) (1 of 2 interleaved repetitions valid)."
    )
    assert "No A/A control" in text and "| fcfs | failed: vllm serve exited with 1 |" in text
    assert "Only 2 repetitions per arm" in text
    # ranked 5 in each step_cost run: no "served in FCFS order" note; with none ranked, the note.
    assert "served in FCFS order" not in text
    for r in runs[1:3]:
        r["metrics"]["vllm:caps_ranked_requests_total"] = 0.0
    assert any("step_cost ranked and bypassed no request in these runs" in ln for ln in _doc(results, runs)["headline"])
    assert text.count("| ok |") == 3 and (tmp_path / "report.md").read_text() == text
    assert _doc({}, runs)["headline"][0].startswith("step_cost vs fcfs on this machine: no verdict")


@pytest.mark.parametrize(
    "argv, message",
    [
        (["--repeats", "0"], "--repeats must be ≥ 1"),
        (["--strategies", "fcfs", "fastest"], "--strategies: unknown arm 'fastest'"),
        (
            ["--strategies", "fcfs", "step_cost", "--baseline", "greedy_dot_product"],
            "--baseline 'greedy_dot_product' is not one of --strategies",
        ),
        (["--strategies", "fcfs", "fcfs"], "named twice"),
        (["--strategies", "fcfs"], "needs two arms"),
        (["--caps-config", "[1]"], "--caps-config must be a JSON object"),
        (["--pattern", "offline", "--max-requests", "50"], "--pattern offline needs --hold S"),
        (
            ["--pattern", "offline", "--hold", "5", "--max-requests", "50", "--concurrency", "8"],
            "--concurrency >= --max",
        ),
        (["--servers", "per-arm", "--warmup", "-1"], "--warmup must be >= 0"),
    ],
)
def test_bad_options_are_named(argv, message):
    r = subprocess.run([sys.executable, "-m", "loadtest.compare", *argv], capture_output=True, text=True, cwd=ROOT)
    assert r.returncode == 2 and message in r.stderr, r.stderr[-600:]


def test_compare_json_round_trips(tmp_path):
    rng = np.random.default_rng(5)
    base = [_run(rng) for _ in range(2)]
    iv = compare(base, base, draws=200)["E2E p99"]
    assert json.loads(json.dumps(iv.to_json())) == {"ratio": 1.0, "lo": iv.lo, "hi": iv.hi, "runs": 2}
