"""Expert-affinity dispatch (caps_vllm.dispatch), without vLLM."""

from __future__ import annotations

import numpy as np
import pytest

from caps_vllm.dispatch import AffinityDispatcher
from caps_vllm.step_cost import StepCostModel

COST = StepCostModel(fixed_ms=0.0, weight_ms=5.0, token_ms=0.1, form="roofline")  # memory bound below 50 tokens
A, B = np.array([2.0, 2.0, 0, 0]), np.array([0, 0, 2.0, 2.0])  # two kinds on disjoint experts


def test_a_request_goes_where_its_experts_are_already_read():
    d = AffinityDispatcher(2, 4, COST, margin=8)
    d.started("a0", 0, 4 * A)
    d.started("b0", 1, 4 * B)
    assert d.choose(A).replica == 0 and d.choose(B).replica == 1
    d.finished("a0")  # replica 0 is empty again: an A request now costs the same anywhere but B's
    assert d.choose(A).replica == 0 and d.in_flight.tolist() == [0, 1]
    np.testing.assert_allclose(d.load[0], 0.0)
    assert d.choose(None).replica == 0  # no prediction: the least loaded


def test_the_load_guard_overrides_affinity_and_counts_it():
    d = AffinityDispatcher(2, 4, COST, margin=2, balance_ms=0.0)  # affinity alone
    for i in range(3):
        d.started(f"a{i}", 0, A)
    c = d.choose(A)
    assert c.replica == 1 and c.overridden and d.overrides == 1  # 3 > 0 + 2 in flight: not a candidate
    d.finished("a2")
    assert d.choose(A).replica == 0 and d.overrides == 1


def test_the_load_term_and_ties():
    d = AffinityDispatcher(3, 4, COST, margin=100, balance_ms=1e3)  # a heavy price per request in flight
    d.started("a0", 0, A)
    assert d.choose(A).replica == 1  # affinity loses to the load term; a tie between 1 and 2 goes to the first
    d.started("x", 1, None)
    assert d.choose(A).replica == 2


def test_bad_input():
    with pytest.raises(ValueError, match="replicas"):
        AffinityDispatcher(0, 4, COST)
    with pytest.raises(ValueError, match="margin"):
        AffinityDispatcher(2, 4, COST, margin=-1)
    d = AffinityDispatcher(2, 4, COST)
    d.started("a", 0, A)
    with pytest.raises(ValueError, match="already in flight"):
        d.started("a", 1, A)
    d.finished("never-started")  # ignored: nothing to release
    assert d.in_flight.tolist() == [1, 0]
    np.testing.assert_allclose(d.distinct_experts(1), [-2 * np.expm1(-2.0), 0.0])


def test_the_tpot_objective_prices_the_requests_already_there_and_does_not_herd():
    step = AffinityDispatcher(2, 4, COST, margin=100, balance_ms=0.0)  # the marginal step cost alone
    tpot = AffinityDispatcher(2, 4, COST, margin=100, objective="tpot")
    for d in (step, tpot):
        for i in range(4):
            d.started(f"a{i}", 0, A)
    # the marginal step cost is lowest where A's experts are already read, however busy that is;
    # the TPOT objective sees the four requests there that every extra expert read slows down
    assert step.choose(A).replica == 0 and tpot.choose(A).replica == 1
    tpot.started("b0", 1, B)
    tpot.started("b1", 1, B)
    tpot.finished("a3")
    tpot.finished("a2")  # two of each kind on each side: each kind goes home
    assert tpot.choose(A).replica == 0 and tpot.choose(B).replica == 1
    assert tpot.balance_ms == 0.0 and AffinityDispatcher(2, 4, COST).balance_ms == COST.weight_ms
    with pytest.raises(ValueError, match="objective"):
        AffinityDispatcher(2, 4, COST, objective="latency")
