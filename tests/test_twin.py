"""The vLLM twin: vLLM's real scheduler on a virtual clock (sim/twin.py), its step-time model
(sim/step_time.py) and the trace formats (loadtest/traces.py)."""

from __future__ import annotations

import json

import numpy as np
import pytest

from loadtest.traces import load_trace
from sim.step_time import HARDWARE, ModelShape, RooflineStep, StepBatch, UniformRouting
from tests.servers import ROOT

MODELS = ROOT / "sim" / "models"


def test_trace_formats_and_malformed_rows(tmp_path):
    azure = tmp_path / "azure.csv"
    azure.write_text(
        "TIMESTAMP,ContextTokens,GeneratedTokens\n2023-11-16 18:15:47.5,20,4\n2023-11-16 18:15:46.5,10,3\n"
    )
    t = load_trace(azure)
    assert t.format == "azure" and list(t.arrival_s) == [0.0, 1.0] and list(t.prompt_tokens) == [10, 20]
    burst = tmp_path / "burst.csv"
    burst.write_text(
        "Timestamp,Model,Request tokens,Response tokens,Total tokens,Log Type\n"
        "5,ChatGPT,100,20,120,Conversation log\n7.5,GPT-4,50,0,50,API log\n"
    )
    t = load_trace(burst)
    assert t.format == "burstgpt" and list(t.arrival_s) == [0.0, 2.5] and list(t.output_tokens) == [20, 0]
    moon = tmp_path / "moon.jsonl"
    moon.write_text(
        '{"timestamp": 1000, "input_length": 700, "output_length": 5, "hash_ids": [1, 2]}\n'
        '{"timestamp": 0, "input_length": 600, "output_length": 9, "hash_ids": [1, 3]}\n'
    )
    t = load_trace(moon)
    assert t.format == "mooncake" and list(t.arrival_s) == [0.0, 1.0] and t.hash_ids == [[1, 3], [1, 2]]
    a, b = t.prompt_ids(0, vocab=1000), t.prompt_ids(1, vocab=1000)
    assert len(a) == 600 and len(b) == 700 and a[:512] == b[:512] and a[512:] != b[512:600]  # shared block 1
    plain = tmp_path / "plain.csv"
    plain.write_text("arrival_s,prompt_tokens,output_tokens\n0,5,2\n")
    assert load_trace(plain).format == "plain"
    for name, text, where in [
        ("b.csv", "Timestamp,Model,Request tokens,Response tokens,Total tokens,Log Type\n1,m,ten,1,1,x\n", "b.csv:2"),
        (
            "a.csv",
            "TIMESTAMP,ContextTokens,GeneratedTokens\n2023-11-16 18:15:47,1,2\n2023-11-16 18:15:48,1\n",
            "a.csv:3",
        ),
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
    assert step.seconds(StepBatch(8192, 8192, u.counts([("r", 0, 8192)]), True)) > 4 * step.seconds(
        StepBatch(8, 8000, spread)
    )


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
    return [
        TwinRequest(
            f"r{i}", float(t[i]), rng.integers(1, vocab, int(rng.integers(8, 200))).tolist(), int(rng.integers(1, 40))
        )
        for i in range(n)
    ]


def _tiny_workload(tiny_model, n: int, seed: int, **deployment):
    """``n`` Poisson requests at 300/s over the embedded model's vocabulary, and a small deployment."""
    from sim.twin import Deployment

    vocab = json.loads((tiny_model / "config.json").read_text())["vocab_size"]
    return _poisson(n, 300.0, vocab, seed=seed), Deployment(
        max_num_seqs=8, max_num_batched_tokens=128, num_blocks=300, max_model_len=2048, **deployment
    )


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
            assert twin.scheduler.caps.planner.stats.bypassed > 0


@pytest.mark.vllm
def test_stock_and_caps_with_fcfs_schedule_identically(vllm_twin, tiny_model):
    Scheduler, Deployment, Twin, TwinRequest, build = vllm_twin
    from caps_vllm.scheduler import CapsScheduler

    reqs, d = _tiny_workload(tiny_model, 200, seed=1)
    runs = [
        Twin(build(str(tiny_model), cls, d, caps=caps), _step_time).run(reqs)
        for cls, caps in ((Scheduler, None), (CapsScheduler, {"strategy": "fcfs", "min_batch_trigger": 2}))
    ]
    a, b = ([(s.tokens, s.admitted) for s in r.steps] for r in runs)
    assert a == b and len(a) > 100
    assert runs[0].finished_order == runs[1].finished_order


@pytest.mark.vllm
def test_preempted_requests_resume_from_the_waiting_queue_and_count_as_admitted(vllm_twin, tiny_model):
    """vLLM lists a resumed request among the cached ones, not the new: the twin's engagement
    figures must still see it leave the queue, or a step that only resumed preempted requests
    passes for one where new requests were left behind."""
    Scheduler, Deployment, Twin, TwinRequest, build = vllm_twin
    from sim.twin_run import summarize

    reqs, _ = _tiny_workload(tiny_model, 150, seed=2)
    d = Deployment(max_num_seqs=8, max_num_batched_tokens=128, num_blocks=40, max_model_len=2048)  # preempts
    res = Twin(build(str(tiny_model), Scheduler, d), _step_time).run(reqs)
    seen: set[str] = set()
    for st in res.steps:
        assert not set(st.resumed) & set(st.admitted)
        assert set(st.resumed) <= seen  # only a request admitted before can resume
        seen |= set(st.admitted)
    assert sum(map(len, (st.resumed for st in res.steps))) > 0
    e = summarize(res, 1.0)["engagement"]
    behind = [
        st
        for st in res.steps
        if (st.admitted or st.resumed)
        and st.waiting_before >= 2
        and len(st.admitted) + len(st.resumed) < st.waiting_before
    ]
    assert e["contested_steps"] + e["steps_only_preempted_resumed"] == len(behind)
    assert e["contested_steps"] == sum(bool(st.admitted) for st in behind)


@pytest.mark.vllm
def test_the_budget_read_from_the_requests_not_in_plain_decode_matches_a_full_pass(vllm_twin, tiny_model):
    """With many running, CAPS reads only the requests that joined recently or still prefill: the
    token budget it finds equals a pass over every running request, its KV estimate never exceeds
    that pass's, and the fast reading is what most contested steps used."""
    Scheduler, Deployment, Twin, TwinRequest, build = vllm_twin
    from caps_vllm.scheduler import CapsScheduler

    vocab = json.loads((tiny_model / "config.json").read_text())["vocab_size"]
    reqs = _poisson(600, 2000.0, vocab, seed=3)
    d = Deployment(max_num_seqs=160, max_num_batched_tokens=4096, num_blocks=3000, max_model_len=2048)
    sched = build(str(tiny_model), CapsScheduler, d, caps={"strategy": "step_cost"})
    seen = {"fast": 0, "walked": 0, "budget_left": 0, "wrong": 0}  # (CAPS would swallow an assert: counted)
    fast = sched.caps.capacity
    from caps_vllm import vllm_state

    def checked(free):
        cap, running = fast(free)
        walk, _ = vllm_state.capacity_walk(sched, free)
        if running is None:
            seen["fast"] += 1
            seen["wrong"] += not (
                cap.tokens == walk.tokens and cap.kv_tokens <= walk.kv_tokens and cap.slots == walk.slots
            )
            seen["budget_left"] += cap.tokens > 0
        else:
            seen["walked"] += 1
        return cap, running

    sched.caps.capacity = checked  # an instance attribute: reorder() calls it
    res = Twin(sched, _step_time).run(reqs)
    assert sorted(res.finished_order) == sorted(r.rid for r in reqs)
    assert seen["wrong"] == 0 and sched.caps.counters["errors"] == 0, seen
    assert seen["fast"] > 20 and seen["budget_left"] > 10 and max(st.running for st in res.steps) > 64, seen


@pytest.mark.vllm
@pytest.mark.parametrize("num_blocks", [3000, 700])  # the second preempts
def test_the_running_rows_follow_the_batch_by_its_changes(vllm_twin, tiny_model, num_blocks):
    """With many running, the running load's rows are kept by the batch's changes (joined,
    preempted, finished), not a pass over it: on every choosing step they hold exactly the
    running requests with their predicted vectors, and their sum is theirs; the changes alone
    give the running set also under preemption (where the budget estimate walks the batch)."""
    Scheduler, Deployment, Twin, TwinRequest, build = vllm_twin
    from caps_vllm.scheduler import CapsScheduler

    vocab = json.loads((tiny_model / "config.json").read_text())["vocab_size"]
    reqs = _poisson(500, 2000.0, vocab, seed=5)
    d = Deployment(max_num_seqs=160, max_num_batched_tokens=4096, num_blocks=num_blocks, max_model_len=2048)
    sched = build(str(tiny_model), CapsScheduler, d, caps={"strategy": "step_cost"})
    caps, shared = sched.caps, sched.caps.shared_load
    seen = {"event": 0, "wrong": 0}  # (CAPS would swallow an assert: counted)

    def checked(head, running):
        run = caps.running
        tracked = set(run.keys()) - set(sched.finished_req_ids)  # what the changes alone give
        load = shared(head, running)
        want = {r.request_id: caps.vector(r) for r in sched.running}
        seen["event"] += running is None
        seen["wrong"] += (
            tracked != set(want)
            or set(run.keys()) != set(want)
            or not all(np.allclose(run.vector(rid), 0.0 if v is None else v, atol=1e-6) for rid, v in want.items())
        )
        total = sum((v for v in want.values() if v is not None), np.zeros(run.d))
        seen["wrong"] += not np.allclose(run.shared(run.rows(), [], 0.0), total, atol=1e-4)
        return load

    caps.shared_load = checked
    res = Twin(sched, _step_time).run(reqs)
    assert sorted(res.finished_order) == sorted(r.rid for r in reqs)
    assert seen["wrong"] == 0 and caps.counters["errors"] == 0, seen
    assert caps.counters["running_load_syncs"] == 0, caps.counters
    if num_blocks < 3000:  # KV-bound: the budget estimate walks the batch on most choosing steps
        assert sum(map(len, (st.resumed for st in res.steps))) > 0  # preemption happened
    else:
        assert seen["event"] > 10, seen


@pytest.mark.vllm
def test_the_requests_tracked_for_the_budget_stay_bounded_when_no_queue_forms(vllm_twin, tiny_model):
    """Admitted requests are tracked until the budget estimate sees them decode; under a light
    load it never runs (nothing waits), and finished requests must not pile up there."""
    Scheduler, Deployment, Twin, TwinRequest, build = vllm_twin
    from caps_vllm.scheduler import CapsScheduler

    vocab = json.loads((tiny_model / "config.json").read_text())["vocab_size"]
    reqs = _poisson(300, 20.0, vocab, seed=4)  # one at a time: the queue never holds two
    d = Deployment(max_num_seqs=8, max_num_batched_tokens=512, num_blocks=3000, max_model_len=2048)
    sched = build(str(tiny_model), CapsScheduler, d, caps={"strategy": "step_cost"})
    res = Twin(sched, _step_time).run(reqs)
    assert len(res.finished_order) == len(reqs) and sched.caps.planner.stats.engaged == 0
    assert len(sched.caps.busy) <= 2 * d.max_num_seqs + 64


@pytest.mark.vllm
def test_async_schedulers_run_in_the_twin(vllm_twin, tiny_model):
    Scheduler, Deployment, Twin, TwinRequest, build = vllm_twin
    from vllm.v1.core.sched.async_scheduler import AsyncScheduler

    from caps_vllm.scheduler import CapsAsyncScheduler, CapsScheduler

    reqs, d = _tiny_workload(tiny_model, 150, seed=3)
    sync = Twin(build(str(tiny_model), Scheduler, d), _step_time).run(reqs)
    for cls, caps in ((AsyncScheduler, None), (CapsScheduler, {"strategy": "fcfs"})):
        sched = build(str(tiny_model), cls, d, caps=caps, async_scheduling=True)
        assert isinstance(sched, (AsyncScheduler, CapsAsyncScheduler))
        res = Twin(sched, _step_time).run(reqs)
        assert sorted(res.finished_order) == sorted(r.rid for r in reqs) and len(set(res.finished_order)) == len(reqs)
        assert all(len(res.served[r.rid].token_s) == r.output_tokens for r in reqs)
        assert [st.tokens for st in res.steps] == [st.tokens for st in sync.steps]


@pytest.mark.vllm
def test_the_step_log_records_every_step_and_request(vllm_twin, tiny_model, tmp_path):
    Scheduler, Deployment, Twin, TwinRequest, build = vllm_twin
    from caps_vllm.scheduler import CapsScheduler
    from caps_vllm.step_log import read

    reqs, d = _tiny_workload(tiny_model, 60, seed=2, enable_prefix_caching=False)
    sched = build(str(tiny_model), CapsScheduler, d, caps={"strategy": "fcfs", "step_log": str(tmp_path / "s.jsonl")})
    res = Twin(sched, _step_time).run(reqs)
    # An aborted request (its client went away) leaves no line and no entry behind.
    from vllm.v1.request import RequestStatus

    from sim.twin import make_request

    sched.add_request(make_request("gone", [1, 2, 3], 0.0))
    assert "gone" in sched.caps.step_log._reqs
    assert [r.request_id for r in sched.finish_requests("gone", RequestStatus.FINISHED_ABORTED)] == ["gone"]
    assert "gone" not in sched.caps.step_log._reqs
    sched.caps.step_log.close()
    steps, lines = read(tmp_path / "s.jsonl")
    assert [s["tokens"] for s in steps] == [s.tokens for s in res.steps]
    assert sum(s["prefill_tokens"] for s in steps) == sum(len(r.prompt) for r in reqs)  # no prefix cache
    assert sum(s["decode_reqs"] for s in steps) == sum(r.output_tokens - 1 for r in reqs)
    assert all(s["t"] <= s["end"] for s in steps) and not steps[-1]["busy"] and steps[0]["busy"]
    assert sorted(r["req"] for r in lines) == sorted(r.rid for r in reqs)
    assert all(r["added"] <= r["first"] <= r["done"] for r in lines)
    (tmp_path / "bad.jsonl").write_text('{"t": 1}\nnot json\n')
    with pytest.raises(ValueError, match=r"bad.jsonl:2"):
        read(tmp_path / "bad.jsonl")


def _fake_esft(path, rng, layers=4, experts=16, top_k=3):
    arrays = {}
    for d in ("alpha", "beta"):
        lens = rng.integers(20, 60, size=5)
        ids = np.stack(
            [np.stack([rng.choice(experts, top_k, replace=False) for _ in range(layers)]) for _ in range(lens.sum())]
        )
        arrays[f"{d}_experts"], arrays[f"{d}_seq_lens"] = ids.astype(np.uint8), lens
    np.savez(path, **arrays)


def test_routing_replay_counts_and_a_noisy_oracle_at_its_stated_recall(tmp_path):
    from sim.routing_replay import EsftReplay

    rng = np.random.default_rng(0)
    _fake_esft(tmp_path / "r.npz", rng)
    rep = EsftReplay(tmp_path / "r.npz", seed=1)
    assert (rep.domains, rep.layers, rep.experts, rep.top_k) == (["alpha", "beta"], 4, 16, 3)
    rep.bind("x", "alpha")
    rep.bind("y", "beta")
    seq = rep.bound["x"]
    counts = rep.counts([("x", 5, 10), ("y", 0, 3)])
    assert counts.shape == (4, 16) and counts.sum() == (10 + 3) * 4 * 3
    want = np.zeros((4, 16))
    for row in seq[5:15]:
        for layer, ex in enumerate(row):
            want[layer, ex] += 1
    for row in rep.bound["y"][:3]:
        for layer, ex in enumerate(row):
            want[layer, ex] += 1
    np.testing.assert_array_equal(counts, want)
    assert rep.rows("x", len(seq), 1).tolist() == seq[:1].tolist()  # positions wrap around
    true = rep.prompt_vector("x", len(seq))
    np.testing.assert_array_equal(true.reshape(4, 16), rep.counts([("x", 0, len(seq))]))
    with pytest.raises(ValueError, match="domain 'gamma'"):
        rep.bind("z", "gamma")
    with pytest.raises(ValueError, match="oracle recall"):
        rep.prompt_vector("x", 10, recall=0.1)
    # Per (token, layer): the share of its true experts the noisy rows keep.
    orig = rep.rows("x", 0, len(seq))
    kept = []
    for _ in range(200):
        noisy = orig.copy()
        g = np.random.default_rng(len(kept))
        redraw = g.random(noisy.shape[:2]) >= (0.6 - 3 / 16) / (1 - 3 / 16)
        noisy[redraw] = np.argsort(g.random((int(redraw.sum()), 16)), axis=1)[:, :3]
        kept.append(np.mean([len(set(a) & set(b)) / 3 for a, b in zip(orig.reshape(-1, 3), noisy.reshape(-1, 3))]))
    assert np.mean(kept) == pytest.approx(0.6, abs=0.02)


def test_the_static_bound_compares_one_domain_with_mixed_batches(tmp_path):
    from sim.routing_replay import EsftReplay

    # alpha routes to experts 0-1, beta to 2-3 (top-2 of 4), in every layer: a one-domain batch of
    # many tokens touches 2 experts a layer, a mixed one all 4.
    arrays = {}
    for d, ex in (("alpha", [0, 1]), ("beta", [2, 3])):
        arrays[f"{d}_experts"] = np.tile(np.array(ex, dtype=np.uint8), (30, 3, 1))
        arrays[f"{d}_seq_lens"] = np.array([10, 20])
    np.savez(tmp_path / "r.npz", **arrays)
    b = EsftReplay(tmp_path / "r.npz").static_bound(32, draws=20)
    assert (b["tokens"], b["one_domain"], b["mixed"], b["ratio"]) == (32, 2.0, 4.0, 0.5)


@pytest.mark.vllm
def test_caps_given_vectors_reorders_and_the_twin_counts_it(vllm_twin):
    Scheduler, Deployment, Twin, TwinRequest, build = vllm_twin
    from caps_vllm.scheduler import CapsScheduler
    from sim.twin import VectorSpace, with_vectors

    rng = np.random.default_rng(3)
    reqs = [
        TwinRequest(f"r{i}", 0.001 * i, rng.integers(1, 1000, 32).tolist(), 8, domain=str(i // 10 % 2))
        for i in range(120)
    ]
    # Two kinds of request on disjoint experts, arriving in runs of ten: FCFS admits one kind at
    # a time, a balancing strategy mixes them, so it must reach past the oldest.
    vec = {r.rid: np.eye(2)[int(r.domain)].repeat(8) * 32 for r in reqs}

    def give(r, req):
        req.caps_vector = vec[r.rid]

    d = Deployment(max_num_seqs=8, max_num_batched_tokens=512, num_blocks=1000, max_model_len=2048)
    model = str(MODELS / "qwen1.5-moe-a2.7b")
    stock = Twin(build(model, Scheduler, d), _step_time).run(reqs)
    cls = with_vectors(CapsScheduler, VectorSpace(2, 8, 1))
    caps = {"strategy": "greedy_dot_product", "metrics": False, "max_wait_ms": 60000, "min_batch_trigger": 2}
    twin = Twin(build(model, cls, d, caps=caps), _step_time, on_arrival=give)
    res = twin.run(reqs)
    assert sum(st.out_of_order for st in stock.steps) == 0  # FCFS never admits out of order
    assert sorted(res.finished_order) == sorted(r.rid for r in reqs)
    assert sum(st.out_of_order for st in res.steps) > 0 and any(st.planned for st in res.steps)
    assert twin.scheduler.caps.planner.stats.ranked > 0


class _Sched:
    """The few fields vLLM's DP front end reads of an engine (its own rule is under test)."""

    def __init__(self, waiting=0, running=0, kv=0.0):
        self.waiting, self.running = [0] * waiting, [0] * running
        self.kv_cache_manager = type("KV", (), {"usage": kv})()


class _Eng:
    def __init__(self, **kw):
        self.scheduler, self.inbox, self.in_flight = _Sched(**kw), [], 0


def test_least_loaded_dispatch_is_vllms_rule_on_hand_cases():
    from sim.cluster import LeastLoaded

    ll = LeastLoaded(snapshot_s=0)
    idle = [_Eng(), _Eng(), _Eng()]
    picks = []
    for _ in range(4):  # equal loads: the scan start rotates, so ties go round-robin
        i = ll.choose(None, idle)
        idle[i].in_flight += 1
        picks.append(i)
    assert picks == [0, 1, 2, 0]
    ll = LeastLoaded(snapshot_s=0)
    # score = max(in flight, waiting + running) + 6 x waiting x max(0, kv - 0.5) when waiting
    a, b, c = _Eng(running=3), _Eng(waiting=2, kv=0.9), _Eng(running=4)
    a.in_flight, b.in_flight, c.in_flight = 3, 2, 4  # scores 3, 2 + 4.8, 4
    assert ll.choose(None, [a, b, c]) == 0
    b.scheduler.kv_cache_manager.usage = 0.5  # no KV pressure: 2
    assert ll.choose(None, [a, b, c]) == 1
    # vLLM's snapshot: waiting/running as the coordinator last published them (every 100 ms),
    # plus the front end's own dispatches since; in flight is always current.
    at = lambda t: type("R", (), {"arrival_s": t})()  # noqa: E731
    ll = LeastLoaded(snapshot_s=0.1)
    a, b = _Eng(running=5), _Eng(running=1)
    a.in_flight, b.in_flight = 5, 1
    assert ll.choose(at(0.00), [a, b]) == 1  # 5 against 1
    a.scheduler.running, a.in_flight = [], 0  # a's requests finish at once
    assert ll.choose(at(0.05), [a, b]) == 1  # the snapshot still says 5 running there; b: 1 + 1 dispatched
    assert ll.choose(at(0.12), [a, b]) == 0  # next snapshot: a is idle


def test_expert_parallel_step_waits_for_the_slowest_rank():
    from sim.cluster import ExpertParallel

    shape = ModelShape.from_config(MODELS / "deepseek-v2-lite")
    model = RooflineStep(HARDWARE["h100"], shape)
    ep = ExpertParallel(model, shape, ranks=2, placement="linear")  # experts 0-31 on rank 0, 32-63 on rank 1
    layers = len(shape.moe_layers)
    one_rank = np.zeros((layers, 64))
    one_rank[:, :8] = 100.0
    both = np.zeros((layers, 64))
    both[:, :4] = both[:, 32:36] = 100.0
    half = [StepBatch(400, 4000, one_rank / 2), StepBatch(400, 4000, one_rank / 2)]  # 2 engines, same tokens
    t_one, imb_one = ep.seconds(half)
    t_both, imb_both = ep.seconds([StepBatch(400, 4000, both / 2), StepBatch(400, 4000, both / 2)])
    assert t_one > t_both and np.all(imb_one == 2.0) and np.all(imb_both == 1.0)
    per_rank = model.moe.expert_ms(one_rank)[:, :32].sum(axis=-1)  # rank 0 carries every token
    a2a = 2 * 800 * 6 * 2048 * 2 / (2 * 450e9)
    want = HARDWARE["h100"].fixed_s + model.dense_seconds(half[0]) + per_rank.sum() / 1e3 + layers * a2a
    assert t_one == pytest.approx(want)


@pytest.mark.vllm
@pytest.mark.parametrize("lockstep", [False, True])
def test_a_cluster_serves_every_request_once(vllm_twin, lockstep):
    Scheduler, Deployment, Twin, TwinRequest, build = vllm_twin
    from sim.cluster import Cluster, ExpertParallel, LeastLoaded
    from sim.step_time import VllmStepTime
    from sim.twin import Engine

    shape = ModelShape.from_config(MODELS / "deepseek-v2-lite")
    model = RooflineStep(HARDWARE["h100"], shape)
    timing = VllmStepTime(model, UniformRouting(shape))
    d = Deployment(max_num_seqs=8, max_num_batched_tokens=256, num_blocks=500, max_model_len=2048)
    engines = [Engine(build(str(MODELS / "deepseek-v2-lite"), Scheduler, d), name=str(k)) for k in range(3)]
    reqs = _poisson(150, 800.0, 1000, seed=2)
    ep = ExpertParallel(model, shape, ranks=3) if lockstep else None
    cluster = Cluster(
        engines,
        LeastLoaded(),
        lambda e, out: timing.batch(e.scheduler, out),
        price=None if lockstep else model.seconds,
        ep=ep,
    )
    cluster.run(reqs)
    done = [rid for e in engines for rid in e.finished]
    assert sorted(done) == sorted(r.rid for r in reqs) and len(set(done)) == len(reqs)
    assert all(e.in_flight == 0 for e in engines) and min(len(e.finished) for e in engines) > 20
    for e in engines:
        for rid in e.finished:
            s = e.served[rid]
            assert s.finished_s >= s.arrival_s and s.token_s == sorted(s.token_s)
    if lockstep:  # one clock: every engine's steps start at the same instants
        starts = [[st.start_s for st in e.steps] for e in engines]
        assert len(cluster.rank_imbalance) >= max(len(s) for s in starts)
        assert set(starts[0]) & set(starts[1])


@pytest.mark.vllm
def test_twin_run_writes_every_arm_and_refuses_a_mismatched_routing_file(tmp_path, vllm_twin, capsys):
    from sim import twin_run

    out = tmp_path / "tw"
    argv = [
        "--model",
        "qwen1.5-moe-a2.7b",
        "--requests",
        "40",
        "--rate",
        "50",
        "--output-tokens",
        "8",
        "--routing",
        "uniform",
        "--strategies",
        "stock",
        "fcfs",
        "--engines",
        "2",
        "--no-progress",
        "--out",
        str(out),
    ]
    assert twin_run.main(argv) == 0
    doc = json.loads((out / "results.json").read_text())
    stock, fcfs = doc["results"]["stock"], doc["results"]["fcfs"]
    assert stock["requests"] == fcfs["requests"] == 40 and sum(stock["per_engine_requests"]) == 40
    assert stock["ttft_s"] == fcfs["ttft_s"] and stock["steps"] == fcfs["steps"]  # same order, same schedule
    assert "roofline" in doc["note"] and doc["command"].startswith("python -m sim.twin_run")
    _fake_esft(tmp_path / "r.npz", np.random.default_rng(0))
    capsys.readouterr()
    with pytest.raises(SystemExit):
        twin_run.main(["--routing", str(tmp_path / "r.npz"), "--out", str(out)])
    assert (
        "--routing has 4 layers x 16 experts, top-3; --model deepseek-v2-lite has 26 x 64, top-6"
        in capsys.readouterr().err
    )
    with pytest.raises(SystemExit):
        twin_run.main(["--strategies", "fastest", "--out", str(out)])
    assert "unknown arm 'fastest'" in capsys.readouterr().err


@pytest.mark.vllm
@pytest.mark.parametrize("policy", ["expert_affinity", "expert_affinity_oracle"])
def test_expert_affinity_dispatch_serves_every_request_once(tmp_path, vllm_twin, policy):
    from sim import twin_run

    _fake_esft(tmp_path / "r.npz", np.random.default_rng(0), layers=26, experts=64, top_k=6)
    out = tmp_path / policy
    assert (
        twin_run.main(
            [
                "--model",
                "deepseek-v2-lite",
                "--requests",
                "60",
                "--rate",
                "200",
                "--output-tokens",
                "8",
                "--routing",
                str(tmp_path / "r.npz"),
                "--strategies",
                "stock",
                "--engines",
                "2",
                "--dispatch",
                policy,
                "--affinity-margin",
                "3",
                "--no-progress",
                "--out",
                str(out),
            ]
        )
        == 0
    )
    r = json.loads((out / "results.json").read_text())["results"]["stock"]
    assert r["requests"] == 60 and sum(r["per_engine_requests"]) == 60
    assert "dispatch_load_guard_overrides" in r
    with pytest.raises(SystemExit):
        twin_run.main(["--routing", "uniform", "--dispatch", policy, "--requests", "10", "--out", str(out)])


def test_capacity_bisects_to_the_highest_rate_that_meets_the_slo():
    from sim.twin_run import capacity

    def at(rate):  # a server whose P99 TTFT crosses 1 s at 37 req/s
        return {"ttft_s": {"p99": rate / 37.0}, "itl_s": {"p99": 0.01}}

    c = capacity(at, slo_ttft=1.0, slo_itl=0.1, start=10.0, rel_tol=0.01)
    assert c["capacity_rps"] <= 37.0 < c["first_failing_rps"] and c["first_failing_rps"] / c["capacity_rps"] <= 1.01
    assert [p["rate"] for p in c["probes"][:3]] == [10.0, 20.0, 40.0]
    never = capacity(lambda r: {"ttft_s": {"p99": 9.0}, "itl_s": {"p99": 0.01}}, 1.0, 0.1, 10.0)
    assert never["capacity_rps"] == 0.0 and len(never["probes"]) == 14


def test_synthetic_routing_is_fitted_to_the_stated_skew():
    from sim.routing_replay import SkewedRouting

    r = SkewedRouting(layers=4, experts=128, top_k=8, domains=["a", "b", "c", "d"], target=0.87, mid_tokens=32)
    assert r.distinct_ratio(r.profile, 32) == pytest.approx(0.87, abs=0.01)
    assert r.distinct_ratio(r.profile, 512) > r.distinct_ratio(r.profile, 32)  # saturates towards uniform
    r.bind("x", "a")
    r.bind("y", "b")
    c = r.counts([("x", 0, 10), ("y", 0, 6)])
    assert c.shape == (4, 128) and c.sum() == pytest.approx(16 * 8 * 4)
    np.testing.assert_allclose(r.prompt_vector("x", 10).reshape(4, 128), r.counts([("x", 0, 10)]))
    with pytest.raises(ValueError, match="domain 'z'"):
        r.bind("q", "z")


def test_the_study_report_gathers_parts_written_by_separate_processes(tmp_path):
    from sim.twin_study import collect, report

    arm = {
        "itl_p50_ms": 10.0,
        "itl_p99_ms": 20.0,
        "ttft_p99_s": 1.0,
        "decode_distinct_experts": 60.0,
        "ep_rank_max_over_mean": None,
        "share_reordered": 0.0,
        "scheduler_share_of_simulated": 0.3,
        "per_engine_requests": [10],
        "ttft_max_s": 2.0,
        "contested_steps": 10,
        "share_contested_planned": 0.95,
        "scheduler_wall_s": 3.0,
        "simulated_s": 10.0,
        "itl_mean_ms": 12.0,
    }
    bound = {"tokens": 32, "one_domain": 50.0, "mixed": 55.0, "ratio": 50 / 55}
    parts = tmp_path / "parts"
    parts.mkdir()
    for part, name, entry, command in (
        (
            "admission",
            "one-engine-bursty",
            {
                "capacity_rps": 250.0,
                "loads": {
                    "1.0": {
                        "arms": {
                            "stock": arm,
                            "step_cost": {**arm, "itl_p50_ms": 9.0, "caps_share_of_simulated": 0.0123},
                            "step_cost_oracle_headroom": {**arm, "itl_p50_ms": 8.0, "itl_mean_ms": 9.6},
                        },
                        "static_bound": bound,
                    }
                },
            },
            "A",
        ),
        (
            "admission",
            "dp8-ep8-bursty",
            {
                "capacity_rps": 1200.0,
                "loads": {
                    "0.5": {
                        "arms": {
                            "stock": arm,
                            "step_cost": {**arm, "ttft_p99_s": 1.05, "share_contested_planned": 0.5},
                        },
                        "static_bound": None,
                    }
                },
            },
            "B",
        ),
        (
            "dispatch",
            "4-replicas-poisson",
            {
                "capacity_rps": 1000.0,
                "loads": {
                    "0.3": {
                        "arms": {
                            "least_loaded": arm,
                            "domain_oracle": {**arm, "itl_p50_ms": 9.5},
                            "expert_affinity_oracle": {**arm, "itl_mean_ms": 11.4},
                            "expert_affinity": {**arm, "itl_mean_ms": 11.76},
                        },
                        "static_bound": bound,
                    }
                },
            },
            "A",
        ),
    ):
        (parts / f"{part}--{name}.json").write_text(json.dumps({**entry, "study_command": command, "wall_s": 60.0}))
    study = collect(tmp_path)
    assert list(study["admission"]) == ["one-engine-bursty", "dp8-ep8-bursty"] and study["commands"] == ["A", "B"]
    text = report(study)
    assert (
        "| one-engine-bursty | 250 | 1.0× | 10 / 20 | 1 / 2 | 60 | – | step_cost | -10.0% | +0.0% | +0.0% | "
        "+0.0% | 0.95 of 10 | 0 | 1.23% | -9.1% at 32 |" in text
    )
    assert "| one-engine-bursty | 1.0× | +20.0% | +0.0% | 0% | no | yes | – |" in text  # the goals: TPOT = mean ITL
    assert "| dp8-ep8-bursty | 0.5× | – | +0.0% | – | TTFT p99 +5.0% | NO (50%) | – |" in text
    assert "| 4-replicas-poisson | 1000 | 0.3× | domain_oracle | 1 | 9.5 (-5.0%) |" in text
    assert "| 4-replicas-poisson | 0.3× | +5.0% | +2.0% | 40% | +0.0% / +0.0% |" in text
    assert "(3 min of runs here)" in text


@pytest.mark.vllm
def test_expert_parallel_engines_tell_caps_their_layout(vllm_twin):
    Scheduler, Deployment, Twin, TwinRequest, build = vllm_twin
    from caps_vllm.scheduler import CapsScheduler
    from sim.twin import VectorSpace, with_vectors

    cls = with_vectors(CapsScheduler, VectorSpace(26, 64, 6))
    d = Deployment(max_num_seqs=8, max_num_batched_tokens=256, num_blocks=100)
    ep = build(
        str(MODELS / "deepseek-v2-lite"),
        cls,
        d,
        caps={"strategy": "step_cost"},
        parallel={
            "data_parallel_size": 4,
            "data_parallel_rank": 2,
            "enable_expert_parallel": True,
            "expert_placement_strategy": "round_robin",
        },
    )
    assert ep.caps._deployment(ep.vllm_config) == {"experts": 64, "ranks": 4, "placement": "round_robin"}
    one = build(str(MODELS / "deepseek-v2-lite"), cls, d, caps={"strategy": "step_cost"})
    assert one.caps._deployment(one.vllm_config)["ranks"] == 1


@pytest.mark.vllm
def test_an_mla_model_keeps_the_deployments_budgets_in_the_twin(vllm_twin):
    """vLLM's CPU platform turns chunked prefill and prefix caching off for MLA models and raises
    the token budget to the model length; the twin of a GPU deployment must not inherit that."""
    Scheduler, Deployment, Twin, TwinRequest, build = vllm_twin
    d = Deployment(
        max_num_seqs=256, max_num_batched_tokens=2048, num_blocks=1000, max_model_len=8192, enable_prefix_caching=True
    )
    s = build(str(MODELS / "deepseek-v2-lite"), Scheduler, d)
    assert s.scheduler_config.enable_chunked_prefill and s.cache_config.enable_prefix_caching
    assert s.max_num_scheduled_tokens == 2048 and s.max_num_running_reqs == 256
