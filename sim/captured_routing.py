"""The embedded model's own routing, captured, for the twin: what its router does with each request.

The embedded tiny MoE is on local disk, so its real routing is at hand: a forward pass over a
prompt (Hugging Face transformers, the model's own weights) gives every prompt token's top-k
experts in every MoE layer. A prompt's tokens share experts far more than tokens of different
requests do, so a step's distinct experts depend on which requests' prompts it holds; replaying
the captured routing prices that.

Decode tokens: the live load tests decode greedily (temperature 0, ``ignore_eos``), so a request's
decode routing is that of its own greedy continuation: ``bind(rid, prompt, output_tokens)``
generates it (transformers, float32; vLLM's bf16 kernels may take another token after a near
tie, so the text can part from the server's after a while) and a decode position takes the routing
of the token the engine feeds at that position. That is what makes one-topic decode batches
share experts in the twin as they do live. Without output tokens (``decode="uniform"``, the old
assumption) each decode position draws top-k experts uniformly, seeded by request and position.

The real-cost model (:mod:`caps_vllm.real_cost`) computes the shipped model's function, so its
routing is captured on the shipped model (a 4 GB float32 copy would add nothing).
"""

from __future__ import annotations

import json
import zlib
from pathlib import Path

import numpy as np

from caps_vllm.routing import counts_from_rows

DECODE = ("generated", "uniform")


def routing_model(model_dir: str | Path) -> Path:
    """The checkpoint whose routing ``model_dir`` has: the shipped model for the real-cost one."""
    model_dir = Path(model_dir)
    try:
        record = json.loads((model_dir / "caps_model.json").read_text())
    except (OSError, ValueError):
        return model_dir
    if "real_cost" in record:
        from caps_vllm.tiny_model import digest, shipped_dir

        if digest(shipped_dir()) != record["real_cost"]["source_digest"]:
            raise ValueError(f"{model_dir} was padded from another embedded model than the one installed; rebuild it")
        return shipped_dir()
    return model_dir


class CapturedRouting:
    """``counts(spans)`` of the twin's step model: exact per-expert counts (not expected)."""

    expected = False

    def __init__(self, model_dir: str | Path, seed: int = 0, decode: str = "generated") -> None:
        import torch
        from transformers import AutoModelForCausalLM

        if decode not in DECODE:
            raise ValueError(f"decode routing {decode!r}; valid: {', '.join(DECODE)}")
        self.torch = torch
        self.model = AutoModelForCausalLM.from_pretrained(str(routing_model(model_dir)), dtype=torch.float32).eval()
        cfg = self.model.config
        self.layers, self.experts, self.top_k = cfg.num_hidden_layers, cfg.num_experts, cfg.num_experts_per_tok
        self.seed, self.decode = seed, decode
        self._cache: dict[tuple[int, ...], np.ndarray] = {}
        self._generated: dict[tuple[int, ...], np.ndarray] = {}  # prompt -> routing of prompt + continuation
        self._seq: dict[str, np.ndarray] = {}  # rid -> [tokens it feeds, layers, k]

    def route(self, ids: list[int]) -> np.ndarray:
        """[tokens, layers, top_k] experts the model's routers pick for a token sequence (cached)."""
        key = tuple(ids)
        if key not in self._cache:
            with self.torch.no_grad():
                out = self.model(self.torch.tensor([ids]), output_router_logits=True)
            logits = self.torch.stack([r.reshape(len(ids), -1) for r in out.router_logits], dim=1)
            self._cache[key] = logits.topk(self.top_k, dim=-1).indices.numpy()
        return self._cache[key]

    def continuation(self, prompt: list[int], tokens: int) -> np.ndarray:
        """Routing of the prompt followed by its greedy continuation of ``tokens`` tokens (cached
        per prompt, regenerated only when a longer one is asked for)."""
        key = tuple(prompt)
        have = self._generated.get(key)
        if have is None or len(have) < len(prompt) + tokens:
            with self.torch.no_grad():
                seq = self.model.generate(
                    self.torch.tensor([prompt]),
                    max_new_tokens=tokens,
                    min_new_tokens=tokens,  # as the load tests' ignore_eos
                    do_sample=False,
                    pad_token_id=self.model.config.pad_token_id,
                )[0].tolist()
            self._generated[key] = have = self.route(seq)
            self._cache.pop(tuple(seq), None)  # kept once, under the prompt
        return have[: len(prompt) + tokens]

    def bind(self, rid: str, prompt: list[int], output_tokens: int = 0) -> None:
        if self.decode == "generated" and output_tokens > 1:
            self._seq[rid] = self.continuation(prompt, output_tokens - 1)  # the last token is never fed back
        else:
            self._seq[rid] = self.route(prompt)

    def rows(self, rid: str) -> np.ndarray:
        """What ``bind`` captured for a request: [tokens it feeds, layers, top_k]."""
        return self._seq[rid]

    def counts(self, spans: list[tuple[str, int, int]]) -> np.ndarray:
        total = np.zeros((self.layers, self.experts), dtype=np.int64)
        for rid, start, n in spans:
            rows = self._seq[rid]
            routed = rows[start : start + n]
            if len(routed):
                total += counts_from_rows(routed, self.experts)
            for pos in range(start + len(routed), start + n):  # past what was captured: uniform draws
                rng = np.random.default_rng([self.seed, zlib.crc32(rid.encode()), pos])
                draw = np.argpartition(rng.random((self.layers, self.experts)), self.top_k, axis=1)[:, : self.top_k]
                total += counts_from_rows(draw[None], self.experts)
        return total
