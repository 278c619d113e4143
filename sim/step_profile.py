"""A step-time profile measured on a live engine: the twin's ``cpu`` profile, fitted, not guessed.

The live engine writes its own step timings (``caps.step_log``, :mod:`caps_vllm.step_log`).
A step's *period* is from one ``schedule()`` to the next while the engine has work (the engine
loop goes straight on), so it holds everything the engine does per step: the model, sampling,
scheduling, output handling, and on a shared CPU the API server's share. It is fitted as

    fixed + token * tokens + prefill_request * prefill requests + decode_request * decode requests
          + context * KV tokens attended + Σ over MoE layers of weight_ms * experts run

(least squares with every coefficient kept ≥ 0: a feature whose coefficient would be negative
is dropped and the rest refitted), the last term being ``caps_vllm.step_cost``'s linear form
with its per-token part folded into ``token`` (the two are the same feature at a fixed top-k).
The front end's share of a request's latency is measured too: ``front_s`` (vLLM stamped the
arrival → the scheduler got it; the median over requests that found the engine idle, since the
others also waited for the running step, which the twin models) and ``output_s`` (a token left
a step → the client had it: per run, median client TTFT minus median engine TTFT, matched by
distribution, not request by request, since the client never learns vLLM's request id).

    python -m sim.step_profile --runs CMP_DIR [CMP_DIR ...] --out sim/profiles/cpu-tiny.json
"""

from __future__ import annotations

import argparse
import bisect
import json
from dataclasses import asdict, dataclass
from pathlib import Path

import numpy as np

from caps_vllm.step_cost import StepCostModel
from caps_vllm.step_log import read
from sim.step_time import StepBatch

FEATURES = ("fixed", "token", "prefill_request", "decode_request", "context", "expert")


@dataclass(frozen=True)
class MeasuredStep:
    """Seconds of a step from coefficients fitted on a live engine's step log (see the module)."""

    fixed_s: float
    token_s: float
    prefill_request_s: float
    decode_request_s: float
    context_s: float
    expert_s: float  # per (MoE layer, expert) pair the step runs
    front_s: float = 0.0  # arrival stamped -> in the scheduler
    output_s: float = 0.0  # out of a step -> at the client
    source: str = ""
    fit: dict | None = None  # how well it fits its own steps

    def __post_init__(self) -> None:
        for name in (
            "fixed_s",
            "token_s",
            "prefill_request_s",
            "decode_request_s",
            "context_s",
            "expert_s",
            "front_s",
            "output_s",
        ):
            v = getattr(self, name)
            if isinstance(v, bool) or not isinstance(v, (int, float)) or not np.isfinite(v) or v < 0:
                raise ValueError(f"step profile {name}: {v!r}; valid: a finite number >= 0")
        moe = StepCostModel(fixed_ms=0.0, weight_ms=self.expert_s * 1e3, token_ms=0.0, form="linear")
        object.__setattr__(self, "_moe", moe)

    def coefficients(self) -> np.ndarray:
        """The step coefficients in the order of FEATURES (what ``periods`` rows multiply)."""
        return np.array(
            [self.fixed_s, self.token_s, self.prefill_request_s, self.decode_request_s, self.context_s, self.expert_s]
        )

    def seconds(self, b: StepBatch) -> float:
        moe_ms = float(self._moe.layer_ms(b.moe_counts, expected=b.expected).sum()) if b.moe_counts.size else 0.0
        return (
            self.fixed_s
            + self.token_s * b.tokens
            + self.prefill_request_s * b.prefill_requests
            + self.decode_request_s * b.decode_requests
            + self.context_s * b.context_tokens
            + moe_ms / 1e3
        )

    @classmethod
    def load(cls, path: str | Path) -> MeasuredStep:
        doc = json.loads(Path(path).read_text())
        try:
            return cls(**{k: doc[k] for k in cls.__dataclass_fields__ if k in doc})
        except TypeError as exc:
            raise ValueError(f"{path}: not a step profile ({exc})") from None

    def save(self, path: str | Path) -> None:
        Path(path).parent.mkdir(parents=True, exist_ok=True)
        Path(path).write_text(json.dumps(asdict(self), indent=2) + "\n")


def periods(steps: list[dict]) -> tuple[np.ndarray, np.ndarray]:
    """(features [n, 6], seconds [n]) of the steps the engine went straight on from."""
    rows, secs = [], []
    for a, b in zip(steps, steps[1:]):
        if not a["busy"] or "experts" not in a:
            continue
        rows.append([1.0, a["tokens"], a["prefill_reqs"], a["decode_reqs"], a["context"], a["experts"]])
        secs.append(b["t"] - a["t"])
    return np.asarray(rows, dtype=np.float64).reshape(-1, len(FEATURES)), np.asarray(secs)


def fit_nonnegative(x: np.ndarray, y: np.ndarray) -> np.ndarray:
    """Least squares with coefficients ≥ 0, by dropping the most negative one and refitting."""
    keep = list(range(x.shape[1]))
    while True:
        coef = np.zeros(x.shape[1])
        coef[keep] = np.linalg.lstsq(x[:, keep], y, rcond=None)[0]
        if coef.min() >= 0:
            return coef
        keep.remove(int(np.argmin(coef)))


def idle_front(steps: list[dict], reqs: list[dict]) -> list[float]:
    """Front-end delays of the requests that found the engine idle: the others also waited for
    the running step to end, which the twin models itself."""
    spans = [(a["t"], b["t"] if a["busy"] else a["end"]) for a, b in zip(steps, steps[1:] + [steps[-1]])]
    starts = [a for a, _ in spans]
    out = []
    for r in reqs:
        stamped = r["added"] - r["front_s"]  # when vLLM stamped its arrival, on the log's clock
        k = bisect.bisect_right(starts, stamped) - 1
        if k < 0 or stamped >= spans[k][1]:
            out.append(r["front_s"])
    return out


def fit(step_logs: list[Path], client_ttft: list[list[float]] | None = None) -> MeasuredStep:
    """The profile of ``step_logs``; ``client_ttft`` (per log, the same run's TTFTs as Locust saw
    them) sets ``output_s``: per run, median client TTFT minus median engine-side TTFT (arrival
    stamp to first token out of a step), the median over runs."""
    xs, ys, front, output = [], [], [], []
    for k, path in enumerate(step_logs):
        steps, reqs = read(path)
        x, y = periods(steps)
        xs.append(x)
        ys.append(y)
        if steps and reqs:
            front += idle_front(steps, reqs)
        engine = [r["front_s"] + r["first"] - r["added"] for r in reqs if r["first"] is not None]
        if client_ttft and client_ttft[k] and engine:
            output.append(float(np.median(client_ttft[k]) - np.median(engine)))
    x, y = np.concatenate(xs), np.concatenate(ys)
    if len(y) < 20:
        raise ValueError(
            f"{len(y)} busy steps with routing in {[str(p) for p in step_logs]}: too few to fit "
            "(the runs need caps.step_log and CAPS's routing capture)"
        )
    coef = fit_nonnegative(x, y)
    err = np.abs(x @ coef - y) / y
    quality = {
        "steps": int(len(y)),
        "median_abs_error": float(np.median(err)),
        "p90_abs_error": float(np.quantile(err, 0.9)),
        "total_error": float((x @ coef).sum() / y.sum() - 1.0),
        "period_p50_s": float(np.median(y)),
        "idle_arrivals": len(front),
    }
    return MeasuredStep(
        *map(float, coef),
        front_s=float(np.median(front)) if front else 0.0,
        output_s=max(0.0, float(np.median(output))) if output else 0.0,
        source=", ".join(sorted({str(p.parent.parent.parent) for p in step_logs})),
        fit=quality,
    )


def comparison_logs(folder: Path) -> tuple[list[Path], list[list[float]]]:
    """The step logs of a ``loadtest.compare`` folder's valid runs and their client TTFTs."""
    from loadtest.records import read_samples

    doc = json.loads((folder / "compare.json").read_text())
    logs, ttft = [], []
    for r in doc["runs"]:
        d = folder / "raw" / f"r{r['repeat']}-{r['label']}"
        if r["status"] == "ok" and (d / "steps.jsonl").exists():
            logs.append(d / "steps.jsonl")
            ttft.append([s["ttft_s"] for s in read_samples(d / "samples.jsonl") if s.get("ttft_s") is not None])
    if not logs:
        raise ValueError(f"{folder}: no valid run with a step log (run loadtest.compare with --step-log)")
    return logs, ttft


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(prog="python -m sim.step_profile", description=__doc__.split("\n\n")[0])
    ap.add_argument("--runs", nargs="+", required=True, help="loadtest.compare output folders run with --step-log")
    ap.add_argument("--out", required=True, help="the profile JSON to write")
    args = ap.parse_args(argv)
    logs, ttft = [], []
    for folder in args.runs:
        lg, tt = comparison_logs(Path(folder))
        logs += lg
        ttft += tt
    prof = fit(logs, ttft)
    prof.save(args.out)
    print(json.dumps(asdict(prof), indent=2))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
