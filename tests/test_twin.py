"""The vLLM twin: vLLM's real scheduler on a virtual clock (sim/twin.py), its step-time model
(sim/step_time.py) and the trace formats (sim/traces.py)."""

from __future__ import annotations

import json

import numpy as np
import pytest

from sim.step_time import HARDWARE, ModelShape, RooflineStep, StepBatch, UniformRouting
from sim.traces import load_trace
from tests.servers import ROOT

MODELS = ROOT / "sim" / "models"


def test_trace_formats_and_malformed_rows(tmp_path):
    azure = tmp_path / "azure.csv"
    azure.write_text("TIMESTAMP,ContextTokens,GeneratedTokens\n2023-11-16 18:15:47.5,20,4\n2023-11-16 18:15:46.5,10,3\n")
    t = load_trace(azure)
    assert t.format == "azure" and list(t.arrival_s) == [0.0, 1.0] and list(t.prompt_tokens) == [10, 20]
    burst = tmp_path / "burst.csv"
    burst.write_text("Timestamp,Model,Request tokens,Response tokens,Total tokens,Log Type\n"
                     "5,ChatGPT,100,20,120,Conversation log\n7.5,GPT-4,50,0,50,API log\n")
    t = load_trace(burst)
    assert t.format == "burstgpt" and list(t.arrival_s) == [0.0, 2.5] and list(t.output_tokens) == [20, 0]
    moon = tmp_path / "moon.jsonl"
    moon.write_text('{"timestamp": 1000, "input_length": 700, "output_length": 5, "hash_ids": [1, 2]}\n'
                    '{"timestamp": 0, "input_length": 600, "output_length": 9, "hash_ids": [1, 3]}\n')
    t = load_trace(moon)
    assert t.format == "mooncake" and list(t.arrival_s) == [0.0, 1.0] and t.hash_ids == [[1, 3], [1, 2]]
    a, b = t.prompt_ids(0, vocab=1000), t.prompt_ids(1, vocab=1000)
    assert len(a) == 600 and len(b) == 700 and a[:512] == b[:512] and a[512:] != b[512:600]  # shared block 1
    plain = tmp_path / "plain.csv"
    plain.write_text("arrival_s,prompt_tokens,output_tokens\n0,5,2\n")
    assert load_trace(plain).format == "plain"
    for name, text, where in [
        ("b.csv", "Timestamp,Model,Request tokens,Response tokens,Total tokens,Log Type\n1,m,ten,1,1,x\n", "b.csv:2"),
        ("a.csv", "TIMESTAMP,ContextTokens,GeneratedTokens\n2023-11-16 18:15:47,1,2\n2023-11-16 18:15:48,1\n",
         "a.csv:3"),
        ("m.jsonl", '{"timestamp": 0, "input_length": 5, "output_length": 1}\n{"timestamp": 1}\n', "m.jsonl:2"),
        ("h.jsonl", '{"timestamp": 0, "input_length": 5, "output_length": 1, "hash_ids": ["x"]}\n', "h.jsonl:1"),
        ("x.csv", "when,what\n", "x.csv:1"),
    ]:
        (tmp_path / name).write_text(text)
        with pytest.raises(ValueError, match=where.replace(".", r"\.")):
            load_trace(tmp_path / name)


def test_model_shapes_from_their_configs():
    q = ModelShape.from_config(MODELS / "qwen1.5-moe-a2.7b")
    assert (len(q.moe_layers), q.experts, q.top_k) == (24, 60, 4)
    assert q.kv_bytes_per_token == 2 * 24 * 16 * 128 * 2
    d = ModelShape.from_config(MODELS / "deepseek-v2-lite")
    assert (len(d.moe_layers), d.experts, d.top_k, d.moe_layers[0]) == (26, 64, 6, 1)  # layer 0 is dense
    assert d.kv_bytes_per_token == (512 + 64) * 27 * 2  # MLA latent + rope key
    q3 = ModelShape.from_config(MODELS / "qwen3-30b-a3b")
    assert (len(q3.moe_layers), q3.experts, q3.top_k) == (48, 128, 8)


def test_roofline_decode_pays_for_distinct_experts_and_prefill_for_tokens():
    shape = ModelShape.from_config(MODELS / "deepseek-v2-lite")
    step = RooflineStep(HARDWARE["h100"], shape)
    layers = len(shape.moe_layers)
    one_domain = np.zeros((layers, shape.experts))
    one_domain[:, :12] = 8 * 6 / 12  # 8 tokens on 12 experts per layer
    spread = np.zeros((layers, shape.experts))
    spread[:, :48] = 8 * 6 / 48
    t_one = step.seconds(StepBatch(8, 8000, one_domain))
    t_spread = step.seconds(StepBatch(8, 8000, spread))
    assert t_spread > t_one  # memory-bound decode: every touched expert's weights are read
    # 8192 prefill tokens touch every expert either way: the arithmetic sets the time.
    u = UniformRouting(shape)
    assert step.seconds(StepBatch(8192, 8192, u.counts(8192), True)) > 4 * step.seconds(StepBatch(8, 8000, spread))


@pytest.fixture(scope="module")
def vllm_twin():
    pytest.importorskip("vllm")
    from vllm.v1.core.sched.scheduler import Scheduler

    from sim.twin import Deployment, Twin, TwinRequest, build_scheduler

    return Scheduler, Deployment, Twin, TwinRequest, build_scheduler


@pytest.mark.vllm
def test_the_clock_on_a_hand_computed_case(vllm_twin):
    Scheduler, Deployment, Twin, TwinRequest, build = vllm_twin
    d = Deployment(max_num_seqs=4, max_num_batched_tokens=4, num_blocks=100, enable_prefix_caching=False)
    twin = Twin(build(str(MODELS / "qwen1.5-moe-a2.7b"), Scheduler, d), lambda sched, out: 1.0)
    res = twin.run([TwinRequest("a", 0.0, list(range(1, 11)), 3), TwinRequest("b", 2.5, list(range(20, 25)), 2)])
    a, b = res.served["a"], res.served["b"]
    # a: prefill of 10 tokens in chunks of 4, 4, 2 (steps ending at 1, 2, 3; the last one samples
    # its first token), then two decode steps.
    assert a.admitted_s == 0.0 and a.token_s == [3.0, 4.0, 5.0] and a.finished_s == 5.0
    assert (a.ttft_s, a.e2e_s, a.itl_s) == (3.0, 5.0, [1.0, 1.0])
    # b arrives at 2.5 and joins at the next step boundary (3.0): 3 of its 5 prompt tokens beside
    # a's decode token, then 2 more, then one decode step.
    assert b.admitted_s == 3.0 and b.token_s == [5.0, 6.0] and b.finished_s == 6.0
    assert [s.tokens for s in res.steps] == [4, 4, 2, 4, 3, 1] and res.simulated_seconds == 6.0
    assert res.finished_order == ["a", "b"]


def _poisson(n: int, rate: float, vocab: int, seed: int = 0):
    from sim.twin import TwinRequest

    rng = np.random.default_rng(seed)
    t = np.cumsum(rng.exponential(1 / rate, n))
    return [TwinRequest(f"r{i}", float(t[i]), rng.integers(1, vocab, int(rng.integers(8, 200))).tolist(),
                        int(rng.integers(1, 40))) for i in range(n)]


def _step_time(sched, out):
    return 0.002 + 1e-5 * sum(out.num_scheduled_tokens.values())


@pytest.mark.vllm
def test_every_request_completes_once_within_vllms_budgets(vllm_twin, tiny_model):
    Scheduler, Deployment, Twin, TwinRequest, build = vllm_twin
    from caps_vllm.scheduler import CapsScheduler

    vocab = json.loads((tiny_model / "config.json").read_text())["vocab_size"]
    reqs = _poisson(300, 400.0, vocab)
    d = Deployment(max_num_seqs=16, max_num_batched_tokens=256, num_blocks=400, max_model_len=2048)
    for cls, caps in ((Scheduler, None), (CapsScheduler, {"strategy": "step_cost", "max_wait_ms": 50})):
        twin = Twin(build(str(tiny_model), cls, d, caps=caps), _step_time)
        res = twin.run(reqs)
        assert sorted(res.finished_order) == sorted(r.rid for r in reqs)  # each exactly once
        assert len(set(res.finished_order)) == len(reqs)
        for r in reqs:
            s = res.served[r.rid]
            assert len(s.token_s) == r.output_tokens and s.admitted_s >= r.arrival_s and s.finished_s == s.token_s[-1]
        for st in res.steps:
            assert st.tokens <= d.max_num_batched_tokens and st.running <= d.max_num_seqs
        if cls is CapsScheduler:
            # The max-wait bound is measured on the virtual clock: waits of more than 50 ms occur.
            assert twin.scheduler.caps_planner.stats.bypassed > 0


@pytest.mark.vllm
def test_stock_and_caps_with_fcfs_schedule_identically(vllm_twin, tiny_model):
    Scheduler, Deployment, Twin, TwinRequest, build = vllm_twin
    from caps_vllm.scheduler import CapsScheduler

    vocab = json.loads((tiny_model / "config.json").read_text())["vocab_size"]
    reqs = _poisson(200, 300.0, vocab, seed=1)
    d = Deployment(max_num_seqs=8, max_num_batched_tokens=128, num_blocks=300, max_model_len=2048)
    runs = [Twin(build(str(tiny_model), cls, d, caps=caps), _step_time).run(reqs)
            for cls, caps in ((Scheduler, None), (CapsScheduler, {"strategy": "fcfs", "min_batch_trigger": 2}))]
    a, b = ([(s.tokens, s.admitted) for s in r.steps] for r in runs)
    assert a == b and len(a) > 100
    assert runs[0].finished_order == runs[1].finished_order
