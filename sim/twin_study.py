"""First studies in the twin (DeepSeek-V2-Lite layout on an H100 roofline, ESFT routing replayed):

1. *Admission inside one engine* at vLLM's H100 defaults (1024 sequences, 8192 tokens): stock
   vLLM vs CAPS strategies, bursty and mixed Poisson traffic, below and above saturation: does
   CAPS ever choose, and what does it change?
2. *Dispatch across 4 replicas*: vLLM's least-loaded rule, round-robin, and an oracle
   domain-affinity dispatch (true domains; with its load guard, and unguarded): what is the
   TPOT/ITL headroom of sending each request where its experts are already being read?

    python -m sim.twin_study --out sim/results/twin     # (make twin-study) about 15 minutes here

Every cell is one ``python -m sim.twin_run`` invocation (its command is recorded); the step
times are a roofline model, not measurements, and each cell is one seed.
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

from sim import twin_run

ADMISSION = [(pattern, rate) for pattern in ("bursty", "poisson") for rate in (200, 400)]
ADMISSION_ARMS = ["stock", "fcfs", "step_cost", "greedy_dot_product"]
DISPATCH = [(pattern, rate) for pattern in ("poisson", "bursty") for rate in (100, 200)]
DISPATCH_ARMS = [("least_loaded", 8), ("round_robin", 8), ("domain_oracle", 8), ("domain_oracle", 10**9)]


def cell(argv: list[str], out: Path) -> dict:
    twin_run.main([*argv, "--no-progress", "--out", str(out)])
    return json.loads((out / "results.json").read_text())


def brief(r: dict) -> dict:
    keys = {"ttft_p99_s": r["ttft_s"]["p99"], "itl_p50_ms": r["itl_s"]["p50"] * 1e3, "itl_p99_ms": r["itl_s"]["p99"] * 1e3,
            "e2e_p99_s": r["e2e_s"]["p99"], "throughput_rps": r["throughput_rps"],
            "decode_distinct_experts": r["decode_step_distinct_experts"], "mean_waiting": r["queue"]["mean_waiting"],
            "admission_steps_2plus_waiting": r["engagement"]["admission_steps_with_2plus_waiting"],
            "share_reordered": r["engagement"]["share_reordered"],
            "share_planned": r["engagement"]["share_of_those_steps_planned"],
            "scheduler_share_of_simulated": r["scheduler_share_of_simulated"]}
    if "caps" in r:
        keys["caps"] = r["caps"]
    if "dispatch_load_guard_overrides" in r:
        keys["load_guard_overrides"] = r["dispatch_load_guard_overrides"]
    keys["per_engine_requests"] = r["per_engine_requests"]
    return keys


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(prog="python -m sim.twin_study", description=__doc__.split("\n\n")[0])
    ap.add_argument("--requests", type=int, default=3000)
    ap.add_argument("--routing", default=str(twin_run.ROOT.parent / "shared" / "data" / "routing" / "esft_routing.npz"))
    ap.add_argument("--out", default="sim/results/twin")
    args = ap.parse_args(argv)
    out = Path(args.out)
    base = ["--model", "deepseek-v2-lite", "--hardware", "h100", "--requests", str(args.requests),
            "--routing", args.routing, "--output-tokens", "128"]
    study = {"command": "python -m sim.twin_study " + " ".join(sys.argv[1:] if argv is None else argv),
             "note": "step times: roofline model of DeepSeek-V2-Lite on an H100 (public peak figures, assumed "
                     "efficiencies), not measurements; ESFT routing replayed per token; one seed per cell",
             "admission": {}, "dispatch": {}}
    for pattern, rate in ADMISSION:
        name = f"{pattern}-{rate}"
        doc = cell([*base, "--pattern", pattern, "--rate", str(rate), "--strategies", *ADMISSION_ARMS],
                   out / "cells" / f"admission-{name}")
        study["admission"][name] = {"command": doc["command"], "arms": {a: brief(r) for a, r in doc["results"].items()}}
    for pattern, rate in DISPATCH:
        name = f"{pattern}-{rate}"
        study["dispatch"][name] = {}
        for policy, margin in DISPATCH_ARMS:
            label = policy if policy != "domain_oracle" else ("domain_oracle" if margin < 10**6 else "domain_unguarded")
            doc = cell([*base, "--pattern", pattern, "--rate", str(rate), "--strategies", "stock", "--engines", "4",
                        "--dispatch", policy, "--affinity-margin", str(margin)],
                       out / "cells" / f"dispatch-{name}-{label}")
            study["dispatch"][name][label] = {"command": doc["command"], **brief(doc["results"]["stock"])}
    (out / "study.json").write_text(json.dumps(study, indent=2))
    (out / "report.md").write_text(report(study))
    print(report(study))
    return 0


def _f(x, d=3):
    return "–" if x is None else (f"{x:.{d}g}" if isinstance(x, float) else str(x))


def report(study: dict) -> str:
    lines = ["# The vLLM twin: first studies", "", f"Command: `{study['command']}`", "", study["note"] + ".", "",
             "## 1. Admission inside one engine (vLLM's H100 defaults: 1024 sequences, 8192 tokens)", "",
             "| cell | arm | TTFT p99 (s) | ITL p50 (ms) | ITL p99 (ms) | decode distinct experts | mean waiting "
             "| admission steps with ≥ 2 waiting | reordered | planned by CAPS | scheduler / simulated time |",
             "|---" * 11 + "|"]
    for name, c in study["admission"].items():
        for arm, r in c["arms"].items():
            lines.append(f"| {name} | {arm} | {_f(r['ttft_p99_s'])} | {_f(r['itl_p50_ms'])} | {_f(r['itl_p99_ms'])} | "
                         f"{_f(r['decode_distinct_experts'])} | {_f(r['mean_waiting'])} | "
                         f"{r['admission_steps_2plus_waiting']} | {_f(r['share_reordered'])} | {_f(r['share_planned'])} | "
                         f"{_f(r['scheduler_share_of_simulated'])} |")
    lines += ["", "## 2. Dispatch across 4 replicas (stock vLLM in each)", "",
              "| cell | dispatch | TTFT p99 (s) | ITL p50 (ms) | ITL p99 (ms) | decode distinct experts | requests per "
              "replica | load-guard overrides |", "|---" * 8 + "|"]
    for name, c in study["dispatch"].items():
        for label, r in c.items():
            lines.append(f"| {name} | {label} | {_f(r['ttft_p99_s'])} | {_f(r['itl_p50_ms'])} | {_f(r['itl_p99_ms'])} | "
                         f"{_f(r['decode_distinct_experts'])} | {r['per_engine_requests']} | "
                         f"{r.get('load_guard_overrides', '–')} |")
    return "\n".join(lines) + "\n"


if __name__ == "__main__":
    sys.exit(main())
