"""schedule() time of CAPS against vLLM's stock Scheduler, predictor and selection costs.

Printed figures, not a test. The state: 256 requests running (decoding) and a queue. A stock
scheduler, CAPS planning inside schedule() and CAPS planning ahead (``plan_ahead``,
caps_vllm.ahead) are built in the same state and then stepped side by side in a steady state:
each step's schedule() is timed, alternating the three (the machine is noisy); then, untimed, the
model's forward pass is stood in for by a sleep (``--forward-ms``: the busy loop waits with the
GIL free; CAPS's worker plans the next step meanwhile, and is waited for before the next timed
call, so no timed call competes with it: a plan not done when the sleep ends is counted late),
one token is fed back to every running request, the requests admitted this step end (their
``max_tokens`` is 1: they end by length, as CAPS can foresee) and as many new ones join the
queue's tail, so every step starts from the same shape (256 decoding, the same queue length)
while the queue moves: requests arrive predicted, as vLLM's input thread hands them over
(``Caps.arrived``; the predictor's cost per request is the last figure), enter CAPS's window,
are chosen or passed over, and leave.
Medians over the steps after a warm-up are reported, with the ratios; CAPS's figure includes all
of its work in schedule() (budget estimate, prediction, plan, the metrics observer; planning
ahead: applying the plan, the snapshot for the next). Budgets:
320 sequences / 16384 tokens (64 free slots: a slot-bound choice every step), vLLM's H100
default 1024 / 8192 (the token budget holds the queue back: 248 of 256 admitted a step; a plan
made ahead sees only the 8 left when the step before was scheduled, since arrivals join the queue
between steps, so it has nothing to decide: hence also a queue of 512), its
256 / 2048 default elsewhere (no free slot: nothing to decide) and 1024 / 8192 with a queue of
16 (everybody is admitted: nothing to decide). Two model shapes: the embedded tiny Qwen2-MoE
(4 x 60 experts, d=240) and a Qwen1.5-MoE-A2.7B-shaped router table (vocab 151936, 24 x 60,
top-4, d=1440; random ids).

    python tests/benchmarks/bench_scheduler.py [--samples N] [--forward-ms MS] [--parts]
"""

from __future__ import annotations

import argparse
import logging
import os
import statistics
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parents[2]))
os.environ.setdefault("CAPS_VLLM_CACHE", str(Path(tempfile.gettempdir()) / "caps_vllm_bench"))

from vllm.v1.core.sched.scheduler import Scheduler  # noqa: E402

from caps_vllm.admission import AdmissionPlanner  # noqa: E402
from caps_vllm.predictor import ExpertPredictor  # noqa: E402
from caps_vllm.running_load import RunningLoad  # noqa: E402
from caps_vllm.scheduler import CapsScheduler  # noqa: E402
from caps_vllm.tiny_model import generate  # noqa: E402
from sim.twin import runner_output  # noqa: E402
from tests.vllm_helpers import make_request, make_scheduler, step  # noqa: E402

RUNNING, PROMPT, WARMUP = 256, 32, 3


def qwen15_predictor(seed: int = 0) -> ExpertPredictor:
    rng = np.random.default_rng(seed)
    table = np.stack([rng.permuted(np.tile(np.arange(60), (151936, 1)), axis=1)[:, :4] for _ in range(24)], axis=1)
    return ExpertPredictor(table.astype(np.uint8), 60)


def build(
    model: str,
    cls,
    vocab: int,
    rng,
    predictor: ExpertPredictor | None,
    window: int,
    budgets: tuple[int, int] = (320, 16384),
    waiting: int = 256,
    ahead: bool = False,
):
    seqs, tokens = budgets
    s = make_scheduler(
        model,
        cls,
        caps={"window_size": window, "max_wait_ms": None, "plan_ahead": ahead},
        max_num_seqs=seqs,
        max_num_batched_tokens=tokens,
        num_blocks=20000,
    )
    if predictor is not None and hasattr(s, "caps"):
        s.caps.predictor = predictor
        s.caps.planner = AdmissionPlanner(s.caps.config, predictor.d)
        s.caps.running = RunningLoad(predictor.d, seqs)
    for i in range(RUNNING):
        s.add_request(
            make_request(f"run{i}", rng.integers(0, vocab, PROMPT).tolist(), arrival=1.0 + i, max_tokens=1000)
        )
    while s.waiting or any(r.num_computed_tokens < r.num_prompt_tokens for r in s.running):
        step(s)
    step(s)  # all running and decoding
    for i in range(waiting):
        arrive(s, newcomer(f"wait{i}", rng, vocab, 1000.0 + i))
    return s


def newcomer(rid: str, rng, vocab: int, arrival: float):
    """A waiting request that ends with its first token (by length: foreseeable, as a stop at max_tokens is)."""
    return make_request(rid, rng.integers(0, vocab, PROMPT).tolist(), arrival=arrival, max_tokens=1)


def arrive(s, request) -> None:
    """A request as vLLM's EngineCore hands it over: prepared (and, for CAPS, predicted: its input
    thread does that in parallel with the model's forward pass, caps_vllm.plugin), then added."""
    if hasattr(s, "caps"):
        s.caps.arrived(request)
    s.add_request(request)


def timed_step(s, rng, vocab: int, serial: list[int], forward_s: float, parts=None) -> tuple[float, float, float, bool]:
    """One steady-state step (see the module docstring): schedule() and update_from_output()
    timed, the rest not. Returns the seconds of the two, for CAPS those of its own work in
    schedule() (``parts``: a bench_caps_parts.Parts counting during schedule() only), and whether
    a plan-ahead worker was still at work when the forward pass's stand-in ended."""
    caps = getattr(s, "caps", None)
    own = caps.seconds if caps is not None else 0.0
    if parts is not None:
        parts.on = True
    t0 = time.perf_counter()
    out = s.schedule()
    seconds = time.perf_counter() - t0
    if parts is not None:
        parts.on = False
    own = caps.seconds - own if caps is not None else 0.0
    time.sleep(forward_s)
    worker = caps.worker if caps is not None else None
    late = worker is not None and not worker.idle(0)
    if worker is not None:
        worker.idle()
    mro = runner_output(s, out)
    t0 = time.perf_counter()
    s.update_from_output(out, mro)
    update = time.perf_counter() - t0
    for _ in out.scheduled_new_reqs:
        serial[0] += 1
        arrive(s, newcomer(f"wait{serial[0]}", rng, vocab, 1000.0 + serial[0]))
    return seconds, update, own, late


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--samples", type=int, default=15)
    ap.add_argument("--forward-ms", type=float, default=15.0, help="the model's forward pass, stood in for by a sleep")
    ap.add_argument("--parts", action="store_true", help="then where CAPS's time goes in each case, part by part")
    a = ap.parse_args()
    for name in ("vllm", "caps_vllm"):  # each scheduler built logs its config and warnings
        logging.getLogger(name).setLevel(logging.ERROR)
    model = str(generate())
    tiny = ExpertPredictor.from_model(model)
    big = qwen15_predictor()
    slots, h100, small = (320, 16384), (1024, 8192), (256, 2048)
    cases = [
        ("tiny d=240, W=32", None, tiny.vocab, 32, slots, 256),
        ("Qwen1.5-shaped d=1440, W=32", big, big.vocab, 32, slots, 256),
        ("Qwen1.5-shaped d=1440, W=256", big, big.vocab, 256, slots, 256),
        ("Qwen1.5 W=32, 1024/8192", big, big.vocab, 32, h100, 256),
        ("Qwen1.5 W=32, 1024/8192, 512 wait", big, big.vocab, 32, h100, 512),
        ("Qwen1.5 W=32, 256/2048 (full)", big, big.vocab, 32, small, 256),
        ("Qwen1.5 W=32, 1024/8192, 16 wait", big, big.vocab, 32, h100, 16),
    ]
    forward_s = a.forward_ms / 1e3
    print(
        f"schedule() with {RUNNING} running, steady state (median of {a.samples} steps after {WARMUP}; a forward pass "
        f"of {a.forward_ms:g} ms stood in for by a sleep); budgets: sequences / tokens; CAPS in schedule(), then "
        "planning ahead"
    )
    for label, pred, vocab, window, budgets, queue in cases:
        trio = [
            build(model, cls, vocab, np.random.default_rng(0), p, window, budgets, queue, ahead)
            for cls, p, ahead in ((Scheduler, None, False), (CapsScheduler, pred, False), (CapsScheduler, pred, True))
        ]
        rngs, serials = [np.random.default_rng(1) for _ in trio], [[queue] for _ in trio]
        times: list[list[float]] = [[], [], []]
        updates: list[list[float]] = [[], [], []]
        own: list[list[float]] = [[], []]
        plans, late = [0, 0], 0
        worker = trio[2].caps.worker
        ahead_s = worker.seconds
        for k in range(WARMUP + a.samples):
            if k == WARMUP:
                ahead_s = worker.seconds
            before = trio[1].caps.planner.stats.plans, trio[2].caps.planner.stats.plans
            for i in (0, 1, 2):
                t, u, caps_s, was_late = timed_step(trio[i], rngs[i], vocab, serials[i], forward_s)
                if k >= WARMUP:
                    times[i].append(t)
                    updates[i].append(u)
                    if i:
                        own[i - 1].append(caps_s)
                    late += was_late
            if k >= WARMUP:
                plans[0] += trio[1].caps.planner.stats.plans > before[0]
                plans[1] += trio[2].caps.planner.stats.plans > before[1]
        s_ms, c_ms, a_ms = (statistics.median(t) * 1e3 for t in times)
        su, cu, au = (statistics.median(u) for u in updates)
        print(
            f"  {label:34s} {queue:3d} waiting  stock {s_ms:7.3f} ms | CAPS {c_ms:7.3f} ms, ratio {c_ms / s_ms:5.2f} "
            f"({'met' if c_ms <= 1.05 * s_ms else 'NOT met'}), chose on {plans[0]} of {a.samples} steps, own "
            f"{statistics.median(own[0]) * 1e3:.3f} ms | ahead {a_ms:7.3f} ms, ratio {a_ms / s_ms:5.2f} "
            f"({'met' if a_ms <= 1.05 * s_ms else 'NOT met'}), chose on {plans[1]}, own "
            f"{statistics.median(own[1]) * 1e3:.3f} ms, worker {(worker.seconds - ahead_s) / a.samples * 1e3:.3f} ms "
            f"a step, late {late} (target: ratio <= 1.05); update_from_output() {su * 1e3:.3f} ms stock, ratio "
            f"{cu / su:.2f} in schedule(), {au / su:.2f} ahead"
        )
        for s in trio:
            if hasattr(s, "caps"):
                s.caps.shutdown()

    if a.parts:
        from tests.benchmarks.bench_caps_parts import Parts

        parts = Parts()
        parts.on = False  # counting during the timed schedule() calls only
        print(
            f"where CAPS's time in schedule() goes, per step (the same steady state, {a.samples} steps after {WARMUP})"
        )
        for label, pred, vocab, window, budgets, queue in cases:
            s = build(model, CapsScheduler, vocab, np.random.default_rng(0), pred, window, budgets, queue)
            rng, serial = np.random.default_rng(1), [queue]
            for k in range(WARMUP + a.samples):
                timed_step(s, rng, vocab, serial, forward_s, parts if k >= WARMUP else None)
            print(f"  {label}, {queue} waiting")
            parts.report(per=a.samples)
            parts.spent.clear()
            parts.calls.clear()

    print("predictor: one request's vector (one counting pass over its tokens' table rows), median of 200")
    for label, pred in (("tiny (4 layers)", tiny), ("Qwen1.5-shaped (24 layers)", big)):
        for n in (128, 1000, 4000):
            ids = np.random.default_rng(n).integers(0, pred.vocab, n)
            ms, as_list = {}, ids.tolist()
            runs = (  # vLLM's prompt_token_ids is a list; the baseline: numpy's gather + bincount of the array
                ("array", lambda: pred.vector(ids, per_token=True)),
                ("list", lambda: pred.vector(as_list, per_token=True)),
                ("numpy", lambda: np.bincount(pred._bins.take(ids, axis=0).ravel(), minlength=pred.d) / n),
            )
            for form, fn in runs:
                ts = []
                for _ in range(200):
                    t0 = time.perf_counter()
                    fn()
                    ts.append(time.perf_counter() - t0)
                ms[form] = statistics.median(ts) * 1e3 / n * 1000
            print(
                f"  {label:28s} {n:5d} tokens: {ms['list']:.3f} ms per 1k tokens from a list, {ms['array']:.3f} from "
                f"an array, numpy gather + bincount {ms['numpy']:.3f} (ratio {ms['array'] / ms['numpy']:.2f}; "
                f"target <= 0.1 from a list: {'met' if ms['list'] <= 0.1 else 'NOT met'}); table "
                f"{pred._bins.nbytes / 2**20:.1f} MiB ({pred.vocab} ids x {pred.layers} layers x top-{pred.top_k}, "
                f"{pred._bins.dtype})"
            )


if __name__ == "__main__":
    main()
