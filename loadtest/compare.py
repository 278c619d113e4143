"""FCFS vs CAPS, side by side, on live `vllm serve` processes: the same model, workload and seed.

    python -m loadtest.compare --pattern bursty --rate 6 --duration 60 --out loadtest/results/x
    python -m loadtest.compare --strategies fcfs greedy_dot_product step_cost ...

For each configuration (baseline and CAPS, or one per ``--strategies`` name, the first being
the baseline), one after the other: start `vllm serve` on loopback, run
the same Locust shape against it (headless, bounded in time and requests), scrape `/metrics`
(vLLM's and CAPS's) every ``--poll`` seconds while it runs, stop the server by pid. Then write
``report.md`` (figures side by side with their ratio), ``compare.json``, and PNG plots (latency
CDFs, actual expert-load imbalance over time).

The baseline is vLLM's FCFS order. By default it runs through the CAPS scheduler class with the
``fcfs`` strategy (the same order as vLLM's, but with routing capture and metrics, so the
imbalance of both runs is measured the same way); ``--baseline stock`` uses vLLM's own
Scheduler (no CAPS metrics then).
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
import threading
import time
from pathlib import Path

from loadtest.server import VllmServer, metric_sums
from loadtest.workload import add_load_options, load_option_args

ROOT = Path(__file__).resolve().parents[1]
#: /metrics series kept per poll (summed over labels)
SERIES = ("vllm:caps_actual_load_max_over_mean", "vllm:caps_actual_load_cv", "vllm:caps_actual_distinct_experts",
          "vllm:caps_predicted_load_max_over_mean", "vllm:caps_predicted_load_cv",
          "vllm:caps_predicted_distinct_experts", "vllm:caps_predictor_cosine", "vllm:caps_selection_seconds")
COUNTERS = ("vllm:caps_ranked_requests_total", "vllm:caps_fcfs_fallback_requests_total",
            "vllm:caps_max_wait_bypass_requests_total", "vllm:caps_admitted_requests_total",
            "vllm:caps_steps_total", "vllm:num_preemptions_total", "vllm:generation_tokens_total")


def scrape(text: str) -> dict[str, float]:
    """``name_sum``/``name_count`` of SERIES and COUNTERS, summed over labels."""
    return metric_sums(text, {f"{n}_{k}" for n in SERIES for k in ("sum", "count")} | set(COUNTERS))


class Poller(threading.Thread):
    """Scrapes /metrics every ``every`` seconds into ``samples`` [(t, values)]."""

    def __init__(self, server: VllmServer, every: float) -> None:
        super().__init__(daemon=True)
        self.server, self.every = server, every
        self.samples: list[tuple[float, dict]] = []
        self.stop_event = threading.Event()
        self.t0 = time.monotonic()

    def run(self) -> None:
        while not self.stop_event.is_set():
            try:
                self.samples.append((time.monotonic() - self.t0, scrape(self.server.get("/metrics"))))
            except OSError:
                pass  # a missed scrape only coarsens the time series
            self.stop_event.wait(self.every)


def mean_between(first: dict, last: dict, name: str) -> float | None:
    n = last.get(f"{name}_count", 0.0) - first.get(f"{name}_count", 0.0)
    return (last.get(f"{name}_sum", 0.0) - first.get(f"{name}_sum", 0.0)) / n if n > 0 else None


def run_one(label: str, sched_args: list[str], args, out: Path) -> dict:
    d = out / label
    d.mkdir(parents=True, exist_ok=True)
    serve_args = ["--max-model-len", str(args.max_model_len), "--max-num-seqs", str(args.max_num_seqs),
                  "--seed", str(args.seed), *(["--enforce-eager"] if not args.compile else []), *sched_args]
    server = VllmServer(args.model, serve_args, d / "serve.log", name="served")
    poller = None
    try:
        server.wait_ready(args.startup_timeout)
        poller = Poller(server, args.poll)
        poller.start()
        shape = ROOT / "loadtest" / "shapes" / f"{args.pattern}.py"
        cmd = [sys.executable, "-m", "locust", "-f", f"{ROOT / 'loadtest' / 'locustfile.py'},{shape}", "--headless",
               "-H", server.url(""), "--only-summary", "--loglevel", "WARNING", "--csv", str(d / "locust"),
               "--summary", str(d / "summary.json"), "--samples", str(d / "samples.jsonl"),
               "--run-time", f"{int(args.duration + args.request_timeout + 30)}s", *load_option_args(args)]
        proc = subprocess.run(cmd, cwd=ROOT, capture_output=True, text=True,
                              timeout=args.duration + args.request_timeout + 120)
        (d / "locust.log").write_text(proc.stdout + proc.stderr)
        if not (d / "summary.json").exists():
            raise RuntimeError(f"{label}: Locust wrote no summary (exit {proc.returncode}):\n{proc.stderr[-3000:]}")
        time.sleep(args.poll * 1.5)  # one more scrape after the last request
    finally:
        if poller is not None:
            poller.stop_event.set()
            poller.join(timeout=10)
        server.stop()
    summary = json.loads((d / "summary.json").read_text())
    samples = poller.samples if poller else []
    first, last = (samples[0][1], samples[-1][1]) if samples else ({}, {})
    metrics = {name: mean_between(first, last, name) for name in SERIES}
    metrics.update({c: last.get(c, 0.0) - first.get(c, 0.0) for c in COUNTERS})
    (d / "metrics_timeseries.json").write_text(json.dumps(samples))
    return {"label": label, "summary": summary, "metrics": metrics, "timeseries": samples}


ROWS = [  # (label, getter, unit)
    ("TTFT p50", lambda r: r["summary"]["ttft_s"]["p50"], "s"),
    ("TTFT p90", lambda r: r["summary"]["ttft_s"]["p90"], "s"),
    ("TTFT p99", lambda r: r["summary"]["ttft_s"]["p99"], "s"),
    ("ITL p50", lambda r: r["summary"]["itl_s"]["p50"], "s"),
    ("ITL p99", lambda r: r["summary"]["itl_s"]["p99"], "s"),
    ("E2E p50", lambda r: r["summary"]["e2e_s"]["p50"], "s"),
    ("E2E p90", lambda r: r["summary"]["e2e_s"]["p90"], "s"),
    ("E2E p99", lambda r: r["summary"]["e2e_s"]["p99"], "s"),
    ("throughput", lambda r: r["summary"]["throughput_rps"], "req/s"),
    ("output tokens/s", lambda r: r["summary"]["throughput_tok_s"], "tok/s"),
    ("goodput", lambda r: r["summary"]["goodput_rps"], "req/s"),
    ("failures", lambda r: r["summary"]["failures"], ""),
    ("actual imbalance max/mean (mean/step)", lambda r: r["metrics"]["vllm:caps_actual_load_max_over_mean"], ""),
    ("actual imbalance CV (mean/step)", lambda r: r["metrics"]["vllm:caps_actual_load_cv"], ""),
    ("actual distinct experts/layer/step", lambda r: r["metrics"]["vllm:caps_actual_distinct_experts"], ""),
    ("predicted imbalance max/mean", lambda r: r["metrics"]["vllm:caps_predicted_load_max_over_mean"], ""),
    ("predictor cosine (mean/request)", lambda r: r["metrics"]["vllm:caps_predictor_cosine"], ""),
    ("requests ordered by the strategy", lambda r: r["metrics"]["vllm:caps_ranked_requests_total"], ""),
    ("engine steps", lambda r: r["metrics"]["vllm:caps_steps_total"], ""),
    ("preemptions", lambda r: r["metrics"]["vllm:num_preemptions_total"], ""),
]


def _fmt(x) -> str:
    if x is None:
        return "–"
    return f"{x:.4g}" if isinstance(x, float) else str(x)


def report(runs: list[dict], args, command: str, out: Path) -> str:
    """Figures of every run side by side, and each run's ratio to the first (the baseline)."""
    base, others = runs[0], runs[1:]
    labels = [r["label"] for r in runs]
    lines = [f"# {' vs '.join(labels)}: {args.pattern} load, live vllm serve", "",
             f"Command: `{command}`", "",
             f"Model `{args.model}`, max_num_seqs {args.max_num_seqs}, {args.max_tokens} output tokens/request, "
             f"rate {args.rate}/s for {args.duration:g} s (≤ {args.max_requests} requests), seed {args.seed}, "
             f"concurrency ≤ {args.concurrency}, SLO TTFT ≤ {args.slo_ttft:g} s and E2E ≤ {args.slo_e2e:g} s. "
             f"Baseline: {base['label']}; CAPS settings: `{args.caps_config}`"
             + (" (strategy set per run)." if args.strategies else "."), "",
             "| figure | " + " | ".join(labels) + " | " + " | ".join(f"{r['label']} / {base['label']}" for r in others) + " |",
             "|---" * (2 * len(runs)) + "|"]
    for name, get, unit in ROWS:
        vals = []
        for r in runs:
            try:
                vals.append(get(r))
            except (KeyError, TypeError):
                vals.append(None)
        a = vals[0]
        ratios = [b / a if isinstance(a, (int, float)) and isinstance(b, (int, float)) and a else None for b in vals[1:]]
        cells = " | ".join(_fmt(v) for v in vals + ratios)
        lines.append(f"| {name}{f' ({unit})' if unit else ''} | {cells} |")
    for r in runs:
        reasons = r["summary"]["failure_reasons"]
        if reasons:
            lines.append(f"\n{r['label']} failures: " + ", ".join(f"{k}: {v}" for k, v in reasons.items()))
    lines += ["", "Plots: `latency_cdf.png`, `imbalance_over_time.png`. Raw: `*/summary.json`, `*/samples.jsonl`, "
              "`*/locust_stats.csv`, `*/metrics_timeseries.json`, `*/serve.log`."]
    text = "\n".join(lines) + "\n"
    (out / "report.md").write_text(text)
    return text


def plots(runs: list[dict], out: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    import numpy as np

    def load_samples(label: str) -> list[dict]:
        return [json.loads(x) for x in (out / label / "samples.jsonl").read_text().splitlines() if x.strip()]

    fig, axes = plt.subplots(1, 3, figsize=(13, 3.8))
    for r in runs:
        rows = [s for s in load_samples(r["label"]) if s["error"] is None]
        for ax, key in zip(axes, ("ttft_s", "itl_s", "e2e_s")):
            xs = np.sort([x for s in rows for x in s[key]] if key == "itl_s" else [s[key] for s in rows])
            if len(xs):
                ax.step(xs, np.arange(1, len(xs) + 1) / len(xs), where="post", label=r["label"])
    for ax, title in zip(axes, ("TTFT", "inter-token latency", "end-to-end latency")):
        ax.set_title(title)
        ax.set_xlabel("seconds")
        ax.set_ylabel("share of requests" if title != "inter-token latency" else "share of gaps")
        ax.grid(alpha=0.3)
        ax.legend()
    fig.tight_layout()
    fig.savefig(out / "latency_cdf.png", dpi=110)
    plt.close(fig)

    fig, ax = plt.subplots(figsize=(8, 3.8))
    name = "vllm:caps_actual_load_max_over_mean"
    for r in runs:
        ts = r["timeseries"]
        pts = [(t1, mean_between(a, b, name)) for (t0, a), (t1, b) in zip(ts, ts[1:])]
        pts = [(t, v) for t, v in pts if v is not None]
        if pts:
            ax.plot(*zip(*pts), marker=".", label=r["label"])
    ax.set_title("actual expert-load imbalance per scrape interval (max/mean, mean over steps)")
    ax.set_xlabel("seconds since the server was ready")
    ax.grid(alpha=0.3)
    ax.legend()
    fig.tight_layout()
    fig.savefig(out / "imbalance_over_time.png", dpi=110)
    plt.close(fig)


def where(runs: list[dict], out: Path) -> str:
    """Where the results and the metrics are, and how to watch them live."""
    series = ", ".join(str(out / r["label"] / "metrics_timeseries.json") for r in runs)
    return (f"Report: {out / 'report.md'} (plots: latency_cdf.png, imbalance_over_time.png).\n"
            f"Metrics: each server's /metrics (vLLM's and the vllm:caps_* series) was scraped every poll into "
            f"{series}; the servers are stopped now.\n"
            "Watch them live: `make serve` (CAPS on http://127.0.0.1:8000, metrics at /metrics), then "
            "`make monitor` (Prometheus on http://127.0.0.1:9090, Grafana with deploy/grafana when installed).")


def main(argv: list[str] | None = None) -> None:
    ap = argparse.ArgumentParser(prog="python -m loadtest.compare", description=__doc__.split("\n\n")[0])
    ap.add_argument("--model", default="", help="model path or name (default: the embedded tiny MoE)")
    ap.add_argument("--pattern", choices=("bursty", "poisson", "trace"), default="bursty")
    add_load_options(ap)
    ap.set_defaults(rate=6.0)
    ap.add_argument("--max-num-seqs", type=int, default=8)
    ap.add_argument("--max-model-len", type=int, default=1024)
    ap.add_argument("--compile", action="store_true", help="let vLLM compile (slower start; default --enforce-eager)")
    ap.add_argument("--caps-config", default="{}",
                    help="the CAPS run's caps object (default: CAPS's defaults, strategy step_cost)")
    ap.add_argument("--baseline", choices=("fcfs", "stock"), default="fcfs")
    ap.add_argument("--strategies", nargs="+", metavar="NAME",
                    help="instead of baseline + CAPS: one run per CAPS strategy, the first is the baseline "
                         "(--caps-config gives the other settings)")
    ap.add_argument("--poll", type=float, default=2.0, help="seconds between /metrics scrapes")
    ap.add_argument("--startup-timeout", type=float, default=600.0)
    ap.add_argument("--out", default="loadtest/results/latest")
    args = ap.parse_args(argv)
    if args.pattern == "trace" and not args.trace:
        ap.error("--pattern trace needs --trace CSV")
    caps = json.loads(args.caps_config)
    if not isinstance(caps, dict):
        ap.error("--caps-config must be a JSON object")
    from caps_vllm.strategies import STRATEGIES

    unknown = [n for n in (args.strategies or []) + [caps.get("strategy", "step_cost")] if n not in STRATEGIES]
    if unknown:
        ap.error(f"unknown strategy {unknown[0]!r}; valid: {', '.join(STRATEGIES)}")
    if not args.model:
        from caps_vllm.tiny_model import generate

        args.model = str(generate())
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    caps_cls = ["--scheduler-cls", "caps_vllm.CapsScheduler"]
    base_args = [] if args.baseline == "stock" else \
        [*caps_cls, "--additional-config", json.dumps({"caps": {**caps, "strategy": "fcfs"}})]
    if args.strategies:
        plan = [(n, [*caps_cls, "--additional-config", json.dumps({"caps": {**caps, "strategy": n}})])
                for n in args.strategies]
    else:
        plan = [(args.baseline, base_args), ("caps", [*caps_cls, "--additional-config", json.dumps({"caps": caps})])]
    runs = []
    for label, sched in plan:
        print(f"[{label}] serving {args.model} and running the {args.pattern} load ...", flush=True)
        runs.append(run_one(label, sched, args, out))
        s = runs[-1]["summary"]
        print(f"[{label}] {s['completed']} completed, {s['failures']} failed, E2E p99 {_fmt(s['e2e_s']['p99'])} s",
              flush=True)
    command = "python -m loadtest.compare " + " ".join(sys.argv[1:] if argv is None else argv)
    (out / "compare.json").write_text(json.dumps(
        {"command": command, "args": vars(args), "runs": [{k: r[k] for k in ("label", "summary", "metrics")}
                                                           for r in runs]}, indent=2))
    text = report(runs, args, command, out)
    plots(runs, out)
    print(text)
    print(where(runs, out))


if __name__ == "__main__":
    main()
