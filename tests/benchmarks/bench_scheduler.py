"""schedule() time of CAPS against vLLM's stock Scheduler, predictor and selection costs.

Printed figures, not a test. The state: 256 requests running (decoding), 256 waiting,
max_num_seqs 320 (64 free slots), so CAPS has a real admission decision every step. Each
sample builds a fresh scheduler pair in that state and times one schedule() call of each,
alternating stock and CAPS (the machine is noisy); medians are reported. Request vectors are
computed before timing, as they would have been on earlier steps (their one-off cost is the
predictor figure). "warm": the window's pairwise dot products are cached too (a step where the
window did not change); "cold": none are (every window member entered the window this step,
the worst case: W rows of O(W d) each). Two model shapes: the embedded tiny Qwen2-MoE (4 x 60 experts, d=240) and
a Qwen1.5-MoE-A2.7B-shaped router table (vocab 151936, 24 x 60, top-4, d=1440; random ids).

    python tests/benchmarks/bench_scheduler.py [--samples N]
"""

from __future__ import annotations

import argparse
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
from tests.vllm_helpers import make_request, make_scheduler, step  # noqa: E402

RUNNING, WAITING, MAX_SEQS, PROMPT = 256, 256, 320, 32


def qwen15_predictor(seed: int = 0) -> ExpertPredictor:
    rng = np.random.default_rng(seed)
    table = np.stack([rng.permuted(np.tile(np.arange(60), (151936, 1)), axis=1)[:, :4] for _ in range(24)], axis=1)
    return ExpertPredictor(table.astype(np.uint8), 60)


def build(model: str, cls, vocab: int, rng, predictor: ExpertPredictor | None, window: int, warm: bool = False):
    s = make_scheduler(model, cls, caps={"window_size": window, "max_wait_ms": None}, max_num_seqs=MAX_SEQS,
                       max_num_batched_tokens=16384, num_blocks=20000)
    if predictor is not None and hasattr(s, "caps_planner"):
        s.caps_predictor = predictor
        s.caps_planner = AdmissionPlanner(s.caps_config, predictor.d)
        s.caps_running = RunningLoad(predictor.d)
    for i in range(RUNNING):
        s.add_request(make_request(f"run{i}", rng.integers(0, vocab, PROMPT).tolist(), arrival=1.0 + i, max_tokens=1000))
    step(s)
    step(s)  # all running and decoding
    for i in range(WAITING):
        s.add_request(make_request(f"wait{i}", rng.integers(0, vocab, PROMPT).tolist(), arrival=1000.0 + i))
    if hasattr(s, "caps_planner"):  # vectors of earlier steps
        for r in list(s.running) + list(s.waiting):
            s._caps_vector(r)
        s._caps_shared_load([], s._caps_capacity(1)[1])  # the running rows, as a choosing step builds them
        if warm:
            for r in list(s.waiting)[:window]:
                s.caps_planner.pairs.add(r.request_id, s._caps_vector(r))
    return s


def timed_schedule(s) -> float:
    t0 = time.perf_counter()
    s.schedule()
    return time.perf_counter() - t0


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--samples", type=int, default=15)
    a = ap.parse_args()
    model = str(generate())
    tiny = ExpertPredictor.from_model(model)
    big = qwen15_predictor()
    cases = [("tiny d=240, W=32", None, tiny.vocab, 32), ("Qwen1.5-shaped d=1440, W=32", big, big.vocab, 32),
             ("Qwen1.5-shaped d=1440, W=256", big, big.vocab, 256)]
    print(f"schedule() with {RUNNING} running, {WAITING} waiting, max_num_seqs {MAX_SEQS} (median of {a.samples})")
    for label, pred, vocab, window in cases:
        for warm in (True, False):
            stock_t, caps_t, sel = [], [], []
            for k in range(a.samples):
                stock = build(model, Scheduler, vocab, np.random.default_rng(k), None, window)
                caps = build(model, CapsScheduler, vocab, np.random.default_rng(k), pred, window, warm)
                stock_t.append(timed_schedule(stock))
                caps_t.append(timed_schedule(caps))
                sel.append(caps.caps_planner.stats.last_selection_s)
                assert caps.caps_planner.stats.plans == 1
            s_ms, c_ms = statistics.median(stock_t) * 1e3, statistics.median(caps_t) * 1e3
            print(f"  {label:30s} {'warm' if warm else 'cold'}  stock {s_ms:7.3f} ms  CAPS {c_ms:7.3f} ms  "
                  f"ratio {c_ms / s_ms:5.2f} (target <= 1.10)  of which plan {statistics.median(sel) * 1e3:.3f} ms")

    print("predictor: one request's vector (gather + bincount), median of 200")
    for label, pred in (("tiny (4 layers)", tiny), ("Qwen1.5-shaped (24 layers)", big)):
        for n in (128, 1000, 4000):
            ids = np.random.default_rng(n).integers(0, pred.vocab, n)
            ts = []
            for _ in range(200):
                t0 = time.perf_counter()
                pred.vector(ids, per_token=True)
                ts.append(time.perf_counter() - t0)
            ms = statistics.median(ts) * 1e3
            print(f"  {label:28s} {n:5d} tokens: {ms:.3f} ms = {ms / n * 1000:.3f} ms per 1k tokens (target <= 0.25)")


if __name__ == "__main__":
    main()
