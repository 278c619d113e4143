"""Ratios between live runs with bootstrap confidence intervals, and the verdicts read from them.

Live runs on a shared machine differ by tens of percent between identical arms, so a figure is
only reported with its uncertainty. The runner repeats each arm; repetition ``r`` of every arm
replays the same seeded schedule, so runs pair by repetition. One bootstrap draw resamples the
repetitions (the same ones for both arms: pairs) and, inside each drawn run, its requests (with
replacement). A request-level figure (a TTFT/ITL/E2E quantile) is computed over the drawn runs'
pooled requests; a run-level figure (throughput, distinct experts per step, ...) is the mean
over the drawn runs. The 95 % interval is the 2.5-97.5 percentile range of the draws' ratios,
widened about the ratio (in log space) so that the between-run part of its variance (the total
variance less that of draws which resample requests only) is scaled by ``small_sample_factor(n)``
squared for n repetitions; the within-run part is left as the bootstrap measures it.

Why widen: a live comparison affords 2-5 repetitions, and with few runs the percentile bootstrap
is far too sure of itself. Its spread can never exceed the range of the n runs, resampling n
runs understates their variance by (n - 1) / n, and when run-to-run noise dominates (it does
here) the chance that all n paired runs fall on one side of 1 by luck is 2^(1 - n): 25 % at
three repetitions. Measured on this CPU: with the plain interval an A/A control (two identical
fcfs arms, three repetitions, overloaded) came out "better" on E2E P99 (0.81, 0.80-0.96) and
throughput, and a strategy that had reordered no request "better" on E2E P99 (0.87, 0.80-1.00).
The factor turns the bootstrap's standard error into Student's t interval for n paired runs
(t at n - 1 degrees of freedom over the normal quantile, times sqrt(n / (n - 1))): 9.2 at two
repetitions, 2.7 at three, 1.6 at five, 1.2 at ten. It makes the verdicts of a short comparison
conservative, which is the honest side to err on.

Resampling requests with replacement is drawing a multinomial count per request; a quantile of
the pooled, weighted values is then one cumulative sum over values sorted once, which keeps a
thousand draws over tens of thousands of inter-token gaps cheap.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np

LEVEL = 0.95
#: Student's t at 97.5 % by degrees of freedom (1-30); the normal quantile beyond
_T975 = (
    12.706,
    4.303,
    3.182,
    2.776,
    2.571,
    2.447,
    2.365,
    2.306,
    2.262,
    2.228,
    2.201,
    2.179,
    2.160,
    2.145,
    2.131,
    2.120,
    2.110,
    2.101,
    2.093,
    2.086,
    2.080,
    2.074,
    2.069,
    2.064,
    2.060,
    2.056,
    2.052,
    2.048,
    2.045,
    2.042,
)
_Z975 = 1.959964


def t975(df: int) -> float:
    """Student's t at 97.5 % for ``df`` >= 1 degrees of freedom."""
    return _T975[df - 1] if df <= len(_T975) else _Z975


def small_sample_factor(n: int) -> float:
    """How much wider than the percentile bootstrap a 95 % interval over n paired runs must be
    (see the module's docstring); 1 for a single run (then only requests are resampled)."""
    if n < 2:
        return 1.0
    return t975(n - 1) / _Z975 * math.sqrt(n / (n - 1))


def quantiles(xs: list[float]) -> dict:
    """P50/P90/P99 by nearest rank (a value some request saw), max, mean and count: the one
    definition the live load generator, the twin and their fidelity comparison share."""
    if not xs:
        return {"p50": None, "p90": None, "p99": None, "max": None, "mean": None, "n": 0}
    a = sorted(xs)

    def q(p: float) -> float:
        return a[min(len(a) - 1, max(0, math.ceil(p * len(a)) - 1))]

    return {"p50": q(0.5), "p90": q(0.9), "p99": q(0.99), "max": a[-1], "mean": sum(a) / len(a), "n": len(a)}


@dataclass(frozen=True)
class Figure:
    name: str
    key: str  # request level: "ttft_s" | "itl_s" | "e2e_s"; run level: a key of RunData.run
    q: float | str | None  # a request-level figure's quantile, or "mean"; None: run level
    better: str | None  # "lower" | "higher" | None (no direction: reported as lower/higher)
    unit: str = ""


FIGURES: tuple[Figure, ...] = (
    Figure("TTFT p50", "ttft_s", 0.5, "lower", "s"),
    Figure("TTFT p90", "ttft_s", 0.9, "lower", "s"),
    Figure("TTFT p99", "ttft_s", 0.99, "lower", "s"),
    Figure("TPOT (mean ITL)", "itl_s", "mean", "lower", "s"),
    Figure("ITL p50", "itl_s", 0.5, "lower", "s"),
    Figure("ITL p99", "itl_s", 0.99, "lower", "s"),
    Figure("E2E p50", "e2e_s", 0.5, "lower", "s"),
    Figure("E2E p90", "e2e_s", 0.9, "lower", "s"),
    Figure("E2E p99", "e2e_s", 0.99, "lower", "s"),
    Figure("throughput", "throughput_rps", None, "higher", "req/s"),
    Figure("output tokens/s", "throughput_tok_s", None, "higher", "tok/s"),
    Figure("goodput", "goodput_rps", None, "higher", "req/s"),
    Figure("makespan", "makespan_s", None, "lower", "s"),
    Figure("engine steps", "engine_steps", None, None),
    Figure("actual distinct experts/layer/step", "distinct_experts", None, None),
    Figure("actual imbalance max/mean", "imbalance", None, None),
)
BY_NAME = {f.name: f for f in FIGURES}


@dataclass
class RunData:
    """What the bootstrap reads of one valid run: per completed request, its TTFT, E2E and
    inter-token gaps; per run, the run-level figures (None where the run has no value)."""

    ttft_s: np.ndarray
    e2e_s: np.ndarray
    itl_s: list[np.ndarray]
    run: dict[str, float | None]

    @classmethod
    def from_samples(cls, samples: Sequence[dict], run: dict[str, float | None]) -> RunData:
        ok = [s for s in samples if s.get("error") is None]
        if not ok:
            raise ValueError("a run without a completed request has no latency to compare")
        return cls(
            np.array([s["ttft_s"] for s in ok], dtype=float),
            np.array([s["e2e_s"] for s in ok], dtype=float),
            [np.asarray(s["itl_s"], dtype=float) for s in ok],
            dict(run),
        )


@dataclass(frozen=True)
class Interval:
    point: float | None  # the ratio on all runs and requests
    lo: float | None
    hi: float | None
    runs: int  # pairs of runs it rests on

    @property
    def excludes_one(self) -> bool:
        return self.lo is not None and (self.lo > 1.0 or self.hi < 1.0)

    def to_json(self) -> dict:
        return {"ratio": self.point, "lo": self.lo, "hi": self.hi, "runs": self.runs}


class _Pooled:
    """One arm's values of one request-level key over its runs, sorted once, with the global
    index of the request each value belongs to."""

    def __init__(self, runs: Sequence[RunData], key: str) -> None:
        vals, owner = [], []
        self.sizes = np.array([len(r.ttft_s) for r in runs])
        self.first = np.concatenate([[0], np.cumsum(self.sizes)[:-1]])
        for i, r in enumerate(runs):
            per = getattr(r, key)
            if key == "itl_s":
                lens = np.array([len(g) for g in per])
                vals.append(np.concatenate(per) if len(per) else np.zeros(0))
                owner.append(np.repeat(self.first[i] + np.arange(len(per)), lens))
            else:
                vals.append(per)
                owner.append(self.first[i] + np.arange(len(per)))
        v, o = np.concatenate(vals), np.concatenate(owner)
        order = np.argsort(v, kind="stable")
        self.values, self.owner = v[order], o[order]

    def quantiles(self, weights: np.ndarray, qs: Sequence[float | str]) -> list[float | None]:
        """Nearest-rank quantiles (or, for ``"mean"``, the mean) of the values, each counted
        ``weights[its request]`` times."""
        w = weights[self.owner]
        cum = np.cumsum(w)
        total = cum[-1] if len(cum) else 0
        if total <= 0:
            return [None for _ in qs]
        return [
            float(np.dot(w, self.values) / total)
            if q == "mean"
            else float(self.values[np.searchsorted(cum, max(1, math.ceil(q * total)))])
            for q in qs
        ]

    def weights(self, rep_counts: np.ndarray, rng: np.random.Generator | None) -> np.ndarray:
        """A request weight vector: all ones (rng None), or each run drawn ``rep_counts`` times and
        its requests resampled with replacement in every draw."""
        if rng is None:
            return np.ones(int(self.sizes.sum()))
        return np.concatenate(
            [
                rng.multinomial(n * c, np.full(n, 1.0 / n)) if c else np.zeros(n, dtype=np.int64)
                for n, c in zip(self.sizes, rep_counts)
            ]
        )


def _run_mean(runs: Sequence[RunData], key: str, rep_counts: np.ndarray) -> float | None:
    vals = [r.run.get(key) for r in runs]
    if any(v is None for v in vals) or rep_counts.sum() == 0:
        return None
    return float(np.dot(rep_counts, vals) / rep_counts.sum())


def _ratio(a: float | None, b: float | None) -> float | None:
    return b / a if a is not None and b is not None and a != 0 else None


def compare(
    base: Sequence[RunData],
    arm: Sequence[RunData],
    figures: Sequence[Figure] = FIGURES,
    draws: int = 1000,
    seed: int = 0,
) -> dict[str, Interval]:
    """Arm / base ratio of every figure with its bootstrap interval; ``base[i]`` and ``arm[i]``
    are the same repetition (the same schedule). With a single pair, only the requests are
    resampled: the interval then leaves out run-to-run noise (see :func:`verdict`)."""
    if len(base) != len(arm) or not base:
        raise ValueError("compare needs the same number (≥ 1) of paired runs on both sides")
    n = len(base)
    keys = sorted({f.key for f in figures if f.q is not None})
    pooled = {side: {k: _Pooled(runs, k) for k in keys} for side, runs in (("base", base), ("arm", arm))}
    ones = np.ones(n, dtype=np.int64)

    def stats(rep_counts: np.ndarray, rng: np.random.Generator | None) -> dict[str, float | None]:
        out: dict[str, float | None] = {}
        for side, runs in (("base", base), ("arm", arm)):
            w = pooled[side][keys[0]].weights(rep_counts, rng) if keys else None
            for k in keys:
                fs = [f for f in figures if f.key == k and f.q is not None]
                for f, v in zip(fs, pooled[side][k].quantiles(w, [f.q for f in fs])):
                    out[f"{side}:{f.name}"] = v
            for f in figures:
                if f.q is None:
                    out[f"{side}:{f.name}"] = _run_mean(runs, f.key, rep_counts)
        return {f.name: _ratio(out[f"base:{f.name}"], out[f"arm:{f.name}"]) for f in figures}

    point = stats(ones, None)
    rng = np.random.default_rng(seed)
    total = {f.name: [] for f in figures}  # runs and requests resampled
    within = {f.name: [] for f in figures}  # requests only: the within-run part of the variance
    for _ in range(draws):
        reps = rng.multinomial(n, np.full(n, 1.0 / n)) if n > 1 else ones
        for kept, counts in ((total, reps), (within, ones)):
            for name, r in stats(counts, rng).items():
                if r is not None and r > 0:
                    kept[name].append(r)
    out = {}
    tail = (1.0 - LEVEL) / 2.0 * 100.0
    k = small_sample_factor(n)
    for f in figures:
        d, p = total[f.name], point[f.name]
        lo = hi = None
        if len(d) >= draws // 2 and p is not None and p > 0:
            lo, hi = float(np.percentile(d, tail)), float(np.percentile(d, 100.0 - tail))
            # Only the between-run part of the variance gets the small-sample correction.
            v_total = float(np.var(np.log(d)))
            v_within = float(np.var(np.log(within[f.name]))) if len(within[f.name]) > 1 else 0.0
            between = max(0.0, v_total - v_within)
            widen = math.sqrt((min(v_within, v_total) + k * k * between) / v_total) if v_total > 0 else 1.0
            lo = min(p, math.exp(math.log(p) - widen * (math.log(p) - math.log(lo))))
            hi = max(p, math.exp(math.log(p) + widen * (math.log(hi) - math.log(p))))
        out[f.name] = Interval(p, lo, hi, n)
    return out


def aa_verdict(iv: Interval) -> str:
    """Words for the A/A control's own interval: identical arms should show no difference."""
    if iv.point is None or iv.lo is None:
        return "no value"
    if iv.runs < 2:
        return "not judged (one run per arm)"
    if iv.excludes_one:
        return "A/A differs: the intervals understate this machine's noise for this figure"
    return "no significant difference (as it should be)"


def verdict(fig: Figure, iv: Interval, aa: Interval | None = None) -> str:
    """Words for one interval: better / worse (or lower / higher for a figure without a
    direction) / no significant difference; withheld where the evidence cannot carry one: one
    run per arm, an A/A control whose own interval excludes 1, or a ratio no farther from 1 than
    the A/A control's interval reaches (the noise floor measured in the same session)."""
    if iv.point is None or iv.lo is None:
        return "no value"
    if iv.runs < 2:
        return "not judged (one run per arm: run-to-run noise not sampled)"
    if not iv.excludes_one:
        return "no significant difference"
    if aa is not None and aa.excludes_one:
        return "inconclusive (the A/A control differed too: the interval understates this machine's noise)"
    if aa is not None and aa.lo is not None and aa.lo <= iv.point <= aa.hi:
        return "no significant difference (within the A/A noise floor)"
    lower = iv.hi < 1.0
    if fig.better is None:
        return "lower" if lower else "higher"
    return "better" if lower == (fig.better == "lower") else "worse"


def fmt_interval(iv: Interval) -> str:
    if iv.point is None:
        return "–"
    if iv.lo is None:
        return f"{iv.point:.3f}"
    return f"{iv.point:.3f} [{iv.lo:.3f}–{iv.hi:.3f}]"


def pooled(runs: Sequence[RunData], fig: Figure) -> float | None:
    """A figure over all of an arm's runs: the quantile of their pooled requests, or the mean of
    a run-level value."""
    if not runs:
        return None
    if fig.q is None:
        return _run_mean(runs, fig.key, np.ones(len(runs), dtype=np.int64))
    p = _Pooled(runs, fig.key)
    return p.quantiles(p.weights(np.ones(len(runs), dtype=np.int64), None), [fig.q])[0]
