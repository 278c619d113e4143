"""Servers started by the tests on loopback and stopped by pid: `vllm serve`, Prometheus."""

from __future__ import annotations

import json
import os
import signal
import socket
import subprocess
import sys
import time
import urllib.error
import urllib.parse
import urllib.request
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


class Server:
    """`vllm serve` started by the test, stopped by pid."""

    def __init__(self, model, extra: list[str], log: Path, env: dict | None = None):
        self.port = free_port()
        self.log = log
        vllm = Path(sys.executable).with_name("vllm")
        # A metrics folder is the test's choice, never inherited from the developer's shell.
        base = {k: v for k, v in os.environ.items() if k.lower() != "prometheus_multiproc_dir"}
        self.proc = subprocess.Popen(
            [str(vllm), "serve", str(model), "--host", "127.0.0.1", "--port", str(self.port), "--served-model-name", "tiny",
             "--max-model-len", "512", "--enforce-eager", "--max-num-seqs", "4", *extra],
            stdout=log.open("w"), stderr=subprocess.STDOUT, start_new_session=True, cwd=ROOT, env={**base, **(env or {})},
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

    def get(self, path: str) -> str:
        with urllib.request.urlopen(self.url(path), timeout=30) as r:
            return r.read().decode()

    def post(self, path: str, body: dict) -> dict:
        req = urllib.request.Request(self.url(path), data=json.dumps(body).encode(), headers={"Content-Type": "application/json"})
        with urllib.request.urlopen(req, timeout=120) as r:
            return json.loads(r.read())

    def stop(self) -> None:
        stop_group(self.proc)


def stop_group(proc: subprocess.Popen) -> None:
    """SIGTERM to the process group the test started, SIGKILL if it lingers."""
    if proc.poll() is None:
        os.killpg(proc.pid, signal.SIGTERM)
        try:
            proc.wait(timeout=30)
        except subprocess.TimeoutExpired:
            os.killpg(proc.pid, signal.SIGKILL)
            proc.wait(timeout=10)


class Monitor:
    """deploy/monitor.sh: a real Prometheus (Debian's package) scraping ``target`` on loopback."""

    def __init__(self, target: str, data: Path, interval: str = "1s"):
        self.port = free_port()
        self.log = data / "monitor.log"
        data.mkdir(parents=True, exist_ok=True)
        self.proc = subprocess.Popen(
            ["bash", str(ROOT / "deploy" / "monitor.sh"), "--target", target, "--prometheus-port", str(self.port),
             "--interval", interval, "--data", str(data)],
            stdout=self.log.open("w"), stderr=subprocess.STDOUT, start_new_session=True, cwd=ROOT,
        )

    def query(self, expr: str) -> list[dict]:
        url = f"http://127.0.0.1:{self.port}/api/v1/query?" + urllib.parse.urlencode({"query": expr})
        with urllib.request.urlopen(url, timeout=10) as r:
            body = json.loads(r.read())
        assert body["status"] == "success", body
        return body["data"]["result"]

    def names(self) -> set[str]:
        with urllib.request.urlopen(f"http://127.0.0.1:{self.port}/api/v1/label/__name__/values", timeout=10) as r:
            return set(json.loads(r.read())["data"])

    def stop(self) -> None:
        stop_group(self.proc)
