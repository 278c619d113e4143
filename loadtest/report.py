"""The side-by-side runner's outputs: verdicts in words first, then the runs, the figures with
their intervals, what CAPS did, and plots. Reads what ``loadtest.compare`` measured."""

from __future__ import annotations

from pathlib import Path

from loadtest.records import mean_between
from loadtest.stats import BY_NAME, FIGURES, LEVEL, Interval, RunData, fmt_interval, pooled

#: per load pattern, the headline's lead figure and the ones named after it (default: the others)
LEADS = {
    "offline": ("makespan", ("TPOT (mean ITL)", "output tokens/s", "actual distinct experts/layer/step")),
    "": ("TPOT (mean ITL)", ("output tokens/s", "TTFT p99", "E2E p99")),
}


def leads(pattern: str) -> tuple[str, tuple[str, ...]]:
    return LEADS.get(pattern, LEADS[""])


def _iv(c: dict) -> str:
    if c["ratio"] is None:
        return "no value"
    if c["lo"] is None:
        return f"ratio {c['ratio']:.2f}"
    return f"ratio {c['ratio']:.2f}, {LEVEL:.0%} CI {c['lo']:.2f}–{c['hi']:.2f}".replace("%", " %")


def headline(results: dict, runs: list[dict], meta: dict) -> list[str]:
    """The verdict of every arm against the baseline in words, then the A/A noise floor."""
    base, aa = meta["baseline"], meta["aa"]
    lead, also = leads(meta["args"]["pattern"])
    reps = len({r["repeat"] for r in runs})
    lines = []
    for arm in meta["arms"]:
        if arm in (base, aa):
            continue
        if arm not in results:
            lines.append(
                f"{arm} vs {base} on this machine: no verdict: no repetition where both ran validly "
                "(see the runs below)."
            )
            continue
        c = results[arm]
        n = c[lead]["runs"]
        lines.append(
            f"{arm} vs {base} on this machine: {lead} {_iv(c[lead])}: {c[lead]['verdict']} "
            f"({n} of {reps} interleaved repetitions valid)."
        )
        lines.append("  " + "; ".join(f"{f} {_iv(c[f])}: {c[f]['verdict']}" for f in also) + ".")
        ok = [r for r in runs if r["label"] == arm and r["status"] == "ok"]
        moved = sum(
            (r["metrics"].get("vllm:caps_ranked_requests_total") or 0)
            + (r["metrics"].get("vllm:caps_max_wait_bypass_requests_total") or 0)
            for r in ok
        )
        if arm not in ("fcfs", "stock") and ok and moved == 0:
            lines.append(
                f"  {arm} ranked and bypassed no request in these runs: it served in FCFS order, so its "
                f"differences from {base} measure noise, not the strategy."
            )
    if aa is None:
        lines.append(
            "No A/A control in this run (--aa adds one, as make loadtest does): the noise floor was not "
            "measured here; loadtest/results/README.md has this CPU's."
        )
    elif aa in results:
        c = results[aa]
        lines.append(
            f"Noise floor, A/A ({base} vs an identical {base} arm): "
            + "; ".join(f"{f} {_iv(c[f])}" for f in (lead, *also))
            + "."
        )
    else:
        lines.append("Noise floor: no valid A/A pair of runs.")
    if reps < 3:
        lines.append(
            f"Only {reps} repetition{'s' if reps > 1 else ''} per arm (make loadtest runs 3): "
            "the intervals are wide and rest on few runs."
        )
    return lines


def _f(x, digits: int = 4) -> str:
    if x is None:
        return "–"
    return f"{x:.{digits}g}" if isinstance(x, float) else str(x)


def report(doc: dict, runs: list[dict], data: dict[tuple[int, str], RunData], out: Path) -> str:
    """``data``: records.run_data(runs), the valid runs as the intervals read them."""
    a = doc["args"]
    arms, base, results = doc["arms"], doc["baseline"], doc["comparisons"]
    pin = doc["pinning"]
    pin_text = (
        f"vllm serve pinned to CPU(s) {pin['server_cpus']} and the load generator to {pin['loadgen_cpus']}"
        if pin
        else "server and load generator not pinned (`--pin none`, or fewer than two CPUs)"
    )
    lines = [
        *doc["headline"],
        "",
        f"# {' vs '.join(arms)}: {a['pattern']} load, live vllm serve",
        "",
        f"Command: `{doc['command']}`",
        "",
        f"Model `{a['model']}`, max_num_seqs {a['max_num_seqs']}, "
        + (
            f"{a['min_tokens']}–{a['max_tokens']} output tokens/request (uniform)"
            if a.get("min_tokens")
            else f"{a['max_tokens']} output tokens/request"
        )
        + (
            f", an offline batch of {a['max_requests']} requests"
            if a["pattern"] == "offline"
            else f", rate {a['rate']}/s for {a['duration']:g} s (≤ {a['max_requests']} requests)"
        )
        + f", seeds {a['seed']}"
        f"…{a['seed'] + a['repeats'] - 1} (one per repetition, the same in every arm), concurrency ≤ "
        f"{a['concurrency']}"
        + (f", scheduler paused for the first {a['hold']:g} s" if a["hold"] else "")
        + f". {a['repeats']} repetitions, each arm once per repetition in rotated order, "
        + (
            f"one server per arm for the whole comparison ({a.get('warmup', 0)} unmeasured warm-up run(s) each)"
            if a.get("servers") == "per-arm"
            else "a fresh server per run"
        )
        + f"; {pin_text}"
        + (f"; {doc['cache']}" if doc.get("cache") else "")
        + f". CAPS settings of the CAPS arms: `{a['caps_config']}`. Intervals: bootstrap "
        f"({a['bootstrap']} draws) over repetitions (paired) and requests; a run whose load generator's "
        f"P99 lag exceeded {a['max_lag']:g} s is invalid and left out.",
        "",
        "## Runs",
        "",
        "| # | repetition | arm | status | completed / scheduled | E2E p99 (s) | generator lag P99 / max (s) "
        "| held by the concurrency bound | wall (s) |",
        "|---" * 9 + "|",
    ]
    for i, r in enumerate(runs, 1):
        s = r["summary"]
        status = r["status"] + (f": {r['reason']}" if r["reason"] else "")
        if s is None:
            lines.append(f"| {i} | {r['repeat'] + 1} | {r['label']} | {status} | – | – | – | – | {r['wall_s']:.0f} |")
            continue
        lines.append(
            f"| {i} | {r['repeat'] + 1} | {r['label']} | {status} | {s['completed']} / {s['scheduled']} | "
            f"{_f(s['e2e_s']['p99'])} | {_f(s['lag_s']['p99'], 3)} / {_f(s['lag_s']['max'], 3)} | "
            f"{s['held_share']:.0%} | {r['wall_s']:.0f} |".replace("%", " %")
        )
    compared = [arm for arm in arms if arm in results]
    by_arm: dict[str, list[RunData]] = {}
    for (_, arm), d in sorted(data.items()):
        by_arm.setdefault(arm, []).append(d)
    lines += [
        "",
        "## Figures",
        "",
        "Values pooled over each arm's valid runs; ratio to the baseline with its 95 % interval and verdict.",
        "",
        "| figure | " + " | ".join(arms) + " | " + " | ".join(f"{arm} / {base} | verdict" for arm in compared) + " |",
        "|---" * (1 + len(arms) + 2 * len(compared)) + "|",
    ]
    for f in FIGURES:
        vals = [_f(pooled(by_arm.get(arm, []), f)) for arm in arms]
        cells = [
            f"{fmt_interval(_interval(results[arm][f.name]))} | {results[arm][f.name]['verdict']}" for arm in compared
        ]
        lines.append(f"| {f.name}{f' ({f.unit})' if f.unit else ''} | " + " | ".join(vals + cells) + " |")
    lines += [
        "",
        "## What CAPS did",
        "",
        'Summed over each arm\'s valid runs ("ranked": requests the strategy placed '
        'into free slots; "bypass": admitted ahead of it by the max-wait rule).',
        "",
        "| arm | ranked | bypass | admitted | engaged / reordered / kept-FCFS steps | guard fallback steps "
        "| realized gain per reordering (ms) | generated tokens | predictor cosine | predicted max/mean | "
        "preemptions | failed requests |",
        "|---" * 12 + "|",
    ]
    for arm in arms:
        ok = [r for r in runs if r["label"] == arm and r["status"] == "ok"]
        if not ok:
            lines.append(f"| {arm} |" + " – |" * 11)
            continue

        def total(name: str) -> float:
            return sum(r["metrics"].get(name) or 0.0 for r in ok)

        def mean(name: str) -> float | None:
            v = [r["metrics"][name] for r in ok if r["metrics"].get(name) is not None]
            return sum(v) / len(v) if v else None

        lines.append(
            f"| {arm} | {total('vllm:caps_ranked_requests_total'):.0f} | "
            f"{total('vllm:caps_max_wait_bypass_requests_total'):.0f} | "
            f"{total('vllm:caps_admitted_requests_total'):.0f} | "
            f"{total('vllm:caps_engaged_steps_total'):.0f} / {total('vllm:caps_reordered_steps_total'):.0f} / "
            f"{total('vllm:caps_kept_fcfs_steps_total'):.0f} | {total('vllm:caps_guard_fallback_steps_total'):.0f} | "
            f"{_f(mean('vllm:caps_guard_realized_gain_ms'), 3)} | {total('vllm:generation_tokens_total'):.0f} | "
            f"{_f(mean('vllm:caps_predictor_cosine'), 3)} | "
            f"{_f(mean('vllm:caps_predicted_load_max_over_mean'), 3)} | "
            f"{total('vllm:num_preemptions_total'):.0f} | {sum(r['summary']['failures'] for r in ok)} |"
        )
    lines += [
        "",
        "How to read: a verdict needs ≥ 2 valid repetitions per arm and an interval that excludes 1; "
        "where the A/A control's own interval excludes 1 for a figure, that figure's verdicts are withheld "
        "as inconclusive. Latency ratios < 1 and throughput ratios > 1 are better; distinct experts, "
        "imbalance and engine steps are reported as lower/higher (which is better depends on the "
        "deployment). "
        + (
            "The real-cost model (the tiny model's routing at Qwen1.5-MoE-A2.7B's expert size) makes every expert "
            "a step reads cost what it costs that model on this CPU; what a CPU cannot show is a GPU's regimes "
            "(HBM-resident experts, PCIe offload, expert parallelism)."
            if "real-cost" in str(a["model"])
            else "On a CPU with a tiny model, a step's time is set by Python and attention overheads, "
            "not by reading expert weights or by an expert-parallel rank; these runs check CAPS serves "
            "correctly under load and measure its overhead, not what it is worth on a GPU."
        ),
        "",
        "Plots: `latency_cdf.png`, `intervals.png`, `imbalance_over_time.png`. Raw per-run files (server "
        "logs, Locust CSVs, per-request samples, /metrics series) in `raw/` (not committed).",
    ]
    text = "\n".join(lines) + "\n"
    (out / "report.md").write_text(text)
    return text


def _interval(c: dict) -> Interval:
    return Interval(c["ratio"], c["lo"], c["hi"], c["runs"])


def plots(doc: dict, runs: list[dict], out: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    import numpy as np

    arms, results = doc["arms"], doc["comparisons"]
    fig, axes = plt.subplots(1, 3, figsize=(13, 3.8))
    for arm in arms:
        rows = [
            s for r in runs if r["label"] == arm and r["status"] == "ok" for s in r["samples"] if s["error"] is None
        ]
        for ax, key in zip(axes, ("ttft_s", "itl_s", "e2e_s")):
            xs = np.sort([x for s in rows for x in s[key]] if key == "itl_s" else [s[key] for s in rows])
            if len(xs):
                ax.step(xs, np.arange(1, len(xs) + 1) / len(xs), where="post", label=arm)
    for ax, title in zip(axes, ("TTFT", "inter-token latency", "end-to-end latency")):
        ax.set_title(title + " (valid runs pooled)")
        ax.set_xlabel("seconds")
        ax.set_ylabel("share of gaps" if title == "inter-token latency" else "share of requests")
        ax.grid(alpha=0.3)
        ax.legend()
    fig.tight_layout()
    fig.savefig(out / "latency_cdf.png", dpi=110)
    plt.close(fig)

    names = [f.name for f in FIGURES]
    fig, ax = plt.subplots(figsize=(8, 0.35 * len(names) + 1.5))
    for k, arm in enumerate(results):
        ys = np.arange(len(names)) + 0.8 * (k - (len(results) - 1) / 2) / max(len(results), 1)
        c = results[arm]
        pts = [(y, c[n]) for y, n in zip(ys, names) if c[n]["ratio"] is not None and c[n]["lo"] is not None]
        if pts:
            y, cs = zip(*pts)
            x = np.array([v["ratio"] for v in cs])
            err = np.array([[v["ratio"] - v["lo"] for v in cs], [v["hi"] - v["ratio"] for v in cs]])
            ax.errorbar(x, y, xerr=np.maximum(err, 0), fmt="o", capsize=3, label=f"{arm} / {doc['baseline']}")
    ax.axvline(1.0, color="grey", lw=1)
    ax.set_yticks(
        np.arange(len(names)),
        [f"{n} ({BY_NAME[n].better + ' is better' if BY_NAME[n].better else 'no direction'})" for n in names],
    )
    ax.invert_yaxis()
    ax.set_xlabel(f"ratio to the baseline, {LEVEL:.0%} bootstrap interval".replace("%", " %"))
    ax.grid(alpha=0.3, axis="x")
    ax.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(out / "intervals.png", dpi=110)
    plt.close(fig)

    fig, ax = plt.subplots(figsize=(8, 3.8))
    name = "vllm:caps_actual_load_max_over_mean"
    for arm in arms:
        for r in [r for r in runs if r["label"] == arm and r["status"] == "ok"][:1]:
            ts = r["timeseries"]
            pts = [(t1, mean_between(a, b, name)) for (t0, a), (t1, b) in zip(ts, ts[1:])]
            pts = [(t, v) for t, v in pts if v is not None]
            if pts:
                ax.plot(*zip(*pts), marker=".", label=f"{arm} (repetition {r['repeat'] + 1})")
    ax.set_title("actual expert-load imbalance per scrape interval (max/mean, mean over steps)")
    ax.set_xlabel("seconds since the server was ready")
    ax.grid(alpha=0.3)
    ax.legend()
    fig.tight_layout()
    fig.savefig(out / "imbalance_over_time.png", dpi=110)
    plt.close(fig)


def where(out: Path) -> str:
    """Where the results and the metrics are, and how to watch them live."""
    return (
        f"Report: {out / 'report.md'} (plots: latency_cdf.png, intervals.png, imbalance_over_time.png); "
        f"raw per-run files, /metrics series included: {out / 'raw'}. The servers are stopped now.\n"
        "Watch the metrics live: `make serve` (CAPS on http://127.0.0.1:8000, metrics at /metrics), then "
        "`make monitor` (Prometheus on http://127.0.0.1:9090, Grafana with deploy/grafana when installed)."
    )
