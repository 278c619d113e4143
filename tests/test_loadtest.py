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
            body = {"choices": [{"text": tok, "delta": {"content": tok}, "finish_reason": None}],
                    "usage": {"completion_tokens": i + 1}}
            self.wfile.write(f"data: {json.dumps(body)}\n\n".encode())
            self.wfile.flush()
            time.sleep(0.01)
        if mode != 3:  # mode 3: the stream stops without [DONE]
            self.wfile.write(b'data: {"choices": [], "usage": {"completion_tokens": 3}}\n\ndata: [DONE]\n\n')


def _locust(host: str, out: Path, *extra: str) -> tuple[int, dict]:
    cmd = [sys.executable, "-m", "locust", "-f", f"{ROOT}/loadtest/locustfile.py,{ROOT}/loadtest/shapes/poisson.py",
           "--headless", "-H", host, "--only-summary", "--loglevel", "WARNING", "--csv", str(out / "locust"),
           "--summary", str(out / "summary.json"), "--samples", str(out / "samples.jsonl"), "--run-time", "60s",
           "--model", "m", *extra]
    proc = subprocess.run(cmd, cwd=ROOT, capture_output=True, text=True, timeout=120)
    assert (out / "summary.json").exists(), proc.stderr[-3000:]
    return proc.returncode, json.loads((out / "summary.json").read_text())


def test_every_failure_is_counted_with_its_reason(tmp_path):
    server = ThreadingHTTPServer(("127.0.0.1", 0), _Faulty)
    threading.Thread(target=server.serve_forever, daemon=True).start()
    try:
        rc, s = _locust(f"http://127.0.0.1:{server.server_port}", tmp_path, "--rate", "20", "--duration", "1.5",
                        "--max-requests", "12", "--request-timeout", "1")
    finally:
        server.shutdown()
    assert s["sent"] == s["scheduled"] == 12
    assert s["completed"] == 2 and s["failures"] == 10 and rc == 1
    reasons = s["failure_reasons"]
    assert reasons == {"http 500: {\"error\": \"no\"}": 2, "http 400: {\"error\": \"no\"}": 2,
                       "broken stream: ended without [DONE]": 2, "timeout": 2,
                       "broken stream: bad chunk (JSONDecodeError)": 2}, reasons
    assert s["ttft_s"]["n"] == 2 and s["itl_s"]["n"] == 4 and s["throughput_tok_s"] > 0
    with (tmp_path / "locust_stats.csv").open() as f:
        names = {(r["Type"], r["Name"]) for r in csv.DictReader(f)}
    assert {"TTFT", "ITL", "E2E"} <= {n for _, n in names}


def test_a_server_that_is_down_is_a_counted_failure(tmp_path):
    from loadtest.server import free_port

    rc, s = _locust(f"http://127.0.0.1:{free_port()}", tmp_path, "--rate", "10", "--duration", "1",
                    "--max-requests", "5")
    assert rc == 1 and s["failures"] == s["sent"] == s["scheduled"] > 0
    assert list(s["failure_reasons"]) == ["connection: server down or refusing"]


@pytest.mark.server
def test_side_by_side_against_live_servers(tiny_model, tmp_path):
    """`python -m loadtest.compare --strategies`: FCFS-order and step_cost servers (the
    deployment-aware strategy live), the same bursty load, a report."""
    out = tmp_path / "cmp"
    cmd = [sys.executable, "-m", "loadtest.compare", "--model", str(tiny_model), "--rate", "40", "--duration", "4",
           "--max-requests", "150", "--max-tokens", "8", "--max-num-seqs", "4", "--poll", "1", "--out", str(out),
           "--caps-config", json.dumps({"min_batch_trigger": 2}), "--strategies", "fcfs", "step_cost"]
    proc = subprocess.run(cmd, cwd=ROOT, capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stdout[-2000:] + proc.stderr[-4000:]
    runs = {r["label"]: r for r in json.loads((out / "compare.json").read_text())["runs"]}
    assert set(runs) == {"fcfs", "step_cost"}
    for r in runs.values():
        s = r["summary"]
        assert s["failures"] == 0 and s["completed"] == s["sent"] == s["scheduled"] > 50
        assert s["e2e_s"]["p99"] >= s["e2e_s"]["p50"] > 0 and s["itl_s"]["n"] == 7 * s["completed"]
        assert r["metrics"]["vllm:caps_actual_load_max_over_mean"] >= 1.0
        assert r["metrics"]["vllm:caps_admitted_requests_total"] == s["completed"]
    assert runs["step_cost"]["metrics"]["vllm:caps_ranked_requests_total"] > 0  # CAPS had choices to make
    assert runs["fcfs"]["metrics"]["vllm:caps_predicted_load_max_over_mean"] is not None
    e2e = [ln for ln in (out / "report.md").read_text().splitlines() if ln.startswith("| E2E p99")]
    assert len(e2e) == 1 and e2e[0].count("|") == 5  # figure, two runs, one ratio
    assert (out / "latency_cdf.png").stat().st_size > 0 and (out / "imbalance_over_time.png").stat().st_size > 0
