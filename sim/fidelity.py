"""How close the twin comes to the live server: the same workloads through both, errors measured.

For each live comparison folder (``loadtest.compare ... --step-log``: every arm run on fresh
``vllm serve`` processes, ≥ 3 interleaved repetitions) the twin replays each repetition: the
same seeded arrival schedule (``loadtest.workload.build`` with the run's own options), the same
prompts tokenized as the server tokenizes them (the model's tokenizer; chat requests through
its chat template), the same output lengths, the same vLLM budgets (vLLM's CPU defaults for the
server's ``--max-num-seqs`` / ``--max-model-len``, the KV blocks the server's log reports) and
the same scheduler class and CAPS config, with the real predictor; the MoE loads of each step
are the embedded model's own captured routing (:mod:`sim.captured_routing`). Steps are priced by the
measured ``cpu`` profile (:mod:`sim.step_profile`, fitted on *other* runs: calibration
workloads, never these); a request reaches the scheduler ``front_s`` after its scheduled time
and its tokens reach the client ``output_s`` after their step.

Per arm and workload, figures of both sides computed the same way: engine steps (live: the step
log's lines), throughput (completed / last completion, from the schedule's start), TTFT and E2E
P50/P90 (nearest rank). Live and twin pair by repetition (its seed sets the arrivals); the
error is the mean over repetitions of twin / live - 1, with its 95 % t interval. A figure meets
its goal when that mean is within it (throughput and steps 5 %, P50 10 %, P90 20 %); one that
misses is "within the live noise" when the interval includes 0. The live noise floor itself is
measured: the two live arms ran the same arrivals, so what separates them is the machine, plus
CAPS's order where it chose other than the oldest (the twin says how often it would).

    python -m sim.fidelity --profile sim/profiles/cpu-tiny.json --live DIR [DIR ...] --out sim/results/twin
"""

from __future__ import annotations

import argparse
import functools
import json
import re
import sys
import time
from pathlib import Path

import numpy as np

from caps_vllm.step_log import read
from sim.captured_routing import CapturedRouting
from sim.cpu_twin import Tokenize, figures, run
from sim.step_profile import FEATURES, MeasuredStep

#: (figure, goal as a relative error)
GOALS = (
    ("steps", 0.05),
    ("throughput_rps", 0.05),
    ("tpot", 0.10),
    ("ttft_p50", 0.10),
    ("ttft_p90", 0.20),
    ("e2e_p50", 0.10),
    ("e2e_p90", 0.20),
)


def live_figures(run_dir: Path, steps: list[dict], hold: float = 0.0) -> dict:
    """A live run's figures from its Locust samples and its engine step log's step lines."""
    from loadtest.records import read_samples

    ok = [s for s in read_samples(run_dir / "samples.jsonl") if s.get("error") is None]
    return figures(
        [s["ttft_s"] for s in ok],
        [s["e2e_s"] for s in ok],
        [s["t"] + s["held_s"] + s["lag_s"] + s["e2e_s"] for s in ok],
        len(steps),
        [g for s in ok for g in s["itl_s"]],
        sum(s["tokens"] for s in ok),
        hold,
    )


def own_steps(steps: list[dict], profile: MeasuredStep) -> float:
    """The profile's price of a live run's own steps (their logged composition and routed experts)
    over their measured periods: how fast the machine ran in that run, against the profile."""
    from sim.step_profile import periods

    x, y = periods(steps)
    return float((x @ profile.coefficients()).sum() / y.sum())


def kv_tokens(serve_log: Path) -> int | None:
    """The KV cache size the server reported (``CPU KV cache size: N tokens``)."""
    m = re.search(r"KV cache size: ([\d,]+) tokens", serve_log.read_text(errors="replace"))
    return int(m.group(1).replace(",", "")) if m else None


def interval(xs: list[float]) -> dict:
    """Mean of ``xs`` with its 95 % t interval (None bounds with fewer than two)."""
    from loadtest.stats import t975

    a = np.asarray([x for x in xs if x is not None], dtype=np.float64)
    if len(a) < 2:
        return {"mean": float(a.mean()) if len(a) else None, "lo": None, "hi": None, "n": len(a)}
    half = t975(len(a) - 1) * a.std(ddof=1) / np.sqrt(len(a))
    return {"mean": float(a.mean()), "lo": float(a.mean() - half), "hi": float(a.mean() + half), "n": len(a)}


def compare_workload(folder: Path, profile: MeasuredStep, tokenize_for, routing_for) -> dict:
    """Every arm of one live comparison folder against the twin, repetition by repetition (a
    repetition's seed sets its arrivals, so live and twin pair by repetition)."""
    doc = json.loads((folder / "compare.json").read_text())
    args = doc["args"]
    cell = {"workload": folder.name, "command": doc["command"], "arms": {}, "live_noise": {}, "twin_out_of_order": {}}
    live_of: dict[str, dict[int, dict]] = {}
    speed: dict[str, list[float]] = {}
    for arm in doc["arms"]:
        runs = sorted((r for r in doc["runs"] if r["label"] == arm and r["status"] == "ok"), key=lambda r: r["repeat"])
        live, twin = {}, {}
        for r in runs:
            d = folder / "raw" / f"r{r['repeat']}-{arm}"
            if not (d / "steps.jsonl").exists():
                raise ValueError(f"{d}: no steps.jsonl (run loadtest.compare with --step-log)")
            kv = kv_tokens(d / "serve.log")
            if kv is None:
                raise ValueError(f"{d / 'serve.log'}: no 'KV cache size' line")
            steps, _ = read(d / "steps.jsonl")
            live[r["repeat"]] = live_figures(d, steps, args.get("hold", 0.0) if args["pattern"] == "offline" else 0.0)
            speed.setdefault(arm, []).append(own_steps(steps, profile))
            t0 = time.perf_counter()
            twin[r["repeat"]] = run(
                args,
                r["seed"],
                arm.removesuffix("-aa"),
                profile,
                tokenize_for(args["model"]),
                kv,
                routing_for(args["model"]),
            )
            print(
                f"  {folder.name} {arm} repetition {r['repeat'] + 1}: twin in {time.perf_counter() - t0:.1f} s",
                file=sys.stderr,
                flush=True,
            )
        live_of[arm] = live
        fig = {}
        for name, goal in GOALS:
            errs = [twin[k][name] / live[k][name] - 1.0 for k in live if live[k][name]]
            e = interval(errs)
            fig[name] = {
                "error": e,
                "goal": goal,
                "meets_goal": e["mean"] is not None and abs(e["mean"]) <= goal,
                "within_live_noise": e["lo"] is not None and e["lo"] <= 0.0 <= e["hi"],
                "live_runs": [live[k][name] for k in sorted(live)],
                "twin_runs": [twin[k][name] for k in sorted(live)],
            }
        cell["arms"][arm] = fig
        cell["twin_out_of_order"][arm] = sum(t["out_of_order"] for t in twin.values())
    cell["profile_over_own_steps"] = speed
    # The live noise floor: two arms on the same arrivals differ by the machine, and by CAPS's
    # order where it chose other than the oldest (the twin counts how often it would).
    arms = list(live_of)
    if len(arms) >= 2:
        a, b = live_of[arms[0]], live_of[arms[1]]
        for name, _ in GOALS:
            cell["live_noise"][name] = float(
                np.median([abs(b[k][name] / a[k][name] - 1.0) for k in a if k in b and a[k][name]])
            )
    return cell


def report(doc: dict) -> str:
    s = doc["summary"]
    lines = [
        "# Twin fidelity: the twin against live vllm serve on this CPU",
        "",
        f"Command: `{doc['command']}`",
        "",
        f"**{s['met']} of {s['figures']} figures within their goal; {s['within_noise']} of the other "
        f"{s['figures'] - s['met']} within the live runs' own noise** (the 95 % interval of the twin's paired error "
        f"includes 0); median |error| {s['median_abs_error']:.1%}.",
        "",
        f"Profile `{doc['profile']}`, fitted on {doc['profile_source']} (other workloads, never these runs): "
        + ", ".join(f"{k} {v:.3g}" for k, v in doc["profile_coefficients"].items())
        + f"; its own steps fit to a median {doc['profile_fit']['median_abs_error']:.0%} per step.",
        "",
        "Error: per repetition (the same seeded arrivals live and in the twin), twin / live − 1; shown: the mean "
        "over repetitions [95 % t interval]. Goals: steps and throughput ±5 %, P50 ±10 %, P90 ±20 %. Live noise: "
        "the median per-repetition |difference| between the two live arms on the same arrivals — the machine, "
        "plus CAPS's order where it chose other than the oldest (the twin's count of such admissions is given "
        "per workload). Throughput = "
        "completed / last completion; quantiles by nearest rank on both sides.",
        "",
    ]
    for cell in doc["cells"]:
        noise = cell["live_noise"]
        ooo = ", ".join(f"{a} {n}" for a, n in cell["twin_out_of_order"].items())
        lines += [
            f"## {cell['workload']}",
            "",
            f"Live: `{cell['command']}`",
            "",
            f"Admissions the twin's CAPS made out of FCFS order, over all repetitions: {ooo}. The profile's price "
            "of each live run's own steps over their measured time (1 = the machine ran as profiled): "
            + "; ".join(
                f"{a} " + " / ".join(f"{v:.2f}" for v in vs) for a, vs in cell["profile_over_own_steps"].items()
            )
            + ".",
            "",
            "| arm | figure | live (per repetition) | twin (per repetition) | error | goal | met | live noise |",
            "|---|---|---|---|---|---|---|---|",
        ]
        for arm, figs in cell["arms"].items():
            for name, f in figs.items():
                e = f["error"]
                ci = f" [{e['lo']:+.1%}, {e['hi']:+.1%}]" if e["lo"] is not None else ""
                met = "✓" if f["meets_goal"] else ("≈ noise" if f["within_live_noise"] else "✗")
                lines.append(
                    f"| {arm} | {name} | {' / '.join(f'{x:.4g}' for x in f['live_runs'])} | "
                    f"{' / '.join(f'{x:.4g}' for x in f['twin_runs'])} | {e['mean']:+.1%}{ci} | "
                    f"±{f['goal']:.0%} | {met} | {f'{noise[name]:.1%}' if name in noise else '–'} |"
                )
        lines.append("")
    lines += [
        "What a CPU run cannot show: a GPU's step; this checks the twin's scheduling, clock and measured CPU "
        "profile against vLLM's, not the GPU roofline profiles. Where the profile prices a run's own steps "
        "below 1, this shared machine ran slower than when it was profiled, and the twin, which has one "
        "machine speed, is fast by as much.",
        "",
    ]
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(prog="python -m sim.fidelity", description=__doc__.split("\n\n")[0])
    ap.add_argument("--profile", required=True, help="a measured step profile (python -m sim.step_profile)")
    ap.add_argument("--live", nargs="+", required=True, help="loadtest.compare folders run with --step-log")
    ap.add_argument("--out", required=True, help="folder for fidelity.json, fidelity.md and fidelity.png/.pdf")
    args = ap.parse_args(argv)
    profile = MeasuredStep.load(args.profile)
    tokenize_for, routing_for = functools.cache(Tokenize), functools.cache(CapturedRouting)
    cells = [compare_workload(Path(f), profile, tokenize_for, routing_for) for f in args.live]
    figs = [f for c in cells for a in c["arms"].values() for f in a.values()]
    errs = [abs(f["error"]["mean"]) for f in figs if f["error"]["mean"] is not None]
    coef = {f"{k}_s": float(v) for k, v in zip(FEATURES, profile.coefficients())}
    coef.update(front_s=profile.front_s, output_s=profile.output_s)
    doc = {
        "command": "python -m sim.fidelity " + " ".join(sys.argv[1:] if argv is None else argv),
        "profile": args.profile,
        "profile_source": profile.source,
        "profile_coefficients": coef,
        "profile_fit": profile.fit,
        "cells": cells,
        "summary": {
            "figures": len(figs),
            "met": sum(f["meets_goal"] for f in figs),
            "within_noise": sum(f["within_live_noise"] and not f["meets_goal"] for f in figs),
            "median_abs_error": float(np.median(errs)) if errs else None,
        },
    }
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    (out / "fidelity.json").write_text(json.dumps(doc, indent=1) + "\n")
    (out / "fidelity.md").write_text(report(doc))
    from sim.plots import fidelity_figure

    fidelity_figure(doc, out)
    print(report(doc))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
