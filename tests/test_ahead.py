"""Planning ahead (caps_vllm.ahead): the worker thread, the next step's budget foreseen, and a
plan applied only to the queue it was made for, in vLLM's real scheduler."""

from __future__ import annotations

import threading

import numpy as np
import pytest

from caps_vllm.ahead import Worker


def test_the_worker_runs_jobs_in_order_and_flags_the_stale_ones():
    seen: list[tuple[int, bool]] = []
    started, gate = threading.Event(), threading.Event()

    def run(job, stale):
        if job == 0:
            started.set()
            gate.wait(5)  # jobs 1 and 2 queue up behind it
        seen.append((job, stale))

    w = Worker(run)
    w.submit(0)
    assert started.wait(5)
    w.submit(1)
    w.submit(2)
    gate.set()
    assert w.idle(5)
    assert seen == [(0, False), (1, True), (2, False)]  # a job with a newer one behind it is stale
    w.submit(3)
    w.close()
    assert seen[-1] == (3, False) and w.jobs == 4


def test_a_worker_far_behind_refuses_jobs():
    started, gate = threading.Event(), threading.Event()
    w = Worker(lambda job, stale: (started.set(), gate.wait(5)), limit=2)
    assert w.submit(0) and started.wait(5)  # job 0 runs, held at the gate
    assert w.submit(1) and w.submit(2) and not w.submit(3)  # two wait: the third is refused
    gate.set()
    assert w.idle(5) and w.jobs == 3
    w.close()


def test_a_failing_job_leaves_the_worker_alive():
    seen = []

    def run(job, stale):
        if job == "bad":
            raise RuntimeError("boom")
        seen.append(job)

    w = Worker(run)
    w.submit("bad")
    w.submit("good")
    assert w.idle(5) and seen == ["good"]
    w.close()


vllm = pytest.importorskip("vllm")

from caps_vllm import vllm_state as vs  # noqa: E402
from caps_vllm.scheduler import CapsScheduler  # noqa: E402
from sim.twin import runner_output  # noqa: E402
from tests.vllm_helpers import make_request, make_scheduler, step  # noqa: E402

CAPS = {"min_batch_trigger": 2, "max_wait_ms": None, "strategy": "greedy_dot_product", "plan_ahead": True}


def forward(s):
    """What stands in for the model's forward pass: the busy loop waits, the worker plans."""
    return lambda out, mro: s.caps.worker.idle(5)


def admitted(out):
    return [r.req_id for r in out.scheduled_new_reqs]


@pytest.mark.vllm
@pytest.mark.parametrize("async_scheduling", [False, True], ids=["sync", "async"])
def test_the_next_steps_budget_is_foreseen_right_after_schedule(model, async_scheduling):
    """capacity_next, read right after schedule() of a step, against what vLLM then does in the
    next schedule(): the slots free (requests ending on their last token) and the token budget
    its running requests leave (decode tokens, prefill chunks, and with async scheduling, where
    the step before's output is processed between the two calls, the requests it skips); the
    free KV as the in-schedule estimate reads it then (the ending requests' blocks freed)."""
    from vllm.v1.core.sched.async_scheduler import AsyncScheduler
    from vllm.v1.core.sched.scheduler import Scheduler

    cls = AsyncScheduler if async_scheduling else Scheduler
    s = make_scheduler(
        model, cls, max_num_seqs=6, max_num_batched_tokens=48, num_blocks=200, async_scheduling=async_scheduling
    )
    rng = np.random.default_rng(0)
    for i in range(14):
        ids = rng.integers(0, 1000, int(rng.integers(4, 60))).tolist()
        s.add_request(make_request(f"r{i}", ids, arrival=float(i), max_tokens=int(rng.integers(1, 5))))
    pending, est, checked = None, None, 0
    while s.requests or pending is not None:
        before = {r.request_id for r in s.running}
        kv = vs.capacity_walk(s, vs.free_slots(s))[0].kv_tokens
        out = s.schedule()
        if est is not None:
            used = sum(n for rid, n in out.num_scheduled_tokens.items() if rid in before)
            assert (est.slots, est.tokens) == (s.max_num_running_reqs - len(before), s.max_num_scheduled_tokens - used)
            assert est.kv_tokens == kv
            checked += 1
        mro = runner_output(s, out)  # (the tokens this step makes, known when it is scheduled)
        est, _ = vs.capacity_next(s, list(s.running), vs.free_slots(s), out.num_scheduled_tokens)
        if async_scheduling:  # the step before's output is processed after this schedule(), as vLLM's batch queue does
            if pending is not None:
                s.update_from_output(*pending)
            pending = (out, mro) if out.total_num_scheduled_tokens else None
        else:
            s.update_from_output(out, mro)
    assert checked >= 10


def hot_running_and_a_queue(model, tokens):
    """Two slots; "run" (hot, long) and "end" (ends on its first token) are admitted first, then
    hot1, hot2 (like "run") and c1, c2 (sharing no expert with it) wait."""
    hot, cold = tokens
    s = make_scheduler(model, CapsScheduler, caps=CAPS, max_num_seqs=2)
    specs = [("run", hot, 1000), ("end", cold[2], 1), ("hot1", hot, 100), ("hot2", hot, 100)]
    for i, (rid, tok, n) in enumerate([*specs, ("c1", cold[0], 100), ("c2", cold[1], 100)]):
        s.add_request(make_request(rid, [tok] * 8, arrival=1000.0 + i, max_tokens=n))
    return s


@pytest.mark.vllm
def test_a_plan_made_while_the_model_runs_is_applied_on_the_next_step(model, tokens):
    """The plan for step 2 is made after step 1's schedule(), from the state it leaves: "end"
    ends on its first token, so one slot frees, and the plan picks a complement of the hot
    request still running where FCFS would admit hot1."""
    s = hot_running_and_a_queue(model, tokens)
    assert admitted(step(s, worker=forward(s))) == ["run", "end"]  # no plan yet: FCFS
    assert admitted(step(s, worker=forward(s)))[0] in ("c1", "c2")
    c = s.caps.counters
    assert (c["plans_applied"], c["plans_dropped"], c["plans_late"]) == (1, 0, 0)
    assert s.caps.worker.seconds > 0 and s.caps.worker.jobs == 2


@pytest.mark.vllm
def test_a_plan_for_a_queue_that_changed_is_dropped(model, tokens):
    """A request aborted while the model runs (vLLM processes aborts before update_from_output)
    changes the queue's head: the plan is dropped and the step stays FCFS, nobody lost."""
    s = hot_running_and_a_queue(model, tokens)
    from vllm.v1.request import RequestStatus

    def abort_during_forward(out, mro):
        s.caps.worker.idle(5)
        s.finish_requests(["hot1"], RequestStatus.FINISHED_ABORTED)

    step(s, worker=abort_during_forward)
    assert admitted(step(s, worker=forward(s))) == ["hot2"]
    assert s.caps.counters["plans_dropped"] == 1 and s.caps.counters["plans_applied"] == 0
    assert [r.request_id for r in s.waiting] == ["c1", "c2"]


@pytest.mark.vllm
def test_planning_ahead_under_async_scheduling_loses_nothing(model, tokens):
    """vLLM's batch queue order (schedule step k, wait for step k-1's output, process it): CAPS's
    async class plans ahead in the wait, under random arrivals; every request finishes once."""
    from caps_vllm.scheduler import CapsAsyncScheduler

    hot, cold = tokens
    s = make_scheduler(
        model, CapsScheduler, caps=CAPS, max_num_seqs=4, max_num_batched_tokens=64, async_scheduling=True
    )
    assert isinstance(s, CapsAsyncScheduler) and s.caps.worker is not None
    rng = np.random.default_rng(1)
    ids, finished, pending = [], [], None
    for t in range(400):
        for k in range(int(rng.poisson(1.5)) if t < 60 else 0):
            rid = f"r{t}-{k}"
            ids.append(rid)
            tok = hot if rng.random() < 0.5 else cold[int(rng.integers(len(cold)))]
            n = int(rng.integers(4, 40))
            s.add_request(make_request(rid, [int(tok)] * n, arrival=1000.0 + t, max_tokens=int(rng.integers(1, 6))))
        out = s.schedule()
        mro = runner_output(s, out)
        s.caps.worker.idle(5)  # the wait for step k-1's output
        if pending is not None:
            for eco in s.update_from_output(*pending).values():
                finished += [o.request_id for o in eco.outputs if o.finish_reason is not None]
        pending = (out, mro) if out.total_num_scheduled_tokens else None
        if t >= 60 and not s.requests and pending is None:
            break
    assert sorted(finished) == sorted(ids) and len(set(finished)) == len(finished)
    c = s.caps.counters
    assert c["plans_applied"] > 0 and c["errors"] == 0 and s.caps.planner.stats.plans > 0


@pytest.mark.vllm
@pytest.mark.parametrize("policy", ["fcfs", "priority"])
@pytest.mark.parametrize("async_scheduling", [False, True], ids=["sync", "async"])
def test_planning_ahead_under_preemption_priorities_and_aborts_loses_nothing(model, tokens, policy, async_scheduling):
    """A KV cache too small for the batch (vLLM preempts and resumes requests: they go back to
    the queue's front), random priorities, aborts of the queue's first request while the model
    runs: every request still ends exactly once."""
    from vllm.v1.request import RequestStatus

    hot, cold = tokens
    s = make_scheduler(
        model,
        CapsScheduler,
        caps=CAPS,
        max_num_seqs=6,
        max_num_batched_tokens=96,
        num_blocks=12,
        policy=policy,
        async_scheduling=async_scheduling,
    )
    rng = np.random.default_rng(2)
    ids, ended, pending, preempted = [], [], None, 0
    for t in range(600):
        for k in range(int(rng.poisson(1.0)) if t < 60 else 0):
            rid = f"r{t}-{k}"
            ids.append(rid)
            tok = hot if rng.random() < 0.5 else cold[int(rng.integers(len(cold)))]
            n, out_n, prio = int(rng.integers(8, 48)), int(rng.integers(4, 24)), int(rng.integers(0, 3))
            s.add_request(make_request(rid, [int(tok)] * n, arrival=1000.0 + t, max_tokens=out_n, priority=prio))
        out = s.schedule()
        preempted += len(out.preempted_req_ids or ())
        mro = runner_output(s, out)
        s.caps.worker.idle(5)  # the model runs; then vLLM processes the aborts that came meanwhile
        if s.waiting and rng.random() < 0.1:
            rid = s.waiting[0].request_id  # (the head: the part a plan orders)
            s.finish_requests([rid], RequestStatus.FINISHED_ABORTED)
            ended.append(rid)
        done = pending if async_scheduling else (out, mro)  # (async: the step before's output, as the batch queue)
        if done is not None:
            for eco in s.update_from_output(*done).values():
                ended += [o.request_id for o in eco.outputs if o.finish_reason is not None]
        pending = (out, mro) if async_scheduling and out.total_num_scheduled_tokens else None
        if t >= 60 and not s.requests and pending is None:
            break
    assert sorted(ended) == sorted(ids) and len(set(ended)) == len(ended)
    c = s.caps.counters
    assert preempted > 0 and s.caps.planner.stats.plans > 0 and c["plans_applied"] > 0 and c["errors"] == 0, dict(c)
