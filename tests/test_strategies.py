"""The strategy contract, the prototype's equivalences, and bad input."""

from __future__ import annotations

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st
from hypothesis.extra.numpy import arrays

from caps_vllm.strategies import STRATEGIES, PairwiseCache, make_strategy

NAMES = sorted(STRATEGIES)


@st.composite
def problems(draw, max_w=24, max_d=12):
    d = draw(st.integers(1, max_d))
    w = draw(st.integers(0, max_w))
    values = st.integers(0, 9).map(float)
    cands = draw(arrays(np.float64, (w, d), elements=values))
    running = draw(arrays(np.float64, (d,), elements=values))
    slots = draw(st.integers(0, max_w + 3))
    return running, cands, slots


@pytest.mark.parametrize("name", NAMES)
@settings(max_examples=60, deadline=None)
@given(problem=problems(), seed=st.integers(0, 2**16))
def test_contract(name, problem, seed):
    running, cands, slots = problem
    picks = make_strategy(name, seed=seed).select(running, cands, slots)
    w = cands.shape[0]
    assert len(picks) == min(slots, w), "work conserving: no slot left empty while candidates wait"
    assert len(set(picks)) == len(picks)
    assert all(isinstance(i, int) and 0 <= i < w for i in picks)
    if min(slots, w) > 0:
        assert picks[0] == 0, "the oldest candidate is always admitted first"


@pytest.mark.parametrize("name", NAMES)
def test_deterministic_for_a_seed(name):
    rng = np.random.default_rng(7)
    calls = [(rng.integers(0, 9, 6).astype(float), rng.integers(0, 9, (20, 6)).astype(float), 5) for _ in range(10)]
    a, b = make_strategy(name, seed=3), make_strategy(name, seed=3)
    assert [a.select(*c) for c in calls] == [b.select(*c) for c in calls]


def _naive_objective(name, load, v, target):
    x = load + v
    return {
        "greedy_variance": np.var(x),
        "greedy_dot_product": v @ load,
        "norm_minimizing": x @ x,
        "best_fit": (x - target) @ (x - target),
        "differencing": v @ (load - load.mean()),
    }[name]


@pytest.mark.parametrize(
    "name", ["greedy_variance", "greedy_dot_product", "norm_minimizing", "best_fit", "differencing"]
)
@pytest.mark.parametrize("use_gram", [False, True])
@settings(max_examples=40, deadline=None)
@given(problem=problems(max_w=16, max_d=8))
def test_incremental_greedy_matches_recomputation(name, use_gram, problem):
    """Each incremental pick is a minimiser of the objective recomputed from scratch."""
    running, cands, slots = problem
    gram = cands @ cands.T if use_gram else None
    picks = make_strategy(name).select(running, cands, slots, gram=gram)
    if not picks:
        return
    b = len(picks)
    target = (running.sum() + b * cands.sum(axis=1).mean()) / cands.shape[1]
    load = running + cands[0]
    for j in picks[1:]:
        rest = [i for i in range(cands.shape[0]) if i not in picks[: picks.index(j)]]
        scores = [_naive_objective(name, load, cands[i], target) for i in rest]
        assert _naive_objective(name, load, cands[j], target) == pytest.approx(min(scores), rel=1e-9, abs=1e-9)
        load = load + cands[j]


def test_variance_norm_and_dot_agree_on_equal_mass_equal_norm_vectors():
    """The prototype's equivalence, on permutations of one vector (equal mass and norm)."""
    rng = np.random.default_rng(0)
    base = np.array([5.0, 3, 2, 1, 1, 0, 0, 0, 0, 0, 0, 0])
    for _ in range(50):
        cands = np.array([rng.permutation(base) for _ in range(24)])
        running = rng.integers(0, 4, base.size).astype(float)
        got = {
            n: make_strategy(n).select(running, cands, 8)
            for n in ("greedy_variance", "norm_minimizing", "greedy_dot_product")
        }
        assert got["greedy_variance"] == got["norm_minimizing"] == got["greedy_dot_product"]


def test_variance_and_norm_agree_on_equal_mass_but_dot_need_not():
    rng = np.random.default_rng(1)
    for _ in range(50):
        cands = rng.dirichlet(np.ones(10), size=20) * 40  # every row has mass 40
        running = rng.random(10) * 20
        assert make_strategy("greedy_variance").select(running, cands, 6) == make_strategy("norm_minimizing").select(
            running, cands, 6
        )
    # Equal mass, unequal norm: dot product prefers the concentrated vector, L2 norm the spread one.
    running = np.array([1.0, 1.0, 1.0, 1.0])
    cands = np.array([[1.0, 1, 1, 1], [4.0, 0, 0, 0], [1.0, 1, 1, 1]])
    assert make_strategy("greedy_dot_product").select(running * 0, cands, 2) == [0, 1]
    assert make_strategy("norm_minimizing").select(running * 0, cands, 2) == [0, 2]


def test_greedy_complements_the_running_load():
    running = np.array([10.0, 0, 0, 0])
    cands = np.array([[1.0, 1, 0, 0], [5.0, 0, 0, 0], [0, 0, 5.0, 0], [0, 0, 0, 5.0]])
    assert make_strategy("greedy_dot_product").select(running, cands, 3) == [0, 2, 3]
    assert make_strategy("fcfs").select(running, cands, 3) == [0, 1, 2]
    assert make_strategy("lpt").select(running, cands, 2) == [0, 1]


def test_karmarkar_karp_admits_the_oldest_group_of_at_most_b():
    mass = np.array([9.0, 1, 8, 2, 7, 3, 6, 4, 5, 5])
    cands = np.stack([mass, np.zeros_like(mass)], axis=1)
    picks = make_strategy("karmarkar_karp").select(np.zeros(2), cands, 5)
    assert picks[0] == 0 and len(picks) == 5
    assert sum(mass[picks]) == pytest.approx(mass.sum() / 2)  # a perfect 2-way split exists and is found
    # 7 candidates, 3 slots: groups of at most 3 (k = 3), the oldest's group topped up by age.
    picks = make_strategy("karmarkar_karp").select(np.zeros(2), cands[:7], 3)
    assert picks[0] == 0 and len(picks) == 3


def test_lpt_balanced_stays_in_the_heavy_shortlist():
    rng = np.random.default_rng(2)
    cands = rng.integers(1, 9, (30, 6)).astype(float)
    picks = make_strategy("lpt_balanced").select(np.zeros(6), cands, 4)
    mass = cands.sum(axis=1)
    shortlist = set(np.argsort(-mass[1:], kind="stable")[:6] + 1) | {0}
    assert set(picks) <= shortlist


@pytest.mark.parametrize("name", NAMES)
def test_edge_cases_pick_sensibly(name):
    s = make_strategy(name)
    assert s.select(np.zeros(4), np.zeros((0, 4)), 3) == []
    assert s.select(np.zeros(4), np.ones((5, 4)), 0) == []
    few = s.select(np.zeros(4), np.ones((3, 4)), 8)  # W < B
    assert few[0] == 0 and sorted(few) == [0, 1, 2]
    zeros = s.select(np.zeros(4), np.zeros((6, 4)), 3)  # all-zero loads
    assert zeros[0] == 0 and len(set(zeros)) == len(zeros)


def test_all_zero_vectors_fall_back_to_age_order():
    for name in ("greedy_variance", "greedy_dot_product", "norm_minimizing", "best_fit", "differencing"):
        assert make_strategy(name).select(np.zeros(3), np.zeros((6, 3)), 4) == [0, 1, 2, 3]


def test_unknown_strategy_lists_valid_names():
    with pytest.raises(ValueError) as exc:
        make_strategy("gredy_dot")
    for name in NAMES:
        assert name in str(exc.value)


@pytest.mark.parametrize("bad", [np.nan, np.inf, -1.0])
@pytest.mark.parametrize("where", ["running", "candidates"])
def test_bad_loads_raise(bad, where):
    running, cands = np.ones(4), np.ones((5, 4))
    (running if where == "running" else cands[2])[1] = bad
    with pytest.raises(ValueError, match="finite and >= 0"):
        make_strategy("greedy_dot_product").select(running, cands, 3)


def test_shape_and_slot_errors():
    s = make_strategy("fcfs")
    with pytest.raises(ValueError, match="length"):
        s.select(np.ones(4), np.ones((5, 3)), 2)
    with pytest.raises(ValueError, match="slots"):
        s.select(np.ones(4), np.ones((5, 4)), -1)
    with pytest.raises(ValueError, match="gram"):
        make_strategy("greedy_variance").select(np.ones(4), np.ones((5, 4)), 2, gram=np.ones((4, 4)))
    with pytest.raises(ValueError, match="sample"):
        make_strategy("power_of_d", sample=0)


@pytest.mark.parametrize("gram", [True, False])
def test_pairwise_cache_tracks_the_gram_matrix(gram):
    rng = np.random.default_rng(3)
    cache = PairwiseCache(d=5, capacity=2, terms=make_strategy("step_cost").row_terms, gram=gram)
    vecs = {k: rng.integers(0, 7, 5).astype(float) for k in range(12)}
    for k, v in vecs.items():
        cache.add(k, v)
    for k in (3, 0, 11, 7):
        cache.remove(k)
        del vecs[k]
    cache.remove("absent")
    cache.add(5, vecs[5] + 1)  # re-adding replaces
    vecs[5] = vecs[5] + 1
    keys = [8, 1, 5, 10, 2]
    v, g = cache.window(keys)
    expect = np.array([vecs[k] for k in keys])
    np.testing.assert_array_equal(v, expect)
    np.testing.assert_array_equal(cache.terms(keys), -np.expm1(-expect))
    if gram:
        np.testing.assert_allclose(g, expect @ expect.T)
    else:
        assert g is None  # not kept: step_cost never reads it
    assert len(cache) == len(vecs) and 5 in cache and 3 not in cache
    with pytest.raises(ValueError):
        cache.add("nan", np.full(5, np.nan))
    with pytest.raises(ValueError):
        cache.add("short", np.ones(4))


def test_step_cost_picks_the_same_from_terms_kept_per_request():
    """The live path hands step_cost its touched probabilities from the PairwiseCache (computed
    once per request, kept through removals and growth): the picks equal those it computes itself."""
    rng = np.random.default_rng(5)
    s = make_strategy("step_cost")
    assert s.row_terms is not None and make_strategy("greedy_dot_product").row_terms is None
    cache = PairwiseCache(d=12, capacity=2, terms=s.row_terms)
    vecs = {k: rng.gamma(0.3, 1.0, 12) * (rng.random(12) < 0.5) for k in range(20)}
    for k, v in vecs.items():
        cache.add(k, v)
    for k in (4, 0, 19):
        cache.remove(k)
    keys = [7, 1, 12, 3, 18, 9, 15, 2]
    cand, _ = cache.window(keys)
    terms = cache.terms(keys)
    np.testing.assert_array_equal(terms, s.row_terms(cand))
    for b in (1, 3, 8):
        running = rng.gamma(0.5, 1.0, 12)
        assert s.select(running, cand, b, terms=terms) == s.select(running, cand, b)
    with pytest.raises(ValueError, match="terms"):
        s.select(np.ones(12), cand, 2, terms=terms[:3])
    assert PairwiseCache(d=12).terms(keys[:0]) is None  # a cache kept without terms
    assert not s.uses_gram and make_strategy("greedy_dot_product").uses_gram and not make_strategy("fcfs").uses_gram


def test_pairwise_cache_batch_add_equals_one_by_one():
    rng = np.random.default_rng(4)
    vecs = rng.integers(0, 5, (9, 6)).astype(float)
    one, many = PairwiseCache(6, capacity=2), PairwiseCache(6, capacity=2)
    for i in range(4):
        one.add(i, vecs[i])
        many.add(i, vecs[i])
    for i in range(4, 9):
        one.add(i, vecs[i])
    many.add_many(list(range(4, 9)), list(vecs[4:]))
    keys = [8, 0, 5, 2]
    for a, b in zip(one.window(keys), many.window(keys)):
        np.testing.assert_allclose(a, b)
    with pytest.raises(ValueError, match="duplicate"):
        many.add_many([1, 1], [vecs[0], vecs[1]])
