"""MoE-layer time as a function of the per-expert token counts, with the kernel that serves.

Raw measurements for the step-cost model (issue 6), not a test. On CPU: vLLM's fused-MoE op
(`ops.cpu_fused_moe`, the path vLLM's CPU backend runs, weights prepacked as vLLM prepacks
them), bf16, for a Qwen1.5-MoE-A2.7B-shaped layer (hidden 2048, 60 experts of 1408, top-4) and
a half-width one (hidden 1024, 60 experts of 704, top-4). For each number of tokens per step,
the routing goes from fully concentrated (every token on the same top-k experts) to spread
over ``distinct`` experts with equal load, plus a Zipf-skewed load over all experts. Each
point: median of ``--reps`` timed calls after one warm-up. The per-expert counts go to the CSV too
(``counts``, space separated), because the cost model is fitted on them. Writes CSV rows as it goes, so a
time budget (``--budget-s``) cuts the sweep cleanly; the machine's description goes to a
``.machine.txt`` beside the CSV.

    caps-vllm profile-moe --out moe_kernel_cpu.csv
    caps-vllm profile-moe --device cuda --out moe_kernel_gpu.csv

(``make bench-moe`` writes this repository's ``tests/benchmarks/results/moe_kernel_cpu.csv``.)

``--device cuda`` times the same layers on a GPU with per-expert torch matmuls (the reference
grouped GEMM: one matmul pair per expert that has tokens), synchronised around each call.
"""

from __future__ import annotations

import argparse
import csv
import os
import platform
import statistics
import subprocess
import sys
import time
from pathlib import Path

import numpy as np

SHAPES = {"qwen1.5-moe": (2048, 1408, 60, 4), "half": (1024, 704, 60, 4)}
TOKENS = (1, 2, 4, 8, 16, 32, 64, 128, 256, 512, 1024, 2048)
#: Dirichlet concentrations of the random routings (held out from the fit): 0.05 puts most
#: tokens on a few experts, 1.0 spreads them.
ALPHAS = (0.05, 0.3, 1.0)


def routing(tokens: int, experts: int, top_k: int, distinct: int, pattern: str, rng) -> np.ndarray:
    """[tokens, top_k] expert ids: ``distinct`` experts in equal load, Zipf over all, or a
    Dirichlet draw (``dirichlet-<alpha>``) of expert popularity."""
    if pattern == "zipf" or pattern.startswith("dirichlet"):
        if pattern == "zipf":
            p = 1.0 / np.arange(1, experts + 1) ** 1.2
        else:
            p = rng.dirichlet(np.full(experts, float(pattern.split("-")[1]))) + 1e-9
        p /= p.sum()
        return np.stack([rng.choice(experts, size=top_k, replace=False, p=p) for _ in range(tokens)])
    chosen = rng.permutation(experts)[:distinct]
    # Round robin over the chosen experts (equal loads), k consecutive ones per token, so no id
    # repeats within a token's top-k.
    return np.stack([np.roll(chosen, -((i * top_k) % distinct))[:top_k] for i in range(tokens)])


def torch_moe(x, w13, w2, ids, weights):
    """SiLU-gated MoE layer with one matmul pair per expert that has tokens."""
    import torch
    import torch.nn.functional as F

    out = torch.zeros_like(x)
    for e in ids.unique().tolist():
        tok, slot = (ids == e).nonzero(as_tuple=True)
        gate, up = (x[tok] @ w13[e].T).chunk(2, dim=-1)
        out.index_add_(0, tok, ((F.silu(gate) * up) @ w2[e].T) * weights[tok, slot, None].to(x.dtype))
    return out


def machine() -> str:
    lines = [f"platform: {platform.platform()}", f"cpus: {os.cpu_count()}"]
    try:
        lscpu = subprocess.run(["lscpu"], capture_output=True, text=True).stdout
        lines += [ln for ln in lscpu.splitlines() if ln.split(":")[0] in ("Model name", "Flags", "L3 cache")]
    except OSError:
        pass
    import torch
    import vllm

    lines += [f"torch: {torch.__version__}", f"vllm: {vllm.__version__}", f"torch threads: {torch.get_num_threads()}"]
    if torch.cuda.is_available():
        lines.append(f"gpu: {torch.cuda.get_device_name()}")
    return "\n".join(lines) + "\n"


def main(argv: list[str] | None = None) -> None:
    ap = argparse.ArgumentParser(prog="caps-vllm profile-moe", description=__doc__.split("\n")[0])
    ap.add_argument("--out", default="moe_kernel.csv", help="CSV of the timings (the machine's description beside it)")
    ap.add_argument("--reps", type=int, default=5)
    ap.add_argument("--budget-s", type=float, default=1800.0)
    ap.add_argument("--shapes", nargs="+", default=list(SHAPES))
    ap.add_argument("--tokens", nargs="+", type=int, default=list(TOKENS))
    ap.add_argument(
        "--device",
        choices=("cpu", "cuda"),
        default="cpu",
        help="cpu: vLLM's CPU fused-MoE op; cuda: per-expert torch matmuls on the GPU",
    )
    ap.add_argument(
        "--threads",
        type=int,
        default=None,
        help="CPU threads of the op (default: torch's); a server pinned to N cores runs N (vllm serve's "
        "VLLM_CPU_OMP_THREADS_BIND), so profile with as many, under taskset",
    )
    args = ap.parse_args(argv)

    import torch

    if args.threads is not None:
        if args.threads < 1:
            ap.error(f"--threads must be >= 1 (got {args.threads})")
        torch.set_num_threads(args.threads)

    gpu = args.device == "cuda"
    if gpu and not torch.cuda.is_available():
        sys.exit(
            f"--device cuda needs a CUDA GPU, and torch {torch.__version__} sees none here "
            "(torch.cuda.is_available() is False). Run it on a GPU host with a CUDA build of torch "
            "(pip install -e '.[gpu]'), or leave out --device to time vLLM's CPU op."
        )
    if not gpu:
        from vllm import _custom_ops as ops
        from vllm.platforms import current_platform

        current_platform.import_kernels()  # vLLM's kernels for this CPU's ISA (AVX2 here)
        if hasattr(torch._C, "_cpu") and hasattr(torch._C._cpu, "_init_amx"):
            torch._C._cpu._init_amx()  # needed on AMX machines, or the op dies with "Illegal instruction"
    out = Path(args.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    out.with_suffix(".machine.txt").write_text(machine())
    rng = np.random.default_rng(0)
    started = time.monotonic()
    with out.open("w", newline="") as f:
        w = csv.writer(f)
        w.writerow(
            [
                "shape",
                "hidden",
                "intermediate",
                "experts",
                "top_k",
                "tokens",
                "pattern",
                "distinct",
                "max_load",
                "cv",
                "median_ms",
                "min_ms",
                "max_ms",
                "reps",
                "counts",
            ]
        )
        for name in args.shapes:
            hidden, inter, experts, top_k = SHAPES[name]
            torch.manual_seed(0)
            w13 = (torch.randn(experts, 2 * inter, hidden) * 0.02).bfloat16()
            w2 = (torch.randn(experts, hidden, inter) * 0.02).bfloat16()
            if gpu:
                w13, w2 = w13.cuda(), w2.cuda()
            else:
                w13, w2 = ops.cpu_prepack_moe_weight(w13, "vec"), ops.cpu_prepack_moe_weight(w2, "vec")
            for tokens in args.tokens:
                x = torch.randn(tokens, hidden).bfloat16().to(args.device)
                res = torch.empty_like(x)
                ladder = sorted({top_k, *[d for d in (8, 16, 32, 48, 60) if d <= min(experts, tokens * top_k)]})
                randoms = [("zipf", 0)] + [(f"dirichlet-{a:g}", 0) for a in ALPHAS]
                for pattern, distinct in [("equal", d) for d in ladder] + randoms:
                    if time.monotonic() - started > args.budget_s:
                        print(f"time budget reached; stopped before {name} tokens={tokens}")
                        return
                    ids = routing(tokens, experts, top_k, distinct, pattern, rng)
                    counts = np.bincount(ids.ravel(), minlength=experts)
                    topk_ids = torch.from_numpy(ids.astype(np.int32)).to(args.device)
                    topk_w = torch.full((tokens, top_k), 1.0 / top_k, dtype=torch.float32, device=args.device)

                    def call() -> float:
                        if gpu:
                            torch.cuda.synchronize()
                        t0 = time.perf_counter()
                        if gpu:
                            torch_moe(x, w13, w2, topk_ids, topk_w)
                            torch.cuda.synchronize()
                        else:
                            ops.cpu_fused_moe(res, x, w13, w2, None, None, topk_w, topk_ids, "silu", "vec")
                        return (time.perf_counter() - t0) * 1e3

                    call()  # warm-up
                    times = [call() for _ in range(args.reps)]
                    live = counts[counts > 0]
                    w.writerow(
                        [
                            name,
                            hidden,
                            inter,
                            experts,
                            top_k,
                            tokens,
                            pattern,
                            int((counts > 0).sum()),
                            int(counts.max()),
                            round(float(counts.std() / counts.mean()), 4),
                            round(statistics.median(times), 3),
                            round(min(times), 3),
                            round(max(times), 3),
                            args.reps,
                            " ".join(map(str, counts.tolist())),
                        ]
                    )
                    f.flush()
                    print(
                        f"{name} tokens={tokens:4d} {pattern:13s} distinct={len(live):2d} "
                        f"max={counts.max():4d}: {statistics.median(times):8.2f} ms",
                        flush=True,
                    )


if __name__ == "__main__":
    main()
