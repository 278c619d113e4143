"""Selection time per strategy: printed figures, not a test.

Sizes (W, B, d): (32, 8, 60), the prototype's window, (32, 8, 1440), the live default window
on Qwen1.5-MoE (24 layers x 60 experts, cached path), and (256, 64, 1440), a deep queue there. Three paths are timed for the large size:
  checked  - select() validating its input (what an arbitrary caller gets),
  trusted  - vectors validated once on arrival (checked=True), Gram computed per pick,
  cached   - trusted + what PairwiseCache keeps per request (the live path): the window's Gram
             matrix, and step_cost's touched probabilities (Strategy.row_terms).
The median of repeated calls is reported (machines are noisy).

    python tests/benchmarks/bench_strategies.py [--repeat N]
"""

from __future__ import annotations

import argparse
import statistics
import time

import numpy as np

from caps_vllm.strategies import STRATEGIES, PairwiseCache, make_strategy


def median_ms(fn, repeat: int) -> float:
    fn()
    times = []
    for _ in range(repeat):
        t0 = time.perf_counter()
        fn()
        times.append(time.perf_counter() - t0)
    return statistics.median(times) * 1e3


def paired_ms(fn, base, repeat: int) -> tuple[float, float]:
    """Medians of ``fn`` and ``base`` timed alternately, call by call (the machine's speed drifts
    more between two separate loops than between two neighbouring calls)."""
    fn(), base()
    a, b = [], []
    for _ in range(repeat):
        for f, out in ((fn, a), (base, b)):
            t0 = time.perf_counter()
            f()
            out.append(time.perf_counter() - t0)
    return statistics.median(a) * 1e3, statistics.median(b) * 1e3


def problem(w: int, d: int, seed: int = 0) -> tuple[np.ndarray, np.ndarray]:
    """Topic-skewed integer expert counts, like the simulator's."""
    rng = np.random.default_rng(seed)
    topics = rng.dirichlet(np.full(d, 0.5), size=8)
    cands = np.array([rng.multinomial(400, topics[rng.integers(8)]) for _ in range(w)], dtype=np.float64)
    running = np.array(rng.multinomial(4000, topics[0]), dtype=np.float64)
    return running, cands


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--repeat", type=int, default=200)
    a = ap.parse_args()
    sizes = [(32, 8, 60), (256, 64, 1440)]
    probs = {s: problem(s[0], s[2]) for s in sizes}
    cache = PairwiseCache(d=1440)
    running, cands = probs[(256, 64, 1440)]
    t0 = time.perf_counter()
    for i, v in enumerate(cands):
        cache.add(i, v)
    add_ms = (time.perf_counter() - t0) * 1e3 / len(cands)
    _, gram = cache.window(list(range(len(cands))))
    window_ms = median_ms(lambda: cache.window(list(range(len(cands)))), a.repeat)

    print(
        f"{'strategy':20s} {'(32,8,60)':>12s} {'(32,8,1440) cached':>19s} {'(256,64,1440) checked':>22s} {'trusted':>10s} "
        f"{'cached':>10s}   (ms, median)"
    )
    rows = {}
    for name in STRATEGIES:
        row = []
        r, c = probs[(32, 8, 60)]
        row.append(median_ms(lambda: make_strategy(name).select(r, c, 8), a.repeat))
        s = make_strategy(name)
        terms = s.row_terms(cands) if s.row_terms is not None else None
        small = None if terms is None else terms[:32]
        row.append(
            median_ms(
                lambda: s.select(running, cands[:32], 8, gram=gram[:32, :32], checked=True, terms=small), a.repeat
            )
        )
        row.append(median_ms(lambda: s.select(running, cands, 64), max(10, a.repeat // 10)))
        row.append(median_ms(lambda: s.select(running, cands, 64, checked=True), max(10, a.repeat // 10)))
        row.append(median_ms(lambda: s.select(running, cands, 64, gram=gram, checked=True, terms=terms), a.repeat))
        rows[name] = row
        print(f"{name:20s} {row[0]:12.3f} {row[1]:19.3f} {row[2]:22.3f} {row[3]:10.3f} {row[4]:10.3f}")
    g, sc = make_strategy("greedy_dot_product"), make_strategy("step_cost")
    terms = sc.row_terms(cands)
    for size, w, b, reps in (("(256, 64, 1440)", 256, 64, max(10, a.repeat // 4)), ("(32, 8, 1440)", 32, 8, a.repeat)):
        caps, base = paired_ms(
            lambda: sc.select(running, cands[:w], b, gram=gram[:w, :w], checked=True, terms=terms[:w]),
            lambda: g.select(running, cands[:w], b, checked=True),
            reps,
        )
        print(
            f"target step_cost (live path) <= 1.5x one uncached greedy_dot_product selection at {size}, timed "
            f"alternately: {caps:.3f} ms / {base:.3f} ms = {caps / base:.2f}x -> {'met' if caps <= 1.5 * base else 'NOT met'}"
        )
    print(f"PairwiseCache.add per arrival at n<=256, d=1440: {add_ms:.3f} ms; window(256) gather: {window_ms:.3f} ms")
    cached = median_ms(lambda: g.select(running, cands, 64, gram=gram, checked=True), a.repeat)
    print(
        f"target greedy_dot_product <= 0.2 ms at (256, 64, 1440), cached path: {cached:.3f} ms -> {'met' if cached <= 0.2 else 'NOT met'}"
    )


if __name__ == "__main__":
    main()
