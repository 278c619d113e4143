"""Servers started by the tests on loopback and stopped by pid: `vllm serve`, Prometheus."""

from __future__ import annotations

import json
import subprocess
import urllib.parse
import urllib.request
from pathlib import Path

from loadtest.server import VllmServer, free_port, stop_group

ROOT = Path(__file__).resolve().parents[1]


class Server(VllmServer):
    """`vllm serve` of the embedded model as the tests run it: eager, 4 sequences, 512 tokens."""

    def __init__(self, model, extra: list[str], log: Path, env: dict | None = None):
        super().__init__(
            model, ["--max-model-len", "512", "--enforce-eager", "--max-num-seqs", "4", *extra], log, env=env, cwd=ROOT
        )


class Monitor:
    """deploy/monitor.sh: a real Prometheus (Debian's package) scraping ``target`` on loopback."""

    def __init__(self, target: str, data: Path, interval: str = "1s"):
        self.port = free_port()
        self.log = data / "monitor.log"
        data.mkdir(parents=True, exist_ok=True)
        self.proc = subprocess.Popen(
            [
                "bash",
                str(ROOT / "deploy" / "monitor.sh"),
                "--target",
                target,
                "--prometheus-port",
                str(self.port),
                "--interval",
                interval,
                "--data",
                str(data),
            ],
            stdout=self.log.open("w"),
            stderr=subprocess.STDOUT,
            start_new_session=True,
            cwd=ROOT,
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
