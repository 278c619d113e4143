"""Run workloads through the vLLM twin: stock vLLM vs CAPS strategies at a deployment's budgets.

    python -m sim.twin_run --model deepseek-v2-lite --hardware h100 --pattern bursty --rate 20 \\
        --requests 2000 --routing ../shared/data/routing/esft_routing.npz --strategies stock fcfs step_cost
    python -m sim.twin_run --trace ../shared/data/traces/azure_llm_2023_conv.csv ...

Every arm replays the same requests (arrival times, prompts, output lengths, domains, routing).
Arms: ``stock`` (vLLM's Scheduler) or a CAPS strategy name (``caps_vllm.CapsScheduler`` with
that strategy and ``--caps-config``'s other settings, given each request's vector: its prompt's
true routing, or a noisy oracle at ``--oracle-recall``; ``step_cost`` prices steps with the
twin's own MoE model unless ``--caps-config`` names a cost). The step time is the roofline model of
``--model`` on ``--hardware`` (``sim/step_time.py``: a model, not a measurement), its MoE part
priced from the replayed routing of the tokens each step schedules (``--routing synthetic``:
fitted domain profiles, an assumption; ``uniform``). ``--capacity``: per arm the capacity at SLO
by bisection instead of one run. Writes ``results.json``
(per arm: latency percentiles, throughput, distinct experts per step, CAPS's engagement, the
scheduler's own time) and prints a table.
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from collections.abc import Callable
from dataclasses import asdict
from pathlib import Path

import numpy as np

from caps_vllm.config import CapsConfig
from loadtest.stats import quantiles
from loadtest.workload import topic_runs
from sim.routing_replay import EsftReplay
from sim.step_time import HARDWARE, ModelShape, RooflineStep, UniformRouting, VllmStepTime
from sim.twin import Deployment, TwinRequest, VectorSpace, build_scheduler, with_vectors

ROOT = Path(__file__).resolve().parents[1]
MODELS = ROOT / "sim" / "models"
STOCK = "stock"
MAX_MODEL_LEN = 8192


def build_requests(args, domains: list[str], seq_len: dict[str, list[int]], vocab: int) -> list[TwinRequest]:
    """The workload: arrivals, prompts, output lengths and a domain per request (seeded)."""
    rng = np.random.default_rng(args.seed)
    if args.trace:
        from loadtest.traces import load_trace

        tr = load_trace(args.trace)
        n = min(len(tr), args.requests)
        t = tr.arrival_s[:n] / args.speedup
        outs = np.clip(tr.output_tokens[:n], 1, args.max_output)
        lens = np.clip(tr.prompt_tokens[:n], 1, MAX_MODEL_LEN - outs)  # vLLM refuses longer requests
        prompts = [tr.prompt_ids(i, vocab)[: int(lens[i])] for i in range(n)]
        prompts = [p if p else [1] for p in prompts]
    else:
        n = args.requests
        gaps = rng.exponential(1.0 / args.rate, n)
        t = np.cumsum(gaps) - gaps[0]
        prompts, outs = None, np.full(n, args.output_tokens)
    if args.pattern == "poisson" and not args.trace:
        topic = rng.integers(len(domains), size=n)
    else:
        topic = topic_runs(n, len(domains), args.burst_len, rng)
    reqs = []
    for i in range(n):
        d = domains[int(topic[i])]
        if prompts is None:
            length = int(rng.choice(seq_len[d]))  # a recorded sequence's length
            prompt = rng.integers(1, vocab, size=length).tolist()
        else:
            prompt = prompts[i]
        reqs.append(TwinRequest(f"r{i}", float(t[i]), prompt, int(outs[i]), d))
    return reqs


def summarize(res, wall_s: float) -> dict:
    served = list(res.served.values())
    ttft = [s.ttft_s for s in served if s.ttft_s is not None]
    itl = [x for s in served for x in s.itl_s]
    e2e = [s.e2e_s for s in served if s.e2e_s is not None]
    span = max(s.finished_s for s in served) - min(s.arrival_s for s in served)
    steps = res.steps
    admit = [st for st in steps if (st.admitted or st.resumed) and st.waiting_before >= 2]
    behind = [st for st in admit if len(st.admitted) + len(st.resumed) < st.waiting_before]  # somebody stayed
    # Contested: a new request took a place while another stayed behind. Where only preempted
    # requests resume, vLLM's order fixed the choice (they go first, with CAPS too).
    contested = [st for st in behind if st.admitted]
    decode = [st.distinct_experts for st in steps if st.prefill_tokens == 0 and st.distinct_experts is not None]
    tokens = sum(len(s.token_s) for s in served)
    return {
        "requests": len(served),
        "steps": len(steps),
        "simulated_s": res.simulated_seconds,
        "ttft_s": quantiles(ttft),
        "itl_s": quantiles(itl),
        "e2e_s": quantiles(e2e),
        "throughput_rps": len(served) / span if span > 0 else None,
        "output_tok_s": tokens / span if span > 0 else None,
        "step_ms": quantiles([st.seconds * 1e3 for st in steps]),
        "decode_step_distinct_experts": float(np.mean(decode)) if decode else None,
        "engagement": {
            "admission_steps_with_2plus_waiting": len(admit),
            "share_reordered": sum(st.out_of_order > 0 for st in admit) / len(admit) if admit else None,
            "requests_out_of_order": sum(st.out_of_order for st in steps),
            "share_of_those_steps_planned": sum(st.planned for st in admit) / len(admit) if admit else None,
            "steps_planned": sum(st.planned for st in steps),
            "contested_steps": len(contested),
            "share_of_contested_planned": sum(st.planned for st in contested) / len(contested) if contested else None,
            "steps_only_preempted_resumed": len(behind) - len(contested),
        },
        "queue": {
            "mean_waiting": float(np.mean([st.waiting for st in steps])) if steps else 0.0,
            "mean_running": float(np.mean([st.running for st in steps])) if steps else 0.0,
            "max_waiting": max((st.waiting for st in steps), default=0),
        },
        "scheduler_wall_s": res.scheduler_seconds,
        "scheduler_share_of_simulated": res.scheduler_seconds / res.simulated_seconds
        if res.simulated_seconds
        else None,
        "wall_s": wall_s,
        "simulated_s_per_wall_s": res.simulated_seconds / wall_s if wall_s > 0 else None,
    }


DISPATCH = ("least_loaded", "round_robin", "domain_oracle", "expert_affinity", "expert_affinity_oracle")


def make_dispatch(
    name: str,
    domains: list[str],
    margin: int,
    snapshot_s: float,
    engines: int = 1,
    replay=None,
    bind: Callable | None = None,
    cost=None,
):
    """``expert_affinity``: scored on the prompt's true routing per token (what CAPS's predictor
    is told); ``expert_affinity_oracle``: on the request's own decode tokens' routing."""
    from sim.cluster import DomainOracle, ExpertAffinity, LeastLoaded, RoundRobin

    if name == "domain_oracle":
        return DomainOracle(domains, margin, snapshot_s)
    if name.startswith("expert_affinity"):
        if not isinstance(replay, EsftReplay):
            raise SystemExit(f"--dispatch {name} needs recorded routing (--routing PATH.npz)")
        oracle = name.endswith("_oracle")

        def vector_of(r: TwinRequest) -> np.ndarray:
            bind(r)
            start, n = (len(r.prompt), r.output_tokens) if oracle else (0, len(r.prompt))
            return replay.row_counts(replay.rows(r.rid, start, max(n, 1))).ravel() / max(n, 1)

        return ExpertAffinity(engines, replay.layers * replay.experts, cost, vector_of, margin)
    return LeastLoaded(snapshot_s) if name == "least_loaded" else RoundRobin()


def run_arm(
    arm: str,
    args,
    shape: ModelShape,
    deployment: Deployment,
    reqs: list[TwinRequest],
    replay,
    caps: dict,
    domains: list[str],
    progress: bool,
) -> dict:
    """One arm over the workload: ``args.engines`` engines of it behind ``args.dispatch``."""
    from vllm.v1.core.sched.scheduler import Scheduler

    from sim.cluster import Cluster, ExpertParallel
    from sim.twin import Engine

    model = RooflineStep(HARDWARE[args.hardware], shape)
    if arm == STOCK:
        from vllm.v1.core.sched.async_scheduler import AsyncScheduler

        cls, caps_cfg = AsyncScheduler if args.async_scheduling else Scheduler, None
    else:
        from caps_vllm.scheduler import CapsScheduler

        space = (
            VectorSpace(replay.layers, replay.experts, replay.top_k)
            if replay is not None
            else VectorSpace(len(shape.moe_layers), shape.experts, shape.top_k)
        )
        # step_cost prices steps with the twin's own MoE model: what `make fit-step-cost` gives a
        # user on the serving hardware (the shipped fit is this CPU's)
        params = caps.get("strategy_params", {})
        if arm == "step_cost" and "cost" not in params and "shape" not in params:
            params = {**params, "cost": model.moe.as_dict()}
        cls, caps_cfg = (
            with_vectors(CapsScheduler, space),
            {"metrics": False, **caps, "strategy": arm, "strategy_params": params},
        )
    timing = VllmStepTime(model, replay if replay is not None else UniformRouting(shape))
    per_token = caps_cfg is not None and CapsConfig.from_dict(caps_cfg).vectors == "per_token"
    oracle_rng = np.random.default_rng(args.seed + 1)
    by_id = {r.rid: r for r in reqs}

    def bind(r: TwinRequest) -> None:
        replay.rng = np.random.default_rng([args.seed, int(r.rid[1:])])  # the same sequence in every arm
        replay.bind(r.rid, r.domain)

    def on_arrival(r: TwinRequest, req) -> None:
        if replay is not None:
            bind(r)
            if arm != STOCK:
                n = len(by_id[r.rid].prompt)
                v = replay.prompt_vector(r.rid, n, args.oracle_recall, oracle_rng)
                req.caps_vector = v / n if per_token else v  # as CAPS's predictor hands it out

    # Under EP the engines are the ranks of one server, and CAPS's step_cost reads that layout;
    # replicas without EP are separate servers, each of one engine.
    parallel = (
        (
            lambda k: {
                "data_parallel_size": args.engines,
                "data_parallel_rank": k,
                "enable_expert_parallel": True,
                "expert_placement_strategy": args.placement,
            }
        )
        if args.ep
        else (lambda k: None)
    )
    engines = [
        Engine(
            build_scheduler(
                str(MODELS / args.model),
                cls,
                deployment,
                caps=caps_cfg,
                async_scheduling=args.async_scheduling,
                parallel=parallel(k),
            ),
            deployment.block_size,
            on_arrival,
            name=str(k),
        )
        for k in range(args.engines)
    ]
    ep = ExpertParallel(model, shape, args.engines, args.placement) if args.ep else None
    dispatch = make_dispatch(
        args.dispatch, domains, args.affinity_margin, args.dp_snapshot, args.engines, replay, bind, model.moe
    )
    cluster = Cluster(
        engines, dispatch, lambda e, out: timing.batch(e.scheduler, out), price=None if ep else model.seconds, ep=ep
    )
    bar = None
    if progress:
        from tqdm import tqdm

        bar = tqdm(total=round(reqs[-1].arrival_s, 1), desc=arm, unit="sim s", leave=False, file=sys.stderr)
    last = [0.0]

    def tick(now: float) -> None:
        if bar is not None and now - last[0] >= 1.0:
            bar.update(round(min(now, bar.total) - bar.n, 1))
            last[0] = now

    t0 = time.perf_counter()
    cluster.run(reqs, tick)
    wall = time.perf_counter() - t0
    if bar is not None:
        bar.close()
    out = summarize(cluster.result(), wall)
    out["per_engine_requests"] = [len(e.served) for e in engines]
    if ep is not None:
        out["ep_rank_max_over_mean"] = float(np.mean(cluster.rank_imbalance)) if cluster.rank_imbalance else None
    if hasattr(dispatch, "overrides"):
        out["dispatch_load_guard_overrides"] = dispatch.overrides
    if arm != STOCK:
        stats = [e.scheduler.caps.planner.stats for e in engines]
        out["caps"] = {
            k: sum(getattr(st, k) for st in stats)
            for k in ("engaged", "plans", "ranked", "reordered", "kept_fcfs", "pinned", "bypassed", "fcfs_fallback")
        }
        # CAPS's own time on the busy loop on this CPU's wall clock, the busiest engine's (each
        # engine schedules in its own process), against the modelled time it served; planning
        # ahead (run inline here), the worker's time apart: it runs while the model does
        caps = [e.scheduler.caps for e in engines]
        ahead = [c.worker.seconds if c.worker is not None else 0.0 for c in caps]
        own = max(c.seconds - a for c, a in zip(caps, ahead))
        sim_s = out["simulated_s"]
        out["caps"]["seconds"] = own
        out["caps"]["share_of_simulated"] = own / sim_s if sim_s else None
        if any(c.worker is not None for c in caps):
            out["caps"]["ahead_seconds"] = max(ahead)
            out["caps"]["ahead_share_of_simulated"] = max(ahead) / sim_s if sim_s else None
    return out


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(prog="python -m sim.twin_run", description=__doc__.split("\n\n")[0])
    ap.add_argument("--model", default="deepseek-v2-lite", choices=sorted(p.name for p in MODELS.iterdir()))
    ap.add_argument("--hardware", default="h100", choices=sorted(HARDWARE))
    ap.add_argument("--max-num-seqs", type=int, help="default: vLLM's for the hardware")
    ap.add_argument("--max-num-batched-tokens", type=int, help="default: vLLM's for the hardware")
    ap.add_argument("--kv-gib", type=float, default=40.0, help="KV-cache memory (GiB) the blocks come from")
    ap.add_argument("--no-prefix-caching", action="store_true")
    ap.add_argument(
        "--async-scheduling",
        action="store_true",
        help="vLLM's AsyncScheduler (CAPS: CapsAsyncScheduler); its overlap of scheduling with the "
        "model's step is not modelled, only its scheduling",
    )
    ap.add_argument("--engines", type=int, default=1, help="data-parallel engines or replicas")
    ap.add_argument("--ep", action="store_true", help="expert parallel over the engines (lockstep), one rank each")
    ap.add_argument("--placement", choices=("linear", "round_robin"), default="linear")
    ap.add_argument("--dispatch", choices=DISPATCH, default="least_loaded")
    ap.add_argument(
        "--affinity-margin",
        type=int,
        default=8,
        help="the load guard of domain_oracle and expert_affinity: in-flight requests above the least "
        "loaded engine they tolerate",
    )
    ap.add_argument(
        "--dp-snapshot",
        type=float,
        default=0.1,
        help="seconds between the load snapshots vLLM's DP front end dispatches on (0: current state)",
    )
    ap.add_argument(
        "--pattern",
        choices=("bursty", "poisson"),
        default="bursty",
        help="topics (domains) in runs or mixed; arrivals Poisson at --rate unless --trace",
    )
    ap.add_argument("--trace", help="arrival times and lengths from a trace (loadtest/traces.py formats)")
    ap.add_argument("--speedup", type=float, default=1.0, help="trace time compression")
    ap.add_argument("--rate", type=float, default=20.0)
    ap.add_argument("--requests", type=int, default=1000)
    ap.add_argument("--output-tokens", type=int, default=128, help="per request without a trace")
    ap.add_argument("--max-output", type=int, default=2048, help="cap on a trace's output lengths")
    ap.add_argument("--burst-len", type=float, default=16.0)
    ap.add_argument(
        "--routing",
        default=str(ROOT.parent / "shared" / "data" / "routing" / "esft_routing.npz"),
        help="ESFT routing npz to replay (DeepSeek-V2-Lite layout); 'uniform'; or 'synthetic': domain "
        "profiles fitted to --skew (an assumption, for shapes without recorded routing)",
    )
    ap.add_argument(
        "--skew",
        type=float,
        default=0.87,
        help="synthetic routing: distinct experts of a mixed 32-token batch relative to uniform routing",
    )
    ap.add_argument(
        "--oracle-recall",
        type=float,
        default=1.0,
        help="CAPS's vectors: the prompt's true routing (1.0) or a noisy oracle at this top-k recall",
    )
    ap.add_argument("--strategies", nargs="+", default=[STOCK, "fcfs", "step_cost"])
    ap.add_argument("--caps-config", default="{}")
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument(
        "--capacity",
        action="store_true",
        help="per arm, the capacity at SLO (bisection over the rate, from --rate) instead of one run",
    )
    ap.add_argument(
        "--capacity-seconds",
        type=float,
        default=20.0,
        help="--capacity: each probe sends at least this many seconds of arrivals",
    )
    ap.add_argument("--slo-ttft", type=float, default=2.0, help="SLO: P99 TTFT seconds (for --capacity)")
    ap.add_argument("--slo-itl", type=float, default=0.1, help="SLO: P99 inter-token seconds (for --capacity)")
    ap.add_argument("--no-progress", action="store_true")
    ap.add_argument("--out", default="sim/results/twin/latest")
    args = ap.parse_args(argv)
    if args.capacity and args.trace:
        ap.error("--capacity scales Poisson arrivals; it does not apply to --trace")
    if args.requests < 1 or args.rate <= 0 or args.speedup <= 0 or args.engines < 1:
        ap.error("--requests and --engines must be ≥ 1, --rate and --speedup > 0")
    from caps_vllm.strategies import STRATEGIES

    for a in args.strategies:
        if a != STOCK and a not in STRATEGIES:
            ap.error(f"--strategies: unknown arm {a!r}; valid: {STOCK}, {', '.join(STRATEGIES)}")
    caps = json.loads(args.caps_config)
    shape = ModelShape.from_config(MODELS / args.model)
    replay = None
    if args.routing == "synthetic":
        from sim.routing_replay import SkewedRouting

        domains = ["d0", "d1", "d2", "d3"]
        replay = SkewedRouting(len(shape.moe_layers), shape.experts, shape.top_k, domains, args.skew, seed=args.seed)
        seq_len = {d: [256] for d in domains}
    elif args.routing == "uniform":
        domains = ["a", "b", "c", "d"]
        seq_len = {d: [256] for d in domains}
    else:
        if not Path(args.routing).exists():
            ap.error(f"--routing {args.routing}: no such file (pass 'uniform' without ../shared)")
        replay = EsftReplay(args.routing, seed=args.seed)
        if (replay.layers, replay.experts, replay.top_k) != (len(shape.moe_layers), shape.experts, shape.top_k):
            ap.error(
                f"--routing has {replay.layers} layers x {replay.experts} experts, top-{replay.top_k}; "
                f"--model {args.model} has {len(shape.moe_layers)} x {shape.experts}, top-{shape.top_k}"
            )
        domains = replay.domains
        seq_len = {d: [len(s) for s in replay.seqs[d]] for d in domains}
    vocab = json.loads((MODELS / args.model / "config.json").read_text())["vocab_size"]
    reqs = build_requests(args, domains, seq_len, vocab)
    overrides = {
        k: v
        for k, v in (("max_num_seqs", args.max_num_seqs), ("max_num_batched_tokens", args.max_num_batched_tokens))
        if v
    }
    deployment = Deployment.defaults(
        args.hardware,
        kv_bytes=args.kv_gib * 2**30,
        kv_bytes_per_token=shape.kv_bytes_per_token,
        max_model_len=MAX_MODEL_LEN,
        enable_prefix_caching=not args.no_prefix_caching,
        **overrides,
    )
    results = {}
    for arm in args.strategies:
        if args.capacity:

            def at(rate: float, arm=arm) -> dict:
                # A sustained load: the probe lasts --capacity-seconds whatever the rate (a fixed
                # count of requests at a high rate is one burst, which a big batch absorbs).
                n = max(args.requests, int(rate * args.capacity_seconds))
                probe = argparse.Namespace(**{**vars(args), "rate": rate, "requests": n})
                return run_arm(
                    arm,
                    probe,
                    shape,
                    deployment,
                    build_requests(probe, domains, seq_len, vocab),
                    replay,
                    caps,
                    domains,
                    False,
                )

            results[arm] = capacity(at, args.slo_ttft, args.slo_itl, args.rate)
            print(f"[{arm}] capacity at SLO {results[arm]['capacity_rps']:.4g} req/s", file=sys.stderr, flush=True)
            continue
        results[arm] = run_arm(arm, args, shape, deployment, reqs, replay, caps, domains, not args.no_progress)
        r = results[arm]
        print(
            f"[{arm}] {r['requests']} requests, {r['steps']} steps, TTFT p99 {r['ttft_s']['p99']:.3f} s, "
            f"ITL p50 {r['itl_s']['p50'] * 1e3:.2f} ms, wall {r['wall_s']:.1f} s",
            file=sys.stderr,
            flush=True,
        )
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    doc = {
        "command": "python -m sim.twin_run " + " ".join(sys.argv[1:] if argv is None else argv),
        "deployment": asdict(deployment),
        "hardware": vars(HARDWARE[args.hardware]),
        "model": args.model,
        "note": "step times are a roofline model (public peak figures, assumed efficiencies), not measurements",
        "results": results,
    }
    (out / "results.json").write_text(json.dumps(doc, indent=2, default=str))
    if args.capacity:
        print("\n".join(f"| {a} | {r['capacity_rps']:.4g} req/s |" for a, r in results.items()))
    else:
        print(table(results))
    return 0


def meets(r: dict, slo_ttft: float, slo_itl: float) -> bool:
    return r["ttft_s"]["p99"] <= slo_ttft and r["itl_s"]["p99"] <= slo_itl


def capacity(at, slo_ttft: float, slo_itl: float, start: float, rel_tol: float = 0.03, max_probes: int = 14) -> dict:
    """The highest arrival rate whose P99 TTFT and P99 ITL meet the SLO: ``at(rate)`` runs the
    workload (the same seeded arrivals, time-scaled) at ``rate``; the rate is doubled or halved
    from ``start`` until the SLO flips, then bisected (geometrically) to ``rel_tol``."""
    probes = []

    def probe(rate: float) -> bool:
        r = at(rate)
        ok = meets(r, slo_ttft, slo_itl)
        probes.append({"rate": rate, "meets": ok, "ttft_p99_s": r["ttft_s"]["p99"], "itl_p99_s": r["itl_s"]["p99"]})
        return ok

    lo = hi = None
    rate = start
    while (lo is None or hi is None) and len(probes) < max_probes:
        if probe(rate):
            lo, rate = rate, rate * 2.0
        else:
            hi, rate = rate, rate / 2.0
        if lo is not None and hi is not None and lo > hi:
            lo, hi = hi, lo
    while lo is not None and hi is not None and hi / lo > 1.0 + rel_tol and len(probes) < max_probes:
        mid = (lo * hi) ** 0.5
        if probe(mid):
            lo = mid
        else:
            hi = mid
    return {
        "capacity_rps": lo if lo is not None else 0.0,
        "first_failing_rps": hi,
        "slo": {"ttft_p99_s": slo_ttft, "itl_p99_s": slo_itl},
        "probes": probes,
    }


def table(results: dict) -> str:
    rows = [
        ("TTFT p50 (s)", lambda r: r["ttft_s"]["p50"]),
        ("TTFT p99 (s)", lambda r: r["ttft_s"]["p99"]),
        ("ITL p50 (ms)", lambda r: r["itl_s"]["p50"] * 1e3),
        ("ITL p99 (ms)", lambda r: r["itl_s"]["p99"] * 1e3),
        ("E2E p99 (s)", lambda r: r["e2e_s"]["p99"]),
        ("throughput (req/s)", lambda r: r["throughput_rps"]),
        ("distinct experts/layer, decode steps", lambda r: r["decode_step_distinct_experts"]),
        ("mean waiting", lambda r: r["queue"]["mean_waiting"]),
        ("admission steps with ≥ 2 waiting", lambda r: r["engagement"]["admission_steps_with_2plus_waiting"]),
        ("… of them reordered", lambda r: r["engagement"]["share_reordered"]),
        ("… of them planned by CAPS", lambda r: r["engagement"]["share_of_those_steps_planned"]),
        ("contested steps (a new request admitted, another left behind)", lambda r: r["engagement"]["contested_steps"]),
        ("… of them planned by CAPS ", lambda r: r["engagement"]["share_of_contested_planned"]),
        (
            "steps where only preempted requests resumed (their order is vLLM's)",
            lambda r: r["engagement"]["steps_only_preempted_resumed"],
        ),
        ("scheduler time / simulated time", lambda r: r["scheduler_share_of_simulated"]),
        ("CAPS's own time / simulated time (busiest engine)", lambda r: r["caps"]["share_of_simulated"]),
        ("simulated s per wall s", lambda r: r["simulated_s_per_wall_s"]),
    ]
    arms = list(results)
    lines = ["| figure | " + " | ".join(arms) + " |", "|---" * (len(arms) + 1) + "|"]
    for name, get in rows:
        cells = []
        for a in arms:
            try:
                v = get(results[a])
            except (TypeError, KeyError):
                v = None
            cells.append("–" if v is None else f"{v:.4g}")
        lines.append(f"| {name} | " + " | ".join(cells) + " |")
    return "\n".join(lines)


if __name__ == "__main__":
    sys.exit(main())
