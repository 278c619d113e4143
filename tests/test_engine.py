"""A real vLLM engine and a real `vllm serve` with CAPS on the embedded model."""

from __future__ import annotations

import json
import os
import signal
import socket
import subprocess
import sys
import time
import urllib.error
import urllib.request
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import pytest

pytest.importorskip("vllm")
ROOT = Path(__file__).resolve().parents[1]
CAPS = {"min_batch_trigger": 2, "max_wait_ms": 60000}


def _engine(model, sched, caps=None):
    cmd = [sys.executable, str(ROOT / "tests" / "engine_run.py"), str(model), sched or "", json.dumps(caps or {})]
    proc = subprocess.run(cmd, capture_output=True, text=True, timeout=600, cwd=ROOT)
    line = next((x for x in proc.stdout.splitlines() if x.startswith("RESULT ")), None)
    assert proc.returncode == 0 and line, proc.stderr[-3000:]
    return json.loads(line[len("RESULT "):])


@pytest.mark.engine
def test_caps_changes_admission_not_results(tiny_model):
    caps = _engine(tiny_model, "caps_vllm.CapsScheduler", CAPS)
    fcfs = _engine(tiny_model, None)
    assert caps["scheduler"] == "CapsScheduler" and fcfs["scheduler"] == "Scheduler"
    assert caps["caps_stats"]["plans"] > 0 and caps["caps_stats"]["ranked"] > 0, "CAPS really ordered admissions"
    assert caps["caps_counters"].get("errors", 0) == 0
    assert caps["outputs"] == fcfs["outputs"]  # greedy results do not depend on admission order
    assert caps["chat"] == fcfs["chat"]
    assert all(len(o) == 12 for o in caps["outputs"])


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


class Server:
    """`vllm serve` started by the test, stopped by pid."""

    def __init__(self, model, extra: list[str], log: Path):
        self.port = _free_port()
        self.log = log
        vllm = Path(sys.executable).with_name("vllm")
        self.proc = subprocess.Popen(
            [str(vllm), "serve", str(model), "--host", "127.0.0.1", "--port", str(self.port), "--served-model-name", "tiny",
             "--max-model-len", "512", "--enforce-eager", "--max-num-seqs", "4", *extra],
            stdout=log.open("w"), stderr=subprocess.STDOUT, start_new_session=True, cwd=ROOT,
        )

    def url(self, path: str) -> str:
        return f"http://127.0.0.1:{self.port}{path}"

    def wait_ready(self, timeout: float = 300.0) -> None:
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if self.proc.poll() is not None:
                raise AssertionError(f"server exited with {self.proc.returncode}:\n{self.log.read_text()[-3000:]}")
            try:
                with urllib.request.urlopen(self.url("/health"), timeout=2) as r:
                    if r.status == 200:
                        return
            except (urllib.error.URLError, OSError):
                pass
            time.sleep(1)
        raise AssertionError("server not ready in time:\n" + self.log.read_text()[-3000:])

    def post(self, path: str, body: dict) -> dict:
        req = urllib.request.Request(self.url(path), data=json.dumps(body).encode(), headers={"Content-Type": "application/json"})
        with urllib.request.urlopen(req, timeout=120) as r:
            return json.loads(r.read())

    def stop(self) -> None:
        if self.proc.poll() is None:
            os.killpg(self.proc.pid, signal.SIGTERM)
            try:
                self.proc.wait(timeout=30)
            except subprocess.TimeoutExpired:
                os.killpg(self.proc.pid, signal.SIGKILL)
                self.proc.wait(timeout=10)


@pytest.mark.server
def test_vllm_serve_with_caps(tiny_model, tmp_path):
    from caps_vllm.tiny_model import prompt_pool

    srv = Server(tiny_model, ["--scheduler-cls", "caps_vllm.CapsScheduler", "--additional-config",
                              json.dumps({"caps": CAPS})], tmp_path / "serve.log")
    try:
        srv.wait_ready()
        prompts = [r["prompt"] for r in prompt_pool()][:24]

        def call(i: int) -> dict:
            if i % 2:
                return srv.post("/v1/chat/completions", {"model": "tiny", "max_tokens": 8, "temperature": 0,
                                                        "messages": [{"role": "user", "content": prompts[i]}]})
            return srv.post("/v1/completions", {"model": "tiny", "prompt": prompts[i], "max_tokens": 8, "temperature": 0})

        with ThreadPoolExecutor(12) as pool:
            answers = list(pool.map(call, range(len(prompts))))
        for i, a in enumerate(answers):
            choice = a["choices"][0]
            assert a["usage"]["completion_tokens"] > 0
            assert ("message" in choice) if i % 2 else ("text" in choice)
    finally:
        srv.stop()
    assert srv.proc.returncode is not None
    log = srv.log.read_text()
    assert "CAPS scheduler (sync)" in log


@pytest.mark.server
def test_vllm_serve_refuses_an_invalid_caps_setting(tiny_model, tmp_path):
    srv = Server(tiny_model, ["--scheduler-cls", "caps_vllm.CapsScheduler", "--additional-config",
                              json.dumps({"caps": {"window_size": 0}})], tmp_path / "bad.log")
    try:
        rc = srv.proc.wait(timeout=300)
    finally:
        srv.stop()
    assert rc != 0
    assert "caps.window_size: 0 is out of range; valid: an integer in [1, 4096]" in srv.log.read_text()
