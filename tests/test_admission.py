"""Admission order and CAPS configuration, without vLLM."""

from __future__ import annotations

import numpy as np
import pytest

from caps_vllm.admission import AdmissionPlanner, Waiting
from caps_vllm.config import CapsConfig

D = 4
VEC = {
    "hot": np.array([4.0, 0, 0, 0]),
    "b": np.array([0, 4.0, 0, 0]),
    "c": np.array([0, 0, 4.0, 0]),
    "d": np.array([0, 0, 0, 4.0]),
}


def waiting(*specs, now=100.0):
    """specs: (name, age_s[, preempted[, priority]]); name's prefix selects the vector."""
    out = []
    for s in specs:
        name, age = s[0], s[1]
        out.append(Waiting(item=name, key=name, arrival=now - age, preempted=len(s) > 2 and s[2],
                           priority=s[3] if len(s) > 3 else 0))
    return out


def vec(name):
    return VEC.get(name.rstrip("0123456789"))


def planner(**kw):
    kw.setdefault("min_batch_trigger", 2)
    kw.setdefault("max_wait_ms", None)
    kw.setdefault("strategy", "greedy_dot_product")
    return AdmissionPlanner(CapsConfig.from_dict(kw), D)


def test_complementary_requests_move_ahead_of_the_hotspot():
    p = planner()
    w = waiting(("hot1", 5), ("hot2", 4), ("hot3", 3), ("b", 2), ("c", 1))
    order = p.plan(w, vec, running_load=np.array([8.0, 0, 0, 0]), free_slots=3, now=100.0)
    assert order[0] == "hot1"  # the oldest always first
    assert order[1:3] == ["b", "c"]  # complements of the running hot expert
    assert sorted(order) == sorted(x.item for x in w)  # nothing lost, nothing duplicated
    assert p.stats.plans == 1 and p.stats.ranked == 3


def test_below_trigger_or_without_free_slots_the_order_is_kept():
    p = planner(min_batch_trigger=4)
    w = waiting(("hot1", 3), ("hot2", 2), ("b", 1))
    assert p.plan(w, vec, np.zeros(D), free_slots=3, now=100.0) is None
    assert p.stats.fcfs_fallback == 1
    w4 = waiting(("hot1", 4), ("hot2", 3), ("hot3", 2), ("b", 1))
    assert p.plan(w4, vec, np.zeros(D), free_slots=0, now=100.0) is None


def test_preempted_stay_first_then_overdue_then_strategy():
    p = planner(max_wait_ms=1500)
    w = waiting(("hot9", 0.5, True), ("hot3", 1), ("hot1", 5), ("hot4", 0.7), ("hot2", 1.8), ("b", 0.5))
    order = p.plan(w, vec, np.zeros(D), free_slots=5, now=100.0)
    # preempted first, then the two waiting > 1.5 s, then the strategy: its oldest, a complement
    assert order == ["hot9", "hot1", "hot2", "hot3", "b", "hot4"]
    assert p.stats.bypassed == 2
    # One slot left after the rules: only the max-wait reordering happens.
    assert p.plan(w, vec, np.zeros(D), free_slots=3, now=100.0) == ["hot9", "hot1", "hot2", "hot3", "hot4", "b"]


def test_requests_without_a_vector_keep_their_fcfs_position():
    p = planner()
    w = waiting(("hot1", 5), ("x", 4), ("hot2", 3), ("b", 2))
    order = p.plan(w, vec, np.array([8.0, 0, 0, 0]), free_slots=2, now=100.0)
    assert order == ["hot1", "x", "b", "hot2"]
    assert p.stats.no_vector == 1


def test_priority_group_is_reordered_alone():
    p = planner()
    w = waiting(("hot1", 5, False, 0), ("hot2", 4, False, 0), ("b", 3, False, 0), ("c", 9, False, 1))
    order = p.plan(w, vec, np.array([8.0, 0, 0, 0]), free_slots=2, now=100.0, by_priority=True)
    assert order == ["hot1", "b", "hot2", "c"]  # the priority-1 request stays behind


def test_window_limits_the_choice():
    p = planner(window_size=2)
    w = waiting(("hot1", 5), ("hot2", 4), ("b", 3))
    order = p.plan(w, vec, np.array([8.0, 0, 0, 0]), free_slots=2, now=100.0)
    assert order == ["hot1", "hot2", "b"]  # b is outside the window of 2


def test_pairwise_cache_forgets_requests_that_left():
    p = planner()
    p.plan(waiting(("hot1", 5), ("b", 4), ("c", 3)), vec, np.zeros(D), free_slots=2, now=100.0)
    assert len(p.pairs) == 3
    p.plan(waiting(("c", 3), ("d", 1), ("b5", 0.5)), vec, np.zeros(D), free_slots=2, now=100.0)
    assert len(p.pairs) == 3 and "hot1" not in p.pairs


def test_no_decision_when_everyone_fits():
    p = planner()
    w = waiting(("hot1", 5), ("hot2", 4), ("b", 3))
    assert p.plan(w, vec, np.array([8.0, 0, 0, 0]), free_slots=3, now=100.0) is None
    assert p.stats.plans == 0


def test_config_defaults_and_errors():
    cfg = CapsConfig.from_dict(None)
    assert cfg.strategy == "step_cost" and cfg.vectors == "per_token"
    for bad, field in [
        ({"strategy": "nope"}, "caps.strategy"),
        ({"window_size": 0}, "caps.window_size"),
        ({"window_size": True}, "caps.window_size"),
        ({"min_batch_trigger": -1}, "caps.min_batch_trigger"),
        ({"max_wait_ms": 0}, "caps.max_wait_ms"),
        ({"vectors": "raw"}, "caps.vectors"),
        ({"predictor": "yes"}, "caps.predictor"),
        ({"strategy": "power_of_d", "strategy_params": {"sample": 0}}, "sample"),
        ({"windowsize": 3}, "unknown CAPS option"),
    ]:
        with pytest.raises(ValueError, match=field):
            CapsConfig.from_dict(bad)
    with pytest.raises(ValueError, match="must be an object"):
        CapsConfig.from_dict([1])
