"""Arrival schedules for the load tests: who asks what, when (no Locust, no server).

A schedule is a list of :class:`Arrival` in time order, built once per run from a seed, so a
run against the stock scheduler and one against CAPS replay exactly the same requests. Three
patterns, as in the simulator:

* ``bursty``: Poisson arrivals at ``rate``; topics in runs (geometric, mean ``burst_len``) of
  one category, then another — semantic hotspots;
* ``poisson``: Poisson arrivals at ``rate``, every request's topic drawn independently;
* ``trace``: arrival times and output lengths from a trace CSV (the simulator's formats),
  prompts from the pool, the one closest to the trace's prompt length (≈ 4 characters a token);
* ``offline``: a batch of ``max_requests`` requests, topics mixed, sent over the first half of
  ``hold`` seconds while the server's scheduler is paused (``--hold``), so the whole batch waits
  in vLLM's queue when it resumes; its figure is the makespan (resume to the last answer).
"""

from __future__ import annotations

import json
from dataclasses import asdict, dataclass
from pathlib import Path

import numpy as np

from loadtest.traces import load_trace

DEFAULT_PROMPTS = Path(__file__).resolve().parents[1] / "caps_vllm" / "data" / "topic_prompts.jsonl"
PATTERNS = ("bursty", "poisson", "trace", "offline")


@dataclass(frozen=True)
class Arrival:
    t: float  # seconds from the start of the run
    prompt: str
    category: str
    max_tokens: int
    chat: bool  # /v1/chat/completions (else /v1/completions)


#: The load's options, shared by the Locust file and the side-by-side runner (which forwards them).
LOAD_OPTIONS: tuple[tuple[str, type, object, str], ...] = (
    ("--prompts", str, "", "JSON-lines prompt pool with prompt, category (default: the project's)"),
    ("--rate", float, 4.0, "mean arrivals per second (bursty, poisson)"),
    ("--duration", float, 60.0, "seconds of arrivals"),
    ("--max-requests", int, 1000, "at most this many requests"),
    ("--max-tokens", int, 32, "tokens generated per request (cap for traces)"),
    (
        "--min-tokens",
        int,
        0,
        "0 < N < --max-tokens: each request's output length drawn uniformly in [N, --max-tokens] (seeded)",
    ),
    ("--burst-len", float, 16.0, "mean run length of one topic (bursty)"),
    ("--chat-share", float, 0.5, "share of chat completions"),
    ("--trace", str, "", "trace CSV (trace pattern)"),
    ("--speedup", float, 1.0, "trace time compression"),
    ("--seed", int, 0, "seed of the schedule"),
    ("--concurrency", int, 64, "users = requests in flight at most"),
    ("--request-timeout", float, 120.0, "seconds per request"),
    ("--slo-ttft", float, 2.0, "goodput SLO: TTFT seconds"),
    ("--slo-e2e", float, 20.0, "goodput SLO: end-to-end seconds"),
    (
        "--hold",
        float,
        0.0,
        "pause the server's scheduler for the first S seconds of the run, so the first arrivals "
        "queue up (vLLM's /pause: the server needs VLLM_SERVER_DEV_MODE=1; compare sets it)",
    ),
)


def add_load_options(parser) -> None:
    for flag, kind, default, doc in LOAD_OPTIONS:
        parser.add_argument(flag, type=kind, default=default, help=doc)


def load_option_args(ns) -> list[str]:
    """``ns``'s load options as command-line arguments, to pass them on to Locust."""
    return [a for flag, *_ in LOAD_OPTIONS for a in (flag, str(getattr(ns, flag[2:].replace("-", "_"))))]


def load_prompts(path: str | Path | None = None) -> list[dict]:
    """``{"prompt", "category"}`` rows from a JSON-lines pool (the project's own by default)."""
    path = Path(path) if path else DEFAULT_PROMPTS
    rows = []
    with path.open() as f:
        for n, line in enumerate(f, 1):
            if not line.strip():
                continue
            try:
                row = json.loads(line)
                prompt, category = row["prompt"], row["category"]
            except (ValueError, KeyError, TypeError) as exc:
                raise ValueError(f"{path}:{n}: expected a JSON object with 'prompt' and 'category' ({exc})") from None
            if not isinstance(prompt, str) or not prompt.strip():
                raise ValueError(f"{path}:{n}: empty prompt")
            rows.append({"prompt": prompt, "category": str(category)})
    if not rows:
        raise ValueError(f"{path}: no prompts")
    return rows


def topic_runs(n: int, topics: int, mean_len: float, rng: np.random.Generator) -> np.ndarray:
    """Topics in runs of geometric length (mean ``mean_len``, at least 1), each run a different topic
    (the simulator's and the load test's bursty pattern)."""
    out = np.empty(n, dtype=np.int64)
    pos, cur = 0, int(rng.integers(topics))
    while pos < n:
        run = int(rng.geometric(1.0 / max(mean_len, 1.0)))
        out[pos : pos + run] = cur
        pos += run
        if topics > 1:
            cur = (cur + 1 + int(rng.integers(topics - 1))) % topics
    return out


def build(
    pattern: str,
    prompts: list[dict],
    *,
    rate: float = 4.0,
    duration: float = 60.0,
    max_requests: int = 1000,
    max_tokens: int = 32,
    min_tokens: int = 0,
    burst_len: float = 16.0,
    chat_share: float = 0.5,
    seed: int = 0,
    trace: str | Path | None = None,
    speedup: float = 1.0,
    hold: float = 0.0,
) -> list[Arrival]:
    """The run's requests, bounded by ``duration`` seconds and ``max_requests`` (``offline``: all
    ``max_requests`` within the first half of ``hold``)."""
    if pattern not in PATTERNS:
        raise ValueError(f"pattern {pattern!r}: valid: {', '.join(PATTERNS)}")
    if rate <= 0 or duration <= 0 or max_requests < 1 or max_tokens < 1 or speedup <= 0:
        raise ValueError("rate, duration, speedup must be > 0; max_requests, max_tokens >= 1")
    if not 0 <= min_tokens <= max_tokens:
        raise ValueError(f"min_tokens must be in [0, max_tokens] (got {min_tokens})")
    rng = np.random.default_rng(seed)
    cats = sorted({p["category"] for p in prompts})
    by_cat = {c: [p for p in prompts if p["category"] == c] for c in cats}
    if pattern == "trace":
        if trace is None:
            raise ValueError("pattern 'trace' needs a trace CSV")
        t = load_trace(trace)
        times, prompt_tokens, output_tokens = t.arrival_s, t.prompt_tokens, t.output_tokens
        keep = times / speedup <= duration
        times, prompt_tokens, output_tokens = times[keep] / speedup, prompt_tokens[keep], output_tokens[keep]
        n = min(len(times), max_requests)
        lengths = np.array([len(p["prompt"]) for p in prompts])
        picks = [prompts[int(np.argmin(np.abs(lengths - 4 * pt)))] for pt in prompt_tokens[:n]]
        outs = np.clip(output_tokens[:n], 1, max_tokens)
        return [
            Arrival(
                float(times[i]), picks[i]["prompt"], picks[i]["category"], int(outs[i]), bool(rng.random() < chat_share)
            )
            for i in range(n)
        ]
    if pattern == "offline":
        if hold <= 0:
            raise ValueError("pattern 'offline' needs hold > 0: the batch queues while the scheduler is paused")
        n = max_requests
        times = np.arange(n) * (hold / 2.0 / n)
    else:
        gaps = rng.exponential(1.0 / rate, size=max_requests)
        times = np.cumsum(gaps) - gaps[0]
        n = int(np.searchsorted(times, duration, side="right"))
    if pattern == "bursty":
        topic = topic_runs(n, len(cats), burst_len, rng)
    else:
        topic = rng.integers(len(cats), size=n)
    # output lengths from a stream of their own, so that a fixed length leaves the schedule as it was
    lengths = (
        np.random.default_rng([seed, 1]).integers(min_tokens, max_tokens + 1, size=n)
        if min_tokens
        else np.full(n, max_tokens)
    )
    out = []
    for i in range(n):
        pool = by_cat[cats[topic[i]]]
        p = pool[int(rng.integers(len(pool)))]
        out.append(
            Arrival(float(times[i]), p["prompt"], p["category"], int(lengths[i]), bool(rng.random() < chat_share))
        )
    return out


def to_json(arrivals: list[Arrival]) -> str:
    return json.dumps([asdict(a) for a in arrivals])
