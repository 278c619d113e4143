"""What a step pays per distinct expert on a GPU: reads from pinned host memory, from HBM, and the
grouped MoE GEMM, against the number of distinct experts (torch and Triton only: the lent GPU has
no vLLM and no network).

The regime map (``sim/deployments.py``) prices an offloaded expert at its bytes over PCIe at 80 %
of the link's peak; this measures it, three ways per distinct-expert count ``d``:

* ``h2d``: ``d`` experts copied from pinned host memory to the GPU (what an expert cache's miss does);
* ``uva``: a Triton kernel reading ``d`` experts in place from pinned host memory through unified
  addressing (what vLLM's ``--cpu-offload-params experts`` does); skipped where Triton cannot
  launch on a host pointer;
* ``hbm``: the same kernel reading ``d`` resident experts;

and the grouped GEMM (gate_up then down, bf16) of ``t`` tokens on each of ``d`` experts. Writes
JSON (device, rows, a per-distinct-expert and per-(token, expert) fit) and prints a table.

    python tests/benchmarks/gpu_expert_reads.py --out $OUT/gpu_expert_reads.json       # on the GPU
    python tests/benchmarks/gpu_expert_reads.py --device cpu --shapes tiny              # a dry run
"""

from __future__ import annotations

import argparse
import json
import platform
import sys
import time

import numpy as np
import torch

#: (hidden, expert intermediate) from the models' Hugging Face configs (sim/models)
SHAPES = {
    "qwen1.5-moe-a2.7b": (2048, 1408),  # also DeepSeek-V2-Lite's
    "qwen3-30b-a3b": (2048, 768),
    "olmoe-1b-7b": (2048, 1024),
    "deepseek-v3-like": (7168, 2048),
    "tiny": (64, 32),
}


def timer(device: str, fn, repeats: int) -> float:
    """Median seconds of ``fn()`` over ``repeats`` (after one warm-up)."""
    fn()
    out = []
    for _ in range(repeats):
        if device == "cuda":
            a, b = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
            a.record()
            fn()
            b.record()
            torch.cuda.synchronize()
            out.append(a.elapsed_time(b) / 1e3)
        else:
            t0 = time.perf_counter()
            fn()
            out.append(time.perf_counter() - t0)
    return float(np.median(out))


def read_kernel():
    """A Triton kernel summing ``n`` bf16 values from a pointer (host-mapped or device)."""
    import triton
    import triton.language as tl

    @triton.jit
    def _sum(src, dst, n, BLOCK: tl.constexpr):
        pid = tl.program_id(0)
        offs = pid * BLOCK + tl.arange(0, BLOCK)
        x = tl.load(src + offs, mask=offs < n, other=0.0).to(tl.float32)
        tl.atomic_add(dst, tl.sum(x, axis=0))

    def run(src, n: int, dst) -> None:
        _sum[(triton.cdiv(n, 8192),)](src, dst, n, BLOCK=8192)

    return run


class HostPointer:
    """A pinned host tensor's address handed to Triton as if it were device memory (UVA)."""

    def __init__(self, t: torch.Tensor) -> None:
        self.t, self.dtype = t, t.dtype

    def data_ptr(self) -> int:
        return self.t.data_ptr()


def measure(shape: str, experts: int, distinct: list[int], tokens: list[int], device: str, repeats: int) -> list[dict]:
    h, inter = SHAPES[shape]
    per = 3 * h * inter  # bf16 values per expert: gate, up, down
    cuda = device == "cuda"
    host = torch.empty((experts, per), dtype=torch.bfloat16, pin_memory=cuda).normal_()
    dev = host.to(device)
    rows = []
    kernel = read_kernel() if cuda else None
    acc = torch.zeros(1, device=device)
    for d in [x for x in distinct if x <= experts]:
        nbytes = d * per * 2
        r = {"shape": shape, "distinct": d, "bytes": nbytes}
        buf = torch.empty((d, per), dtype=torch.bfloat16, device=device)
        r["h2d_s"] = timer(device, lambda: buf.copy_(host[:d], non_blocking=True), repeats)
        if cuda:
            r["hbm_s"] = timer(device, lambda: kernel(dev[:d], d * per, acc), repeats)
            try:
                r["uva_s"] = timer(device, lambda: kernel(HostPointer(host[:d]), d * per, acc), repeats)
            except Exception as exc:  # noqa: BLE001 - recorded, the other figures still stand
                r["uva_error"] = f"{type(exc).__name__}: {exc}"[:200]
        for k in ("h2d", "hbm", "uva"):
            if f"{k}_s" in r:
                r[f"{k}_gb_s"] = nbytes / r[f"{k}_s"] / 1e9
        w1 = dev[:d, : 2 * h * inter].reshape(d, h, 2 * inter)
        w2 = dev[:d, 2 * h * inter :].reshape(d, inter, h)
        for t in tokens:
            x = torch.randn((d, t, h), dtype=torch.bfloat16, device=device)

            def gemm(x=x, w1=w1, w2=w2) -> None:
                g, u = torch.bmm(x, w1).chunk(2, dim=-1)
                torch.bmm(torch.nn.functional.silu(g) * u, w2)

            r[f"gemm_t{t}_s"] = timer(device, gemm, repeats)
        rows.append(r)
        print(json.dumps({k: (round(v, 7) if isinstance(v, float) else v) for k, v in r.items()}), flush=True)
    return rows


def fit(rows: list[dict], key: str) -> dict | None:
    """Seconds = a + b x distinct, least squares: b is the per-distinct-expert cost."""
    pts = [(r["distinct"], r[key]) for r in rows if key in r]
    if len(pts) < 2:
        return None
    b, a = (float(v) for v in np.polyfit(*zip(*pts), 1))
    per_expert_bytes = rows[0]["bytes"] / rows[0]["distinct"]
    return {"per_expert_ms": b * 1e3, "fixed_ms": a * 1e3, "gb_s": per_expert_bytes / b / 1e9 if b > 0 else None}


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--shapes", nargs="+", default=["qwen1.5-moe-a2.7b", "qwen3-30b-a3b"], choices=sorted(SHAPES))
    ap.add_argument("--experts", type=int, default=64, help="experts allocated per shape (pinned host and HBM)")
    ap.add_argument("--distinct", nargs="+", type=int, default=[1, 2, 4, 8, 16, 32, 64])
    ap.add_argument("--tokens", nargs="+", type=int, default=[1, 8, 32])
    ap.add_argument("--repeats", type=int, default=20)
    ap.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu", choices=("cuda", "cpu"))
    ap.add_argument("--out", help="JSON output")
    a = ap.parse_args(argv)
    if a.device == "cuda" and not torch.cuda.is_available():
        ap.error("--device cuda: no CUDA device here (use --device cpu for a dry run)")
    doc = {
        "device": torch.cuda.get_device_name() if a.device == "cuda" else platform.processor() or "cpu",
        "torch": torch.__version__,
        "args": vars(a),
        "shapes": {},
    }
    for s in a.shapes:
        rows = measure(s, a.experts, a.distinct, a.tokens, a.device, a.repeats)
        doc["shapes"][s] = {"rows": rows, **{f"fit_{k}": fit(rows, f"{k}_s") for k in ("h2d", "uva", "hbm")}}
        print(s, {k: v for k, v in doc["shapes"][s].items() if k.startswith("fit")}, flush=True)
    if a.out:
        with open(a.out, "w") as f:
            json.dump(doc, f, indent=1)
    return 0


if __name__ == "__main__":
    sys.exit(main())
