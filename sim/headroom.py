"""What real routing leaves to win, measured on the shared routing files before anything is built.

Three figures, each reproducible by this one command:

1. **Grouping**: distinct experts per layer of a decode batch of B recorded tokens (each a random
   position of a random sequence, ESFT's DeepSeek-V2-Lite-layout routing) drawn from one domain,
   across the domains (mixed), and a greedy minimum: B tokens picked one by one, from a window
   of 4B mixed candidates, each adding the fewest new (layer, expert) pairs — what a scheduler
   with that lookahead could reach.
2. **Balance under expert parallelism**: mean over layers of the busiest rank's load over the
   mean rank load, for 4 and 8 ranks placed as vLLM places them (linear, round-robin), one-domain
   against mixed batches.
3. **The token-id ceiling** (OLMoE-1B-7B top-8 of 64, Mixtral top-2 of 8, per domain and layer):
   the top-k recall of the best possible table from token id to experts — each token id's k most
   frequent experts, measured in-sample on the joint token-id x expert counts — against chance
   (k / E). No predictor that sees only the token id can do better.

    python -m sim.headroom --routing ../shared/data/routing --out sim/results/routing
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

import numpy as np

from caps_vllm.step_cost import expert_placement, rank_sums
from sim.routing_replay import EsftReplay

BATCHES = (8, 16, 32, 64, 128)
TOP_K = {"olmoe": 8, "mistral": 2}


def greedy(replay: EsftReplay, window: np.ndarray, batch: int) -> np.ndarray:
    """``batch`` of the ``window`` tokens, each step the one adding the fewest new pairs."""
    onehot = np.stack([replay.row_counts(r[None]).ravel() > 0 for r in window])
    covered = np.zeros(onehot.shape[1], dtype=bool)
    free = np.ones(len(window), dtype=bool)
    picked = []
    for _ in range(batch):
        new = (onehot & ~covered).sum(axis=1)
        new[~free] = np.iinfo(new.dtype).max
        i = int(np.argmin(new))
        picked.append(i)
        free[i] = False
        covered |= onehot[i]
    return window[picked]


def grouping(replay: EsftReplay, draws: int, seed: int) -> list[dict]:
    rng = np.random.default_rng(seed)
    doms = replay.domains
    out = []
    for b in BATCHES:
        one, mixed, best = [], [], []
        for _ in range(draws):
            d = doms[int(rng.integers(len(doms)))]
            one.append((replay.row_counts(replay.sample([d] * b, rng)) > 0).sum(axis=1).mean())
            mix = [doms[int(i)] for i in rng.integers(len(doms), size=4 * b)]
            window = replay.sample(mix, rng)
            mixed.append((replay.row_counts(window[:b]) > 0).sum(axis=1).mean())
            best.append((replay.row_counts(greedy(replay, window, b)) > 0).sum(axis=1).mean())
        out.append(
            {
                "tokens": b,
                "one_domain": float(np.mean(one)),
                "mixed": float(np.mean(mixed)),
                "greedy_window_4x": float(np.mean(best)),
            }
        )
    return out


def balance(replay: EsftReplay, draws: int, seed: int) -> list[dict]:
    rng = np.random.default_rng(seed)
    doms = replay.domains
    out = []
    for ranks in (4, 8):
        for placement in ("linear", "round_robin"):
            place = expert_placement(replay.experts, ranks, placement)
            for b in BATCHES:
                figs = {}
                for kind in ("one_domain", "mixed"):
                    vals = []
                    for _ in range(draws):
                        ds = (
                            [doms[int(rng.integers(len(doms)))]] * b
                            if kind == "one_domain"
                            else [doms[int(i)] for i in rng.integers(len(doms), size=b)]
                        )
                        loads = rank_sums(replay.row_counts(replay.sample(ds, rng)).astype(np.float64), place)
                        vals.append(float((loads.max(axis=1) / loads.mean(axis=1)).mean()))
                    figs[kind] = float(np.mean(vals))
                out.append({"ranks": ranks, "placement": placement, "tokens": b, **figs})
    return out


def ceiling(stats: Path) -> list[dict]:
    """Top-k recall of the best token-id table, per model, domain and recorded layer."""
    z = np.load(stats)
    out = []
    for key in sorted(k for k in z.files if k.endswith("_token_expert")):
        model, domain = key.split("_")[:2]
        k = TOP_K[model]
        experts = z[f"{model}_{domain}_expert_counts"].shape[1]
        t = z[key]
        for layer in range(3):
            rows = t[t[:, 1] == layer]
            ids, inv = np.unique(rows[:, 0], return_inverse=True)
            table = np.zeros((len(ids), experts))
            np.add.at(table, (inv, rows[:, 2]), rows[:, 3])
            best = -np.sort(-table, axis=1)[:, :k].sum()
            out.append(
                {
                    "model": model,
                    "domain": domain,
                    "layer": [0, 7, 15][layer],
                    "top_k": k,
                    "experts": experts,
                    "token_ids": int(len(ids)),
                    "ceiling_recall": float(best / table.sum()),
                    "chance": k / experts,
                }
            )
    return out


def report(doc: dict) -> str:
    lines = [
        "# Real-routing headroom (shared routing files)",
        "",
        f"Command: `{doc['command']}`",
        "",
        "## Grouping: distinct experts per layer of a decode batch (ESFT, DeepSeek-V2-Lite layout, 64 experts, top-6)",
        "",
        "| tokens | one domain | mixed | greedy from a 4× window | one domain vs mixed |",
        "|---|---|---|---|---|",
    ]
    for g in doc["grouping"]:
        lines.append(
            f"| {g['tokens']} | {g['one_domain']:.1f} | {g['mixed']:.1f} | {g['greedy_window_4x']:.1f} | "
            f"{g['one_domain'] / g['mixed'] - 1:+.1%} |"
        )
    lines += [
        "",
        "The greedy column picks single tokens for one step; a scheduler admits requests, whose later tokens "
        "route elsewhere, so it bounds what one step could save, loosely. Batches of recorded tokens, each a random "
        "position of a random sequence.",
        "",
        "## Balance: EP rank max/mean load (mean over layers)",
        "",
        "| ranks | placement | tokens | one domain | mixed |",
        "|---|---|---|---|---|",
    ]
    for b in doc["balance"]:
        lines.append(f"| {b['ranks']} | {b['placement']} | {b['tokens']} | {b['one_domain']:.2f} | {b['mixed']:.2f} |")
    lines += [
        "",
        "## The token-id ceiling: top-k recall of the best token → experts table (in-sample)",
        "",
        "| model | domain | layer | top-k of experts | token ids | ceiling recall | chance |",
        "|---|---|---|---|---|---|---|",
    ]
    for c in doc["ceiling"]:
        lines.append(
            f"| {c['model']} | {c['domain']} | {c['layer']} | {c['top_k']} of {c['experts']} | {c['token_ids']} | "
            f"{c['ceiling_recall']:.2f} | {c['chance']:.3f} |"
        )
    return "\n".join(lines) + "\n"


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(prog="python -m sim.headroom", description=__doc__.split("\n\n")[0])
    ap.add_argument(
        "--routing", default="../shared/data/routing", help="folder with esft_routing.npz and olmoe_routing_stats.npz"
    )
    ap.add_argument("--draws", type=int, default=200, help="batches drawn per figure")
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--out", default="sim/results/routing")
    args = ap.parse_args(argv)
    folder = Path(args.routing)
    for name in ("esft_routing.npz", "olmoe_routing_stats.npz"):
        if not (folder / name).exists():
            ap.error(f"--routing {folder}: no {name} (the shared routing files)")
    replay = EsftReplay(folder / "esft_routing.npz")
    doc = {
        "command": "python -m sim.headroom " + " ".join(sys.argv[1:] if argv is None else argv),
        "grouping": grouping(replay, args.draws, args.seed),
        "balance": balance(replay, args.draws, args.seed),
        "ceiling": ceiling(folder / "olmoe_routing_stats.npz"),
    }
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    (out / "headroom.json").write_text(json.dumps(doc, indent=1) + "\n")
    (out / "headroom.md").write_text(report(doc))
    print(report(doc))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
