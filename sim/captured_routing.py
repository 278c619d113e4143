"""The embedded model's own routing, captured, for the twin: what its router does with each prompt.

The embedded tiny MoE is on local disk, so its real routing is at hand: a forward pass over a
prompt (Hugging Face transformers, the model's own weights) gives every prompt token's top-k
experts in every MoE layer. A prompt's tokens share experts far more than tokens of different
requests do (on the live engine a 10-token prefill chunk touched 12.5 experts a layer, two
decode tokens of different requests 7.5 — uniform's 7.5), so a step's distinct experts depend
on which requests' prompts it holds; replaying the captured routing prices that. Decode tokens
are not captured (it would take the generated text): each draws top-k experts uniformly, seeded
by request and position — an assumption, matching what the live step log shows for decode.
"""

from __future__ import annotations

import zlib
from pathlib import Path

import numpy as np

from caps_vllm.routing import counts_from_rows


class CapturedRouting:
    """``counts(spans)`` of the twin's step model: exact per-expert counts (not expected)."""

    expected = False

    def __init__(self, model_dir: str | Path, seed: int = 0) -> None:
        import torch
        from transformers import AutoModelForCausalLM

        self.torch = torch
        self.model = AutoModelForCausalLM.from_pretrained(str(model_dir), dtype=torch.float32).eval()
        cfg = self.model.config
        self.layers, self.experts, self.top_k = cfg.num_hidden_layers, cfg.num_experts, cfg.num_experts_per_tok
        self.seed = seed
        self._cache: dict[tuple[int, ...], np.ndarray] = {}
        self._prompt: dict[str, np.ndarray] = {}  # rid -> [prompt tokens, layers, k]

    def route(self, ids: list[int]) -> np.ndarray:
        """[tokens, layers, top_k] experts the model's routers pick for a prompt (cached)."""
        key = tuple(ids)
        if key not in self._cache:
            with self.torch.no_grad():
                out = self.model(self.torch.tensor([ids]), output_router_logits=True)
            logits = self.torch.stack([r.reshape(len(ids), -1) for r in out.router_logits], dim=1)
            self._cache[key] = logits.topk(self.top_k, dim=-1).indices.numpy()
        return self._cache[key]

    def bind(self, rid: str, prompt: list[int]) -> None:
        self._prompt[rid] = self.route(prompt)

    def counts(self, spans: list[tuple[str, int, int]]) -> np.ndarray:
        total = np.zeros((self.layers, self.experts), dtype=np.int64)
        for rid, start, n in spans:
            rows = self._prompt[rid]
            routed = rows[start : start + n]
            if len(routed):
                total += counts_from_rows(routed, self.experts)
            for pos in range(start + len(routed), start + n):  # decode tokens: uniform draws
                rng = np.random.default_rng([self.seed, zlib.crc32(rid.encode()), pos])
                draw = np.argpartition(rng.random((self.layers, self.experts)), self.top_k, axis=1)[:, : self.top_k]
                total += counts_from_rows(draw[None], self.experts)
        return total
