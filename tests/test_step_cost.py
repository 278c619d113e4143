"""The step-cost model, its fit, the step_cost strategy and the simulator's step-level models."""

from __future__ import annotations

import json

import numpy as np
import pytest

from caps_vllm.profiling import fit_step_cost
from caps_vllm.step_cost import DEFAULT_FIT, StepCostModel, check_placement, expert_placement
from caps_vllm.strategies import make_strategy
from sim.engine import ServerConfig
from sim.evaluate import execution_model, sweep
from sim.execution import StepModel
from sim.workload import WorkloadConfig

ROOF = StepCostModel(fixed_ms=1.0, weight_ms=2.0, token_ms=0.5, form="roofline")
LIN = StepCostModel(fixed_ms=1.0, weight_ms=2.0, token_ms=0.5, form="linear")


def test_layer_cost_by_hand():
    counts = np.array([0, 1, 4, 10])
    # roofline: max(2, 0.5 n) per touched expert: 2 + 2 + 5
    assert ROOF.layer_ms(counts) == pytest.approx(1 + 2 + 2 + 5)
    # linear: 2 per touched expert + 0.5 per assignment
    assert LIN.layer_ms(counts) == pytest.approx(1 + 3 * 2 + 0.5 * 15)
    # expected counts: an expert with mean m is touched with probability 1 - exp(-m)
    assert ROOF.expert_ms(np.array([0.5]), expected=True)[0] == pytest.approx(2 * (1 - np.exp(-0.5)))
    # two ranks {0,1} and {2,3}: the layer waits for the slower one (2 + 5 = 7 vs 2)
    assert ROOF.layer_ms(counts, np.array([0, 0, 1, 1])) == pytest.approx(1 + 7)
    assert ROOF.layer_ms(np.stack([counts, counts[::-1]])).shape == (2,)


def test_fewer_distinct_experts_are_cheaper_on_one_device_until_compute_bound():
    concentrated, spread = np.zeros(60), np.zeros(60)
    concentrated[:4], spread[:32] = 8, 1  # 32 assignments each
    assert ROOF.layer_ms(concentrated) < ROOF.layer_ms(spread)
    concentrated[:4], spread[:32] = 800, 100  # compute bound: only the total counts
    assert ROOF.layer_ms(concentrated) == pytest.approx(ROOF.layer_ms(spread))


@pytest.mark.parametrize("experts,ranks", [(60, 4), (60, 7), (8, 8), (10, 3), (5, 1)])
@pytest.mark.parametrize("strategy", ["linear", "round_robin"])
def test_placement_matches_vllm(experts, ranks, strategy):
    from vllm.model_executor.layers.fused_moe.expert_map_manager import determine_expert_map

    ours = expert_placement(experts, ranks, strategy)
    for rank in range(ranks):
        _, expert_map, _ = determine_expert_map(ranks, rank, experts, strategy)
        local = np.flatnonzero(ours == rank)
        if expert_map is None:
            assert ranks == 1 and len(local) == experts
        else:
            assert local.tolist() == np.flatnonzero(expert_map.numpy() >= 0).tolist()


def test_bad_model_and_placement_input():
    with pytest.raises(ValueError, match="form"):
        StepCostModel(1, 1, 1, "cubic")
    with pytest.raises(ValueError, match="weight_ms"):
        StepCostModel(1, -1, 1)
    with pytest.raises(ValueError, match="ranks"):
        expert_placement(4, 5)
    with pytest.raises(ValueError, match="placement"):
        expert_placement(4, 2, "random")
    with pytest.raises(ValueError, match="rank"):
        check_placement([0, 2, 2])
    with pytest.raises(ValueError, match="the model has"):
        check_placement([0, 1], experts=3)
    with pytest.raises(ValueError, match="no step-cost fit"):
        StepCostModel.load(shape="nope")


def test_shipped_fit_loads():
    doc = json.loads(DEFAULT_FIT.read_text())
    model = StepCostModel.load()
    assert model.as_dict() == doc["fits"][doc["default"]]
    assert model.weight_ms > 0 and model.token_ms > 0


@pytest.mark.parametrize("truth", [ROOF, LIN, StepCostModel(0.3, 0.8, 0.25, "roofline")])
def test_fit_recovers_known_coefficients(truth):
    rng = np.random.default_rng(0)
    rows = []
    for tokens in (1, 4, 16, 64, 256):
        for distinct in (4, 8, 16, 32, 60):
            counts = np.zeros(60, dtype=np.int64)
            chosen = rng.permutation(60)[: min(distinct, tokens * 4)]
            np.add.at(counts, chosen[np.arange(tokens * 4) % len(chosen)], 1)
            rows.append({"pattern": "equal", "tokens": tokens, "counts": counts, "ms": float(truth.layer_ms(counts))})
    got = fit_step_cost.fit(rows, truth.form)
    assert got.weight_ms == pytest.approx(truth.weight_ms, rel=0.02)
    assert got.token_ms == pytest.approx(truth.token_ms, rel=0.02)
    assert fit_step_cost.errors(got, rows)["max"] < 2.0


def test_the_installed_command_fits_a_machines_timings_into_strategy_params(tmp_path):
    """``caps-vllm fit-step-cost`` (the wheel's console script) on the shipped CPU timings
    reproduces the shipped fit, writes beside the CSV, and prints what to pass as strategy_params."""
    import shutil
    import subprocess
    import sys
    from pathlib import Path

    root = Path(__file__).resolve().parents[1]
    csv = tmp_path / "timings.csv"
    shutil.copy(root / "tests" / "benchmarks" / "results" / "moe_kernel_cpu.csv", csv)
    exe = Path(sys.executable).with_name("caps-vllm")
    cmd = [str(exe)] if exe.exists() else [sys.executable, "-m", "caps_vllm.cli"]
    r = subprocess.run([*cmd, "fit-step-cost", "--csv", str(csv)], capture_output=True, text=True, cwd=tmp_path)
    assert r.returncode == 0, r.stderr
    fitted = json.loads((tmp_path / "step_cost.json").read_text())
    shipped = json.loads(DEFAULT_FIT.read_text())["fits"]
    assert fitted["fits"].keys() == shipped.keys()
    for name, fit in shipped.items():  # the same least squares, to its rounding (numpy/BLAS builds differ)
        assert fitted["fits"][name] == {k: pytest.approx(v, rel=1e-9) if k != "form" else v for k, v in fit.items()}
    params = json.loads(r.stdout.split("strategy_params for this machine: ")[1].splitlines()[0])
    assert StepCostModel(**params["cost"]).as_dict() == fitted["fits"][fitted["default"]]
    bad = subprocess.run([*cmd, "no-such-command"], capture_output=True, text=True)
    assert bad.returncode == 2 and "profile-moe" in bad.stderr


def _layer(experts: dict[int, float], e: int = 8) -> np.ndarray:
    v = np.zeros(e)
    for k, x in experts.items():
        v[k] = x
    return v


def test_one_device_prefers_requests_on_the_experts_already_read():
    s = make_strategy("step_cost", cost=ROOF.as_dict())
    running = _layer({0: 1.0, 1: 1.0})
    cands = np.stack([_layer({4: 1.0, 5: 1.0}), _layer({6: 1.0, 7: 1.0}), _layer({0: 1.0, 1: 1.0})])
    assert s.select(running, cands, 2) == [0, 2]


def test_expert_parallel_prefers_requests_on_the_idle_rank():
    # Ranks {0..3} and {4..7}; rank 0 is busy. Compute-bound counts, so only balance matters.
    s = make_strategy("step_cost", cost=ROOF.as_dict(), ranks=2, experts=8)
    running = _layer({0: 40.0, 1: 40.0})
    cands = np.stack([_layer({0: 20.0}), _layer({2: 20.0}), _layer({5: 20.0}), _layer({3: 20.0})])
    assert s.select(running, cands, 2) == [0, 2]
    # the same on one device: all cost the same per token, so FCFS order
    assert make_strategy("step_cost", cost=ROOF.as_dict()).select(running, cands, 4) == [0, 1, 2, 3]


def test_expert_parallel_takes_every_layer_and_vllm_style_deployment():
    deployment = {"experts": 4, "ranks": 2, "placement": "round_robin", "unused": 1}
    s = make_strategy("step_cost", cost=ROOF.as_dict(), deployment=deployment)
    assert s.placement.tolist() == [0, 1, 0, 1]
    # user parameters win over what the deployment says
    assert make_strategy("step_cost", deployment=deployment, ranks=1).placement is None
    # two layers of 4 experts: layer 1 of the running load is busy on rank 1 (experts 1, 3)
    running = np.array([0, 0, 0, 0, 0, 30, 0, 30.0])
    cands = np.array([[1, 0, 0, 0, 0, 0, 0, 0], [0, 0, 0, 0, 0, 20, 0, 0], [0, 0, 0, 0, 20, 0, 0, 0.0]])
    assert s.select(running, cands, 2) == [0, 2]
    with pytest.raises(ValueError, match="split into layers"):
        s.select(np.zeros(6), np.ones((3, 6)), 2)
    with pytest.raises(ValueError, match="needs experts"):
        make_strategy("step_cost", ranks=2)
    with pytest.raises(ValueError, match="placement"):
        make_strategy("step_cost", placement="random")


def test_step_model_by_hand():
    cost = StepCostModel(0.0, 1.0, 0.0, "linear")  # 1 ms per distinct expert
    m = StepModel(cost, experts=4, vectors="counts", model_layers=1)
    # Two requests of 2 prompt tokens (top-1 here): r0 on experts {0, 1}, r1 on {2, 3}.
    vecs = np.array([[1, 1, 0, 0], [0, 0, 1, 1.0]])
    t = m.batch_time(np.array([2, 2]), np.array([1, 3]), vecs)
    touched = lambda lam: np.sum(-np.expm1(-lam))  # noqa: E731
    one, both = touched(np.array([0.5, 0.5])), touched(np.full(4, 0.5))
    # prefill: 4 experts; step 1: both requests; steps 2-3: r1 only
    assert t * 1000 == pytest.approx(4 + both + 2 * one)
    ep = StepModel(cost, experts=4, vectors="counts", model_layers=1, placement=(0, 0, 1, 1))
    assert ep.batch_time(np.array([2, 2]), np.array([1, 3]), vecs) * 1000 == pytest.approx(2 + one + 2 * one)


def test_sweep_under_each_execution_model():
    wcfg = WorkloadConfig()
    for kind in ("fitted", "expert_parallel"):
        model = execution_model(kind, wcfg, ranks=4)
        doc = sweep(
            120, [1], [0.5], ["bursty"], ["fcfs", "step_cost", "greedy_dot_product"], wcfg, ServerConfig(), model
        )
        assert doc["config"]["execution"]["model"] == "StepModel"
        assert doc["config"]["deployment"]["ranks"] == (4 if kind == "expert_parallel" else 1)
        assert set(doc["bursty"]["0.5"]["_improvements"]) == {"step_cost", "greedy_dot_product"}


def _naive_step_cost(model, running, cands, b, placement=None):
    """Greedy by recomputing the whole cost for every candidate at every pick."""

    def cost(load):
        if placement is None:
            return model.expert_ms(load, expected=True).sum()
        return (model.layer_ms(load.reshape(-1, len(placement)), placement, expected=True) - model.fixed_ms).sum()

    load, picks = running + cands[0], [0]
    for _ in range(min(b, len(cands)) - 1):
        rest = [i for i in range(len(cands)) if i not in picks]
        scores = [(cost(load + cands[i]) - cost(load)) / cands[i].sum() for i in rest]
        best = min(scores)
        j = rest[next(k for k, sc in enumerate(scores) if sc <= best + 1e-9 * abs(best))]
        picks.append(j)
        load = load + cands[j]
    return picks


@pytest.mark.parametrize("model", [ROOF, LIN])
@pytest.mark.parametrize("ranks", [1, 3])
def test_incremental_picks_match_recomputation(ranks, model):
    rng = np.random.default_rng(ranks)
    placement = expert_placement(6, ranks) if ranks > 1 else None
    s = make_strategy("step_cost", cost=model.as_dict(), ranks=ranks, experts=6)
    for _ in range(40):
        running = rng.gamma(0.3, 2.0, 12) * (rng.random(12) < 0.5)
        cands = rng.gamma(0.3, 2.0, (10, 12)) * (rng.random((10, 12)) < 0.4) + 1e-3
        b = int(rng.integers(1, 12))
        assert s.select(running, cands, b) == _naive_step_cost(model, running, cands, b, placement)


def test_study_runs_end_to_end(tmp_path):
    from sim import step_cost_study

    assert step_cost_study.main(["--requests", "60", "--seeds", "1", "--jobs", "1", "--out", str(tmp_path)]) == 0
    doc = json.loads((tmp_path / "study.json").read_text())
    assert len(doc["cells"]) == 2 * 3 * 2 * 3  # hotspots x models x patterns x loads
    assert all(
        c["capacity_rps"] > 0 and set(c["vs_fcfs"]) == {"greedy_dot_product", "greedy_variance", "step_cost"}
        for c in doc["cells"]
    )
    assert "| 0.5 | expert_parallel | poisson | 1.2 |" in (tmp_path / "report.md").read_text()
