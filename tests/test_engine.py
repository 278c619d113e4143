"""A real vLLM engine and a real `vllm serve` with CAPS on the embedded model."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from concurrent.futures import ThreadPoolExecutor

import pytest

from tests.servers import ROOT, Server

pytest.importorskip("vllm")
torch = pytest.importorskip("torch")
CAPS = {"min_batch_trigger": 2, "max_wait_ms": 60000}


def _engine(model, sched, caps=None, mode="small"):
    cmd = [sys.executable, str(ROOT / "tests" / "engine_run.py"), str(model), sched or "", json.dumps(caps or {}), mode]
    proc = subprocess.run(cmd, capture_output=True, text=True, timeout=600, cwd=ROOT)
    line = next((x for x in proc.stdout.splitlines() if x.startswith("RESULT ")), None)
    assert proc.returncode == 0 and line, proc.stderr[-3000:]
    return json.loads(line[len("RESULT ") :])


@pytest.fixture(scope="module")
def fcfs_run(tiny_model):
    return _engine(tiny_model, None)


@pytest.mark.engine
def test_caps_changes_admission_not_results(tiny_model, fcfs_run):
    caps = _engine(tiny_model, "caps_vllm.CapsScheduler", CAPS)
    fcfs = fcfs_run
    assert caps["scheduler"] == "CapsScheduler" and fcfs["scheduler"] == "Scheduler"
    assert caps["caps_stats"]["plans"] > 0 and caps["caps_stats"]["ranked"] > 0, "CAPS really ordered admissions"
    assert caps["caps_counters"].get("errors", 0) == 0
    # every request's load was predicted as vLLM prepared it (caps_vllm.plugin), not in schedule()
    assert caps["caps_counters"]["predicted_on_arrival"] == len(caps["outputs"]) + len(caps["chat"])
    assert caps["outputs"] == fcfs["outputs"]  # greedy results do not depend on admission order
    assert caps["chat"] == fcfs["chat"]
    assert all(len(o) == 12 for o in caps["outputs"])
    # the learning table learned from the routing the workers captured, and changed predictions
    assert caps["learner"]["rows"] > 1000 and caps["learner"]["changed"] > 0
    again = _engine(tiny_model, "caps_vllm.CapsScheduler", CAPS)  # a restart resumes the persisted state
    assert again["learner"]["resumed"] and again["learner"]["rows"] > caps["learner"]["rows"]
    assert again["outputs"] == fcfs["outputs"]


@pytest.mark.engine
@pytest.mark.parametrize("caps", [{}, {"plan_ahead": True}], ids=["in-schedule", "plan-ahead"])
def test_caps_chooses_at_vllms_cpu_defaults(tiny_model, caps):
    """No budget lowered to force a choice: 96 long prompts at once queue on vLLM's token budget
    with sequence slots to spare, and CAPS (its defaults) chooses; every request completes once.
    Planning ahead (on a worker thread while the engine runs the model), too."""
    run = _engine(tiny_model, "caps_vllm.CapsScheduler", caps, mode="cpu-defaults")
    slots, tokens = run["budgets"]
    assert slots > 96 and tokens >= 2048  # vLLM's own defaults: the slots never bind
    st = run["caps_stats"]
    assert st["engaged"] > 0 and st["plans"] > 0 and st["ranked"] > 0, st
    assert len(run["outputs"]) == 96 and all(len(o) == 12 for o in run["outputs"])
    assert run["caps_counters"].get("errors", 0) == 0
    if caps:  # the plans were made on the worker, and applied (possibly to keep FCFS) unless counted late
        c = run["caps_counters"]
        late, dropped = c.get("plans_late", 0), c.get("plans_dropped", 0)
        assert c["plans_applied"] > 0 and c["plans_applied"] + late + dropped >= st["plans"], c


@pytest.mark.engine
def test_shipped_model_greedy_in_vllm_equals_transformers(tiny_model, fcfs_run):
    """The trained weights load in both, and both decode the same greedy continuations."""
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from caps_vllm.tiny_model import prompt_pool

    tok = AutoTokenizer.from_pretrained(str(tiny_model))
    model = AutoModelForCausalLM.from_pretrained(str(tiny_model), dtype=torch.float32).eval()
    prompts = [row["prompt"] for row in sorted(prompt_pool(), key=lambda r: r["category"])][:6]  # engine_run's first
    for prompt, vllm_ids in zip(prompts, fcfs_run["outputs"]):
        ids = torch.tensor([tok(prompt)["input_ids"]])
        with torch.no_grad():
            out = model.generate(ids, max_new_tokens=12, min_new_tokens=12, do_sample=False)
        assert out[0, ids.shape[1] :].tolist() == vllm_ids


@pytest.mark.server
def test_vllm_serve_with_caps(tiny_model, tmp_path):
    from caps_vllm.tiny_model import prompt_pool

    # A metrics folder of the user's, holding what a previous server left: a counter of a
    # process that has exited. It must not leak into this server's /metrics.
    folder = tmp_path / "prom"
    folder.mkdir()
    subprocess.run(
        [
            sys.executable,
            "-c",
            "from prometheus_client import Counter; Counter('vllm:caps_steps', 'x', "
            "['model_name', 'engine']).labels('tiny', '0').inc(1e6)",
        ],
        env={**os.environ, "PROMETHEUS_MULTIPROC_DIR": str(folder)},
        check=True,
    )
    assert list(folder.glob("counter_*.db"))
    srv = Server(
        tiny_model,
        ["--scheduler-cls", "caps_vllm.CapsScheduler", "--additional-config", json.dumps({"caps": CAPS})],
        tmp_path / "serve.log",
        env={"PROMETHEUS_MULTIPROC_DIR": str(folder)},
    )
    try:
        srv.wait_ready()
        prompts = [r["prompt"] for r in prompt_pool()][:24]

        def call(i: int) -> dict:
            if i % 2:
                return srv.post(
                    "/v1/chat/completions",
                    {
                        "model": "tiny",
                        "max_tokens": 8,
                        "temperature": 0,
                        "messages": [{"role": "user", "content": prompts[i]}],
                    },
                )
            return srv.post(
                "/v1/completions", {"model": "tiny", "prompt": prompts[i], "max_tokens": 8, "temperature": 0}
            )

        with ThreadPoolExecutor(12) as pool:
            answers = list(pool.map(call, range(len(prompts))))
        for i, a in enumerate(answers):
            choice = a["choices"][0]
            assert a["usage"]["completion_tokens"] > 0
            assert ("message" in choice) if i % 2 else ("text" in choice)
        steps = [ln for ln in srv.get("/metrics").splitlines() if ln.startswith("vllm:caps_steps_total")]
        assert len(steps) == 1 and 0 < float(steps[0].split()[-1]) < 1e6
    finally:
        srv.stop()
    assert srv.proc.returncode is not None
    log = srv.log.read_text()
    assert "CAPS scheduler (sync)" in log


@pytest.mark.server
def test_vllm_serve_refuses_an_invalid_caps_setting(tiny_model, tmp_path):
    srv = Server(
        tiny_model,
        ["--scheduler-cls", "caps_vllm.CapsScheduler", "--additional-config", json.dumps({"caps": {"window_size": 0}})],
        tmp_path / "bad.log",
    )
    try:
        rc = srv.proc.wait(timeout=300)
    finally:
        srv.stop()
    assert rc != 0
    assert "caps.window_size: 0 is out of range; valid: an integer in [1, 4096]" in srv.log.read_text()
