"""What the model actually routed in one step, and the figures computed from it.

The worker reduces each step's router decisions to counts on the device (see
:mod:`caps_vllm.capture`) and sends a :class:`RoutingRecord` back on vLLM's
``ModelRunnerOutput``; the scheduler turns records into metrics. Pure numpy, no vLLM import,
so the arithmetic is tested on its own and shared by the GPU path (vLLM's routed-experts rows).
"""

from __future__ import annotations

from dataclasses import dataclass, field

import numpy as np


@dataclass
class RoutingRecord:
    """One step's actual routing, counted over the step's tokens.

    ``layer_counts[l, e]`` is how many of the step's tokens layer ``moe_layers[l]`` sent to
    expert ``e`` (each token counts once per expert of its top-k). ``prompt_counts[req_id]``
    holds the same for the prompt tokens that request had in this step (what the predictor
    predicts); ``prompt_start[req_id]`` is the first of those prompt positions.
    ``decode_counts[req_id]`` (only with ``caps.capture_decode``) counts the request's decode
    tokens of the step. ``prompt_rows[req_id]`` (only with ``caps.learn``) holds the routed
    expert ids ``[tokens, layers, top_k]`` of that request's first prompt tokens of the step,
    from ``prompt_start`` on (at most ``learn_rows_per_step`` tokens a step in all).
    """

    moe_layers: tuple[int, ...]
    layer_counts: np.ndarray  # [layers, experts] int
    num_tokens: int
    prompt_counts: dict[str, np.ndarray] = field(default_factory=dict)
    prompt_start: dict[str, int] = field(default_factory=dict)
    decode_counts: dict[str, np.ndarray] = field(default_factory=dict)
    prompt_rows: dict[str, np.ndarray] = field(default_factory=dict)


@dataclass(frozen=True)
class LoadShape:
    """Per-layer imbalance figures of one expert-load matrix, averaged over layers."""

    cv: float  # coefficient of variation of the per-expert load
    max_over_mean: float
    distinct: float  # experts with load >= threshold, per layer
    per_layer_max_over_mean: np.ndarray


def load_shape(load: np.ndarray, distinct_threshold: float = 1.0) -> LoadShape | None:
    """Imbalance of ``load`` [layers, experts]; None when nothing was routed.

    Layers without load are left out of the averages (they carry no information).
    """
    return load_shapes(np.asarray(load, dtype=np.float64)[None], distinct_threshold)[0]


def load_shapes(loads: np.ndarray, distinct_threshold: float = 1.0) -> list[LoadShape | None]:
    """:func:`load_shape` of each of ``loads`` [steps, layers, experts], in one pass of array
    operations (the observer batches its steps: the per-call overhead, not the arithmetic, is
    what a step's figures cost)."""
    loads = np.asarray(loads, dtype=np.float64)
    experts = loads.shape[2]
    mean = np.add.reduce(loads, axis=2) / experts
    live = mean > 0
    safe = np.where(live, mean, 1.0)
    top = np.where(live, np.maximum.reduce(loads, axis=2) / safe, 0.0)
    dev = loads - mean[..., None]
    cv = np.where(live, np.sqrt(np.einsum("kij,kij->ki", dev, dev) / experts) / safe, 0.0)  # np.std's two passes
    distinct = np.where(live, np.add.reduce(loads >= distinct_threshold, axis=2), 0)
    n = np.add.reduce(live, axis=1)
    per = np.maximum(n, 1)
    # the per-step means over layers in three reductions, not three per step
    means = (np.add.reduce(cv, axis=1) / per, np.add.reduce(top, axis=1) / per, np.add.reduce(distinct, axis=1) / per)
    return [
        LoadShape(c, t, k, top[i]) if n_i else None
        for i, (n_i, c, t, k) in enumerate(zip(n.tolist(), *(m.tolist() for m in means)))
    ]


def counts_from_rows(rows: np.ndarray, num_experts: int) -> np.ndarray:
    """[tokens, layers, top_k] expert ids (vLLM's routed-experts rows) -> [layers, experts] counts."""
    rows = np.asarray(rows)
    if rows.ndim != 3:
        raise ValueError(f"routed-experts rows must be [tokens, layers, top_k], got shape {rows.shape}")
    layers = rows.shape[1]
    if rows.size == 0:
        return np.zeros((layers, num_experts), dtype=np.int64)
    flat = rows.astype(np.int64) + (np.arange(layers, dtype=np.int64) * num_experts)[None, :, None]
    return np.bincount(flat.ravel(), minlength=layers * num_experts).reshape(layers, num_experts)


def cosine(a: np.ndarray, b: np.ndarray) -> float | None:
    """Cosine similarity of two expert histograms (None if either is empty)."""
    a = np.asarray(a, dtype=np.float64).ravel()
    b = np.asarray(b, dtype=np.float64).ravel()
    na, nb = np.linalg.norm(a), np.linalg.norm(b)
    if na == 0 or nb == 0:
        return None
    return float(a @ b / (na * nb))


def topk_overlap(predicted: np.ndarray, actual: np.ndarray, k: int) -> float | None:
    """Mean over layers of |top-k predicted experts ∩ top-k actual experts| / k.

    Both are [layers, experts]; layers where nothing was routed are skipped. Ties are broken
    by expert id (stable sort), the same way on both sides.
    """
    predicted = np.asarray(predicted, dtype=np.float64)
    actual = np.asarray(actual, dtype=np.float64)
    live = actual.sum(axis=1) > 0
    if not live.any():
        return None
    k = min(k, actual.shape[1])
    top_p = np.argsort(-predicted[live], axis=1, kind="stable")[:, :k]
    top_a = np.argsort(-actual[live], axis=1, kind="stable")[:, :k]
    shared = [len(set(p) & set(a)) for p, a in zip(top_p.tolist(), top_a.tolist())]
    return float(np.mean(shared) / k)
