"""How much of a live decode step the routed experts take, by running requests, from the engine's step log.

The engine's step log (``caps.step_log``) gives every step's period, its composition and the
(MoE layer, expert) pairs it ran (the workers' routing capture). The routed experts' share of a
decode-only step is priced by the MoE-layer fit measured on the same core count (``caps-vllm
profile-moe --threads N`` then ``fit-step-cost``): per MoE layer ``fixed + weight x distinct
experts + token x (token, expert) pairs``, over the step's measured period. What it leaves
out (attention, the shared expert, sampling, the scheduler, the front end) is the rest.

    python -m sim.moe_share --runs DIR [DIR ...] --fit tests/benchmarks/results/cpu-1thread/step_cost.json \\
        --model MODEL_DIR --out sim/results/cpu/moe_share
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

import numpy as np

from caps_vllm.step_cost import StepCostModel
from caps_vllm.step_log import read
from sim.step_profile import comparison_logs


def decode_steps(steps: list[dict]) -> list[tuple[dict, float]]:
    """(step, period) of the decode-only steps the engine went straight on from."""
    return [(a, b["t"] - a["t"]) for a, b in zip(steps, steps[1:]) if a["busy"] and not a["prefill_tokens"]]


def shares(logs: list[Path], cost: StepCostModel, layers: int, top_k: int) -> list[dict]:
    """Per running requests (decode-only steps): the median period, distinct experts per layer,
    the routed experts' milliseconds and their share of the period."""
    by_n: dict[int, list[tuple[float, float, float]]] = {}
    for log in logs:
        steps, _ = read(log)
        for s, period in decode_steps(steps):
            if "experts" not in s:
                continue
            n = s["decode_reqs"]
            moe_ms = layers * cost.fixed_ms + cost.weight_ms * s["experts"] + cost.token_ms * n * top_k * layers
            by_n.setdefault(n, []).append((period, s["experts"] / layers, moe_ms / 1e3))
    out = []
    for n in sorted(by_n):
        rows = np.array(by_n[n])
        out.append(
            {
                "running": n,
                "steps": len(rows),
                "period_ms": float(np.median(rows[:, 0]) * 1e3),
                "distinct_per_layer": float(np.median(rows[:, 1])),
                "moe_ms": float(np.median(rows[:, 2]) * 1e3),
                "moe_share": float(np.median(rows[:, 2] / rows[:, 0])),
                "read_share": float(np.median(cost.weight_ms * rows[:, 1] * layers / 1e3 / rows[:, 0])),
            }
        )
    return out


def report(doc: dict) -> str:
    c = doc["cost"]
    lines = [
        "# The routed experts' share of a live decode step (real-cost model, this CPU)",
        "",
        f"Command: `{doc['command']}`",
        "",
        f"MoE-layer fit (`{doc['fit']}`, one core): {c['fixed_ms']:.3f} ms + {c['weight_ms']:.3f} ms per distinct "
        f"expert + {c['token_ms']:.3f} ms per (token, expert) pair ({c['form']}). Step logs: "
        + ", ".join(f"`{r}`" for r in doc["runs"])
        + f". {doc['layers']} MoE layers, top-{doc['top_k']}. Medians over the decode-only steps with that many "
        "running requests; 'reads' is the distinct-expert term alone, what the order of admission can change.",
        "",
        "| running | steps | step period ms | distinct experts / layer | routed-expert ms | share of the step "
        "| of which expert reads |",
        "|---|---|---|---|---|---|---|",
    ]
    for r in doc["shares"]:
        if r["steps"] >= 20:
            lines.append(
                f"| {r['running']} | {r['steps']} | {r['period_ms']:.1f} | {r['distinct_per_layer']:.1f} | "
                f"{r['moe_ms']:.1f} | {r['moe_share']:.0%} | {r['read_share']:.0%} |".replace("%", " %")
            )
    lines += ["", "(Counts with fewer than 20 decode-only steps are left out.)", ""]
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(prog="python -m sim.moe_share", description=__doc__.split("\n\n")[0])
    ap.add_argument("--runs", nargs="+", required=True, help="loadtest.compare folders run with --step-log")
    ap.add_argument("--fit", required=True, help="fit-step-cost's JSON for the server's core count")
    ap.add_argument("--model", required=True, help="the served model (its MoE layers and top-k)")
    ap.add_argument("--out", required=True, help="the report's stem (.md and .json are written)")
    a = ap.parse_args(argv)
    cfg = json.loads((Path(a.model) / "config.json").read_text())
    layers, top_k = cfg["num_hidden_layers"], cfg["num_experts_per_tok"]
    cost = StepCostModel.load(a.fit)
    logs = [p for folder in a.runs for p in comparison_logs(Path(folder))[0]]
    doc = {
        "command": "python -m sim.moe_share " + " ".join(sys.argv[1:] if argv is None else argv),
        "fit": a.fit,
        "cost": cost.as_dict(),
        "runs": a.runs,
        "layers": layers,
        "top_k": top_k,
        "shares": shares(logs, cost, layers, top_k),
    }
    out = Path(a.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    out.with_suffix(".json").write_text(json.dumps(doc, indent=1) + "\n")
    out.with_suffix(".md").write_text(report(doc))
    print(report(doc))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
