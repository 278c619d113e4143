"""Locust load against vLLM's OpenAI endpoint: streaming completions and chat completions.

Imported by ``loadtest/locustfile.py`` and the shape files (by package name, so Locust's
listeners are registered once):

    locust -f loadtest/locustfile.py,loadtest/shapes/bursty.py --headless -H http://127.0.0.1:8000 \
        --rate 4 --duration 60 --summary out/summary.json

The shape file picks the pattern (``shapes/bursty.py``, ``shapes/poisson.py``,
``shapes/trace.py``); the arrival schedule is built from ``--seed`` at test start, so two runs
send the same requests at the same times. Each Locust user takes the next arrival, waits for its
time and sends it; ``--concurrency`` users bound the requests in flight. Two kinds of lateness
are recorded per request and summarized: ``held_s``, how long an arrival waited for a free user
(the concurrency bound: the load turns closed-loop there), and ``lag_s``, how late the generator
itself sent it once a user held it (a starved load generator: such a run measures another
arrival process, and the side-by-side runner marks it invalid past a bound).

``--hold S`` pauses the server's scheduler for the first S seconds of the run (vLLM's
``/pause?mode=keep`` and ``/resume``, served when ``VLLM_SERVER_DEV_MODE=1``): the arrivals of
those seconds queue up inside vLLM as after a stall, so a burst larger than the free sequence
slots waits at the first step, whatever the machine's speed.

Every request fires Locust request events named ``TTFT``, ``ITL`` (one per generated token after
the first: a chunk's gap divided over the tokens it carries, from per-chunk usage) and ``E2E``,
under request type ``completions`` or ``chat``, so Locust's CSVs hold them.
A failure (server down, time-out, an HTTP error, a broken stream, no token) is an ``E2E``
failure with its reason and never stops the run. ``--summary`` writes p50/p90/p99 of TTFT, ITL
and E2E, throughput, goodput under the SLO (``--slo-ttft``, ``--slo-e2e``) and failures by
reason; ``--samples`` writes one JSON line per request.
"""

from __future__ import annotations

import json
import time
from collections import Counter
from pathlib import Path

import gevent
import requests
from locust import LoadTestShape, User, events, task

from loadtest.stats import quantiles
from loadtest.workload import PATTERNS, Arrival, add_load_options, build, load_prompts


@events.init_command_line_parser.add_listener
def _options(parser) -> None:
    g = parser.add_argument_group("caps-vllm load")
    add_load_options(g)
    g.add_argument("--model", default="", help="served model name (default: the server's first)")
    g.add_argument("--summary", default="", help="write the JSON summary here")
    g.add_argument("--samples", default="", help="write one JSON line per request here")


class Run:
    """One run's schedule and results, shared by the users (gevent: no locks needed)."""

    def __init__(self, env, pattern: str) -> None:
        o = env.parsed_options
        self.options = o
        self.pattern = pattern
        self.arrivals: list[Arrival] = build(
            pattern,
            load_prompts(o.prompts or None),
            rate=o.rate,
            duration=o.duration,
            max_requests=o.max_requests,
            max_tokens=o.max_tokens,
            min_tokens=o.min_tokens,
            burst_len=o.burst_len,
            chat_share=o.chat_share,
            seed=o.seed,
            trace=o.trace or None,
            speedup=o.speedup,
            hold=o.hold,
        )
        self.next = 0
        self.in_flight = 0
        self.start = time.monotonic()
        self.results: list[dict] = []
        self.model = o.model
        self.hold_error: str | None = None

    def take(self) -> Arrival | None:
        """The next arrival, counted in flight from now until its answer (or failure)."""
        if self.next >= len(self.arrivals):
            return None
        self.next += 1
        self.in_flight += 1
        return self.arrivals[self.next - 1]

    @property
    def done(self) -> bool:
        return self.next >= len(self.arrivals) and self.in_flight == 0


RUN: Run | None = None


def start_run(env, pattern: str) -> None:
    global RUN
    if pattern not in PATTERNS:
        raise ValueError(pattern)
    RUN = Run(env, pattern)
    if RUN.options.hold > 0:
        _hold(RUN, env.host)
        RUN.start = time.monotonic()  # arrivals count from the pause, not from before it


def _hold(run: Run, host: str) -> None:
    """Pause the server's scheduler now; resume it ``--hold`` seconds after the run's start."""
    try:
        r = requests.post(host + "/pause", params={"mode": "keep"}, timeout=30)
        if r.status_code == 404:
            raise RequestFailed("the server has no /pause: start vllm serve with VLLM_SERVER_DEV_MODE=1")
        r.raise_for_status()
    except Exception as exc:
        run.hold_error = f"--hold: {_reason(exc)}"
        return

    def resume() -> None:
        gevent.sleep(max(0.0, run.options.hold - (time.monotonic() - run.start)))
        try:
            requests.post(host + "/resume", timeout=30).raise_for_status()
        except Exception as exc:
            run.hold_error = f"--hold: resume failed: {_reason(exc)}"

    gevent.spawn(resume)


class ArrivalShape(LoadTestShape):
    """Users enough for ``--concurrency`` requests in flight until every arrival is answered."""

    abstract = True
    use_common_options = True  # --run-time still bounds the run
    pattern = ""

    def tick(self):
        if RUN is None:
            start_run(self.runner.environment, self.pattern)
        run, o = RUN, RUN.options
        if run.done or self.get_run_time() > o.duration + o.request_timeout + 10:
            return None
        return o.concurrency, float(o.concurrency)


@events.test_start.add_listener
def _no_shape(environment, **_kw) -> None:
    if RUN is None and environment.shape_class is None:  # plain -u/-r run: the bursty schedule
        start_run(environment, "bursty")


def _served_model(base: str, timeout: float) -> str:
    r = requests.get(base + "/v1/models", timeout=timeout)
    r.raise_for_status()
    return r.json()["data"][0]["id"]


def _fire(env, kind: str, name: str, seconds: float, length: int = 0, exc: Exception | None = None) -> None:
    env.events.request.fire(
        request_type=kind, name=name, response_time=seconds * 1000.0, response_length=length, exception=exc, context={}
    )


class LLMUser(User):
    """Sends the run's arrivals, streaming, and times them."""

    # A User, not an HttpUser: Locust's own request event would time only the response headers.
    def on_start(self) -> None:
        self.session = requests.Session()

    @task
    def next_request(self) -> None:
        run = RUN
        if run is None:
            gevent.sleep(0.1)
            return
        arrival = run.take()
        if arrival is None:
            gevent.sleep(0.2)
            return
        try:
            taken = time.monotonic() - run.start
            if arrival.t > taken:
                gevent.sleep(arrival.t - taken)
            run.results.append(self._send(run, arrival, taken))
        finally:
            run.in_flight -= 1

    def _send(self, run: Run, a: Arrival, taken: float) -> dict:
        o, env = run.options, self.environment
        kind = "chat" if a.chat else "completions"
        sent = time.monotonic()
        due = max(a.t, taken)  # a user held it from then on
        rec = {
            "t": a.t,
            "held_s": due - a.t,
            "lag_s": max(0.0, sent - run.start - due),
            "category": a.category,
            "kind": kind,
            "ttft_s": None,
            "itl_s": [],
            "e2e_s": None,
            "tokens": 0,
            "error": None,
        }
        try:
            if not run.model:
                run.model = _served_model(self.host, o.request_timeout)
            body = {
                "model": run.model,
                "max_tokens": a.max_tokens,
                "stream": True,
                "temperature": 0.0,
                "ignore_eos": True,
                "stream_options": {"include_usage": True, "continuous_usage_stats": True},
            }
            if a.chat:
                body["messages"] = [{"role": "user", "content": a.prompt}]
                path = "/v1/chat/completions"
            else:
                body["prompt"] = a.prompt
                path = "/v1/completions"
            with self.session.post(self.host + path, json=body, stream=True, timeout=o.request_timeout) as r:
                if r.status_code >= 400:
                    raise RequestFailed(f"http {r.status_code}: {r.text[:120]}")
                last, finished = None, False
                for line in r.iter_lines(decode_unicode=True):
                    if not line or not line.startswith("data:"):
                        continue
                    data = line[5:].strip()
                    if data == "[DONE]":
                        finished = True
                        break
                    chunk = json.loads(data)
                    if "error" in chunk:
                        raise RequestFailed(f"stream error: {str(chunk['error'])[:120]}")
                    # Per-chunk usage (continuous_usage_stats) says how many tokens a chunk carries:
                    # under load vLLM sends several per chunk. Chat's first chunk only has the role.
                    usage = chunk.get("usage") or {}
                    new_tokens = usage.get("completion_tokens", rec["tokens"]) - rec["tokens"]
                    if new_tokens > 0:
                        rec["tokens"] += new_tokens
                        now = time.monotonic()
                        if last is None:
                            rec["ttft_s"] = now - sent
                            _fire(env, kind, "TTFT", rec["ttft_s"])
                            gaps = [0.0] * (new_tokens - 1)  # the first chunk's other tokens came with it
                        else:
                            gaps = [(now - last) / new_tokens] * new_tokens
                        for gap in gaps:
                            rec["itl_s"].append(gap)
                            _fire(env, kind, "ITL", gap)
                        last = now
                if not finished:
                    raise RequestFailed("broken stream: ended without [DONE]")
                if last is None:
                    raise RequestFailed("no token streamed")
            rec["e2e_s"] = time.monotonic() - sent
            _fire(env, kind, "E2E", rec["e2e_s"], rec["tokens"])
        except Exception as exc:  # every failure is counted with its reason; the run goes on
            rec["error"] = _reason(exc)
            _fire(env, kind, "E2E", time.monotonic() - sent, 0, RequestFailed(rec["error"]))
        return rec


class RequestFailed(Exception):
    pass


def _reason(exc: Exception) -> str:
    err = requests.exceptions
    if isinstance(exc, RequestFailed):
        return str(exc)
    if isinstance(exc, err.ConnectionError):  # ConnectTimeout included: nobody answered
        return "connection: server down or refusing"
    if isinstance(exc, err.Timeout):
        return "timeout"
    if isinstance(exc, err.ChunkedEncodingError):
        return "broken stream: connection closed mid-response"
    if isinstance(exc, (ValueError, KeyError, IndexError, TypeError)):
        return f"broken stream: bad chunk ({type(exc).__name__})"
    return f"{type(exc).__name__}: {str(exc)[:120]}"


def summarize(run: Run, wall_s: float) -> dict:
    o = run.options
    ok = [r for r in run.results if r["error"] is None]
    good = [r for r in ok if r["ttft_s"] <= o.slo_ttft and r["e2e_s"] <= o.slo_e2e]
    return {
        "pattern": run.pattern,
        "seed": o.seed,
        "scheduled": len(run.arrivals),
        "sent": len(run.results),
        "completed": len(ok),
        "failures": len(run.results) - len(ok),
        "failure_reasons": dict(Counter(r["error"] for r in run.results if r["error"])),
        "wall_s": wall_s,
        "ttft_s": quantiles([r["ttft_s"] for r in ok]),
        "itl_s": quantiles([x for r in ok for x in r["itl_s"]]),
        "e2e_s": quantiles([r["e2e_s"] for r in ok]),
        "held_s": quantiles([r["held_s"] for r in run.results]),
        "held_share": sum(r["held_s"] > 0 for r in run.results) / len(run.results) if run.results else 0.0,
        "lag_s": quantiles([r["lag_s"] for r in run.results]),
        "hold": {"seconds": o.hold, "error": run.hold_error},
        "throughput_rps": len(ok) / wall_s if wall_s > 0 else 0.0,
        "throughput_tok_s": sum(r["tokens"] for r in ok) / wall_s if wall_s > 0 else 0.0,
        # an offline batch's figure: the scheduler's resume to the last answer
        "makespan_s": max(r["t"] + r["held_s"] + r["lag_s"] + r["e2e_s"] for r in ok) - o.hold
        if ok and run.pattern == "offline"
        else None,
        "slo": {"ttft_s": o.slo_ttft, "e2e_s": o.slo_e2e},
        "goodput_rps": len(good) / wall_s if wall_s > 0 else 0.0,
        "goodput_share": len(good) / len(run.results) if run.results else 0.0,
    }


@events.quitting.add_listener
def _write(environment, **_kw) -> None:
    run = RUN
    if run is None:
        return
    o = run.options
    summary = summarize(run, time.monotonic() - run.start)
    if o.summary:
        Path(o.summary).parent.mkdir(parents=True, exist_ok=True)
        Path(o.summary).write_text(json.dumps(summary, indent=2))
    if o.samples:
        Path(o.samples).parent.mkdir(parents=True, exist_ok=True)
        Path(o.samples).write_text("".join(json.dumps(r) + "\n" for r in run.results))
    if summary["failures"] or run.hold_error:
        environment.process_exit_code = 1
