"""The engine's own step timings, as JSON lines: what the twin's ``cpu`` profile is fitted on.

``caps.step_log: PATH`` makes the scheduler append one line per engine step and one per
finished request. A step line says when ``schedule()`` began (``t``, this process's monotonic
clock), how long it took (``sched_s``), when ``update_from_output()`` returned (``end``), what
was scheduled (tokens, prefill tokens and requests, decode requests, the KV context those
requests attend over) and whether work was left (``busy``: the engine loop goes straight on to
the next step, so the next ``t`` minus this one is the whole step period: model, sampling,
scheduling, output handling). A request line says when it was added to the scheduler, how long
after vLLM stamped its arrival (the front end's share of its TTFT), its prompt length, and when
its first and last tokens came out of a step (an aborted request leaves none). Where the workers capture routing, a step line
also says how many (MoE layer, expert) pairs it ran (``experts``). No vLLM import: it reads the objects it is given.
"""

from __future__ import annotations

import json
import time
from pathlib import Path
from typing import IO


class StepLog:
    """One engine's step log; ``begin``/``scheduled`` around ``schedule()``, ``updated`` after
    ``update_from_output()``, ``added`` at ``add_request``."""

    def __init__(self, path: str | Path, clock=time.monotonic, wall=time.time) -> None:
        self.path = Path(path)
        self.path.parent.mkdir(parents=True, exist_ok=True)
        self._f: IO[str] = self.path.open("a", buffering=1)  # line-buffered: nothing lost when the engine is stopped
        self.clock, self.wall = clock, wall
        self._t0 = 0.0
        self._step: dict | None = None
        self._reqs: dict[str, dict] = {}

    def added(self, request) -> None:
        self._reqs[request.request_id] = {
            "req": request.request_id,
            "added": self.clock(),
            "front_s": max(0.0, self.wall() - request.arrival_time),
            "prompt": request.num_prompt_tokens,
            "first": None,
            "done": None,
        }

    def dropped(self, request_ids) -> None:
        """Requests finished from outside (aborted: a client went away) leave no line, and no
        entry behind: the log's memory stays bounded by the requests in flight."""
        for rid in request_ids:
            self._reqs.pop(rid, None)

    def begin(self) -> None:
        self._t0 = self.clock()

    def scheduled(self, out, requests) -> None:
        """After ``schedule()``: ``requests`` is the scheduler's id -> Request map, whose
        ``num_computed_tokens`` already count this step's tokens."""
        t1 = self.clock()
        prefill = prefill_reqs = decode = context = 0
        for rid, n in out.num_scheduled_tokens.items():
            req = requests[rid]
            before = req.num_computed_tokens - n
            context += before + n
            if before < req.num_prompt_tokens:
                prefill += min(n, req.num_prompt_tokens - before)
                prefill_reqs += 1
            else:
                decode += 1
        self._step = {
            "t": self._t0,
            "sched_s": t1 - self._t0,
            "tokens": sum(out.num_scheduled_tokens.values()),
            "prefill_tokens": prefill,
            "prefill_reqs": prefill_reqs,
            "decode_reqs": decode,
            "context": context,
            "new": len(out.scheduled_new_reqs),
        }

    def updated(self, engine_outputs, busy: bool, routed=None) -> None:
        """After ``update_from_output()``: its EngineCoreOutputs; ``busy``: work is left;
        ``routed``: the step's [MoE layers, experts] counts where the workers captured them."""
        now, step = self.clock(), self._step
        self._step = None
        if step is None or not step["tokens"]:
            return
        step["end"], step["busy"] = now, busy
        if routed is not None:
            step["experts"] = int((routed > 0).sum())  # (layer, expert) pairs the step ran
        self._f.write(json.dumps(step) + "\n")
        for eco in engine_outputs.values():
            for o in eco.outputs:
                r = self._reqs.get(o.request_id)
                if r is None:
                    continue
                if r["first"] is None and o.new_token_ids:
                    r["first"] = now
                if o.finish_reason is not None:
                    r["done"] = now
                    self._f.write(json.dumps(self._reqs.pop(o.request_id)) + "\n")

    def close(self) -> None:
        self._f.close()


def read(path: str | Path) -> tuple[list[dict], list[dict]]:
    """(step lines, request lines) of a step log; a line that is not JSON: an error naming it."""
    steps, reqs = [], []
    with Path(path).open() as f:
        for n, line in enumerate(f, 1):
            if not line.strip():
                continue
            try:
                row = json.loads(line)
            except ValueError as exc:
                raise ValueError(f"{path}:{n}: not a JSON line ({exc})") from None
            (reqs if "req" in row else steps).append(row)
    return steps, reqs
