"""CAPS inside vLLM's scheduler, built without a model runner: order, budgets, fallbacks."""

from __future__ import annotations

import numpy as np
import pytest

pytest.importorskip("vllm")
pytestmark = pytest.mark.vllm

from vllm.v1.core.sched.async_scheduler import AsyncScheduler  # noqa: E402
from vllm.v1.core.sched.scheduler import Scheduler  # noqa: E402

from caps_vllm.scheduler import CapsAsyncScheduler, CapsScheduler  # noqa: E402
from tests.vllm_helpers import make_request, make_scheduler, step  # noqa: E402

CAPS = {"min_batch_trigger": 2, "max_wait_ms": None, "strategy": "greedy_dot_product"}


def fill(sched, specs, t0=1000.0):
    for i, (rid, toks) in enumerate(specs):
        sched.add_request(make_request(rid, toks, arrival=t0 + i))


def admitted(out):
    return [r.req_id for r in out.scheduled_new_reqs]


def test_caps_admits_complements_of_the_running_load(model, tokens):
    hot, cold = tokens
    results = {}
    for name, cls in (("fcfs", Scheduler), ("caps", CapsScheduler)):
        s = make_scheduler(model, cls, caps=CAPS, max_num_seqs=3)
        fill(s, [("run", [hot] * 8)])
        step(s)  # the hot request is now running
        fill(s, [("hot1", [hot] * 8), ("hot2", [hot] * 8), ("c1", [cold[0]] * 8), ("c2", [cold[1]] * 8)], t0=2000.0)
        results[name] = admitted(step(s))
    assert results["fcfs"] == ["hot1", "hot2"]
    assert sorted(results["caps"]) == ["c1", "c2"]  # the complements, not the hot ones (nobody pinned first)


def test_the_token_budget_engages_caps_at_vllms_default_slots(model, tokens):
    """Plenty of sequence slots, a token budget that fits one prompt a step: CAPS still chooses."""
    hot, cold = tokens
    s = make_scheduler(model, CapsScheduler, caps=CAPS, max_num_seqs=40, max_num_batched_tokens=40)
    fill(s, [("run", [hot] * 30)])
    step(s)
    fill(s, [("hot1", [hot] * 30), ("hot2", [hot] * 30), ("c1", [cold[0]] * 30), ("c2", [cold[1]] * 30)], t0=2000.0)
    out = step(s)
    assert admitted(out)[0] in ("c1", "c2")  # one admission this step (plus a chunk): a complement
    assert s.caps.planner.stats.engaged >= 1 and s.caps.planner.stats.reordered >= 1


@pytest.mark.parametrize("ahead", [False, True])
def test_budgets_and_no_request_lost(model, tokens, ahead):
    """Random arrivals under tight token and sequence budgets: vLLM's budgets hold, every
    request finishes exactly once, and the same set of requests finishes as with FCFS. Planning
    ahead, the worker plans while the "model runs", and now and then a waiting request is
    aborted then (as vLLM does before update_from_output), so some plans meet a changed queue."""
    from vllm.v1.request import RequestStatus

    hot, cold = tokens
    rng = np.random.default_rng(0)
    caps = {**CAPS, "plan_ahead": ahead}
    s = make_scheduler(model, CapsScheduler, caps=caps, max_num_seqs=4, max_num_batched_tokens=64, num_blocks=60)
    ids = []
    finished = []

    def forward(out, mro):
        if ahead:
            s.caps.worker.idle(5)
            if s.waiting and rng.random() < 0.1:
                rid = s.waiting[0].request_id
                s.finish_requests([rid], RequestStatus.FINISHED_ABORTED)
                finished.append(rid)

    for t in range(400):
        for k in range(int(rng.poisson(1.5)) if t < 60 else 0):
            rid = f"r{t}-{k}"
            ids.append(rid)
            tok = hot if rng.random() < 0.5 else cold[int(rng.integers(len(cold)))]
            s.add_request(
                make_request(
                    rid, [int(tok)] * int(rng.integers(4, 40)), arrival=1000.0 + t, max_tokens=int(rng.integers(1, 6))
                )
            )
        out = step(s, finished=finished, worker=forward)
        assert out.total_num_scheduled_tokens <= 64
        assert len(s.running) <= 4
        if t >= 60 and not s.requests:
            break
    assert sorted(finished) == sorted(ids) and len(set(finished)) == len(finished)
    assert s.caps.planner.stats.plans > 0 and s.caps.counters["errors"] == 0
    if ahead:
        assert s.caps.counters["plans_applied"] > 0 and s.caps.counters["plans_dropped"] > 0


def test_max_wait_admits_old_requests_ahead(model, tokens):
    hot, cold = tokens
    s = make_scheduler(
        model,
        CapsScheduler,
        caps={"min_batch_trigger": 2, "max_wait_ms": 50, "strategy": "greedy_dot_product"},
        max_num_seqs=3,
    )
    fill(s, [("run", [hot] * 8)], t0=0.0)
    step(s)
    # hot2 has waited for ages (arrival 1.0 s after the epoch), the complement is fresh.
    import time

    now = time.time()
    s.add_request(make_request("hot1", [hot] * 8, arrival=1.0))
    s.add_request(make_request("hot2", [hot] * 8, arrival=2.0))
    s.add_request(make_request("c1", [cold[0]] * 8, arrival=now))
    assert admitted(step(s)) == ["hot1", "hot2"]
    assert s.caps.planner.stats.bypassed >= 1


def test_priority_keeps_its_meaning(model, tokens):
    hot, cold = tokens
    s = make_scheduler(model, CapsScheduler, caps=CAPS, max_num_seqs=2, policy="priority")
    s.add_request(make_request("low-c", [cold[0]] * 8, arrival=1.0, priority=5))
    s.add_request(make_request("hi1", [hot] * 8, arrival=2.0, priority=0))
    s.add_request(make_request("hi2", [hot] * 8, arrival=3.0, priority=0))
    s.add_request(make_request("low-c2", [cold[1]] * 8, arrival=0.5, priority=5))
    assert admitted(step(s)) == ["hi1", "hi2"]


def test_requests_without_predictable_tokens_are_served_in_fcfs_place(model, tokens):
    import torch

    hot, _ = tokens
    s = make_scheduler(model, CapsScheduler, caps=CAPS, max_num_seqs=2)
    s.add_request(make_request("emb", None, arrival=1.0, prompt_embeds=torch.zeros(6, 128)))
    s.add_request(make_request("unknown", [5000, 6000], arrival=2.0))
    s.add_request(make_request("ok", [hot] * 4, arrival=3.0))
    out = step(s)
    assert admitted(out) == ["emb", "unknown"]
    assert s.caps.counters["predictor_fallback"] == 2
    assert s.caps.predictor.unknown_tokens == 2


def test_a_failing_policy_never_stops_the_engine(model, tokens, monkeypatch):
    hot, cold = tokens
    s = make_scheduler(model, CapsScheduler, caps={"min_batch_trigger": 1}, max_num_seqs=2)
    monkeypatch.setattr(s.caps.planner, "plan", lambda *a, **k: 1 / 0)
    fill(s, [("a", [hot] * 4), ("c", [hot] * 4), ("b", [cold[0]] * 4)])
    assert admitted(step(s)) == ["a", "c"]  # FCFS for that step
    assert s.caps.counters["errors"] == 1
    finished: list[str] = []
    for _ in range(20):
        step(s, finished=finished)
    assert sorted(finished) == ["a", "b", "c"]  # and the engine keeps serving


def test_invalid_configuration_stops_startup(model):
    with pytest.raises(ValueError, match=r"caps\.window_size.*\[1, 4096\]"):
        make_scheduler(model, CapsScheduler, caps={"window_size": 0})
    with pytest.raises(ValueError, match="valid: fcfs"):
        make_scheduler(model, CapsScheduler, caps={"strategy": "fastest"})


def test_async_engines_get_the_async_class(model):
    s = make_scheduler(model, CapsScheduler, caps=CAPS, async_scheduling=True)
    assert isinstance(s, CapsAsyncScheduler) and isinstance(s, AsyncScheduler)
    sync = make_scheduler(model, CapsScheduler, caps=CAPS)
    assert type(sync) is CapsScheduler and not isinstance(sync, AsyncScheduler)


def test_model_without_moe_layers_falls_back_to_fcfs(tmp_path, caplog):
    import torch
    import transformers

    cfg = transformers.Qwen2Config(
        vocab_size=64,
        hidden_size=32,
        intermediate_size=64,
        num_hidden_layers=1,
        num_attention_heads=2,
        num_key_value_heads=1,
        max_position_embeddings=4096,
    )
    torch.manual_seed(0)
    transformers.Qwen2ForCausalLM(cfg).save_pretrained(tmp_path)
    s = make_scheduler(str(tmp_path), CapsScheduler, caps=CAPS)
    assert s.caps.predictor is None
    fill(s, [("a", [1] * 4), ("b", [2] * 4)])
    assert admitted(step(s)) == ["a", "b"]


def test_missing_router_tensors_fall_back_to_fcfs(tiny_model, tmp_path):
    import shutil

    from safetensors.torch import load_file, save_file

    copy = tmp_path / "broken"
    shutil.copytree(tiny_model, copy)
    w = load_file(copy / "model.safetensors")
    del w["model.layers.1.mlp.gate.weight"]
    save_file(w, copy / "model.safetensors")
    s = make_scheduler(str(copy), CapsScheduler, caps=CAPS)
    assert s.caps.predictor is None


def test_multimodal_placeholders_are_not_predicted(model, tokens):
    """Placeholder positions stand for image features, not for those token ids' routing."""
    from vllm.multimodal.inputs import MultiModalFeatureSpec, MultiModalKwargsItem, PlaceholderRange

    hot, cold = tokens
    s = make_scheduler(model, CapsScheduler, caps=CAPS)
    req = make_request("mm", [cold[0]] * 3 + [hot] * 5, arrival=1.0)
    req.mm_features = [
        MultiModalFeatureSpec(
            data=MultiModalKwargsItem.dummy(),
            modality="image",
            identifier="img0",
            mm_position=PlaceholderRange(offset=3, length=5),
        )
    ]
    plain = make_request("plain", [cold[0]] * 3, arrival=2.0)
    np.testing.assert_allclose(s.caps.vector(req), s.caps.vector(plain))


def _routed_rows(pred, ids) -> np.ndarray:
    """[tokens, layers, top_k] as the gating-only router would route these tokens."""
    offsets = (np.arange(pred.layers) * pred.num_experts)[None, :, None]
    return pred._bins[np.asarray(ids)].reshape(len(ids), pred.layers, pred.top_k) - offsets


def _metric(name: str, model: str) -> float:
    from prometheus_client import REGISTRY

    return sum(
        s.value
        for fam in REGISTRY.collect()
        for s in fam.samples
        if s.name == name and s.labels.get("model_name") == model
    )


@pytest.mark.parametrize("ahead", [False, True], ids=["in-schedule", "plan-ahead"])
@pytest.mark.parametrize("path", ["capture", "routed_experts_rows"])
def test_routing_feedback_reaches_the_metrics(tiny_model, tokens, tmp_path, path, ahead):
    """What the workers send back (our capture, or vLLM's routed-experts rows on GPUs) is
    counted per step, and a prediction equal to the routing scores cosine 1; planning ahead,
    the same figures come from CAPS's worker thread (handed the routing after each step)."""
    from vllm.distributed.aux_output_connector.connector import AuxRequestOutput

    from caps_vllm.routing import RoutingRecord, counts_from_rows

    model = str(tmp_path / f"m-{path}")  # its own model_name label
    import shutil

    shutil.copytree(tiny_model, model)
    sched = make_scheduler(model, CapsScheduler, caps={**CAPS, "plan_ahead": ahead}, max_num_batched_tokens=16)
    pred = sched.caps.predictor
    hot, disjoint = tokens
    fill(sched, [("a", [hot] * 12), ("b", disjoint[:20]), ("c", disjoint[20:30])])

    def worker(out, mro):
        if ahead:
            sched.caps.worker.idle(5)  # it works while the model runs
        per_req, total = {}, []
        for rid, n in out.num_scheduled_tokens.items():
            r = sched.requests[rid]
            start = r.num_computed_tokens - n  # schedule() already advanced it
            ids = list(r.all_token_ids)[start : start + n]
            rows = _routed_rows(pred, [t if t < pred.vocab else 0 for t in ids])
            total.append(rows)
            per_req[rid] = (start, rows)
        if not total:
            return  # nothing ran
        if path == "capture":
            rows = np.concatenate(total)
            rec = RoutingRecord(pred.moe_layers, counts_from_rows(rows, pred.num_experts), len(rows))
            for rid, (start, rows) in per_req.items():
                k = max(0, min(len(rows), sched.requests[rid].num_prompt_tokens - start))
                if k:
                    rec.prompt_counts[rid] = counts_from_rows(rows[:k], pred.num_experts)
                    rec.prompt_start[rid] = start
            mro.caps_routing = rec
        else:
            mro.aux_output_connector_output = {
                rid: AuxRequestOutput(start, rows.astype(np.uint8)) for rid, (start, rows) in per_req.items()
            }

    done: list[str] = []
    for _ in range(30):
        if sched.has_requests():
            step(sched, finished=done, worker=worker)
    if ahead:
        assert sched.caps.worker.idle(5)
    assert sorted(done) == ["a", "b", "c"]
    assert _metric("vllm:caps_predictor_cosine_count", model) == 3
    assert _metric("vllm:caps_predictor_cosine_sum", model) == pytest.approx(3.0)
    assert _metric("vllm:caps_predictor_topk_overlap_sum", model) == pytest.approx(3.0)
    assert (
        _metric("vllm:caps_routed_tokens_total", model)
        == _metric("vllm:caps_scheduled_tokens_total", model)
        == 12 + 20 + 10 + 3 * 3
    )  # prompts, then 3 of each 4 output tokens are fed back
    assert _metric("vllm:caps_admitted_requests_total", model) == 3
    assert _metric("vllm:caps_actual_load_cv_count", model) == _metric("vllm:caps_steps_total", model)
    assert sched.caps.counters["errors"] == 0


def test_step_cost_batches_requests_on_the_experts_already_read(model, tokens):
    """On one device (the shipped CPU fit, memory bound at this size) step_cost admits the
    request routed like the running one, where greedy_dot_product admits a complement."""
    hot, cold = tokens
    s = make_scheduler(model, CapsScheduler, caps={**CAPS, "strategy": "step_cost"}, max_num_seqs=3)
    assert s.caps.planner.strategy.experts == s.caps.predictor.num_experts
    assert s.caps.planner.strategy.placement is None
    fill(s, [("run", [hot] * 8)])
    step(s)
    fill(s, [("hot1", [hot] * 8), ("c1", [cold[0]] * 8), ("c2", [cold[1]] * 8), ("hot2", [hot] * 8)], t0=2000.0)
    assert admitted(step(s)) == ["hot1", "hot2"]


def test_step_cost_reads_the_expert_parallel_layout_from_vllm(model):
    s = make_scheduler(model, CapsScheduler, caps={**CAPS, "strategy": "step_cost"})
    experts = s.caps.predictor.num_experts
    pc = s.vllm_config.parallel_config
    pc.enable_expert_parallel, pc.data_parallel_size, pc.tensor_parallel_size = True, 2, 2
    pc.expert_placement_strategy = "round_robin"
    deployment = s.caps._deployment(s.vllm_config)
    assert deployment == {"experts": experts, "ranks": 4, "placement": "round_robin"}
    from caps_vllm.strategies import make_strategy

    assert make_strategy("step_cost", deployment=deployment).placement.tolist() == (np.arange(experts) % 4).tolist()
    with pytest.raises(ValueError, match=r"caps\.strategy_params: .*placement lists 2 experts"):
        make_scheduler(model, CapsScheduler, caps={"strategy": "step_cost", "strategy_params": {"placement": [0, 1]}})


def test_a_running_request_about_to_finish_does_not_attract_its_kind(model, tokens):
    """step_cost prices a candidate over the decode steps it will share: the running request
    that has one token left hardly shares any, the long one shares them all."""
    hot, cold = tokens
    s = make_scheduler(model, CapsScheduler, caps={**CAPS, "strategy": "step_cost"}, max_num_seqs=3)
    s.add_request(make_request("long", [hot] * 8, arrival=1.0, max_tokens=1000))
    s.add_request(make_request("soon", [cold[0]] * 8, arrival=2.0, max_tokens=2))
    step(s)  # both running, "soon" has one token left
    s.add_request(make_request("like-soon", [cold[0]] * 8, arrival=3.0, max_tokens=100))
    s.add_request(make_request("like-long", [hot] * 8, arrival=4.0, max_tokens=100))
    assert admitted(step(s)) == ["like-long"]
    s2 = make_scheduler(model, CapsScheduler, caps={**CAPS, "strategy": "step_cost"}, max_num_seqs=3)
    s2.add_request(make_request("long", [hot] * 8, arrival=1.0, max_tokens=1000))
    s2.add_request(make_request("soon", [cold[0]] * 8, arrival=2.0, max_tokens=1000))
    step(s2)  # the same, but both stay: a tie, and a tie goes to the oldest
    s2.add_request(make_request("like-soon", [cold[0]] * 8, arrival=3.0, max_tokens=100))
    s2.add_request(make_request("like-long", [hot] * 8, arrival=4.0, max_tokens=100))
    assert admitted(step(s2)) == ["like-soon"]


def test_the_guard_reads_the_captured_prompts_and_falls_back_to_fcfs(model, tokens):
    """step_cost admits the requests predicted to share the running experts; the captured
    routing says the displaced ones did: the guard (window 1) resolves that loss and the next
    contested step is FCFS, counted."""
    from caps_vllm.routing import RoutingRecord

    hot, cold = tokens
    s = make_scheduler(model, CapsScheduler, caps={**CAPS, "strategy": "step_cost", "guard_window": 1}, max_num_seqs=3)
    guard, pred = s.caps.planner.guard, s.caps.predictor
    assert guard is not None
    s.add_request(make_request("run", [hot] * 8, arrival=1.0, max_tokens=1000))
    step(s)
    for i, (rid, tok) in enumerate([("c1", cold[0]), ("c2", cold[1]), ("hot1", hot), ("hot2", hot)]):
        s.add_request(make_request(rid, [tok] * 8, arrival=2.0 + i, max_tokens=2))

    def routed(truth):  # what the workers capture of those prompts in the step that ran them
        s.caps.judge(
            RoutingRecord(tuple(pred.moe_layers), sum(truth.values()), 16, prompt_counts=truth), s.caps.prompt_info
        )

    def counts(tok):
        return pred.vector([tok] * 8).reshape(pred.layers, pred.num_experts)

    assert admitted(step(s)) == ["hot1", "hot2"] and len(guard.pending) == 1
    routed({"hot1": counts(cold[0]), "hot2": counts(cold[1])})  # they were not routed like the hot one
    step(s)  # hot1 and hot2 finish
    assert admitted(step(s)) == ["c1", "c2"] and guard.resolved == 0
    routed({"c1": counts(hot), "c2": counts(hot)})  # ... and the ones they displaced were
    assert guard.resolved == 1 and len(guard.recent) == 0 and guard.tripped  # a loss: tripped
    step(s)  # c1 and c2 finish
    for i, (rid, tok) in enumerate([("c3", cold[0]), ("c4", cold[1]), ("hot3", hot)]):
        s.add_request(make_request(rid, [tok] * 8, arrival=10.0 + i, max_tokens=1))
    assert admitted(step(s)) == ["c3", "c4"]  # FCFS, and the step is counted
    assert s.caps.planner.stats.guard_fallback == 1 and len(guard.pending) == 1  # the shadow choice, to be scored


def test_no_admission_decision_on_a_step_vllm_holds_prefills_back(model, tokens):
    """A data-parallel engine's throttled step (``schedule(throttle_prefills=True)``) admits no new
    request while some running request decodes: CAPS leaves the queue and its counters alone."""
    from sim.twin import runner_output

    hot, cold = tokens
    s = make_scheduler(model, CapsScheduler, caps=CAPS, max_num_seqs=3)
    fill(s, [("run", [hot] * 8)])
    step(s)  # the hot request is now running, in decode
    fill(s, [("hot1", [hot] * 8), ("hot2", [hot] * 8), ("c1", [cold[0]] * 8), ("c2", [cold[1]] * 8)], t0=2000.0)
    out = s.schedule(True)  # positionally, as vLLM's EngineCore calls it
    assert admitted(out) == [] and s.caps.planner.stats.engaged == 0 and s.caps.planner.passes == {}
    assert [r.request_id for r in s.waiting] == ["hot1", "hot2", "c1", "c2"]
    s.update_from_output(out, runner_output(s, out))
    assert sorted(admitted(step(s))) == ["c1", "c2"]  # the next, unthrottled step chooses as before
    assert s.caps.planner.stats.engaged == 1
