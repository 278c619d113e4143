"""FCFS vs CAPS on live `vllm serve` processes: interleaved, repeated arms, ratios with intervals.

    python -m loadtest.compare --pattern bursty --rate 8 --duration 60 --repeats 3 --aa --out loadtest/results/x
    python -m loadtest.compare --strategies fcfs greedy_dot_product step_cost --baseline fcfs ...

An *arm* is one scheduler setup: a CAPS strategy name (the CAPS scheduler class with that
strategy and ``--caps-config``'s other settings; ``fcfs`` keeps vLLM's order but measures routing
and imbalance like the others) or ``stock`` (vLLM's own Scheduler, no CAPS metrics). Every
repetition runs every arm once, each on a fresh server, in an order rotated per repetition
(A B, B A, A B, ... ; Latin-square rotation for more arms) so that drift of the machine over the
session falls on all arms alike; repetition r replays the seeded schedule of ``--seed + r`` in
every arm. ``--aa`` adds a second, identical baseline arm: its ratio to the baseline is the noise
floor of this machine, printed beside every comparison.

Each run: start `vllm serve` on loopback (pinned to its own CPUs, the load generator to another,
where the machine has two or more), run the Locust shape against it, scrape ``/metrics`` every
``--poll`` seconds, stop the server by pid. A run whose load generator fell behind its schedule
(P99 ``lag_s`` > ``--max-lag``) is marked invalid, one whose server did not start or that
completed nothing failed; neither enters an interval, and the report lists both. Per figure:
the ratio of each arm to the baseline with a bootstrap 95 % interval over runs and requests
(``loadtest/stats.py``) and a verdict. Writes ``report.md`` (verdicts first), ``compare.json``,
plots; raw per-run files (server log, Locust CSVs, per-request samples, /metrics series) go to
``raw/``, which git ignores.
"""

from __future__ import annotations

import argparse
import json
import shutil
import signal
import subprocess
import sys
import threading
import time
from pathlib import Path

from loadtest.records import classify, mean_between, read_samples, run_data
from loadtest.report import headline, plots, report, where
from loadtest.server import VllmServer, metric_sums, pinned, split_cpus
from loadtest.stats import FIGURES, RunData, aa_verdict, compare, verdict
from loadtest.workload import PATTERNS, add_load_options, load_option_args

ROOT = Path(__file__).resolve().parents[1]
#: /metrics series kept per poll (summed over labels)
SERIES = (
    "vllm:caps_actual_load_max_over_mean",
    "vllm:caps_actual_load_cv",
    "vllm:caps_actual_distinct_experts",
    "vllm:caps_predicted_load_max_over_mean",
    "vllm:caps_predicted_load_cv",
    "vllm:caps_predicted_distinct_experts",
    "vllm:caps_predictor_cosine",
    "vllm:caps_selection_seconds",
    "vllm:caps_guard_realized_gain_ms",
    "vllm:iteration_tokens_total",
)
COUNTERS = (
    "vllm:caps_ranked_requests_total",
    "vllm:caps_fcfs_fallback_requests_total",
    "vllm:caps_max_wait_bypass_requests_total",
    "vllm:caps_admitted_requests_total",
    "vllm:caps_steps_total",
    "vllm:num_preemptions_total",
    "vllm:generation_tokens_total",
    "vllm:caps_engaged_steps_total",
    "vllm:caps_reordered_steps_total",
    "vllm:caps_kept_fcfs_steps_total",
    "vllm:caps_guard_fallback_steps_total",
)
STOCK = "stock"


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


def plan_runs(arms: list[str], repeats: int) -> list[tuple[int, str]]:
    """(repetition, arm) in run order: every repetition runs every arm, rotated by one per
    repetition (A B / B A / A B ...), so each arm takes each position equally often."""
    k = len(arms)
    return [(r, arms[(r + i) % k]) for r in range(repeats) for i in range(k)]


def arm_caps(strategy: str, caps: dict) -> dict:
    """The CAPS settings of an arm running ``strategy``: ``caps`` with the strategy set, its
    ``strategy_params`` (the compared strategy's) left out for ``fcfs``, which takes none."""
    out = {**caps, "strategy": strategy}
    if strategy == "fcfs":
        out.pop("strategy_params", None)
    return out


def arm_args(arm: str, baseline: str, caps: dict) -> list[str]:
    """``vllm serve`` scheduler arguments of an arm (``<baseline>-aa`` is a copy of the baseline)."""
    name = baseline if arm == f"{baseline}-aa" else arm
    if name == STOCK:
        return []
    return [
        "--scheduler-cls",
        "caps_vllm.CapsScheduler",
        "--additional-config",
        json.dumps({"caps": arm_caps(name, caps)}),
    ]


def start_server(arm: str, sched_args: list[str], args, d: Path, cpus, wait: bool = True) -> VllmServer:
    """A fresh `vllm serve` for ``arm`` with a CAPS cache folder of its own (``d/cache``, empty: no
    router or learning table inherited from another server). It starts on every CPU (imports and
    weight loading go faster; its model's worker threads bound to the server's CPUs from the start)
    and is pinned to the server's CPUs once ready (``wait``; else the caller calls :func:`ready`)."""
    serve_args = [
        "--max-model-len",
        str(args.max_model_len),
        "--max-num-seqs",
        str(args.max_num_seqs),
        "--seed",
        str(args.seed),
        *(["--enforce-eager"] if not args.compile else []),
        *args.serve_arg,
        *sched_args,
    ]
    cache = d / "cache"
    shutil.rmtree(cache, ignore_errors=True)
    env = {"CAPS_VLLM_CACHE": str(cache.resolve())}
    if args.hold > 0:
        env["VLLM_SERVER_DEV_MODE"] = "1"  # /pause and /resume for --hold
    server_cpus = cpus[0] if cpus else None
    server = VllmServer(
        args.model, serve_args, d / "serve.log", name="served", env=env, cpus=server_cpus, pin_processes=False
    )
    if wait:
        ready(server, args, cpus)
    return server


def ready(server: VllmServer, args, cpus) -> None:
    """Wait for a started server, then pin all of it to the server's CPUs (stopped if it fails)."""
    try:
        server.wait_ready(args.startup_timeout)
        if cpus:
            server.pin(cpus[0])
    except BaseException:
        server.stop()
        raise


def drive(server: VllmServer, arm: str, rep: int, seed: int, args, d: Path, cpus) -> dict:
    """One Locust run of the schedule of ``seed`` against a ready server: the run's record
    (status ok / invalid / failed). The server is left running."""
    d.mkdir(parents=True, exist_ok=True)
    rec = {
        "label": arm,
        "repeat": rep,
        "seed": seed,
        "status": "ok",
        "reason": None,
        "summary": None,
        "metrics": None,
        "samples": [],
        "timeseries": [],
    }
    gen_cpus = cpus[1] if cpus else None
    started = time.monotonic()
    poller = None
    try:
        poller = Poller(server, args.poll)
        poller.start()
        shape = ROOT / "loadtest" / "shapes" / f"{args.pattern}.py"
        load = {**vars(args), "seed": seed}
        cmd = [
            sys.executable,
            "-m",
            "locust",
            "-f",
            f"{ROOT / 'loadtest' / 'locustfile.py'},{shape}",
            "--headless",
            "-H",
            server.url(""),
            "--only-summary",
            "--loglevel",
            "WARNING",
            "--csv",
            str(d / "locust"),
            "--summary",
            str(d / "summary.json"),
            "--samples",
            str(d / "samples.jsonl"),
            "--run-time",
            f"{int(args.duration + args.hold + args.request_timeout + 30)}s",
            *load_option_args(argparse.Namespace(**load)),
        ]
        proc = subprocess.run(
            cmd,
            cwd=ROOT,
            capture_output=True,
            text=True,
            preexec_fn=pinned(gen_cpus),
            timeout=args.duration + args.hold + args.request_timeout + 120,
        )
        (d / "locust.log").write_text(proc.stdout + proc.stderr)
        if not (d / "summary.json").exists():
            raise RuntimeError(f"Locust wrote no summary (exit {proc.returncode}): {proc.stderr[-1500:]}")
        time.sleep(args.poll * 1.5)  # one more scrape after the last request
    except Exception as exc:  # a run that fails is reported, never dropped
        rec.update(status="failed", reason=str(exc).strip().splitlines()[0][:300] if str(exc).strip() else repr(exc))
    finally:
        if poller is not None:
            poller.stop_event.set()
            poller.join(timeout=10)
    rec["window"] = (started, time.monotonic())
    rec["wall_s"] = rec["window"][1] - started
    if rec["status"] == "failed":
        return rec
    summary = json.loads((d / "summary.json").read_text())
    rec["samples"] = read_samples(d / "samples.jsonl")
    samples = poller.samples if poller else []
    (d / "metrics_timeseries.json").write_text(json.dumps(samples))
    first, last = (samples[0][1], samples[-1][1]) if samples else ({}, {})
    metrics = {name: mean_between(first, last, name) for name in SERIES}
    metrics.update({c: last.get(c, 0.0) - first.get(c, 0.0) for c in COUNTERS})
    metrics["engine_steps"] = last.get("vllm:iteration_tokens_total_count", 0.0) - first.get(
        "vllm:iteration_tokens_total_count", 0.0
    )
    rec.update(summary=summary, metrics=metrics, timeseries=samples)
    rec["status"], rec["reason"] = classify(summary, args.max_lag)
    return rec


def run_one(arm: str, rep: int, sched_args: list[str], args, raw: Path, cpus) -> dict:
    """One fresh server, one Locust run (``--servers per-run``)."""
    d = raw / f"r{rep}-{arm}"
    d.mkdir(parents=True, exist_ok=True)
    started = time.monotonic()
    try:
        server = start_server(arm, sched_args, args, d, cpus)
    except Exception as exc:
        reason = str(exc).strip().splitlines()[0][:300] if str(exc).strip() else repr(exc)
        return {
            "label": arm,
            "repeat": rep,
            "seed": args.seed + rep,
            "status": "failed",
            "reason": reason,
            "summary": None,
            "metrics": None,
            "samples": [],
            "timeseries": [],
            "wall_s": time.monotonic() - started,
        }
    try:
        return drive(server, arm, rep, args.seed + rep, args, d, cpus)
    finally:
        server.stop()


def step_log_slice(log: Path, window: tuple[float, float], out: Path) -> None:
    """The lines of a server's step log whose step (or request) began inside ``window`` (the
    engine logs this machine's monotonic clock, the one the runner reads)."""
    lo, hi = window
    keep = []
    for line in log.read_text().splitlines():
        if line.strip():
            row = json.loads(line)
            if lo <= row.get("t", row.get("added", -1.0)) <= hi:
                keep.append(line)
    out.write_text("".join(x + "\n" for x in keep))


def analyse(
    runs: list[dict], data: dict[tuple[int, str], RunData], arms: list[str], baseline: str, aa: str | None, draws: int
) -> dict:
    """Per arm other than the baseline: every figure's ratio, interval and verdict, over the
    repetitions where both it and the baseline have a valid run (``data``: records.run_data)."""
    reps = sorted({r["repeat"] for r in runs})
    intervals = {}
    for arm in arms:
        if arm == baseline:
            continue
        pairs = [rep for rep in reps if (rep, baseline) in data and (rep, arm) in data]
        if pairs:
            intervals[arm] = compare(
                [data[(p, baseline)] for p in pairs], [data[(p, arm)] for p in pairs], draws=draws, seed=len(intervals)
            )
    out = {}
    for arm, ivs in intervals.items():
        aa_ivs = intervals.get(aa) if aa and arm != aa else None
        out[arm] = {
            f.name: {
                **ivs[f.name].to_json(),
                "verdict": aa_verdict(ivs[f.name])
                if arm == aa
                else verdict(f, ivs[f.name], aa_ivs[f.name] if aa_ivs else None),
            }
            for f in FIGURES
        }
    return out


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(prog="python -m loadtest.compare", description=__doc__.split("\n\n")[0])
    ap.add_argument(
        "--model",
        default="",
        help="model path or name; 'real-cost': the embedded model at Qwen1.5-MoE-A2.7B's expert size "
        "(built on first use, 4.3 GB); default: the embedded tiny MoE",
    )
    ap.add_argument("--pattern", choices=PATTERNS, default="bursty")
    add_load_options(ap)
    ap.set_defaults(rate=6.0)
    ap.add_argument("--max-num-seqs", type=int, default=8)
    ap.add_argument("--max-model-len", type=int, default=1024)
    ap.add_argument("--compile", action="store_true", help="let vLLM compile (slower start; default --enforce-eager)")
    ap.add_argument(
        "--caps-config", default="{}", help="the CAPS settings of every CAPS arm, as JSON (the strategy is set per arm)"
    )
    ap.add_argument(
        "--strategies",
        nargs="+",
        metavar="ARM",
        default=["fcfs", "step_cost"],
        help="the arms: CAPS strategy names, or 'stock' for vLLM's own Scheduler (default: fcfs step_cost)",
    )
    ap.add_argument("--baseline", default=None, help="the arm the others are compared with (default: the first)")
    ap.add_argument("--repeats", type=int, default=3, help="runs of every arm, interleaved (default 3)")
    ap.add_argument("--aa", action="store_true", help="add an A/A control: a second, identical baseline arm")
    ap.add_argument(
        "--max-lag",
        type=float,
        default=0.5,
        help="a run whose load generator sent its P99 request later than this (s) is invalid",
    )
    ap.add_argument(
        "--pin",
        choices=("auto", "none"),
        default="auto",
        help="auto: server and load generator on separate CPUs where there are two or more",
    )
    ap.add_argument(
        "--step-log",
        action="store_true",
        help="CAPS arms write the engine's step timings to raw/<run>/steps.jsonl (caps.step_log)",
    )
    ap.add_argument(
        "--servers",
        choices=("per-run", "per-arm"),
        default="per-run",
        help="per-run: a fresh server for every run; per-arm: one server per arm for the whole comparison, "
        "started before the first run (on every CPU, then pinned), warmed up, and stopped after the last "
        "(a model that takes a minute to load; every server still starts from an empty CAPS cache)",
    )
    ap.add_argument(
        "--warmup", type=int, default=1, help="per-arm: unmeasured runs of each server first (another seed)"
    )
    ap.add_argument(
        "--warmup-requests",
        type=int,
        default=None,
        help="per-arm: at most this many requests in a warm-up run (default: as many as a measured run)",
    )
    ap.add_argument(
        "--serve-arg",
        action="append",
        default=[],
        metavar="ARG",
        help="an extra vllm serve argument (repeat it), e.g. --serve-arg=--no-enable-prefix-caching",
    )
    ap.add_argument("--bootstrap", type=int, default=1000, help="bootstrap draws per interval")
    ap.add_argument("--poll", type=float, default=2.0, help="seconds between /metrics scrapes")
    ap.add_argument("--startup-timeout", type=float, default=600.0)
    ap.add_argument("--out", default="loadtest/results/latest")
    ap.add_argument(
        "--reanalyse",
        metavar="DIR",
        help="no runs: recompute the intervals, report and plots of an "
        "earlier comparison in DIR from its compare.json and raw/ samples (with this --bootstrap)",
    )
    args = ap.parse_args(argv)
    # A SIGTERM unwinds like Ctrl-C, so the running server is stopped by pid, never orphaned.
    signal.signal(signal.SIGTERM, lambda *_: sys.exit(143))
    if args.reanalyse:
        return reanalyse(Path(args.reanalyse), args.bootstrap)
    if args.pattern == "trace" and not args.trace:
        ap.error("--pattern trace needs --trace CSV")
    if args.pattern == "offline" and (args.hold <= 0 or args.concurrency < args.max_requests):
        ap.error(
            "--pattern offline needs --hold S (the batch queues while the scheduler is paused) and "
            "--concurrency >= --max-requests (every request in flight at once)"
        )
    if args.warmup < 0:
        ap.error(f"--warmup must be >= 0 (got {args.warmup})")
    if args.repeats < 1:
        ap.error(f"--repeats must be ≥ 1 (got {args.repeats})")
    if args.bootstrap < 100:
        ap.error(f"--bootstrap must be ≥ 100 draws (got {args.bootstrap})")
    if args.max_lag <= 0 or args.hold < 0:
        ap.error("--max-lag must be > 0 and --hold ≥ 0")
    try:
        caps = json.loads(args.caps_config)
    except ValueError as exc:
        ap.error(f"--caps-config is not JSON: {exc}")
    if not isinstance(caps, dict):
        ap.error("--caps-config must be a JSON object")
    from caps_vllm.strategies import STRATEGIES

    for name in args.strategies:
        if name != STOCK and name not in STRATEGIES:
            ap.error(f"--strategies: unknown arm {name!r}; valid: {STOCK}, {', '.join(STRATEGIES)}")
    if len(set(args.strategies)) != len(args.strategies):
        ap.error("--strategies: an arm is named twice (use --aa for an A/A control)")
    baseline = args.baseline or args.strategies[0]
    if baseline not in args.strategies:
        ap.error(f"--baseline {baseline!r} is not one of --strategies ({' '.join(args.strategies)})")
    if len(args.strategies) < 2 and not args.aa:
        ap.error("--strategies: a comparison needs two arms (or one and --aa)")
    arms = list(args.strategies) + ([f"{baseline}-aa"] if args.aa else [])
    aa = f"{baseline}-aa" if args.aa else None
    if args.model == "real-cost":
        from caps_vllm.real_cost import CannotBuild, build

        try:
            args.model = str(build())
        except CannotBuild as exc:
            ap.error(f"--model real-cost: {exc}")
    elif not args.model:
        from caps_vllm.tiny_model import generate

        args.model = str(generate())
    out = Path(args.out)
    raw = out / "raw"
    raw.mkdir(parents=True, exist_ok=True)
    cpus = split_cpus() if args.pin == "auto" else None
    command = "python -m loadtest.compare " + " ".join(sys.argv[1:] if argv is None else argv)
    order = plan_runs(arms, args.repeats)
    runs: list[dict] = []
    meta = {
        "command": command,
        "args": vars(args),
        "arms": arms,
        "baseline": baseline,
        "aa": aa,
        "order": order,
        "pinning": {"server_cpus": cpus[0], "loadgen_cpus": cpus[1]} if cpus else None,
    }
    meta["cache"] = (
        "every server starts from an empty CAPS cache folder of its own (no router or learning table "
        "from an earlier server)"
        + (
            "; a server keeps learning over its warm-up and measured runs, as a deployed one would"
            if args.servers == "per-arm"
            else ""
        )
    )

    def caps_of(arm: str, d: Path) -> list[str]:
        run_caps = caps
        if args.step_log:
            log = d / "steps.jsonl"
            log.unlink(missing_ok=True)  # the log appends
            run_caps = {**caps, "step_log": str(log.resolve())}
        return arm_args(arm, baseline, run_caps)

    def said(i: int, arm: str, r: dict) -> None:
        s = r["summary"]
        print(
            f"[{i}/{len(order)}] {arm}: {r['status']}"
            + (f" ({r['reason']})" if r["reason"] else "")
            + (
                f", {s['completed']} completed, E2E p99 {s['e2e_s']['p99']:.3f} s, P99 lag {s['lag_s']['p99']:.3f} s"
                + (f", makespan {s['makespan_s']:.1f} s" if s.get("makespan_s") is not None else "")
                if s and s["e2e_s"]["p99"] is not None
                else ""
            ),
            file=sys.stderr,
            flush=True,
        )

    if args.servers == "per-run":
        for i, (rep, arm) in enumerate(order, 1):
            print(
                f"[{i}/{len(order)}] repetition {rep + 1}, {arm}: serving {args.model}, {args.pattern} load ...",
                file=sys.stderr,
                flush=True,
            )
            runs.append(run_one(arm, rep, caps_of(arm, raw / f"r{rep}-{arm}"), args, raw, cpus))
            said(i, arm, runs[-1])
    else:
        servers: dict[str, VllmServer] = {}
        try:
            print(f"starting {len(arms)} servers of {args.model} ...", file=sys.stderr, flush=True)
            for arm in arms:  # all at once: they load side by side, each pinned once ready
                d = raw / f"server-{arm}"
                d.mkdir(parents=True, exist_ok=True)
                servers[arm] = start_server(arm, caps_of(arm, d), args, d, cpus, wait=False)
            for server in servers.values():
                ready(server, args, cpus)
            warm = argparse.Namespace(
                **{**vars(args), "max_requests": min(args.max_requests, args.warmup_requests or args.max_requests)}
            )
            for w in range(args.warmup):
                for arm in arms:
                    r = drive(
                        servers[arm], arm, -1, args.seed + 1000 + w, warm, raw / f"server-{arm}" / f"warmup{w}", cpus
                    )
                    print(f"warm-up {w + 1}, {arm}: {r['status']}", file=sys.stderr, flush=True)
            for i, (rep, arm) in enumerate(order, 1):
                print(f"[{i}/{len(order)}] repetition {rep + 1}, {arm} ...", file=sys.stderr, flush=True)
                d = raw / f"r{rep}-{arm}"
                runs.append(drive(servers[arm], arm, rep, args.seed + rep, args, d, cpus))
                shutil.copy(raw / f"server-{arm}" / "serve.log", d / "serve.log")  # as a per-run folder has it
                if args.step_log:
                    step_log_slice(raw / f"server-{arm}" / "steps.jsonl", runs[-1]["window"], d / "steps.jsonl")
                said(i, arm, runs[-1])
        finally:
            for server in servers.values():
                server.stop()
    return finish(meta, runs, out, args.bootstrap)


def finish(meta: dict, runs: list[dict], out: Path, draws: int) -> int:
    """Intervals, compare.json, report and plots of finished runs; the exit status."""
    data = run_data(runs)
    results = analyse(runs, data, meta["arms"], meta["baseline"], meta["aa"], draws)
    doc = {
        **meta,
        "headline": headline(results, runs, meta),
        "runs": [
            {k: r[k] for k in ("label", "repeat", "seed", "status", "reason", "wall_s", "summary", "metrics")}
            for r in runs
        ],
        "comparisons": results,
    }
    (out / "compare.json").write_text(json.dumps(doc, indent=2))
    text = report(doc, runs, data, out)
    plots(doc, runs, out)
    print(text)
    print(where(out))
    # A server that does not start is an error; an invalid run (a starved load generator) is a
    # measurement the report sets aside and says so, not a failure of the command.
    return 1 if any(r["status"] == "failed" for r in runs) else 0


def reanalyse(out: Path, draws: int) -> int:
    """``finish`` again over an earlier comparison's records and its raw per-run files."""
    doc = json.loads((out / "compare.json").read_text())
    runs = doc.pop("runs")
    for r in runs:
        d = out / "raw" / f"r{r['repeat']}-{r['label']}"
        r["samples"], r["timeseries"] = [], []
        if r["status"] != "failed":
            if not (d / "samples.jsonl").exists():
                raise SystemExit(f"--reanalyse: {d / 'samples.jsonl'} is missing (raw/ is not committed)")
            r["samples"] = read_samples(d / "samples.jsonl")
            r["timeseries"] = json.loads((d / "metrics_timeseries.json").read_text())
    meta = {k: v for k, v in doc.items() if k not in ("headline", "comparisons")}
    meta["args"] = {**meta["args"], "bootstrap": draws}
    return finish(meta, runs, out, draws)


if __name__ == "__main__":
    sys.exit(main())
