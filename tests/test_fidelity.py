"""The measured step profile, the embedded model's captured routing and the fidelity figures."""

from __future__ import annotations

import json

import numpy as np
import pytest

from sim.step_profile import MeasuredStep, fit, fit_nonnegative, idle_front, periods
from sim.step_time import StepBatch


def _log(path, rng, coef, n=400):
    """A step log whose periods follow ``coef`` (fixed, token, prefill req, decode req, context, expert)."""
    t, lines = 100.0, []
    for i in range(n):
        pre = int(rng.integers(0, 3))
        dec = int(rng.integers(0, 8))
        tokens = dec + pre * int(rng.integers(5, 60)) if pre else max(dec, 1)
        dec = dec if pre or dec else 1
        ctx = tokens + int(rng.integers(0, 500))
        experts = int(rng.integers(4, 120))
        period = float(np.dot(coef, [1, tokens, pre, dec, ctx, experts]))
        lines.append(
            {
                "t": t,
                "sched_s": 1e-4,
                "tokens": tokens,
                "prefill_tokens": tokens - dec,
                "prefill_reqs": pre,
                "decode_reqs": dec,
                "context": ctx,
                "new": pre,
                "end": t + period * 0.9,
                "busy": i < n - 1,
                "experts": experts,
            }
        )
        t += period
    reqs = [
        {"req": f"r{i}", "added": 100.0 + i, "front_s": 0.002, "prompt": 10, "first": 100.01 + i, "done": 100.2 + i}
        for i in range(20)
    ]
    path.write_text("".join(json.dumps(x) + "\n" for x in lines + reqs))


def test_the_profile_fit_recovers_known_coefficients_and_drops_negative_ones(tmp_path):
    coef = np.array([4e-3, 6e-6, 1.3e-3, 6e-5, 2e-6, 2e-5])
    _log(tmp_path / "steps.jsonl", np.random.default_rng(0), coef)
    prof = fit([tmp_path / "steps.jsonl"], client_ttft=[[0.015] * 20])
    got = [prof.fixed_s, prof.token_s, prof.prefill_request_s, prof.decode_request_s, prof.context_s, prof.expert_s]
    assert np.allclose(got, coef, rtol=1e-6)
    assert prof.front_s == pytest.approx(0.002) and prof.output_s == pytest.approx(0.015 - 0.012)
    assert prof.fit["median_abs_error"] < 1e-9
    # A feature that only makes the fit worse would get a negative weight: it is dropped instead.
    x = np.c_[np.ones(50), np.arange(50.0), -(np.arange(50.0) ** 1.5)]
    y = 1.0 + 2.0 * np.arange(50.0)
    assert fit_nonnegative(x, y) == pytest.approx([1.0, 2.0, 0.0])
    # Idle gaps are not step periods: only steps after which the engine went straight on count.
    steps = [
        {"t": 0.0, "busy": False, "tokens": 1, "prefill_reqs": 0, "decode_reqs": 1, "context": 1, "experts": 4},
        {"t": 9.0, "busy": True, "tokens": 1, "prefill_reqs": 0, "decode_reqs": 1, "context": 2, "experts": 4},
        {"t": 9.01, "busy": False, "tokens": 1, "prefill_reqs": 0, "decode_reqs": 1, "context": 3, "experts": 4},
    ]
    x, y = periods(steps)
    assert y.tolist() == pytest.approx([0.01])
    # The front end's own delay: from requests that found the engine idle (not mid-step).
    for st, end in zip(steps, (0.5, 9.005, 9.02)):
        st["end"] = end
    reqs = [{"added": 0.3, "front_s": 0.1}, {"added": 5.0, "front_s": 0.2}, {"added": 9.004, "front_s": 0.001}]
    assert idle_front(steps, reqs) == [0.2]  # stamped at 0.2 (mid-step), 4.8 (idle), 9.003 (busy period)


def test_a_measured_profile_prices_a_step_and_refuses_bad_coefficients(tmp_path):
    prof = MeasuredStep(1e-3, 1e-5, 1e-3, 1e-4, 1e-6, 1e-5)
    counts = np.zeros((4, 60))
    counts[:, :3] = 2  # 12 (layer, expert) pairs run
    b = StepBatch(tokens=6, context_tokens=100, moe_counts=counts, prefill_requests=1, decode_requests=2)
    assert prof.seconds(b) == pytest.approx(1e-3 + 6e-5 + 1e-3 + 2e-4 + 1e-4 + 12e-5)
    prof.save(tmp_path / "p.json")
    assert MeasuredStep.load(tmp_path / "p.json").seconds(b) == pytest.approx(prof.seconds(b))
    with pytest.raises(ValueError, match="expert_s"):
        MeasuredStep(1e-3, 0, 0, 0, 0, -1.0)
    (tmp_path / "bad.json").write_text('{"fixed_s": 1}')
    with pytest.raises(ValueError, match="not a step profile"):
        MeasuredStep.load(tmp_path / "bad.json")
    with pytest.raises(ValueError, match="too few"):
        (tmp_path / "few.jsonl").write_text("")
        fit([tmp_path / "few.jsonl"])


@pytest.mark.vllm
def test_captured_routing_replays_the_models_router_for_prompts(tiny_model):
    pytest.importorskip("transformers")
    from sim.captured_routing import CapturedRouting

    r = CapturedRouting(tiny_model, seed=3, decode="uniform")
    prompt = list(range(5, 45))
    r.bind("a", prompt)
    r.bind("b", list(range(300, 310)))
    rows = r.route(prompt)
    assert rows.shape == (40, r.layers, r.top_k) and r.route(prompt) is rows  # cached
    c = r.counts([("a", 0, 40)])
    assert (c.sum(axis=1) == 40 * r.top_k).all()  # every prompt token routed to k experts per layer
    assert (c > 0).sum(axis=1).mean() < r.experts * -np.expm1(-40 * r.top_k / r.experts)  # shares experts
    # decode positions: k uniform draws per layer, the same for the same request and position
    d = r.counts([("a", 40, 1), ("b", 12, 1)])
    assert (d.sum(axis=1) == 2 * r.top_k).all()
    r2 = CapturedRouting(tiny_model, seed=3, decode="uniform")
    r2.bind("a", prompt)
    r2.bind("b", [1])
    assert (r2.counts([("a", 40, 1), ("b", 12, 1)]) == d).all()


@pytest.mark.vllm
def test_decode_positions_take_the_routing_of_the_greedy_continuation(tiny_model):
    """What the engine feeds at a decode position is the token greedy decoding produced there."""
    pytest.importorskip("transformers")
    import torch

    from caps_vllm.routing import counts_from_rows
    from sim.captured_routing import CapturedRouting

    r = CapturedRouting(tiny_model)
    prompt = list(range(5, 25))
    r.bind("a", prompt, output_tokens=6)
    with torch.no_grad():
        seq = r.model.generate(torch.tensor([prompt]), max_new_tokens=5, min_new_tokens=5, do_sample=False)[0]
    assert len(seq) == 25
    fed = r.route(seq.tolist())  # routing of the 20 prompt tokens and the 5 generated ones fed back
    assert (r.counts([("a", 20, 5)]) == counts_from_rows(fed[20:25], r.experts)).all()
    assert (r.counts([("a", 0, 20)]) == counts_from_rows(fed[:20], r.experts)).all()  # causal: the prompt's own
    r.bind("b", prompt, output_tokens=3)  # a shorter continuation of the same prompt is the cached one's head
    assert (r.counts([("b", 20, 2)]) == counts_from_rows(fed[20:22], r.experts)).all()


def test_fidelity_figures_are_computed_alike_on_both_sides():
    from sim.cpu_twin import figures
    from sim.fidelity import interval

    f = figures([0.1, 0.2, 0.3, 0.4], [1.0, 2.0, 3.0, 4.0], [2.0, 3.0, 4.0, 8.0], 77, [0.1, 0.3], 40, start=0.0)
    assert f == {
        "steps": 77,
        "throughput_rps": 0.5,
        "tok_s": 5.0,
        "tpot": pytest.approx(0.2),
        "makespan": 8.0,
        "ttft_p50": 0.2,
        "ttft_p90": 0.4,
        "ttft_p99": 0.4,
        "e2e_p50": 2.0,
        "e2e_p90": 4.0,
        "e2e_p99": 4.0,
    }
    assert figures([0.1], [1.0], [8.0], 3, [], 4, start=6.0)["makespan"] == 2.0  # an offline batch from its resume
    iv = interval([1.0, 2.0, 3.0])
    assert iv["mean"] == 2.0 and iv["lo"] == pytest.approx(2.0 - 4.303 / 3**0.5) and iv["n"] == 3
    assert interval([5.0])["lo"] is None
