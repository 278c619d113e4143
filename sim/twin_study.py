"""Studies in the twin (DeepSeek-V2-Lite layout on an H100 roofline, ESFT routing replayed):

1. *Admission at 0.5-1.2x capacity*, for one engine, one KV-bound engine (0.15 GiB of KV cache:
   about 12 requests run), DP4/EP4 and DP8/EP8 (engines in lockstep, one expert-parallel rank
   each), bursty (topic runs of the four ESFT domains) and mixed Poisson traffic: stock vLLM's capacity at SLO (bisection), then at 0.5, 0.8, 1.0 and 1.2x it
   stock vLLM, CAPS ``step_cost`` and ``greedy_dot_product`` (vLLM's defaults: 1024 sequences,
   8192 tokens), and the **oracle headroom** of CAPS admission: ``step_cost`` given the true
   routing with unbounded lookahead (window 4096, no trigger, no max-wait bypass, every predicted
   gain taken: ``min_gain`` 0), and CAPS without its threshold (``min_gain`` 0): what the
   default threshold gives up, and what it spares. Each cell also carries the **static bound** of its decode batches: distinct experts of a one-domain batch of
   the cell's mean running size against a mixed one (what perfect grouping could save).
   *Many experts*: the same for Qwen3-30B-A3B (128 experts, top-8) on an H200 roofline, one engine
   and DP4/EP4 (and, ``--many-models deepseek-v3-like``, a DeepSeek-V3-like shape: 256 experts,
   top-8, its MoE step on one H200's roofline, weights' memory not checked), with synthetic
   routing fitted to 0.87x uniform's distinct experts at 32 tokens (an ASSUMPTION from LLMServingSim's figure; no static bound: no recorded sequences).
2. *Every CAPS strategy*, one engine, bursty, at 1.2x capacity; *overhead*: CAPS's own time on the
   busy loop (metrics on) at 1.2x per deployment.
3. *Dispatch across 2, 4 and 8 replicas* (stock vLLM in each, no EP) at 0.3, 0.6 and 1.0x the
   least-loaded capacity: vLLM's least-loaded rule (100 ms snapshots), round-robin, CAPS's
   expert-affinity dispatch (``caps_vllm.dispatch``: the step-cost increase of adding the
   request to each replica's in-flight load, under a load guard of 8 in flight above the least
   loaded) scored on the prompt's routing, its **oracle** (scored on the request's own decode
   tokens' routing), and a domain oracle (true domains, each to its home replica, same guard).

    python -m sim.twin_study --out sim/results/twin     # (make twin-study runs it as two processes)

Every cell is one ``python -m sim.twin_run`` invocation (its command is recorded); the step
times are a roofline model, not measurements; each cell is one seed; CAPS's vectors are the
prompts' true routing (an oracle predictor: the best CAPS can be told).
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

from sim import twin_run

DEPLOYMENTS = {
    "one-engine": [],
    "dp4-ep4": ["--engines", "4", "--ep"],
    "dp8-ep8": ["--engines", "8", "--ep"],
    "one-engine-kv": ["--kv-gib", "0.15"],
}  # KV-bound: about 12 requests' context fits


def start_rate(extra: list[str]) -> float:
    """Where the capacity bisection starts: 250 req/s per engine."""
    return 250.0 * (int(extra[extra.index("--engines") + 1]) if "--engines" in extra else 1)


LOADS = (0.5, 0.8, 1.0, 1.2)
ARMS = ["stock", "step_cost", "greedy_dot_product"]
HEADROOM = [
    "--strategies",
    "step_cost",
    "--caps-config",
    json.dumps({"window_size": 4096, "min_batch_trigger": 1, "max_wait_ms": None, "min_gain": 0.0}),
]
DISPATCH_LOADS = (0.3, 0.6, 1.0)
DISPATCH_ARMS = ("least_loaded", "round_robin", "expert_affinity", "expert_affinity_oracle", "domain_oracle")
REPLICAS = (2, 4, 8)
PARTS = ("admission", "many_experts", "strategies", "dispatch", "overhead", "capacity")
NO_THRESHOLD = ["--strategies", "step_cost", "--caps-config", json.dumps({"min_gain": 0.0})]
HEADROOM_LOADS = (1.0, 1.2)  # the oracle-headroom arm (and CAPS without min_gain) where queues form


def cell(argv: list[str], out: Path, reuse: bool = False) -> dict:
    """One ``twin_run`` invocation's results; ``reuse``: a results.json already in ``out`` that
    the very same command wrote is read instead of rerun."""
    argv = [*argv, "--no-progress", "--out", str(out)]
    done = out / "results.json"
    if reuse and done.exists():
        doc = json.loads(done.read_text())
        if doc.get("command") == "python -m sim.twin_run " + " ".join(argv):
            return doc
    twin_run.main(argv)
    return json.loads(done.read_text())


def brief(r: dict) -> dict:
    keys = {
        "ttft_p99_s": r["ttft_s"]["p99"],
        "ttft_max_s": r["ttft_s"]["max"],
        "itl_p50_ms": r["itl_s"]["p50"] * 1e3,
        "itl_p99_ms": r["itl_s"]["p99"] * 1e3,
        "itl_mean_ms": r["itl_s"]["mean"] * 1e3,
        "e2e_p99_s": r["e2e_s"]["p99"],
        "throughput_rps": r["throughput_rps"],
        "decode_distinct_experts": r["decode_step_distinct_experts"],
        "mean_waiting": r["queue"]["mean_waiting"],
        "mean_running": r["queue"]["mean_running"],
        "ep_rank_max_over_mean": r.get("ep_rank_max_over_mean"),
        "admission_steps_2plus_waiting": r["engagement"]["admission_steps_with_2plus_waiting"],
        "share_reordered": r["engagement"]["share_reordered"],
        "share_planned": r["engagement"]["share_of_those_steps_planned"],
        "contested_steps": r["engagement"]["contested_steps"],
        "share_contested_planned": r["engagement"]["share_of_contested_planned"],
        "steps_only_preempted": r["engagement"].get("steps_only_preempted_resumed"),
        "scheduler_wall_s": r["scheduler_wall_s"],
        "simulated_s": r["simulated_s"],
        "scheduler_share_of_simulated": r["scheduler_share_of_simulated"],
    }
    if "caps" in r:
        keys["caps_share_of_simulated"] = r["caps"].get("share_of_simulated")
    for k in ("caps", "dispatch_load_guard_overrides", "per_engine_requests"):
        if k in r:
            keys[k] = r[k]
    return keys


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(prog="python -m sim.twin_study", description=__doc__.split("\n\n")[0])
    ap.add_argument("--seconds", type=float, default=6.0, help="seconds of arrivals per run (at least 500 requests)")
    ap.add_argument("--capacity-seconds", type=float, default=10.0, help="seconds of arrivals per capacity probe")
    ap.add_argument("--routing", default=str(twin_run.ROOT.parent / "shared" / "data" / "routing" / "esft_routing.npz"))
    ap.add_argument(
        "--deployments",
        nargs="+",
        default=list(DEPLOYMENTS),
        choices=list(DEPLOYMENTS),
        help="the admission study's deployments",
    )
    ap.add_argument(
        "--parts",
        nargs="+",
        default=list(PARTS),
        choices=list(PARTS),
        help="what to run (parts run in separate processes share --out; the report holds every part there)",
    )
    ap.add_argument(
        "--many-models",
        nargs="+",
        default=["qwen3-30b-a3b"],
        choices=["qwen3-30b-a3b", "deepseek-v3-like"],
        help="the many-experts part's shapes (synthetic routing)",
    )
    ap.add_argument("--out", default="sim/results/twin")
    ap.add_argument("--report-only", action="store_true", help="no runs: the report of the parts saved in --out")
    ap.add_argument(
        "--reuse",
        action="store_true",
        help="read every cell that the very same twin_run command already wrote in --out instead of "
        "rerunning it (the parts are rebuilt: for changes to what the report keeps of each run)",
    )
    args = ap.parse_args(argv)
    out = Path(args.out)
    if args.report_only:
        return write_report(out)
    from sim.routing_replay import EsftReplay

    replay = EsftReplay(args.routing)
    base = ["--model", "deepseek-v2-lite", "--hardware", "h100", "--routing", args.routing, "--output-tokens", "128"]
    command = "python -m sim.twin_study " + " ".join(sys.argv[1:] if argv is None else argv)
    parts = out / "parts"
    parts.mkdir(parents=True, exist_ok=True)
    t0 = time.perf_counter()
    last = [t0]

    def save(part: str, name: str, entry: dict) -> None:
        now = time.perf_counter()
        entry.update(study_command=command, wall_s=now - last[0])  # this entry's own runs
        last[0] = now
        (parts / f"{part}--{name}.json").write_text(json.dumps(entry, indent=1))

    def n(rate: float, seconds: float) -> str:
        return str(max(500, int(rate * seconds)))

    def traffic(pattern: str, rate: float, seconds: float = args.seconds) -> list[str]:
        """A cell's arrivals: its pattern and rate, as many requests as ``seconds`` of them (at least 500)."""
        return ["--pattern", pattern, "--rate", f"{rate:.6g}", "--requests", n(rate, seconds)]

    def capacity(extra: list[str], pattern: str, name: str, start: float, model: list[str] = base) -> float:
        """Stock vLLM's capacity at SLO; a capacity cell in --out written by the same command is
        read, not rerun (stock's schedule depends on nothing the CAPS arms change)."""
        doc = cell(
            [
                *model,
                *extra,
                "--pattern",
                pattern,
                "--rate",
                str(start),
                "--requests",
                "500",
                "--capacity",
                "--capacity-seconds",
                str(args.capacity_seconds),
                "--strategies",
                "stock",
            ],
            out / "cells" / f"capacity-{name}",
            reuse=True,
        )
        return doc["results"]["stock"]["capacity_rps"]

    def admission(part: str, model: list[str], prefix: str, deployments: list[str], bound) -> None:
        """Stock capacity, then every load of LOADS, per deployment and traffic (see the module)."""
        for dep in deployments:
            extra = DEPLOYMENTS[dep]
            for pattern in ("bursty", "poisson"):
                name = f"{prefix}{dep}-{pattern}"
                cap = capacity(extra, pattern, name, start_rate(extra), model)
                entry = {"capacity_rps": cap, "loads": {}}
                for load in LOADS:
                    rate = load * cap
                    run = [
                        *model,
                        *extra,
                        *traffic(pattern, rate),
                    ]
                    doc = cell([*run, "--strategies", *ARMS], out / "cells" / f"admission-{name}-{load}", args.reuse)
                    arms = {a: brief(r) for a, r in doc["results"].items()}
                    running = arms["stock"]["mean_running"]
                    e = entry["loads"][str(load)] = {
                        "rate_rps": rate,
                        "command": doc["command"],
                        "static_bound": bound(running) if running >= 1 else None,
                        "arms": arms,
                    }
                    if load in HEADROOM_LOADS:
                        head = cell([*run, *HEADROOM], out / "cells" / f"headroom-{name}-{load}", args.reuse)
                        arms["step_cost_oracle_headroom"] = brief(head["results"]["step_cost"])
                        e["headroom_command"] = head["command"]
                        free = cell([*run, *NO_THRESHOLD], out / "cells" / f"min-gain-0-{name}-{load}", args.reuse)
                        arms["step_cost_min_gain_0"] = brief(free["results"]["step_cost"])
                        e["min_gain_0_command"] = free["command"]
                    print(
                        f"[study {time.perf_counter() - t0:.0f} s] {name} at {load}x capacity done",
                        file=sys.stderr,
                        flush=True,
                    )
                save(part, name, entry)

    if "admission" in args.parts:
        admission("admission", base, "", args.deployments, replay.static_bound)
    for model in args.many_models if "many_experts" in args.parts else ():
        many = ["--model", model, "--hardware", "h200", "--routing", "synthetic", "--output-tokens", "128"]
        admission(
            "many_experts",
            many,
            f"{model}-",
            [d for d in args.deployments if d in ("one-engine", "dp4-ep4")],
            lambda running: None,
        )

    def by_deployment(part: str, one) -> None:
        """``one(extra, pattern, name)`` per deployment and traffic, saved as one entry per deployment."""
        for dep in args.deployments:
            save(part, dep, {p: one(DEPLOYMENTS[dep], p, f"{dep}-{p}") for p in ("bursty", "poisson")})

    def headroom_at_capacity(extra: list[str], pattern: str, name: str) -> dict:
        """Capacity headroom: the oracle needs to meet the SLO at 1.02x stock's capacity to have 2 %."""
        cap = capacity(extra, pattern, name, start_rate(extra))
        rate = 1.02 * cap
        run = [
            *base,
            *extra,
            *traffic(pattern, rate, args.capacity_seconds),
        ]
        arms = {}
        for label, argv in (
            ("stock", ["--strategies", "stock"]),
            ("step_cost", ["--strategies", "step_cost"]),
            ("step_cost_oracle_headroom", HEADROOM),
        ):
            doc = cell([*run, *argv], out / "cells" / f"capacity-headroom-{name}-{label}", args.reuse)
            r = next(iter(doc["results"].values()))
            arms[label] = {
                "command": doc["command"],
                "meets_slo": twin_run.meets(r, 2.0, 0.1),
                "ttft_p99_s": r["ttft_s"]["p99"],
                "itl_p99_ms": r["itl_s"]["p99"] * 1e3,
            }
        return {"capacity_rps": cap, "rate_rps": rate, "arms": arms}

    def own_time(extra: list[str], pattern: str, name: str) -> dict:
        """CAPS's own time on the busy loop at 1.2x capacity, where queues form, with its metrics
        on and planning ahead (the product's defaults on a GPU; the worker's plans made inline, its
        time counted apart), and vLLM's scheduler time (schedule + update_from_output) with and
        without CAPS, in the same run."""
        rate = 1.2 * capacity(extra, pattern, name, start_rate(extra))
        doc = cell(
            [
                *base,
                *extra,
                *traffic(pattern, rate),
                "--strategies",
                "stock",
                "step_cost",
                "--caps-config",
                json.dumps({"metrics": True, "plan_ahead": True}),
            ],
            out / "cells" / f"overhead-ahead-{name}-1.2",
            args.reuse,
        )
        r, s = doc["results"]["step_cost"], doc["results"]["stock"]
        return {
            "rate_rps": rate,
            "command": doc["command"],
            "caps": r["caps"],
            "steps": r["steps"],
            "mean_waiting": r["queue"]["mean_waiting"],
            "mean_running": r["queue"]["mean_running"],
            "step_ms_mean": r["step_ms"]["mean"],
            "scheduler_wall_s": r["scheduler_wall_s"] - r["caps"].get("ahead_seconds", 0.0),  # the busy loop's
            "stock_scheduler_wall_s": s["scheduler_wall_s"],
            "stock_steps": s["steps"],
        }

    if "capacity" in args.parts:
        by_deployment("capacity", headroom_at_capacity)
    if "overhead" in args.parts:
        by_deployment("overhead", own_time)
    if "strategies" in args.parts:
        rate = 1.2 * capacity([], "bursty", "one-engine-bursty", 250.0)
        from caps_vllm.strategies import STRATEGIES

        doc = cell(
            [
                *base,
                *traffic("bursty", rate),
                "--strategies",
                "stock",
                *STRATEGIES,
            ],
            out / "cells" / "strategies-one-engine-bursty-1.2",
            args.reuse,
        )
        save(
            "strategies",
            "one-engine-bursty-1.2",
            {"rate_rps": rate, "command": doc["command"], "arms": {a: brief(r) for a, r in doc["results"].items()}},
        )
    shapes = [(k, pattern) for k in REPLICAS for pattern in ("poisson", "bursty")] if "dispatch" in args.parts else []
    for k, pattern in shapes:
        name = f"{k}-replicas-{pattern}"
        cap = capacity(["--engines", str(k)], pattern, name, 250.0 * k)
        entry = {"capacity_rps": cap, "loads": {}}
        for load in DISPATCH_LOADS:
            rate = load * cap
            cells = {}
            for policy in DISPATCH_ARMS:
                doc = cell(
                    [
                        *base,
                        *traffic(pattern, rate),
                        "--strategies",
                        "stock",
                        "--engines",
                        str(k),
                        "--dispatch",
                        policy,
                        "--affinity-margin",
                        "8",
                    ],
                    out / "cells" / f"dispatch-{name}-{load}-{policy}",
                    args.reuse,
                )
                cells[policy] = {"command": doc["command"], **brief(doc["results"]["stock"])}
            running = cells["least_loaded"]["mean_running"]
            entry["loads"][str(load)] = {
                "rate_rps": rate,
                "arms": cells,
                "static_bound": replay.static_bound(running) if running >= 1 else None,
            }
            print(
                f"[study {time.perf_counter() - t0:.0f} s] {name} at {load}x capacity done", file=sys.stderr, flush=True
            )
        save("dispatch", name, entry)
    return write_report(out)


def write_report(out: Path) -> int:
    study = collect(out)
    (out / "study.json").write_text(json.dumps(study, indent=2))
    (out / "report.md").write_text(report(study))
    from sim.plots import twin_study_figure

    twin_study_figure(study, out)
    print(report(study))
    return 0


def collect(out: Path) -> dict:
    """Every part saved under ``out/parts`` (by this process or another), as one study."""
    study = {
        "note": "step times: roofline model of DeepSeek-V2-Lite on an H100 (public peak figures, assumed "
        "efficiencies), not measurements; ESFT routing replayed per token; CAPS given the prompts' true "
        "routing; one seed per cell",
        "commands": {},
        "wall_s": {},
        "admission": {},
        "many_experts": {},
        "strategies": {},
        "dispatch": {},
        "overhead": {},
        "capacity": {},
    }
    order = {p: i for i, p in enumerate(PARTS)}

    def key(f: Path) -> tuple:
        part, name = f.stem.split("--")
        dep = next((i for i, d in enumerate(DEPLOYMENTS) if name.startswith(d)), len(DEPLOYMENTS))
        return order[part], dep, name

    for f in sorted((out / "parts").glob("*--*.json"), key=key):
        part, name = f.stem.split("--")
        entry = json.loads(f.read_text())
        study["commands"][entry["study_command"]] = True
        study["wall_s"][f.stem] = entry["wall_s"]
        study[part] = entry if part == "strategies" else {**study[part], name: entry}
    study["commands"] = list(study["commands"])
    return study


def _f(x, d=3):
    return "–" if x is None else (f"{x:.{d}g}" if isinstance(x, float) else str(x))


def _rel(x, base):
    return "–" if x is None or not base else f"{x / base - 1:+.1%}"


def _verdict(name: str, load: str, arms: dict) -> str:
    s, caps, oracle = arms["stock"], arms.get("step_cost"), arms.get("step_cost_oracle_headroom")
    free = arms.get("step_cost_min_gain_0")
    if caps is None:
        return f"| {name} | {load}× | – | – | – | – | – | – |"

    def gain(r):  # TPOT (mean ITL: a knee's P50 jumps between decode-only and prefill steps) or P99 ITL
        return max(
            1 - r.get("itl_mean_ms", r["itl_p50_ms"]) / s.get("itl_mean_ms", s["itl_p50_ms"]),
            1 - r["itl_p99_ms"] / s["itl_p99_ms"],
        )

    head = None if oracle is None else gain(oracle)
    own = gain(caps)
    captured = "–" if head is None or head < 0.02 else f"{own / head:.0%}"
    worse = [
        f"{k} {caps[m] / s[m] - 1:+.1%}"
        for k, m in (("TTFT p99", "ttft_p99_s"), ("ITL p99", "itl_p99_ms"))
        if caps[m] > 1.03 * s[m]
    ]
    share = caps.get("share_contested_planned")
    evaluated = "no contested step" if share is None else ("yes" if share >= 0.9 else f"NO ({share:.0%})")
    bare = "–" if free is None else f"{gain(free):+.1%}, TTFT p99 {_rel(free['ttft_p99_s'], s['ttft_p99_s'])}"
    return (
        f"| {name} | {load}× | {'–' if head is None else f'{head:+.1%}'} | {own:+.1%} | {captured} | "
        f"{', '.join(worse) or 'no'} | {evaluated} | {bare} |"
    )


def _by_traffic(part: dict, key: str):
    """(deployment, traffic, entry) of a part saved per deployment by ``by_deployment``: its
    entries holding ``key`` (not the study command and wall time saved beside them)."""
    for dep, e in part.items():
        for pattern, entry in e.items():
            if isinstance(entry, dict) and key in entry:
                yield dep, pattern, entry


def report(study: dict) -> str:
    lines = [
        "# The vLLM twin: studies",
        "",
        "Commands: "
        + "; ".join(f"`{c}`" for c in study["commands"])
        + f" ({sum(study['wall_s'].values()) / 60:.0f} min of runs here).",
        "",
        study["note"] + ".",
        "",
        "## 1. Admission at 0.5–1.2× capacity (vLLM's H100 defaults: 1024 sequences, 8192 tokens per engine)",
        "",
        "Capacity at SLO (P99 TTFT ≤ 2 s, P99 ITL ≤ 100 ms) of stock vLLM, by bisection. Per load: stock's "
        "figures, then each CAPS arm's change against stock (ITL P50 / P99, TTFT P99 / max: the worst wait), "
        "CAPS's engagement (contested steps — a new request is admitted while another stays behind; steps where only "
        "preempted requests resume keep vLLM's order and are not counted — where it evaluated a choice; "
        "admission steps where it admitted other than FCFS), CAPS's own time in schedule() per simulated "
        "second (this CPU, where recorded, by the code of the day the cell ran: the overhead table below "
        "holds the current figures), and the static bound at the cell's mean decode "
        "batch (distinct experts per layer, one domain vs mixed).",
        "",
        "| cell | capacity (req/s) | load | stock ITL p50 / p99 (ms) | stock TTFT p99 / max (s) | decode distinct "
        "| EP rank max/mean | arm | ITL p50 | ITL p99 | TTFT p99 | TTFT max | contested: evaluated | reordered "
        "| CAPS's own time | static bound |",
        "|---" * 16 + "|",
    ]
    verdicts = []
    for name, c in [*study["admission"].items(), *study.get("many_experts", {}).items()]:
        for load, e in c["loads"].items():
            s = e["arms"]["stock"]
            sb = e["static_bound"]
            bound = f"{sb['ratio'] - 1:+.1%} at {sb['tokens']}" if sb else "–"
            for arm, r in e["arms"].items():
                if arm == "stock":
                    continue
                added = r.get("caps_share_of_simulated")
                lines.append(
                    f"| {name} | {_f(c['capacity_rps'], 4)} | {load}× | {_f(s['itl_p50_ms'])} / {_f(s['itl_p99_ms'])} | "
                    f"{_f(s['ttft_p99_s'])} / {_f(s.get('ttft_max_s'))} | {_f(s['decode_distinct_experts'])} | "
                    f"{_f(s['ep_rank_max_over_mean'])} | {arm} | {_rel(r['itl_p50_ms'], s['itl_p50_ms'])} | "
                    f"{_rel(r['itl_p99_ms'], s['itl_p99_ms'])} | {_rel(r['ttft_p99_s'], s['ttft_p99_s'])} | "
                    f"{_rel(r.get('ttft_max_s'), s.get('ttft_max_s'))} | "
                    f"{_f(r.get('share_contested_planned'))} of {_f(r.get('contested_steps'))} | "
                    f"{_f(r['share_reordered'])} | {'–' if added is None else f'{added:.2%}'} | {bound} |"
                )
            verdicts.append(_verdict(name, load, e["arms"]))
    lines += [
        "",
        "### Against the goals (CAPS = step_cost; oracle = its headroom arm, 1.0× and 1.2× only)",
        "",
        "Headroom: the oracle's best improvement over stock of TPOT (mean ITL) or P99 ITL (capacity at SLO "
        "was bisected for stock only; one seed per cell). Goals: CAPS evaluates ≥ 90 % of contested steps; where headroom ≥ 2 % it captures ≥ 70 %; "
        "no cell worse than stock by more than 3 % P99 TTFT/ITL.",
        "",
        "| cell | load | oracle headroom | CAPS's improvement | captured | worse than stock by > 3 % | evaluated ≥ 90 % "
        "| CAPS with min_gain 0: improvement, TTFT p99 |",
        "|---" * 8 + "|",
        *verdicts,
    ]
    if study.get("capacity"):
        lines += [
            "",
            "### Capacity headroom (1.02× stock's capacity at SLO, P99 TTFT ≤ 2 s and P99 ITL ≤ 100 ms)",
            "",
            "An arm that fails the SLO at 1.02× stock's capacity cannot have 2 % more capacity (a 3 % bisection "
            "of stock's own capacity leaves stock either side of that rate).",
            "",
            "| deployment | traffic | rate (req/s) | arm | meets the SLO | TTFT p99 (s) | ITL p99 (ms) |",
            "|---" * 7 + "|",
        ]
        for dep, pattern, c in _by_traffic(study["capacity"], "arms"):
            for arm, r in c["arms"].items():
                lines.append(
                    f"| {dep} | {pattern} | {c['rate_rps']:.4g} | {arm} | {'yes' if r['meets_slo'] else 'no'} "
                    f"| {_f(r['ttft_p99_s'])} | {_f(r['itl_p99_ms'])} |"
                )
    if study.get("overhead"):
        lines += [
            "",
            "### CAPS's own time (step_cost, metrics on, 1.2× capacity, where queues form)",
            "",
            "This CPU's wall clock around all of CAPS's work on the busy loop in `schedule()` and "
            "`update_from_output()` (the busiest engine's; each engine schedules in its own process) per second "
            "of modelled serving: the goal is ≤ 2 % where there is no headroom. CAPS plans ahead (`plan_ahead`, "
            "its default on a GPU): the busy loop applies each plan and hands the worker a snapshot; the worker's "
            "time (the plan, the budget estimate, the metrics observer), which runs while the model does, is "
            "the next column: it must stay well under the step to keep up. Measured on a shared 2-core machine, "
            "so an upper bound.",
            "",
            "| deployment | traffic | mean running | engaged steps | planned | CAPS's busy-loop time (s) | per step "
            "(ms) | share of modelled time | worker's share | mean modelled step (ms) | vLLM's scheduler time on "
            "the busy loop: CAPS / stock (same run) |",
            "|---" * 11 + "|",
        ]
        for dep, pattern, r in _by_traffic(study["overhead"], "caps"):
            c = r["caps"]
            ratio = "–"
            if r.get("stock_scheduler_wall_s"):
                ratio = (
                    f"{r['scheduler_wall_s']:.2f} s / {r['stock_scheduler_wall_s']:.2f} s = "
                    f"{r['scheduler_wall_s'] / r['stock_scheduler_wall_s']:.3f}×"
                )
            per_step = f"{c['seconds'] / r['steps'] * 1e3:.3f}" if r.get("steps") else "–"
            worker = f"{c['ahead_share_of_simulated']:.2%}" if c.get("ahead_share_of_simulated") is not None else "–"
            lines.append(
                f"| {dep} | {pattern} | {r['mean_running']:.0f} | {c['engaged']} | {c['plans']} | "
                f"{c['seconds']:.3f} | {per_step} | {c['share_of_simulated']:.2%} | {worker} | "
                f"{r['step_ms_mean']:.3g} | {ratio} |"
            )
    if study["strategies"]:
        st = study["strategies"]
        s = st["arms"]["stock"]
        lines += [
            "",
            f"## 2. Every CAPS strategy: one engine, bursty, 1.2× capacity ({st['rate_rps']:.4g} req/s)",
            "",
            "| arm | ITL p50 (ms) | ITL p99 (ms) | TTFT p99 (s) | decode distinct experts | reordered | "
            "scheduler / simulated time |",
            "|---" * 7 + "|",
        ]
        for arm, r in st["arms"].items():
            lines.append(
                f"| {arm} | {_f(r['itl_p50_ms'])} ({_rel(r['itl_p50_ms'], s['itl_p50_ms'])}) | "
                f"{_f(r['itl_p99_ms'])} | {_f(r['ttft_p99_s'])} | {_f(r['decode_distinct_experts'])} | "
                f"{_f(r['share_reordered'])} | {_f(r['scheduler_share_of_simulated'])} |"
            )
    lines += [
        "",
        "## 3. Dispatch across replicas (stock vLLM in each, no expert parallelism)",
        "",
        "Per cell: each policy's figures (ITL P50 change against least-loaded in brackets; ITL is TPOT here: "
        "every request decodes 128 tokens). Headroom: the expert-affinity oracle's TPOT (mean ITL) improvement "
        "over least-loaded (a P50 or P99 of one seed moves by several % between arms that place the same "
        "requests differently); the goal is ≥ 70 % of it captured by the predictor-scored policy at moderate load "
        "(0.6×), load spread within the guard.",
        "",
        "| cell | capacity (req/s) | load | dispatch | TTFT p99 (s) | ITL p50 (ms) | ITL p99 (ms) | decode distinct "
        "experts | requests per replica | load-guard overrides | static bound |",
        "|---" * 11 + "|",
    ]
    goals, heads = [], []
    for name, c in study["dispatch"].items():
        for load, e in c["loads"].items():
            sb = e["static_bound"]
            bound = f"{sb['ratio'] - 1:+.1%} at {sb['tokens']}" if sb else "–"
            base = e["arms"]["least_loaded"]
            for label, r in e["arms"].items():
                rel = "" if label == "least_loaded" else f" ({_rel(r['itl_p50_ms'], base['itl_p50_ms'])})"
                lines.append(
                    f"| {name} | {_f(c['capacity_rps'], 4)} | {load}× | {label} | {_f(r['ttft_p99_s'])} | "
                    f"{_f(r['itl_p50_ms'])}{rel} | {_f(r['itl_p99_ms'])} | {_f(r['decode_distinct_experts'])} | "
                    f"{r.get('per_engine_requests', '–')} | {r.get('dispatch_load_guard_overrides', '–')} | {bound} |"
                )
            oracle, caps = e["arms"].get("expert_affinity_oracle"), e["arms"].get("expert_affinity")
            if oracle is not None and caps is not None:
                head, own = (
                    1 - r.get("itl_mean_ms", r["itl_p50_ms"]) / base.get("itl_mean_ms", base["itl_p50_ms"])
                    for r in (oracle, caps)
                )
                heads.append((head, f"{name} {load}×"))
                goals.append(
                    f"| {name} | {load}× | {head:+.1%} | {own:+.1%} | "
                    f"{f'{own / head:.0%}' if head >= 0.02 else '– (headroom < 2 %)'} | "
                    f"{_rel(oracle['ttft_p99_s'], base['ttft_p99_s'])} / "
                    f"{_rel(caps['ttft_p99_s'], base['ttft_p99_s'])} |"
                )
    if goals:
        lines += [
            "",
            "### Against the goals (expert affinity vs least-loaded)",
            "",
            "| cell | load | oracle headroom (TPOT) | expert affinity (TPOT) | captured | TTFT p99: oracle / "
            "expert affinity |",
            "|---" * 6 + "|",
            *goals,
        ]
        best, where = max(heads)
        lines += [
            "",
            f"Largest oracle TPOT headroom: {best:+.1%} ({where}), over {len(heads)} cells: "
            + (
                "below 2 % everywhere, so no expert-affinity router is worth building on this shape."
                if best < 0.02
                else "2 % or more somewhere: the router has something to win there."
            ),
        ]
    return "\n".join(lines) + "\n"


if __name__ == "__main__":
    sys.exit(main())
