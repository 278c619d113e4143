"""Train the embedded default model: a tiny Qwen2-MoE on the shared prompt pool, seeded.

A random-weight router has no learned structure, so nothing measured on it says whether
prompts predict routing. This script trains the embedded model (4 layers, hidden 128, 60
routed experts, top-4, a shared expert: Qwen1.5-MoE's MoE shape at a size this CPU serves
interactively) as a causal language model on real text, the labelled prompt pool, with the
router's load-balancing loss as transformers implements it (``load_balancing_loss_func``,
Switch Transformer's), applied to each MoE layer and averaged. transformers' own forward pools
every layer's tokens into one count per expert id (``--balance pooled``), which lets each layer
stay unbalanced as long as the layers' favourites differ: trained that way, the per-layer
expert load CV on held-out prompts was 1.04-1.38 (untrained 0.46-0.83). Every 20th prompt (by
id) is held out for perplexity and routing measurements. The result (bf16 weights, tokenizer, ``training.json`` with the curve) is what
``caps_vllm/data/tiny-qwen2-moe/`` ships; a user's machine never trains.

Its routing is held to real MoE models' topic locality (``make model-study``): with a 1024-id
vocabulary (words cut into fragments every topic shares) and the balancing coefficient at 0.01
(per-layer load CV 0.13-0.17, real models 0.34-0.63) the topics skewed its routing 2-4x less than
DeepSeek-V2-Lite's or OLMoE's; a 4096-id vocabulary and 0.001 put every layer's skew inside their
band (the defaults here).

    python -m caps_vllm.train_tiny --pool ../shared/data/prompts/topic_prompts_combined.jsonl \\
        --out caps_vllm/data/tiny-qwen2-moe          # about 30 minutes on one CPU core
"""

from __future__ import annotations

import argparse
import math
import random
import time
from pathlib import Path

import numpy as np

from caps_vllm.tiny_model import VOCAB, build_tokenizer, model_config, prompt_pool, save_model

HELD_OUT_EVERY = 20


def split(rows: list[dict]) -> tuple[list[dict], list[dict]]:
    """(train, held out): every HELD_OUT_EVERY-th prompt by its id is held out."""
    train = [r for r in rows if int(r["id"]) % HELD_OUT_EVERY]
    held = [r for r in rows if not int(r["id"]) % HELD_OUT_EVERY]
    return train, held


def write_held_out(pool: Path, out: Path, min_prompts: int = 20) -> int:
    """The held-out prompts of the categories with at least ``min_prompts`` of them, as JSON lines
    (id, source, license, category, prompt): never trained on, shipped for the demo and the studies."""
    import json

    _, held = split(prompt_pool(pool))
    counts: dict[str, int] = {}
    for r in held:
        counts[r["category"]] = counts.get(r["category"], 0) + 1
    keep = [r for r in held if counts[r["category"]] >= min_prompts]
    fields = ("id", "source", "license", "category", "prompt")
    Path(out).write_text("".join(json.dumps({k: r[k] for k in fields}) + "\n" for r in keep))
    return len(keep)


def pack(tok, rows: list[dict], seq_len: int) -> np.ndarray:
    """Prompts as one token stream separated by <|endoftext|>, cut into [blocks, seq_len]."""
    sep = tok.convert_tokens_to_ids("<|endoftext|>")
    stream: list[int] = []
    for r in rows:
        stream.extend(tok(r["prompt"], add_special_tokens=False)["input_ids"])
        stream.append(sep)
    n = len(stream) // seq_len
    return np.asarray(stream[: n * seq_len], dtype=np.int64).reshape(n, seq_len)


def perplexity(model, blocks: np.ndarray, batch: int = 32) -> float:
    """exp(mean next-token cross entropy) over the blocks (language-model loss only)."""
    import torch

    total, count = 0.0, 0
    model.eval()
    with torch.no_grad():
        for lo in range(0, len(blocks), batch):
            x = torch.from_numpy(blocks[lo : lo + batch])
            out = model(input_ids=x, labels=x)
            n = x.shape[0] * (x.shape[1] - 1)
            total += float(out.loss) * n
            count += n
    model.train()
    return math.exp(total / count)


def lr_at(step: int, steps: int, peak: float, warmup: int) -> float:
    if step < warmup:
        return peak * (step + 1) / warmup
    progress = (step - warmup) / max(1, steps - warmup)
    return peak * (0.1 + 0.9 * 0.5 * (1 + math.cos(math.pi * progress)))


def train(
    pool: Path,
    save_to: Path | None,
    steps: int,
    seed: int = 0,
    batch: int = 16,
    seq_len: int = 256,
    lr: float = 3e-3,
    aux_coef: float = 0.001,
    eval_every: int = 100,
    eval_blocks: int = 64,
    threads: int = 1,
    balance: str = "per_layer",
    vocab: int = VOCAB,
    log=print,
) -> tuple[object, object, dict]:
    """Train from the seeded random init; returns (model, tokenizer, report).

    One thread by default: with two, torch's parallel reductions on this CPU differ run to run
    (1e-6 after three steps), so the same seed would not give the same weights."""
    import tempfile

    import torch
    from transformers import Qwen2MoeForCausalLM
    from transformers.models.qwen2_moe.modeling_qwen2_moe import load_balancing_loss_func

    if balance not in ("per_layer", "pooled"):
        raise ValueError(f"balance: {balance!r}; valid: 'per_layer' or 'pooled'")
    torch.set_num_threads(threads)
    random.seed(seed)
    np.random.seed(seed)
    torch.manual_seed(seed)
    train_rows, held_rows = split(prompt_pool(pool))
    with tempfile.TemporaryDirectory() as tmp:
        tok = build_tokenizer([r["prompt"] for r in train_rows], Path(tmp), vocab)
    cfg = model_config(tok, aux_coef=aux_coef)
    torch.manual_seed(seed)
    model = Qwen2MoeForCausalLM(cfg).float()
    model.router_aux_loss_coef = 0.0  # the forward's own (pooled) term off; added below as chosen
    data, held = pack(tok, train_rows, seq_len), pack(tok, held_rows, seq_len)
    held = held[:: max(1, len(held) // eval_blocks)][:eval_blocks]
    opt = torch.optim.AdamW(model.parameters(), lr=lr, betas=(0.9, 0.95), weight_decay=0.1)
    rng = np.random.default_rng(seed)
    order = rng.permutation(len(data))
    curve: list[dict] = []
    ppl0 = perplexity(model, held)
    curve.append({"step": 0, "held_out_ppl": ppl0})
    log(
        f"train: {len(data)} blocks of {seq_len} tokens ({len(train_rows)} prompts), held out {len(held)} blocks; "
        f"step 0 held-out perplexity {ppl0:.1f}"
    )
    started, pos, epoch = time.monotonic(), 0, 0
    model.train()
    for step in range(steps):
        if pos + batch > len(order):
            epoch += 1
            order, pos = rng.permutation(len(data)), 0
        x = torch.from_numpy(data[order[pos : pos + batch]])
        pos += batch
        for g in opt.param_groups:
            g["lr"] = lr_at(step, steps, lr, max(1, steps // 50))
        out = model(input_ids=x, labels=x, output_router_logits=True)
        if balance == "pooled":
            aux = out.aux_loss
        else:
            aux = torch.stack(
                [load_balancing_loss_func((g,), cfg.num_experts, cfg.num_experts_per_tok) for g in out.router_logits]
            ).mean()
        opt.zero_grad(set_to_none=True)
        (out.loss + aux_coef * aux).backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        opt.step()
        if (step + 1) % 10 == 0 or step == 0 or step + 1 == steps:
            lm = float(out.loss.detach())
            point = {"step": step + 1, "train_loss": lm, "aux_loss": float(aux.detach()), "epoch": epoch}
            if (step + 1) % eval_every == 0 or step + 1 == steps:
                point["held_out_ppl"] = perplexity(model, held)
            curve.append(point)
            if "held_out_ppl" in point:
                log(
                    f"step {step + 1}/{steps}: loss {lm:.3f}, aux {point['aux_loss']:.3f}, held-out perplexity "
                    f"{point['held_out_ppl']:.1f} ({time.monotonic() - started:.0f} s)"
                )
    report = {
        "seed": seed,
        "steps": steps,
        "batch": batch,
        "seq_len": seq_len,
        "lr": lr,
        "router_aux_loss_coef": aux_coef,
        "balance": balance,
        "vocab": len(tok),
        "train_prompts": len(train_rows),
        "held_out_prompts": len(held_rows),
        "train_blocks": int(len(data)),
        "tokens_seen": steps * batch * seq_len,
        "epochs": round(steps * batch / len(data), 2),
        "held_out_ppl_untrained": ppl0,
        "held_out_ppl": curve[-1].get("held_out_ppl"),
        "train_seconds": round(time.monotonic() - started, 1),
        "threads": threads,
        "torch": torch.__version__,
        "curve": curve,
    }
    if save_to is not None:
        save_model(model, tok, save_to, {"training": report})
    return model, tok, report


def main(argv: list[str] | None = None) -> None:
    ap = argparse.ArgumentParser(prog="python -m caps_vllm.train_tiny", description=__doc__.split("\n")[0])
    ap.add_argument("--pool", type=Path, default=Path("../shared/data/prompts/topic_prompts_combined.jsonl"))
    ap.add_argument("--out", type=Path, required=True)
    ap.add_argument(
        "--held-out-only",
        action="store_true",
        help="no training: write the pool's held-out prompts (categories with >= 20) to --out as JSON lines",
    )
    ap.add_argument("--steps", type=int, default=2000)
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--batch", type=int, default=16)
    ap.add_argument("--seq-len", type=int, default=256)
    ap.add_argument("--lr", type=float, default=3e-3)
    ap.add_argument("--aux-coef", type=float, default=0.001, help="router_aux_loss_coef (load-balancing loss weight)")
    ap.add_argument(
        "--balance",
        choices=("per_layer", "pooled"),
        default="per_layer",
        help="load-balancing loss per MoE layer, or pooled over layers as transformers' forward does",
    )
    ap.add_argument("--vocab", type=int, default=VOCAB, help="byte-level BPE ids (special tokens included)")
    ap.add_argument("--eval-every", type=int, default=100)
    ap.add_argument("--threads", type=int, default=1, help="torch threads (1: bitwise reproducible)")
    a = ap.parse_args(argv)
    if a.held_out_only:
        print(f"{write_held_out(a.pool, a.out)} held-out prompts -> {a.out}")
        return
    train(
        a.pool,
        a.out,
        a.steps,
        a.seed,
        a.batch,
        a.seq_len,
        a.lr,
        a.aux_coef,
        a.eval_every,
        threads=a.threads,
        balance=a.balance,
        vocab=a.vocab,
    )
    print(a.out)


if __name__ == "__main__":
    main()
