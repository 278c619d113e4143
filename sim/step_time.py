"""How long one engine step takes, for the twin: a model of the step, per hardware profile.

A step's time is a fixed per-step overhead, plus the non-MoE part of the model (attention and
dense weights: read once per step, their arithmetic per token; attention's KV reads per token
of context), plus every MoE layer priced by ``caps_vllm.step_cost`` from that step's per-expert
token counts. GPU profiles are rooflines from public bandwidth and FLOP/s figures with stated
efficiencies: a model, not a measurement. Pure numpy (the twin hands it what it read off
vLLM's scheduler output).
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from caps_vllm.step_cost import StepCostModel


@dataclass(frozen=True)
class Hardware:
    """Public peak figures of one device."""

    name: str
    bandwidth: float  # bytes/s of device memory
    flops: float  # dense bf16 FLOP/s
    bandwidth_efficiency: float = 0.8  # assumed share of peak reached by weight and KV reads
    flops_efficiency: float = 0.5  # assumed share of peak reached by the GEMMs
    fixed_s: float = 1e-3  # assumed per-step overhead: scheduling, sampling, launches


HARDWARE: dict[str, Hardware] = {
    "h100": Hardware("h100", 3.35e12, 989e12),  # H100 SXM: HBM3 3.35 TB/s, 989 TFLOP/s bf16 dense
    "h200": Hardware("h200", 4.8e12, 989e12),  # H200 SXM: HBM3e 4.8 TB/s, same compute as H100
}


@dataclass(frozen=True)
class ModelShape:
    """What the step model needs of an MoE model, read from its Hugging Face config."""

    name: str
    layers: int
    moe_layers: tuple[int, ...]
    experts: int
    top_k: int
    hidden: int
    expert_intermediate: int
    dense_params_per_token: float  # parameters every token multiplies (attention, shared/dense MLPs, lm head)
    kv_bytes_per_token: float
    dtype_bytes: int = 2

    @property
    def expert_bytes(self) -> float:
        return 3.0 * self.hidden * self.expert_intermediate * self.dtype_bytes  # gate, up, down

    @property
    def expert_flops_per_token(self) -> float:
        return 2.0 * 3.0 * self.hidden * self.expert_intermediate

    @classmethod
    def from_config(cls, path: str | Path, name: str | None = None) -> ModelShape:
        """From a ``config.json`` (or the folder holding one): Qwen2-MoE / Qwen3-MoE / DeepSeek-V2/V3 layouts."""
        p = Path(path)
        cfg = json.loads((p / "config.json" if p.is_dir() else p).read_text())
        mt = cfg.get("model_type", "")
        if not (cfg.get("num_experts") or cfg.get("n_routed_experts")):
            raise ValueError(f"{p}: no MoE layers (model_type {mt!r}: no num_experts or n_routed_experts)")
        h, layers, vocab = cfg["hidden_size"], cfg["num_hidden_layers"], cfg["vocab_size"]
        heads = cfg["num_attention_heads"]
        kv_heads = cfg.get("num_key_value_heads", heads)
        if mt.startswith("deepseek"):
            experts, top_k = cfg["n_routed_experts"], cfg["num_experts_per_tok"]
            first_dense, freq = cfg.get("first_k_dense_replace", 0), cfg.get("moe_layer_freq", 1)
            moe = tuple(i for i in range(layers) if i >= first_dense and i % freq == 0)
            rope, nope, v = cfg["qk_rope_head_dim"], cfg["qk_nope_head_dim"], cfg["v_head_dim"]
            lora = cfg["kv_lora_rank"]
            q = (
                h * heads * (rope + nope)
                if not cfg.get("q_lora_rank")
                else cfg["q_lora_rank"] * (h + heads * (rope + nope))
            )
            attn = q + h * (lora + rope) + lora * heads * (nope + v) + heads * v * h
            shared = 3 * h * cfg["moe_intermediate_size"] * cfg.get("n_shared_experts", 0)
            dense_mlp = 3 * h * cfg["intermediate_size"]
            per_token = layers * attn + len(moe) * shared + (layers - len(moe)) * dense_mlp
            kv = (lora + rope) * layers * 2  # MLA caches the compressed latent and the rope key
            inter = cfg["moe_intermediate_size"]
        else:  # qwen2_moe, qwen3_moe, olmoe (no shared experts, every layer MoE)
            experts, top_k = cfg["num_experts"], cfg["num_experts_per_tok"]
            step = cfg.get("decoder_sparse_step", 1)
            skip = set(cfg.get("mlp_only_layers", []) or [])
            moe = tuple(i for i in range(layers) if i not in skip and (i + 1) % step == 0)
            head_dim = cfg.get("head_dim") or h // heads
            attn = h * head_dim * (heads + 2 * kv_heads) + heads * head_dim * h
            shared = 3 * h * cfg.get("shared_expert_intermediate_size", 0)
            dense_mlp = 3 * h * cfg["intermediate_size"]
            per_token = layers * attn + len(moe) * shared + (layers - len(moe)) * dense_mlp
            kv = 2 * layers * kv_heads * head_dim * 2
            # OLMoE's config names its expert width intermediate_size (no dense MLPs there)
            inter = cfg.get("moe_intermediate_size", cfg["intermediate_size"])
        per_token += h * vocab  # lm head
        return cls(name or p.name, layers, moe, experts, top_k, h, inter, float(per_token), float(kv))


@dataclass(frozen=True)
class StepBatch:
    """What the step model reads of one step."""

    tokens: int  # scheduled
    context_tokens: int  # KV tokens read: each scheduled request's context, once
    moe_counts: np.ndarray  # (MoE layers, experts): tokens routed to each expert
    expected: bool = False  # counts are expected values (see StepCostModel.expert_ms)
    prefill_requests: int = 0  # requests with prompt tokens in the step
    decode_requests: int = 0  # requests decoding one token


class RooflineStep:
    """Seconds of a step on ``hardware`` for ``shape`` (each part: max of its weight/KV reads
    and its arithmetic at the assumed efficiencies)."""

    def __init__(self, hardware: Hardware, shape: ModelShape) -> None:
        self.hw, self.shape = hardware, shape
        bw = hardware.bandwidth * hardware.bandwidth_efficiency
        fl = hardware.flops * hardware.flops_efficiency
        self._bw, self._fl = bw, fl
        # One MoE layer in the step-cost model's units (milliseconds): per expert the larger of
        # reading its weights and its tokens' arithmetic.
        self.moe = StepCostModel(
            fixed_ms=0.0,
            weight_ms=shape.expert_bytes / bw * 1e3,
            token_ms=shape.expert_flops_per_token / fl * 1e3,
            form="roofline",
        )

    def dense_seconds(self, b: StepBatch) -> float:
        """The non-MoE part: dense weights read once, KV reads, their arithmetic per token."""
        s = self.shape
        if b.tokens == 0:
            return 0.0
        weights = s.dense_params_per_token * s.dtype_bytes
        return max(
            (weights + b.context_tokens * s.kv_bytes_per_token) / self._bw,
            2.0 * s.dense_params_per_token * b.tokens / self._fl,
        )

    def seconds(self, b: StepBatch) -> float:
        moe_ms = float(self.moe.layer_ms(b.moe_counts, expected=b.expected).sum()) if b.moe_counts.size else 0.0
        return self.hw.fixed_s + self.dense_seconds(b) + moe_ms / 1e3


class UniformRouting:
    """Each token picks ``top_k`` of ``experts`` uniformly in every MoE layer: a step's expected
    per-expert counts (the baseline before real or captured routing is replayed)."""

    expected = True

    def __init__(self, shape: ModelShape) -> None:
        self.shape = shape

    def counts(self, spans: list[tuple[str, int, int]]) -> np.ndarray:
        """Expected [MoE layers, experts] counts of a step's (request, start, n) spans."""
        s, tokens = self.shape, sum(n for _, _, n in spans)
        return np.full((len(s.moe_layers), s.experts), tokens * s.top_k / s.experts)


class VllmStepTime:
    """The twin's ``step_time(scheduler, out)``: reads the step off vLLM's scheduler output and
    prices it with ``model`` (a RooflineStep, or a measured ``sim.step_profile.MeasuredStep``), the MoE loads from ``routing`` (anything with
    ``counts(spans)`` and ``expected``: UniformRouting, sim.routing_replay.EsftReplay). The last
    step's counts stay in ``last_counts`` for the twin's statistics."""

    def __init__(self, model: RooflineStep, routing) -> None:
        self.model, self.routing = model, routing
        self.last_counts: np.ndarray | None = None

    def batch(self, scheduler, out) -> StepBatch:
        """What the step model reads of one engine's scheduled step."""
        spans, context, prefill = [], 0, 0
        for rid, n in out.num_scheduled_tokens.items():
            req = scheduler.requests[rid]
            before = req.num_computed_tokens - n  # schedule() has advanced it already
            spans.append((rid, before, n))
            context += before + n  # its KV is read once per step (attention's arithmetic is not modelled)
            prefill += before < req.num_prompt_tokens
        return StepBatch(
            sum(n for _, _, n in spans),
            context,
            self.routing.counts(spans),
            self.routing.expected,
            prefill,
            len(spans) - prefill,
        )

    def __call__(self, scheduler, out) -> float:
        b = self.batch(scheduler, out)
        self.last_counts = b.moe_counts
        return self.model.seconds(b)
