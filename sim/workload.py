"""Synthetic and replayed workloads: arrival times, request sizes, topics and expert-load vectors."""

from __future__ import annotations

import csv
from dataclasses import dataclass
from datetime import datetime
from pathlib import Path

import numpy as np


@dataclass(frozen=True)
class WorkloadConfig:
    """How requests and their expert loads are generated; defaults are the paper sweep's."""

    num_experts: int = 60
    top_k: int = 4
    layers: int = 1  # vectors are layers x experts long (per-layer counts, flattened)
    topics: int = 8
    hot_experts: int = 8  # experts each topic favours (per layer)
    hot_share: float = 0.08  # share of a topic's routing that goes to its hot experts
    request_concentration: float = 1000.0  # Dirichlet spread of a request around its topic
    burst_len: float = 32.0  # mean length of a run of one topic in the bursty pattern
    prompt_tokens_mean: float = 128.0
    output_tokens_mean: float = 32.0
    #: "counts": prompt-token expert counts (what the live predictor gives, mass grows with the
    #: prompt); "per_token": the same divided by prompt length (equal mass for every request)
    vectors: str = "counts"


@dataclass
class Workload:
    """Requests in arrival order (arrival times in seconds from the first arrival)."""

    arrival: np.ndarray  # (n,) float seconds, non-decreasing
    prompt_tokens: np.ndarray  # (n,) int
    output_tokens: np.ndarray  # (n,) int
    topic: np.ndarray  # (n,) int

    def __len__(self) -> int:
        return self.arrival.shape[0]


def _sizes(n: int, cfg: WorkloadConfig, rng: np.random.Generator) -> tuple[np.ndarray, np.ndarray]:
    """Log-normal prompt and output lengths (sigma 0.5) around the configured means."""

    def draw(mean: float, lo: int, hi: int) -> np.ndarray:
        sigma = 0.5
        x = rng.lognormal(np.log(mean) - sigma * sigma / 2, sigma, n)
        return np.clip(np.rint(x), lo, hi).astype(np.int64)

    return draw(cfg.prompt_tokens_mean, 4, 4096), draw(cfg.output_tokens_mean, 1, 1024)


def topic_runs(n: int, topics: int, mean_len: float, rng: np.random.Generator) -> np.ndarray:
    """Topics in runs of geometric length (mean ``mean_len``), each run a different topic."""
    out = np.empty(n, dtype=np.int64)
    pos, cur = 0, int(rng.integers(topics))
    while pos < n:
        run = int(rng.geometric(1.0 / mean_len))
        out[pos : pos + run] = cur
        pos += run
        if topics > 1:
            cur = (cur + 1 + int(rng.integers(topics - 1))) % topics
    return out


def poisson(rate: float, n: int, cfg: WorkloadConfig, rng: np.random.Generator) -> Workload:
    """Poisson arrivals at ``rate`` req/s, topics drawn independently (uniform traffic)."""
    arrival = np.cumsum(rng.exponential(1.0 / rate, n))
    arrival -= arrival[0]
    prompt, output = _sizes(n, cfg, rng)
    return Workload(arrival, prompt, output, rng.integers(cfg.topics, size=n))


def bursty(rate: float, n: int, cfg: WorkloadConfig, rng: np.random.Generator) -> Workload:
    """Poisson arrivals at ``rate`` req/s in runs of one topic (semantic hotspots)."""
    wl = poisson(rate, n, cfg, rng)
    wl.topic = topic_runs(n, cfg.topics, cfg.burst_len, rng)
    return wl


def _parse_time(text: str) -> float:
    """Seconds: a plain number, or a timestamp like Azure's '2023-11-16 18:15:46.6805900'."""
    try:
        return float(text)
    except ValueError:
        pass
    head, _, frac = text.strip().partition(".")
    stamp = datetime.strptime(head, "%Y-%m-%d %H:%M:%S").timestamp()
    if frac and not frac.isdigit():
        raise ValueError(f"bad fractional seconds {frac!r}")
    return stamp + (float("0." + frac) if frac else 0.0)


TRACE_COLUMNS = {
    ("TIMESTAMP", "ContextTokens", "GeneratedTokens"),
    ("arrival_s", "prompt_tokens", "output_tokens"),
}


def load_trace(path: str | Path) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Arrival seconds (from the first), prompt and output tokens, from a trace CSV.

    Accepts the Azure LLM trace header (TIMESTAMP,ContextTokens,GeneratedTokens) and a plain
    arrival_s,prompt_tokens,output_tokens one. A malformed row raises ValueError naming the
    file and line.
    """
    path = Path(path)
    times, prompts, outputs = [], [], []
    with path.open(newline="") as f:
        reader = csv.reader(f)
        header = tuple(c.strip() for c in next(reader, ()))
        if header not in TRACE_COLUMNS:
            raise ValueError(f"{path}:1: expected a header of {' or '.join(map(','.join, TRACE_COLUMNS))}, got {','.join(header)!r}")
        for row in reader:
            line = reader.line_num
            if not row or not "".join(row).strip():
                continue
            try:
                if len(row) != 3:
                    raise ValueError(f"expected 3 fields, got {len(row)}")
                t, p, o = _parse_time(row[0]), int(row[1]), int(row[2])
                if not np.isfinite(t) or p < 0 or o < 0:
                    raise ValueError("times must be finite and token counts >= 0")
            except ValueError as exc:
                raise ValueError(f"{path}:{line}: malformed trace row {row!r}: {exc}") from None
            times.append(t)
            prompts.append(p)
            outputs.append(o)
    if not times:
        raise ValueError(f"{path}: no requests in trace")
    t = np.asarray(times)
    order = np.argsort(t, kind="stable")
    t = t[order] - t[order[0]]
    return t, np.asarray(prompts, dtype=np.int64)[order], np.asarray(outputs, dtype=np.int64)[order]


def trace(path: str | Path, rate: float | None, n: int, cfg: WorkloadConfig, rng: np.random.Generator) -> Workload:
    """Replay the first ``n`` requests of a trace (times and sizes), topics in runs as in bursty.

    With ``rate`` the arrival times are scaled so the mean rate is ``rate`` req/s (the trace's
    burst shape is kept); without it they are replayed as recorded.
    """
    t, prompt, output = load_trace(path)
    t, prompt, output = t[:n], np.maximum(prompt[:n], 1), np.maximum(output[:n], 1)
    if rate is not None and t.shape[0] > 1 and t[-1] > 0:
        t = t * ((t.shape[0] - 1) / t[-1] / rate)
    return Workload(t, prompt, output, topic_runs(t.shape[0], cfg.topics, cfg.burst_len, rng))


def topic_profiles(cfg: WorkloadConfig, rng: np.random.Generator) -> np.ndarray:
    """(topics, layers*experts) routing probabilities: each topic leans on a few hot experts per layer."""
    e = cfg.num_experts
    prof = np.full((cfg.topics, cfg.layers, e), (1.0 - cfg.hot_share) / e)
    for t in range(cfg.topics):
        for layer in range(cfg.layers):
            hot = rng.choice(e, size=cfg.hot_experts, replace=False)
            prof[t, layer, hot] += cfg.hot_share / cfg.hot_experts
    return prof.reshape(cfg.topics, cfg.layers * e)


def expert_vectors(wl: Workload, cfg: WorkloadConfig, rng: np.random.Generator) -> np.ndarray:
    """(n, layers*experts) expert loads: prompt_tokens * top_k routings per layer.

    Each request's routing distribution is drawn around its topic's profile (Dirichlet), then
    its counts are multinomial. Per-token distinctness of the top-k is not modelled.
    """
    prof = topic_profiles(cfg, rng)
    n, e, layers = len(wl), cfg.num_experts, cfg.layers
    p = rng.gamma(cfg.request_concentration * prof[wl.topic] + 1e-3).reshape(n, layers, e)
    p /= p.sum(axis=2, keepdims=True)
    tokens = wl.prompt_tokens.astype(np.int64)[:, None]
    counts = rng.multinomial(tokens * cfg.top_k, p).reshape(n, layers * e).astype(np.float64)
    if cfg.vectors == "per_token":
        return counts / tokens
    if cfg.vectors != "counts":
        raise ValueError(f"vectors must be 'counts' or 'per_token', got {cfg.vectors!r}")
    return counts
