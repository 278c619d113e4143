"""The CPU regime study's choice of rules and the routed experts' share of a step (no vLLM)."""

from __future__ import annotations

import json

import pytest

from caps_vllm.step_cost import StepCostModel
from sim.cpu_study import choose
from sim.cpu_twin import arrival_times
from sim.moe_share import shares


def _arm(tpot, tok_s, ttft_p99):
    return {"tpot": tpot, "tok_s": tok_s, "ttft_p99": ttft_p99}


def test_the_rules_chosen_gain_most_within_the_bounds():
    cells = {
        "poisson 8": {
            "pattern": "poisson",
            "arms": {
                "fcfs": _arm(0.100, 50.0, 2.0),
                "fast but late": _arm(0.080, 52.0, 2.5),  # TTFT P99 +25 %: out
                "modest": _arm(0.095, 50.5, 2.1),
                "slower": _arm(0.099, 49.0, 2.0),  # throughput -2 %: out
            },
        },
        "offline 8": {
            "pattern": "offline",
            "arms": {
                "fcfs": _arm(0.100, 50.0, 30.0),
                "fast but late": _arm(0.080, 60.0, 40.0),  # an offline batch's TTFT is not bounded
                "modest": _arm(0.090, 55.0, 33.0),
                "slower": _arm(0.090, 55.0, 30.0),
            },
        },
    }
    c = choose(cells, ["fast but late", "modest", "slower"])
    assert c["chosen"] == "modest"
    assert c["scores"]["fast but late"] == {"mean_tpot_gain": pytest.approx(0.2), "within_bounds": False}
    assert not c["scores"]["slower"]["within_bounds"]
    offline = choose({"offline 8": cells["offline 8"]}, ["fast but late", "modest", "slower"])
    assert offline["chosen"] == "fast but late"  # an offline batch's TTFT is not a bound


def test_the_routed_experts_share_of_a_decode_step(tmp_path):
    cost = StepCostModel(fixed_ms=0.5, weight_ms=1.0, token_ms=0.25, form="linear")
    log = tmp_path / "steps.jsonl"
    lines, t = [], 0.0
    for _ in range(30):  # decode steps of 8 requests, 200 ms each, 80 (layer, expert) pairs over 4 layers
        lines.append({"t": t, "busy": True, "prefill_tokens": 0, "decode_reqs": 8, "experts": 80, "tokens": 8})
        t += 0.2
    lines.append({"t": t, "busy": True, "prefill_tokens": 300, "decode_reqs": 7, "experts": 240, "tokens": 307})
    lines.append({"t": t + 0.5, "busy": False, "prefill_tokens": 0, "decode_reqs": 8, "experts": 80, "tokens": 8})
    log.write_text("".join(json.dumps(x) + "\n" for x in lines))
    (row,) = shares([log], cost, layers=4, top_k=4)  # the prefill step and the last (idle after) are left out
    assert row["running"] == 8 and row["steps"] == 30 and row["distinct_per_layer"] == 20.0
    assert row["moe_ms"] == pytest.approx(4 * 0.5 + 80 * 1.0 + 8 * 4 * 4 * 0.25)  # 114 ms of a 200 ms step
    assert row["moe_share"] == pytest.approx(0.57) and row["read_share"] == pytest.approx(0.4)


def test_an_offline_batch_reaches_the_twin_in_the_order_it_was_sent():
    # sent during a 5 s hold: all there at the resume, none tied (the starvation bound needs an order)
    t = arrival_times([0.0, 0.01, 0.02, 4.5], front_s=0.002, hold=5.0)
    assert all(5.0 <= x < 5.001 for x in t) and t == sorted(t) and len(set(t)) == 4
    assert arrival_times([1.0, 2.0], front_s=0.002, hold=0.0) == [1.002, 2.002]  # online: as sent
