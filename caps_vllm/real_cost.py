"""The embedded model at a real MoE's cost: the tiny model's function, zero-padded to real widths.

The shipped tiny Qwen2-MoE (hidden 128, 60 experts of 64, top-4) keeps its 49 KB experts in this
CPU's cache, so a step costs the same whichever experts it reads, and no order can matter. Padded
with zeros to Qwen1.5-MoE-A2.7B's layer shape (hidden 2048, 16 heads of 128, 60 experts of 1408,
a shared expert of 5632: 17.3 MB per expert, 1.04 GB of experts per layer, 32x this CPU's 32 MB
last-level cache), it computes exactly the same function — the same logits and the same routing
— while every expert read and every (token, expert) multiply costs what it costs in that model.
It is the tiny model's routing with a real model's MoE cost (4 layers, not 24; vocabulary 1024).

Why the padding is exact: a zero row of an expert's gate and up projections gives
``silu(0) * 0 = 0``, which its zero down-projection column adds nowhere; the extra hidden
dimensions stay zero through every layer (zero embedding columns, zero output rows). RMSNorm
averages over the padded width, so its scale grows by ``sqrt(2048/128) = 4``: the norm weights
are divided by 4 and eps by 16 (both powers of two: exact in bf16). Heads grow from 32 to 128
dimensions: the 4 query heads keep their places (q doubled: the softmax scale halves, exact),
each key/value head is copied to the query heads that shared it (16 KV heads, Qwen1.5-MoE's
attention, no GQA), and each rotary pair (i, i+16) moves to (4i, 64+4i), where the 128-wide
rotary embedding turns at the same frequency.

Written deterministically from the shipped checkpoint on first use, tensor by tensor (a few
seconds of memory, never the whole model), into a temporary folder renamed when complete.

    caps-vllm tiny-model --real-cost          # builds it once (4.6 GB), prints its path
"""

from __future__ import annotations

import json
import os
import shutil
import struct
from collections.abc import Iterator
from dataclasses import asdict, dataclass
from pathlib import Path

import numpy as np

from caps_vllm.tiny_model import MODEL_FILES, default_dir, digest, shipped_dir

FORMAT = 1
MARKER = "caps_model.json"


class CannotBuild(Exception):
    """The real-cost model cannot be built here: the reason names what is missing (nothing was written)."""


@dataclass(frozen=True)
class Shape:
    """The widths a checkpoint is padded to (the layer count, experts, top-k and vocabulary stay)."""

    hidden_size: int
    num_attention_heads: int
    num_key_value_heads: int
    moe_intermediate_size: int
    shared_expert_intermediate_size: int


#: Qwen1.5-MoE-A2.7B's layer (its config.json): what the real-cost model costs per layer.
QWEN15_MOE = Shape(2048, 16, 16, 1408, 5632)


def real_cost_dir() -> Path:
    return default_dir().with_name("tiny-qwen2-moe-real-cost")


class _Plan:
    """How each tensor of the source maps into the padded one (indices, scales), from two configs."""

    def __init__(self, src: dict, shape: Shape) -> None:
        h, H = src["hidden_size"], shape.hidden_size
        heads, kv = src["num_attention_heads"], src["num_key_value_heads"]
        hd, HD = h // heads, H // shape.num_attention_heads
        problems = []
        if H < h or H % 2:
            problems.append(f"hidden_size {H} must be even and >= the source's {h}")
        if shape.num_attention_heads < heads or shape.num_key_value_heads != shape.num_attention_heads:
            problems.append(f"need >= {heads} attention heads and as many KV heads (got {shape})")
        if HD < hd or HD % hd or hd % 2:
            problems.append(f"head_dim {HD} must be a multiple of the source's {hd}")
        if shape.moe_intermediate_size < src["moe_intermediate_size"]:
            problems.append(f"moe_intermediate_size {shape.moe_intermediate_size} < {src['moe_intermediate_size']}")
        if shape.shared_expert_intermediate_size < src["shared_expert_intermediate_size"]:
            problems.append("shared_expert_intermediate_size smaller than the source's")
        norm_scale, q_scale = np.sqrt(H / h), np.sqrt(HD / hd)
        for name, s in (("hidden_size ratio", norm_scale), ("head_dim ratio", q_scale)):
            if 2 ** round(np.log2(s)) != s:  # a power of two keeps the rescaled bf16 weights exact
                problems.append(f"sqrt of the {name} must be a power of two (got {s:g})")
        if problems:
            raise CannotBuild("cannot pad to this shape: " + "; ".join(problems))
        self.shape, self.h, self.H = shape, h, H
        self.norm_scale, self.q_scale = float(norm_scale), float(q_scale)
        r, half, HALF = HD // hd, hd // 2, HD // 2
        dims = np.arange(hd)
        within = (dims // half) * HALF + (dims % half) * r  # rotary pair (i, i + hd/2) -> (r i, HD/2 + r i)
        self.q_rows = (np.arange(heads)[:, None] * HD + within).ravel()  # padded row of each source q row
        self.kv_src = np.concatenate([(a // (heads // kv)) * hd + dims for a in range(heads)])
        self.kv_rows = self.q_rows  # KV head a of the padded model serves query head a
        self.moe = (src["moe_intermediate_size"], shape.moe_intermediate_size)
        self.shared = (src["shared_expert_intermediate_size"], shape.shared_expert_intermediate_size)

    def out_shape(self, name: str, shape: tuple[int, ...]) -> tuple[int, ...]:
        H, heads = self.H, self.shape.num_attention_heads
        if name.endswith(("embed_tokens.weight", "lm_head.weight")) or ".mlp.gate.weight" in name:
            return (shape[0], H)
        if name.endswith(("norm.weight", "layernorm.weight")):
            return (H,)
        if ".self_attn." in name:
            rows = heads * (H // heads)
            if name.endswith("o_proj.weight"):
                return (H, rows)
            return (rows, H) if name.endswith("weight") else (rows,)
        if ".shared_expert_gate." in name:
            return (1, H)
        wide = self.shared[1] if ".shared_expert." in name else self.moe[1]
        if name.endswith("down_proj.weight"):
            return (H, wide)
        return (wide, H)  # gate_proj, up_proj

    def pad(self, name: str, w: np.ndarray) -> np.ndarray:
        """The padded tensor (bf16 bits as uint16, or float32 for the rescaled ones)."""
        out = np.zeros(self.out_shape(name, w.shape), dtype=w.dtype)
        h = self.h
        if name.endswith(("norm.weight", "layernorm.weight")):
            out[:h] = w  # rescaled by the caller
        elif ".self_attn." in name:
            proj = name.split(".self_attn.")[1].split(".")[0]
            if proj == "o_proj":
                out[:h, self.q_rows] = w
            elif proj == "q_proj":
                out[self.q_rows, ...] = _cols(w, h, out.shape)
            else:  # k_proj, v_proj: one copy per query head that shared it
                out[self.kv_rows, ...] = _cols(w[self.kv_src], h, out.shape)
        elif name.endswith("down_proj.weight"):
            out[:h, : w.shape[1]] = w
        elif w.ndim == 2 and w.shape[1] == h:
            out[: w.shape[0], :h] = w
        else:
            raise ValueError(f"{name}: no padding rule for a tensor of shape {w.shape}")
        return out

    def scale(self, name: str) -> float:
        if name.endswith(("norm.weight", "layernorm.weight")):
            return 1.0 / self.norm_scale
        if ".self_attn.q_proj." in name:
            return self.q_scale
        return 1.0


def _cols(w: np.ndarray, h: int, shape: tuple[int, ...]) -> np.ndarray:
    """A projection's rows widened to the padded hidden size (a bias is returned as it is)."""
    if w.ndim == 1:
        return w
    out = np.zeros((w.shape[0], shape[1]), dtype=w.dtype)
    out[:, :h] = w
    return out


def padded_config(src: dict, shape: Shape) -> dict:
    cfg = dict(src)
    cfg.update(asdict(shape))
    cfg["intermediate_size"] = shape.shared_expert_intermediate_size  # dense MLP width (unused: every layer is MoE)
    cfg["rms_norm_eps"] = src["rms_norm_eps"] * src["hidden_size"] / shape.hidden_size
    cfg.pop("head_dim", None)  # vLLM's Qwen2-MoE derives it from hidden_size / heads
    return cfg


def _bf16_bits(x: np.ndarray) -> np.ndarray:
    """float32 -> bf16 bits, round to nearest even (exact here: the values are bf16 times powers of two)."""
    u = x.astype(np.float32).view(np.uint32)
    return ((u + 0x7FFF + ((u >> 16) & 1)) >> 16).astype(np.uint16)


def _tensors(src_dir: Path, plan: _Plan) -> Iterator[tuple[str, tuple[int, ...], Iterator[np.ndarray]]]:
    import torch
    from safetensors import safe_open

    with safe_open(str(src_dir / "model.safetensors"), "pt") as f:  # through torch: numpy has no bf16
        for name in sorted(f.keys()):
            t = f.get_tensor(name)
            if t.dtype != torch.bfloat16:
                raise CannotBuild(f"{name}: dtype {t.dtype}, expected bfloat16 (not the shipped checkpoint)")
            bits = t.view(torch.int16).numpy().view(np.uint16)
            padded = plan.pad(name, bits)
            s = plan.scale(name)
            if s != 1.0:
                as_f32 = (padded.astype(np.uint32) << 16).view(np.float32) * np.float32(s)
                padded = _bf16_bits(as_f32)
            yield name, padded.shape, padded


def planned_bytes(src_dir: Path, shape: Shape) -> int:
    """Bytes of the padded safetensors file (data; the header adds a few KB)."""
    from safetensors import safe_open

    plan = _Plan(json.loads((src_dir / "config.json").read_text()), shape)
    with safe_open(str(src_dir / "model.safetensors"), "pt") as f:
        return sum(2 * int(np.prod(plan.out_shape(n, tuple(f.get_slice(n).get_shape())))) for n in f.keys())


def _write_safetensors(path: Path, src_dir: Path, plan: _Plan) -> int:
    """One tensor at a time: the header from the planned shapes, then each padded tensor's bytes."""
    from safetensors import safe_open

    with safe_open(str(src_dir / "model.safetensors"), "pt") as f:
        shapes = {n: plan.out_shape(n, tuple(f.get_slice(n).get_shape())) for n in sorted(f.keys())}
    header, offset = {"__metadata__": {"format": "pt"}}, 0
    for name, shp in shapes.items():
        n = 2 * int(np.prod(shp))
        header[name] = {"dtype": "BF16", "shape": list(shp), "data_offsets": [offset, offset + n]}
        offset += n
    blob = json.dumps(header, separators=(",", ":")).encode()
    blob += b" " * (-len(blob) % 8)
    with path.open("wb") as out:
        out.write(struct.pack("<Q", len(blob)) + blob)
        for name, shp, data in _tensors(src_dir, plan):
            if shp != shapes[name]:
                raise AssertionError(f"{name}: planned {shapes[name]}, padded {shp}")
            out.write(np.ascontiguousarray(data).tobytes())
    return offset


def _available_memory() -> int | None:
    """MemAvailable, or the cgroup's memory limit where that is lower (a container's)."""
    found = []
    try:
        for line in Path("/proc/meminfo").read_text().splitlines():
            if line.startswith("MemAvailable:"):
                found.append(int(line.split()[1]) * 1024)
        limit = Path("/sys/fs/cgroup/memory.max").read_text().strip()
        if limit.isdigit():
            found.append(int(limit))
    except OSError:
        pass
    return min(found) if found else None


def room_problem(need: int, free_disk: int, memory: int | None) -> str | None:
    """Why a model of ``need`` bytes cannot be built and served here, or None."""
    margin = 256 << 20
    if free_disk < need + margin:
        return (
            f"not enough disk for the real-cost model: it needs {need / 2**30:.1f} GiB (+0.25 GiB margin), "
            f"{free_disk / 2**30:.1f} GiB is free there; free some space or pass another folder"
        )
    if memory is not None and memory < need:
        return (
            f"not enough memory to serve the real-cost model: its weights take {need / 2**30:.1f} GiB, "
            f"{memory / 2**30:.1f} GiB is available"
        )
    return None


def _check_room(out: Path, need: int) -> None:
    """Refuse before writing anything where the disk, or the memory to serve the model, is too small."""
    probe = out.parent
    while not probe.exists():
        probe = probe.parent
    problem = room_problem(need, shutil.disk_usage(probe).free, _available_memory())
    if problem:
        raise CannotBuild(f"{problem} ({probe})")


def build(out: Path | str | None = None, src: Path | str | None = None, shape: Shape = QWEN15_MOE) -> Path:
    """The padded checkpoint in ``out`` (default :func:`real_cost_dir`), built from the shipped
    model unless an up-to-date one is there; a ``src`` other than the shipped checkpoint, or too
    little disk or memory, is refused before anything is written."""
    src = Path(src) if src else shipped_dir()
    out = Path(out) if out else real_cost_dir()
    shipped = shipped_dir()
    if not (src / "model.safetensors").exists() or not (src / "config.json").exists():
        raise CannotBuild(f"no checkpoint at {src} (model.safetensors and config.json are needed)")
    source = digest(src)
    if source != digest(shipped):
        raise CannotBuild(
            f"{src} is not the shipped embedded model (its files differ from {shipped}); "
            "the real-cost model is built only from the shipped checkpoint, whose function its tests check"
        )
    record = {"format": FORMAT, "source_digest": source, "shape": asdict(shape)}
    if _up_to_date(out, record):
        return out
    cfg = json.loads((src / "config.json").read_text())
    plan = _Plan(cfg, shape)
    need = planned_bytes(src, shape)
    _check_room(out, need)
    tmp = out.with_name(out.name + f".tmp{os.getpid()}")
    if tmp.exists():
        shutil.rmtree(tmp)
    tmp.mkdir(parents=True)
    try:
        record["bytes"] = _write_safetensors(tmp / "model.safetensors", src, plan)
        (tmp / "config.json").write_text(json.dumps(padded_config(cfg, shape), indent=2) + "\n")
        for name in MODEL_FILES:
            if name not in ("config.json", "model.safetensors", MARKER) and (src / name).exists():
                shutil.copy2(src / name, tmp / name)
        shipped_record = json.loads((src / MARKER).read_text()) if (src / MARKER).exists() else {}
        (tmp / MARKER).write_text(json.dumps({**shipped_record, "real_cost": record}, indent=1) + "\n")
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    if out.exists():
        shutil.rmtree(out)
    tmp.replace(out)
    return out


def _up_to_date(out: Path, record: dict) -> bool:
    try:
        have = json.loads((out / MARKER).read_text())["real_cost"]
        size = (out / "model.safetensors").stat().st_size
    except (OSError, ValueError, KeyError):
        return False
    return {k: have.get(k) for k in record} == record and size > have.get("bytes", 0)
