"""The load-test tool: schedules, and real Locust runs that must count every failure by reason."""

from __future__ import annotations

import csv
import importlib.util
import json
import subprocess
import sys
import threading
import time
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path

import pytest

from caps_vllm.step_log import read
from loadtest.workload import build, load_prompts
from tests.servers import ROOT

# Never import locust here: it monkey-patches the whole process with gevent, which would hang
# later tests that fork (the simulator's worker pool). Locust runs in its own process.
if importlib.util.find_spec("locust") is None:
    pytest.skip("locust is not installed (the loadtest extra)", allow_module_level=True)


def test_schedules_are_seeded_bounded_and_shaped(tmp_path):
    prompts = load_prompts()
    a = build("bursty", prompts, rate=20, duration=30, max_requests=400, seed=3)
    assert a == build("bursty", prompts, rate=20, duration=30, max_requests=400, seed=3)
    assert a != build("bursty", prompts, rate=20, duration=30, max_requests=400, seed=4)
    assert all(x.t <= 30 for x in a) and len(a) <= 400 and [x.t for x in a] == sorted(x.t for x in a)
    p = build("poisson", prompts, rate=20, duration=30, max_requests=400, seed=3)

    def switches(xs):
        return sum(x.category != y.category for x, y in zip(xs, xs[1:])) / (len(xs) - 1)

    assert switches(a) < 0.2 < switches(p)  # topic runs vs mixed topics
    trace = tmp_path / "t.csv"
    trace.write_text("arrival_s,prompt_tokens,output_tokens\n0.0,10,5\n1.0,30,500\n9.0,5,3\n")
    t = build("trace", prompts, duration=5, max_tokens=64, trace=trace)
    assert [(x.t, x.max_tokens) for x in t] == [(0.0, 5), (1.0, 64)]
    o = build("offline", prompts, max_requests=50, hold=4.0, seed=3)
    assert len(o) == 50 and max(x.t for x in o) < 2.0 and len({x.category for x in o}) > 4  # queued while paused
    with pytest.raises(ValueError, match="needs hold"):
        build("offline", prompts, max_requests=50)
    with pytest.raises(ValueError, match="pattern"):
        build("burst", prompts)
    bad = tmp_path / "bad.jsonl"
    bad.write_text('{"prompt": "x"}\n')
    with pytest.raises(ValueError, match="bad.jsonl:1"):
        load_prompts(bad)


class _Faulty(BaseHTTPRequestHandler):
    """A stand-in server that fails in every way a real one can, in turn (a real vLLM cannot be
    made to break a stream on demand)."""

    count = 0
    lock = threading.Lock()

    def log_message(self, *args):
        pass

    def do_POST(self):
        self.rfile.read(int(self.headers.get("Content-Length", 0)))
        with self.lock:
            n = _Faulty.count
            _Faulty.count += 1
        mode = n % 6
        if mode in (1, 2):
            self.send_response(500 if mode == 1 else 400)
            self.end_headers()
            self.wfile.write(b'{"error": "no"}')
            return
        if mode == 4:
            time.sleep(3)  # longer than the request time-out
        self.send_response(200)
        self.send_header("Content-Type", "text/event-stream")
        self.end_headers()
        if mode == 5:
            self.wfile.write(b"data: {not json\n\n")
            return
        for i, tok in enumerate(("a", "b", "c")):
            body = {
                "choices": [{"text": tok, "delta": {"content": tok}, "finish_reason": None}],
                "usage": {"completion_tokens": i + 1},
            }
            self.wfile.write(f"data: {json.dumps(body)}\n\n".encode())
            self.wfile.flush()
            time.sleep(0.01)
        if mode != 3:  # mode 3: the stream stops without [DONE]
            self.wfile.write(b'data: {"choices": [], "usage": {"completion_tokens": 3}}\n\ndata: [DONE]\n\n')


def _locust(host: str, out: Path, *extra: str) -> tuple[int, dict]:
    cmd = [
        sys.executable,
        "-m",
        "locust",
        "-f",
        f"{ROOT}/loadtest/locustfile.py,{ROOT}/loadtest/shapes/poisson.py",
        "--headless",
        "-H",
        host,
        "--only-summary",
        "--loglevel",
        "WARNING",
        "--csv",
        str(out / "locust"),
        "--summary",
        str(out / "summary.json"),
        "--samples",
        str(out / "samples.jsonl"),
        "--run-time",
        "60s",
        "--model",
        "m",
        *extra,
    ]
    proc = subprocess.run(cmd, cwd=ROOT, capture_output=True, text=True, timeout=120)
    assert (out / "summary.json").exists(), proc.stderr[-3000:]
    return proc.returncode, json.loads((out / "summary.json").read_text())


def test_every_failure_is_counted_with_its_reason(tmp_path):
    server = ThreadingHTTPServer(("127.0.0.1", 0), _Faulty)
    threading.Thread(target=server.serve_forever, daemon=True).start()
    try:
        rc, s = _locust(
            f"http://127.0.0.1:{server.server_port}",
            tmp_path,
            "--rate",
            "20",
            "--duration",
            "1.5",
            "--max-requests",
            "12",
            "--request-timeout",
            "1",
            "--concurrency",
            "1",
        )
    finally:
        server.shutdown()
    assert s["sent"] == s["scheduled"] == 12
    assert s["completed"] == 2 and s["failures"] == 10 and rc == 1
    reasons = s["failure_reasons"]
    assert reasons == {
        'http 500: {"error": "no"}': 2,
        'http 400: {"error": "no"}': 2,
        "broken stream: ended without [DONE]": 2,
        "timeout": 2,
        "broken stream: bad chunk (JSONDecodeError)": 2,
    }, reasons
    assert s["ttft_s"]["n"] == 2 and s["itl_s"]["n"] == 4 and s["throughput_tok_s"] > 0
    # One user: the arrivals behind the 1 s time-out waited for it (held by the concurrency bound),
    # which is not the generator's own lag.
    assert s["held_share"] > 0 and s["held_s"]["max"] > 0.3 and s["lag_s"]["n"] == 12
    assert s["hold"] == {"seconds": 0.0, "error": None}
    with (tmp_path / "locust_stats.csv").open() as f:
        names = {(r["Type"], r["Name"]) for r in csv.DictReader(f)}
    assert {"TTFT", "ITL", "E2E"} <= {n for _, n in names}


def test_a_server_that_is_down_is_a_counted_failure(tmp_path):
    from loadtest.server import free_port

    rc, s = _locust(
        f"http://127.0.0.1:{free_port()}", tmp_path, "--rate", "10", "--duration", "1", "--max-requests", "5"
    )
    assert rc == 1 and s["failures"] == s["sent"] == s["scheduled"] > 0
    assert list(s["failure_reasons"]) == ["connection: server down or refusing"]


@pytest.mark.server
def test_side_by_side_against_live_servers(tiny_model, tmp_path):
    """`python -m loadtest.compare`: fcfs and step_cost, two interleaved repetitions, a fresh
    server per run. The scheduler is held for the first 1.5 s (``--hold``), so ~60 requests wait
    for 4 sequence slots at the first step whatever the machine's speed: CAPS has a choice."""
    out = tmp_path / "cmp"
    cmd = [
        sys.executable,
        "-m",
        "loadtest.compare",
        "--model",
        str(tiny_model),
        "--rate",
        "40",
        "--duration",
        "4",
        "--max-requests",
        "150",
        "--max-tokens",
        "8",
        "--max-num-seqs",
        "4",
        "--poll",
        "1",
        "--hold",
        "1.5",
        "--repeats",
        "2",
        "--bootstrap",
        "200",
        "--out",
        str(out),
        "--caps-config",
        json.dumps({"max_wait_ms": 60000}),
        "--strategies",
        "fcfs",
        "step_cost",
        "--step-log",
    ]
    proc = subprocess.run(cmd, cwd=ROOT, capture_output=True, text=True, timeout=900)
    assert proc.returncode == 0, proc.stdout[-2000:] + proc.stderr[-4000:]
    doc = json.loads((out / "compare.json").read_text())
    assert [(r["repeat"], r["label"]) for r in doc["runs"]] == [
        (0, "fcfs"),
        (0, "step_cost"),
        (1, "step_cost"),
        (1, "fcfs"),
    ]
    for r in doc["runs"]:
        s, m = r["summary"], r["metrics"]
        assert r["status"] == "ok", r["reason"]
        assert s["failures"] == 0 and s["completed"] == s["sent"] == s["scheduled"] > 50  # each exactly once
        assert s["e2e_s"]["p99"] >= s["e2e_s"]["p50"] > 0 and s["itl_s"]["n"] == 7 * s["completed"]
        assert s["hold"] == {"seconds": 1.5, "error": None}
        # What /metrics says agrees with what the clients were served.
        assert m["vllm:caps_admitted_requests_total"] == s["completed"]
        assert m["vllm:generation_tokens_total"] == 8 * s["completed"]
        assert m["vllm:caps_actual_load_max_over_mean"] >= 1.0 and m["engine_steps"] > 0
        if r["label"] == "step_cost":
            assert m["vllm:caps_ranked_requests_total"] > 0  # the held queue gave CAPS a choice
    seeds = {r["repeat"]: r["seed"] for r in doc["runs"]}
    assert seeds == {0: 0, 1: 1}
    assert set(doc["comparisons"]) == {"step_cost"}
    for name, c in doc["comparisons"]["step_cost"].items():
        assert c["runs"] == 2 and "verdict" in c
        if c["lo"] is not None:
            assert c["lo"] <= c["ratio"] <= c["hi"], name
    text = (out / "report.md").read_text()
    assert text.splitlines()[0].startswith("step_cost vs fcfs on this machine: TPOT (mean ITL) ratio ")
    assert proc.stdout.splitlines()[0] == text.splitlines()[0]  # what the user reads first
    for name in ("latency_cdf.png", "intervals.png", "imbalance_over_time.png"):
        assert (out / name).stat().st_size > 0
    assert (out / "raw" / "r0-fcfs" / "serve.log").exists()
    # The raw files are enough to recompute everything (seeded bootstrap: the same intervals).
    again = subprocess.run(
        [sys.executable, "-m", "loadtest.compare", "--reanalyse", str(out), "--bootstrap", "200"],
        cwd=ROOT,
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert again.returncode == 0, again.stderr[-3000:]
    assert json.loads((out / "compare.json").read_text())["comparisons"] == doc["comparisons"]
    _check_step_logs(doc, out, tiny_model)


def _check_step_logs(doc: dict, out, tiny_model) -> None:
    """The engines' step logs (--step-log): a line per request served, prompts of the lengths the
    twin tokenizes them to; a profile fits on them and the twin replays the runs."""
    from caps_vllm.step_log import read
    from loadtest.workload import build, load_prompts
    from sim.cpu_twin import Tokenize

    tok = Tokenize(str(tiny_model))
    for r in doc["runs"]:
        steps, reqs = read(out / "raw" / f"r{r['repeat']}-{r['label']}" / "steps.jsonl")
        assert len(reqs) == r["summary"]["completed"] and all(x["added"] <= x["first"] <= x["done"] for x in reqs)
        assert sum(s["decode_reqs"] for s in steps) == 7 * len(reqs)  # 8 tokens: the first from the prefill step
        assert all("experts" in s for s in steps)  # the workers' routing capture counted each step's experts
        arrivals = build("bursty", load_prompts(), rate=40, duration=4, max_requests=150, max_tokens=8, seed=r["seed"])
        assert sorted(len(tok(a.prompt, a.chat)) for a in arrivals) == sorted(x["prompt"] for x in reqs)
    prof = subprocess.run(
        [sys.executable, "-m", "sim.step_profile", "--runs", str(out), "--out", str(out / "p.json")],
        cwd=ROOT,
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert prof.returncode == 0, prof.stderr[-3000:]
    fid = subprocess.run(
        [
            sys.executable,
            "-m",
            "sim.fidelity",
            "--profile",
            str(out / "p.json"),
            "--live",
            str(out),
            "--out",
            str(out / "fid"),
        ],
        cwd=ROOT,
        capture_output=True,
        text=True,
        timeout=600,
    )
    assert fid.returncode == 0, fid.stderr[-3000:]
    cell = json.loads((out / "fid" / "fidelity.json").read_text())["cells"][0]
    for arm in ("fcfs", "step_cost"):
        f = cell["arms"][arm]["throughput_rps"]
        assert len(f["live_runs"]) == len(f["twin_runs"]) == 2 and all(x > 0 for x in f["twin_runs"])


@pytest.mark.server
def test_an_offline_batch_on_one_server_per_arm(tiny_model, tmp_path):
    """`--servers per-arm --pattern offline`: both servers up at once, each warmed up and then run
    twice, interleaved; a batch of 24 requests of 4-12 tokens queued while the scheduler is paused;
    every run's figures, its makespan, and its own slice of its server's step log."""
    out = tmp_path / "off"
    cmd = [
        sys.executable,
        "-m",
        "loadtest.compare",
        "--model",
        str(tiny_model),
        "--pattern",
        "offline",
        "--hold",
        "2",
        "--max-requests",
        "24",
        "--concurrency",
        "24",
        "--max-tokens",
        "12",
        "--min-tokens",
        "4",
        "--max-num-seqs",
        "4",
        "--servers",
        "per-arm",
        "--repeats",
        "2",
        "--bootstrap",
        "200",
        "--poll",
        "1",
        "--step-log",
        "--out",
        str(out),
    ]
    proc = subprocess.run(cmd, cwd=ROOT, capture_output=True, text=True, timeout=900)
    assert proc.returncode == 0, proc.stdout[-2000:] + proc.stderr[-4000:]
    doc = json.loads((out / "compare.json").read_text())
    lengths = [
        a.max_tokens
        for a in build("offline", load_prompts(), max_requests=24, max_tokens=12, min_tokens=4, hold=2, seed=0)
    ]
    assert len(set(lengths)) > 3 and min(lengths) >= 4 and max(lengths) <= 12
    for r in doc["runs"]:
        s, m = r["summary"], r["metrics"]
        assert r["status"] == "ok", r["reason"]
        assert s["completed"] == s["scheduled"] == 24 and s["failures"] == 0
        assert 0 < s["makespan_s"] < s["wall_s"]
        assert m["vllm:caps_admitted_requests_total"] == 24  # this run's, not the server's whole life
        steps, reqs = read(out / "raw" / f"r{r['repeat']}-{r['label']}" / "steps.jsonl")
        assert len(reqs) == 24 and steps
    logs = {arm: (out / "raw" / f"server-{arm}" / "steps.jsonl") for arm in ("fcfs", "step_cost")}
    assert all(len(read(p)[1]) == 3 * 24 for p in logs.values())  # warm-up + 2 runs, all on one server each
    assert (out / "raw" / "server-fcfs" / "cache").is_dir() and (out / "raw" / "server-step_cost" / "cache").is_dir()
    text = (out / "report.md").read_text()
    assert text.splitlines()[0].startswith("step_cost vs fcfs on this machine: makespan ratio ")
    assert "one server per arm" in text and "empty CAPS cache" in text


@pytest.mark.server
def test_a_run_whose_server_does_not_start_is_reported_not_dropped(tmp_path):
    out = tmp_path / "cmp"
    cmd = [
        sys.executable,
        "-m",
        "loadtest.compare",
        "--model",
        str(tmp_path / "no-such-model"),
        "--duration",
        "2",
        "--strategies",
        "fcfs",
        "--aa",
        "--repeats",
        "1",
        "--startup-timeout",
        "300",
        "--out",
        str(out),
    ]
    proc = subprocess.run(cmd, cwd=ROOT, capture_output=True, text=True, timeout=600)
    assert proc.returncode == 1, proc.stderr[-3000:]
    doc = json.loads((out / "compare.json").read_text())
    assert [(r["label"], r["status"]) for r in doc["runs"]] == [("fcfs", "failed"), ("fcfs-aa", "failed")]
    assert all("vllm serve exited" in r["reason"] for r in doc["runs"])
    assert doc["comparisons"] == {}
    text = (out / "report.md").read_text()
    assert text.splitlines()[0] == "Noise floor: no valid A/A pair of runs."
    assert text.count("| failed: vllm serve exited") == 2
