"""A `vllm serve` process on loopback, started and stopped by pid (its own process group)."""

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
from pathlib import Path


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def metric_sums(text: str, names: set[str] | None = None) -> dict[str, float]:
    """Each series on a /metrics page summed over its labels (only ``names`` if given)."""
    from prometheus_client.parser import text_string_to_metric_families

    out: dict[str, float] = {}
    for fam in text_string_to_metric_families(text):
        for s in fam.samples:
            if names is None or s.name in names:
                out[s.name] = out.get(s.name, 0.0) + s.value
    return out


def stop_group(proc: subprocess.Popen, grace: float = 30.0) -> None:
    """SIGTERM to the process group, SIGKILL if it lingers."""
    if proc.poll() is None:
        os.killpg(proc.pid, signal.SIGTERM)
        try:
            proc.wait(timeout=grace)
        except subprocess.TimeoutExpired:
            os.killpg(proc.pid, signal.SIGKILL)
            proc.wait(timeout=10)


def split_cpus(cpus: set[int] | None = None) -> tuple[list[int], list[int]] | None:
    """(server CPUs, load-generator CPUs) out of this process's CPUs: the last one for the load
    generator, the rest for the server; None with fewer than two."""
    allowed = sorted(cpus if cpus is not None else os.sched_getaffinity(0))
    return (allowed[:-1], allowed[-1:]) if len(allowed) >= 2 else None


def pinned(cpus: list[int] | None):
    """A ``preexec_fn`` that pins the child (and what it starts) to ``cpus``; None: no pinning."""
    if not cpus:
        return None
    return lambda: os.sched_setaffinity(0, cpus)


class VllmServer:
    """``vllm serve MODEL ARGS`` on 127.0.0.1; the log goes to ``log``.

    ``cpus``: pin the server's processes to these CPUs, with vLLM's CPU worker threads bound to
    them too (``VLLM_CPU_OMP_THREADS_BIND``; with two or more, the first is left to the API
    server and engine-core processes, as vLLM's own auto binding reserves one).
    ``pin_processes=False``: bind only the worker threads at start, and let the caller
    :meth:`pin` every process once the server is ready (a start on every CPU is faster)."""

    def __init__(
        self,
        model: str | Path,
        args: list[str],
        log: Path,
        env: dict | None = None,
        name: str = "tiny",
        port: int | None = None,
        cwd: Path | None = None,
        cpus: list[int] | None = None,
        pin_processes: bool = True,
    ) -> None:
        self.port = port or free_port()
        self.log = log
        log.parent.mkdir(parents=True, exist_ok=True)
        vllm = Path(sys.executable).with_name("vllm")
        # The metrics folder is the caller's choice, never inherited from the shell.
        base = {k: v for k, v in os.environ.items() if k.lower() != "prometheus_multiproc_dir"}
        if any(a.startswith("--kv-cache-memory-bytes") for a in args):
            base.pop("VLLM_CPU_KVCACHE_SPACE", None)  # vLLM's legacy variable would override the flag
        else:
            base.setdefault("VLLM_CPU_KVCACHE_SPACE", "1")
        if cpus:
            omp = cpus[1:] if len(cpus) >= 2 else cpus
            base["VLLM_CPU_OMP_THREADS_BIND"] = ",".join(map(str, omp))
        self.proc = subprocess.Popen(
            [
                str(vllm),
                "serve",
                str(model),
                "--host",
                "127.0.0.1",
                "--port",
                str(self.port),
                "--served-model-name",
                name,
                *args,
            ],
            stdout=log.open("w"),
            stderr=subprocess.STDOUT,
            start_new_session=True,
            cwd=cwd,
            env={**base, **(env or {})},
            preexec_fn=pinned(cpus) if pin_processes else None,
        )

    def pids(self) -> list[int]:
        """The server's processes: its session (it was started in a new one)."""
        out = []
        for stat in Path("/proc").glob("[0-9]*/stat"):
            try:
                fields = stat.read_text().rsplit(")", 1)[1].split()
            except OSError:
                continue  # gone meanwhile
            if int(fields[3]) == self.proc.pid:  # the session id, after state, ppid and pgrp
                out.append(int(stat.parent.name))
        return out

    def pin(self, cpus: list[int]) -> None:
        """Every thread of every process of the server to ``cpus`` (as ``pinned`` at start would)."""
        for pid in self.pids():
            for task in Path(f"/proc/{pid}/task").glob("*"):
                try:
                    os.sched_setaffinity(int(task.name), cpus)
                except OSError:
                    pass  # a thread that ended meanwhile

    def url(self, path: str) -> str:
        return f"http://127.0.0.1:{self.port}{path}"

    def wait_ready(self, timeout: float = 300.0) -> None:
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if self.proc.poll() is not None:
                raise RuntimeError(f"vllm serve exited with {self.proc.returncode}:\n{self.log.read_text()[-3000:]}")
            try:
                with urllib.request.urlopen(self.url("/health"), timeout=2) as r:
                    if r.status == 200:
                        return
            except (urllib.error.URLError, OSError):
                pass
            time.sleep(1)
        raise RuntimeError(f"vllm serve not ready after {timeout:.0f} s:\n{self.log.read_text()[-3000:]}")

    def get(self, path: str) -> str:
        with urllib.request.urlopen(self.url(path), timeout=30) as r:
            return r.read().decode()

    def post(self, path: str, body: dict) -> dict:
        req = urllib.request.Request(
            self.url(path), data=json.dumps(body).encode(), headers={"Content-Type": "application/json"}
        )
        with urllib.request.urlopen(req, timeout=120) as r:
            return json.loads(r.read())

    def stop(self) -> None:
        stop_group(self.proc)
