"""A real Prometheus (Debian's package, via deploy/monitor.sh) scrapes a live `vllm serve` with CAPS."""

from __future__ import annotations

import json
import os
import re
import shutil
import time
from concurrent.futures import ThreadPoolExecutor

import pytest

from loadtest.server import metric_sums
from tests.servers import ROOT, Monitor, Server

pytest.importorskip("vllm")
DASHBOARD = ROOT / "deploy" / "grafana" / "dashboards" / "caps-vllm.json"


def _dashboard_metrics() -> set[str]:
    exprs = [t["expr"] for p in json.loads(DASHBOARD.read_text())["panels"] for t in p["targets"]]
    return {m for e in exprs for m in re.findall(r"vllm:[a-z0-9_]+", e)}


def test_dashboard_queries_only_metrics_that_exist():
    """Every CAPS series the dashboard reads is one the scheduler defines (vLLM's are checked live)."""
    from caps_vllm.metrics import SPEC

    defined = set()
    for name, (kind, *_rest) in SPEC.items():
        defined |= {f"{name}_total"} if kind == "counter" else {f"{name}_{s}" for s in ("bucket", "sum", "count")}
    caps = {m for m in _dashboard_metrics() if m.startswith("vllm:caps_")}
    assert caps and caps <= defined, caps - defined
    panel_kinds = {p["type"] for p in json.loads(DASHBOARD.read_text())["panels"]}
    assert {"status-history", "timeseries", "heatmap"} <= panel_kinds


def _need_prometheus() -> None:
    if shutil.which("prometheus") is None:
        if os.environ.get("CI"):
            pytest.fail("prometheus is not installed (make setup installs Debian's package)")
        pytest.skip("prometheus is not installed: apt-get install prometheus")


@pytest.mark.server
@pytest.mark.parametrize("ahead", [False, True], ids=["in-schedule", "plan-ahead"])
def test_prometheus_scrapes_caps_metrics_that_match_what_was_served(tiny_model, tmp_path, ahead):
    """Planning ahead (the GPU default; forced here on CPU), the same figures come from CAPS's
    worker thread in vllm serve's engine process."""
    from caps_vllm.tiny_model import prompt_pool

    _need_prometheus()
    srv = Server(
        tiny_model,
        [
            "--scheduler-cls",
            "caps_vllm.CapsScheduler",
            "--no-enable-prefix-caching",
            "--additional-config",
            json.dumps(
                {
                    "caps": {
                        "min_batch_trigger": 2,
                        "capture_decode": True,
                        "learn_rows_per_step": 4096,
                        "plan_ahead": ahead,
                    }
                }
            ),
        ],
        tmp_path / "serve.log",
    )
    mon = Monitor(f"127.0.0.1:{srv.port}", tmp_path / "monitor")
    try:
        srv.wait_ready()
        prompts = [r["prompt"] for r in sorted(prompt_pool(), key=lambda r: r["category"])][:16]

        def call(i: int) -> dict:
            body = {"model": "tiny", "max_tokens": 6, "temperature": 0, "ignore_eos": True}
            if i % 2:
                return srv.post("/v1/chat/completions", {**body, "messages": [{"role": "user", "content": prompts[i]}]})
            return srv.post("/v1/completions", {**body, "prompt": prompts[i]})

        with ThreadPoolExecutor(8) as pool:
            answers = list(pool.map(call, range(len(prompts))))
        prompt_tokens = sum(a["usage"]["prompt_tokens"] for a in answers)
        gen_tokens = sum(a["usage"]["completion_tokens"] for a in answers)
        served = metric_sums(srv.get("/metrics"))

        # Wait for a scrape taken after the last request (the counters no longer move).
        deadline = time.monotonic() + 60
        while True:
            got = mon.query("sum(vllm:caps_routed_tokens_total)")
            if got and float(got[0]["value"][1]) == served["vllm:caps_routed_tokens_total"]:
                break
            assert time.monotonic() < deadline, f"Prometheus never saw the final counts:\n{mon.log.read_text()}"
            time.sleep(0.5)

        def prom(expr: str) -> float:
            return float(mon.query(expr)[0]["value"][1])

        n = len(prompts)
        # What was served, three ways: the responses, vLLM's own counters, CAPS's counters in Prometheus.
        assert served["vllm:prompt_tokens_total"] == prompt_tokens
        assert served["vllm:generation_tokens_total"] == gen_tokens == 6 * n
        # The last sampled token of each request is never fed through the model.
        assert (
            prom("sum(vllm:caps_routed_tokens_total)")
            == prom("sum(vllm:caps_scheduled_tokens_total)")
            == prompt_tokens + gen_tokens - n
        )
        steps = prom("sum(vllm:caps_steps_total)")
        assert steps == served["vllm:caps_steps_total"] == served["vllm:iteration_tokens_total_count"]
        assert prom("sum(vllm:caps_actual_load_cv_count)") == steps
        assert prom("sum(vllm:caps_predicted_load_cv_count)") == steps
        assert prom("sum(vllm:caps_admitted_requests_total)") == n
        assert prom("sum(vllm:caps_ranked_requests_total) + sum(vllm:caps_fcfs_fallback_requests_total)") == n
        assert prom("sum(vllm:caps_predictor_cosine_count)") == n
        assert 0 < prom("sum(vllm:caps_predictor_cosine_sum)") <= n
        assert prom("sum(vllm:caps_errors_total)") == 0
        # every request was predicted on vLLM's input thread as it arrived (caps_vllm.plugin), not in schedule()
        assert prom("sum(vllm:caps_predicted_on_arrival_requests_total)") == n
        # the learning table was scored on every prompt token (4 MoE layers x top-4 choices each) ...
        picks = prom("sum(vllm:caps_learning_routed_picks_total)")
        assert picks == prompt_tokens * 4 * 4
        assert 0 < prom('sum(vllm:caps_learning_hits_total{table="dry_run"})') <= picks
        assert 0 < prom('sum(vllm:caps_learning_hits_total{table="learned"})') <= picks
        # ... and every request's decode tokens against its prompt's prediction
        assert prom("sum(vllm:caps_predictor_decode_cosine_count)") == n
        layers = {r["metric"]["layer"] for r in mon.query("vllm:caps_actual_layer_load_max_over_mean_count")}
        assert layers == {"0", "1", "2", "3"}
        assert all(r["metric"]["model_name"] == "tiny" for r in mon.query('{__name__=~"vllm:caps_.*"}'))

        # Every metric the Grafana dashboard queries exists in this Prometheus.
        missing = _dashboard_metrics() - mon.names()
        assert not missing, missing
    finally:
        mon.stop()
        srv.stop()
    folders = re.findall(r"via PROMETHEUS_MULTIPROC_DIR=(\S+) \(made for this server", srv.log.read_text())
    assert len(folders) == 1 and not os.path.exists(folders[0])  # private to the server, removed at exit
