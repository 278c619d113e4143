"""Admission order and CAPS configuration, without vLLM."""

from __future__ import annotations

import numpy as np
import pytest

from caps_vllm.admission import AdmissionPlanner, Capacity, Waiting, fcfs_admissions
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
        out.append(
            Waiting(
                item=name,
                key=name,
                arrival=now - age,
                preempted=len(s) > 2 and s[2],
                priority=s[3] if len(s) > 3 else 0,
            )
        )
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
    order = p.plan(w, vec, running_load=np.array([8.0, 0, 0, 0]), capacity=3, now=100.0)
    assert set(order[:3]) == {"b", "c", "hot1"}  # complements of the running hot expert (nobody pinned first)
    assert sorted(order) == sorted(x.item for x in w)  # nothing lost, nothing duplicated
    assert p.stats.plans == 1 and p.stats.ranked == 3 and p.stats.engaged == 1 and p.stats.reordered == 1


def test_one_free_place_is_still_a_choice():
    p = planner()
    order = p.plan(waiting(("hot1", 5), ("hot2", 4), ("b", 3)), vec, np.array([8.0, 0, 0, 0]), capacity=1, now=100.0)
    assert order[0] == "b" and p.passes == {"hot1": 1, "hot2": 1}


def test_below_trigger_or_without_capacity_the_order_is_kept():
    p = planner(min_batch_trigger=4)
    w = waiting(("hot1", 3), ("hot2", 2), ("b", 1))
    assert p.plan(w, vec, np.zeros(D), capacity=1, now=100.0) is None
    assert p.stats.fcfs_fallback == 1
    w4 = waiting(("hot1", 4), ("hot2", 3), ("hot3", 2), ("b", 1))
    assert p.plan(w4, vec, np.zeros(D), capacity=0, now=100.0) is None
    assert p.plan(w4, vec, np.zeros(D), capacity=Capacity(slots=8, tokens=0), now=100.0) is None
    assert p.stats.engaged == 0


def test_fcfs_admissions_follow_vllms_budgets():
    needs = [100, 300, 50, 700]
    assert fcfs_admissions(needs, Capacity(slots=8)) == 4
    assert fcfs_admissions(needs, Capacity(slots=2)) == 2
    assert fcfs_admissions(needs, Capacity(slots=8, tokens=420)) == 3  # the third is a chunk of 20
    assert fcfs_admissions(needs, Capacity(slots=8, tokens=400)) == 2  # no budget left for a third
    assert fcfs_admissions(needs, Capacity(slots=8, tokens=420, chunked=False)) == 2
    assert fcfs_admissions(needs, Capacity(slots=8, kv_tokens=460)) == 3
    assert fcfs_admissions(needs, Capacity(slots=8, kv_tokens=460, block_size=16)) == 2  # 112 + 304 + 64 blocks


def test_the_token_budget_engages_caps_with_free_slots_to_spare():
    """vLLM's defaults: plenty of sequence slots, the token budget is what holds the queue."""
    p = planner()
    w = [Waiting(n, n, 100.0 - a, need=600) for n, a in (("hot1", 5), ("hot2", 4), ("b", 3), ("c", 2))]
    cap = Capacity(slots=256, tokens=1000)  # room for one prompt and a chunk of another
    order = p.plan(w, vec, np.array([8.0, 0, 0, 0]), capacity=cap, now=100.0)
    assert order[:2] == ["b", "c"] and p.stats.engaged == 1
    assert p.plan(w, vec, np.zeros(D), capacity=Capacity(slots=256, tokens=10_000), now=100.0) is None  # all fit


def test_fewer_prompt_tokens_are_taken_only_where_the_slots_bind():
    """Where the sequence slots stop FCFS and both sets fit whole, a shorter complement is the same
    work done later; where the token budget stops FCFS, CAPS never admits less of it."""
    w = [Waiting(n, n, 100.0 - a, need=need) for n, a, need in (("hot1", 5, 300), ("hot2", 4, 300), ("b", 3, 100))]
    p = planner()
    order = p.plan(w, vec, np.array([8.0, 0, 0, 0]), capacity=Capacity(slots=2, tokens=2048), now=100.0)
    assert order[:2] == ["b", "hot1"] or order[:2] == ["hot1", "b"]
    assert p.stats.reordered == 1 and p.stats.kept_fcfs == 0
    p = planner()
    assert p.plan(w, vec, np.array([8.0, 0, 0, 0]), capacity=Capacity(slots=2, tokens=600), now=100.0) is None
    assert p.stats.kept_fcfs == 1  # FCFS fills the 600 tokens; hot1 + b would use 400


def test_preempted_stay_first_then_overdue_then_pinned_then_strategy():
    p = planner(max_wait_ms=1500)
    w = waiting(("hot9", 0.5, True), ("hot3", 1), ("hot1", 5), ("hot4", 0.7), ("hot2", 1.8), ("b", 0.5))
    order = p.plan(w, vec, np.zeros(D), capacity=5, now=100.0)
    # preempted first, then the two waiting > 1.5 s, then the strategy's two picks
    assert order[:3] == ["hot9", "hot1", "hot2"] and "b" in order[3:5]
    assert p.stats.bypassed == 2
    p.passes["hot3"] = p.cfg.max_passes  # passed over too often: ahead of the strategy, after the overdue
    assert p.plan(w, vec, np.zeros(D), capacity=5, now=100.0)[:4] == ["hot9", "hot1", "hot2", "hot3"]


def test_requests_without_a_vector_keep_their_fcfs_position():
    p = planner()
    w = waiting(("hot1", 5), ("x", 4), ("hot2", 3), ("b", 2))
    order = p.plan(w, vec, np.array([8.0, 0, 0, 0]), capacity=2, now=100.0)
    assert order[1] == "x" and order[0] == "b"
    assert p.stats.no_vector == 1


def test_priority_group_is_reordered_alone():
    p = planner()
    w = waiting(("hot1", 5, False, 0), ("hot2", 4, False, 0), ("b", 3, False, 0), ("c", 9, False, 1))
    order = p.plan(w, vec, np.array([8.0, 0, 0, 0]), capacity=2, now=100.0, by_priority=True)
    assert order[0] == "b" and order[-1] == "c"  # the priority-1 request stays behind


def test_window_limits_the_choice():
    p = planner(window_size=1)
    w = waiting(("hot1", 5), ("hot2", 4), ("b", 3))
    order = p.plan(w, vec, np.array([8.0, 0, 0, 0]), capacity=1, now=100.0)
    assert order is None  # one place: the window is hot1 (FCFS's pick) + 1 more, both hot; b is outside


def test_pairwise_cache_forgets_requests_that_left():
    p = planner()
    p.plan(waiting(("hot1", 5), ("b", 4), ("c", 3)), vec, np.zeros(D), capacity=2, now=100.0)
    assert len(p.pairs) == 3
    p.plan(waiting(("c", 3), ("d", 1), ("b5", 0.5)), vec, np.zeros(D), capacity=2, now=100.0)
    assert len(p.pairs) == 3 and "hot1" not in p.pairs


def test_no_decision_when_everyone_fits():
    p = planner()
    w = waiting(("hot1", 5), ("hot2", 4), ("b", 3))
    assert p.plan(w, vec, np.array([8.0, 0, 0, 0]), capacity=3, now=100.0) is None
    assert p.stats.plans == 0


@pytest.mark.parametrize("max_passes", [0, 1, 3])
@pytest.mark.parametrize("seed", range(4))
def test_nobody_is_overtaken_in_more_than_max_passes_steps(max_passes, seed):
    """An adversarial stream (every new request is a complement, the old ones all hot), one
    admission a step: the worst-case number of steps in which a younger request was admitted
    ahead of a waiting one is max_passes."""
    rng = np.random.default_rng(seed)
    p = planner(max_passes=max_passes)
    queue, overtaken, t = [], {}, 0.0
    for step in range(300):
        for _ in range(int(rng.integers(0, 3))):
            t += 1.0
            queue.append(
                Waiting(f"{'hot' if rng.random() < 0.7 else 'bcd'[int(rng.integers(3))]}{step}_{t}", f"r{t}", t)
            )
        if not queue:
            continue
        order = p.plan(queue, lambda n: vec(n.split("_")[0]), np.array([50.0, 0, 0, 0]), capacity=1, now=t)
        items = order if order is not None else [w.item for w in queue]
        by_item = {w.item: w for w in queue}
        admitted = by_item[items[0]]
        for w in queue:
            if w is not admitted and w.arrival < admitted.arrival:
                overtaken[w.key] = overtaken.get(w.key, 0) + 1
        queue = [by_item[i] for i in items[1:]]
    assert max(overtaken.values(), default=0) <= max_passes
    if max_passes:
        assert max(overtaken.values(), default=0) == max_passes  # the bound is reached: CAPS did choose


def test_config_defaults_and_errors():
    cfg = CapsConfig.from_dict(None)
    assert (
        cfg.strategy == "step_cost" and cfg.vectors == "per_token" and cfg.max_passes == 4 and cfg.max_wait_ms is None
    )
    for bad, field in [
        ({"strategy": "nope"}, "caps.strategy"),
        ({"window_size": 0}, "caps.window_size"),
        ({"window_size": True}, "caps.window_size"),
        ({"min_batch_trigger": -1}, "caps.min_batch_trigger"),
        ({"max_passes": -1}, "caps.max_passes"),
        ({"max_wait_ms": 0}, "caps.max_wait_ms"),
        ({"vectors": "raw"}, "caps.vectors"),
        ({"predictor": "yes"}, "caps.predictor"),
        ({"strategy": "power_of_d", "strategy_params": {"sample": 0}}, "sample"),
        ({"windowsize": 3}, "unknown CAPS option"),
        ({"blas_threads": 0}, "caps.blas_threads"),
        ({"blas_threads": 1.5}, "caps.blas_threads"),
    ]:
        with pytest.raises(ValueError, match=field):
            CapsConfig.from_dict(bad)
    with pytest.raises(ValueError, match="must be an object"):
        CapsConfig.from_dict([1])
    assert cfg.blas_threads == 1 and CapsConfig.from_dict({"blas_threads": None}).blas_threads is None


def test_numpy_blas_threads_are_set_in_the_library_numpy_loaded():
    import ctypes

    from caps_vllm.blas import limit_threads

    path = limit_threads(2)
    if path is None:
        pytest.skip("this numpy has no OpenBLAS of its own")
    lib = ctypes.CDLL(path)
    get = next(
        getattr(lib, n)
        for n in (
            "scipy_openblas_get_num_threads64_",
            "scipy_openblas_get_num_threads",
            "openblas_get_num_threads64_",
            "openblas_get_num_threads",
        )
        if hasattr(lib, n)
    )
    assert get() == 2
    assert limit_threads(1) == path and get() == 1


def test_step_cost_keeps_fcfs_unless_its_pick_gains_more_than_min_gain():
    # one device: a request on the experts already read is cheaper than one that adds new experts
    w = waiting(("b", 5), ("c", 4), ("hot1", 3))
    running = np.array([8.0, 0, 0, 0])
    p = planner(strategy="step_cost")
    order = p.plan(w, vec, running, capacity=1, now=100.0)
    assert order[0] == "hot1" and p.stats.kept_fcfs == 0  # affinity, ahead of two older requests
    strict = planner(strategy="step_cost", min_gain=1.0)
    assert strict.plan(w, vec, running, capacity=1, now=100.0) is None  # the gain is below the bar: FCFS
    assert strict.stats.kept_fcfs == 1 and strict.stats.plans == 1
    for bad in (-1, 1.5, True):
        with pytest.raises(ValueError, match="caps.min_gain"):
            CapsConfig.from_dict({"min_gain": bad})


def test_step_cost_does_not_choose_where_no_choice_can_gain_min_gain():
    """Every candidate brings the same arithmetic (per-token vectors: equal mass); on a load that
    already reads every expert no choice can save weight reads, so FCFS is kept without a pick.
    With experts left unread the same window is chosen from (the bound is not too eager)."""
    p = planner(strategy="step_cost")
    calls = []
    select = p.strategy.select
    p.strategy.select = lambda *a, **k: calls.append(1) or select(*a, **k)
    w = waiting(("hot1", 5), ("b", 4), ("c", 3), ("d", 2))
    saturated = np.full(D, 50.0)
    assert p.plan(w, vec, saturated, capacity=2, now=100.0) is None
    assert calls == [] and p.stats.kept_fcfs == 1 and p.stats.plans == 1
    # FCFS's hot1 rides on the hot expert, read anyway: nothing can beat it, still no pick
    assert p.plan(w, vec, np.array([8.0, 0, 0, 0]), capacity=1, now=100.0) is None and calls == []
    order = p.plan(waiting(("b", 5), ("hot1", 4), ("c", 3)), vec, np.array([8.0, 0, 0, 0]), capacity=1, now=100.0)
    assert calls == [1] and order[0] == "hot1"  # b would read a new expert: affinity


def test_running_load_sums_and_weights_by_shared_steps():
    from caps_vllm.running_load import RunningLoad

    run = RunningLoad(D, slots=4)
    for i in range(40):  # past the first allocation: rows are reused and grown
        run.add(f"r{i}", np.full(D, 1.0))
    for i in range(30):
        run.remove(f"r{i}")
    run.add("r39", np.full(D, 9.0))  # already running: ignored
    run.add("hot", VEC["hot"])
    run.add("none", None)  # no prediction: no load
    run.remove("never-added")
    assert len(run) == 12 and "none" in run
    keys = ["hot", "none", *(f"r{i}" for i in range(30, 40))]
    asked = []
    rows = run.sync(keys, lambda i: asked.append(i))
    np.testing.assert_allclose(run.shared(rows, [], 0.0), np.full(D, 10.0) + VEC["hot"])  # no horizon: the sum
    assert asked == [] and len(set(rows.tolist())) == 12
    # "hot" finishes in 25 of a 100-step horizon; the others outlast it
    shared = run.shared(rows, [25, 7, *[500] * 10], 100.0)
    np.testing.assert_allclose(shared, np.full(D, 10.0) + 0.25 * VEC["hot"])
    np.testing.assert_allclose(run.shared(rows, [-3, 0, *[500] * 10], 100.0), np.full(D, 10.0))  # done: weight 0
    # the running set moves on: "hot" and r30 finish, "new" starts; only the newcomer's vector is asked for
    keys = ["new", "none", *(f"r{i}" for i in range(31, 40))]
    rows = run.sync(keys, lambda i: asked.append(keys[i]) or np.full(D, 2.0))
    assert asked == ["new"] and len(run) == 11 and "hot" not in run and "r30" not in run
    np.testing.assert_allclose(run.shared(rows, [], 0.0), np.full(D, 9.0 + 2.0))
    np.testing.assert_allclose(run.shared(rows, [50, 1, *[100] * 9], 100.0), np.full(D, 9.0 + 1.0))


def test_running_load_rows_filled_later_give_the_same_sums():
    """The scheduler adds a joining request's row at once and its vector when a choice needs it:
    its weighted sums equal those of rows added with their vectors."""
    from caps_vllm.running_load import RunningLoad

    rng = np.random.default_rng(0)
    vecs = {f"r{i}": rng.random(D) for i in range(6)}
    eager, lazy = RunningLoad(D, slots=2), RunningLoad(D, slots=2)
    for rid, v in vecs.items():
        eager.add(rid, v)
        lazy.add(rid, None)
    lazy.remove("r1")
    eager.remove("r1")
    for rid, v in vecs.items():
        if rid in lazy:
            lazy.fill(rid, v)
    lazy.fill("r2", 2 * vecs["r2"])  # a row filled again takes the new vector
    eager.remove("r2")
    eager.add("r2", 2 * vecs["r2"])
    assert sorted(lazy.keys()) == sorted(eager.keys())
    for run in (eager, lazy):
        assert sorted(run.rows().tolist()) == sorted(run.sync(sorted(run.keys()), None).tolist())
    left = {rid: 10 * i for i, rid in enumerate(sorted(eager.keys()))}
    for horizon in (25.0, 0.0):
        got = [run.shared(run.sync(list(left), None), list(left.values()), horizon) for run in (eager, lazy)]
        np.testing.assert_allclose(got[0], got[1], rtol=1e-6)
    np.testing.assert_allclose(
        got[0], sum(2 * v if rid == "r2" else v for rid, v in vecs.items() if rid != "r1"), rtol=1e-6
    )


def test_running_load_keeps_each_rows_end_step_for_the_steps_left():
    from caps_vllm.running_load import RunningLoad

    run = RunningLoad(D, slots=2)
    keys = ["a", "b", "c"]
    rows = run.sync(keys, lambda i: np.full(D, 1.0), lambda i: [10, 3, 200][i], now=5)
    np.testing.assert_array_equal(run.steps_left(rows, 5), [10, 3, 200])
    np.testing.assert_array_equal(run.steps_left(rows, 9), [6, -1, 196])  # one token a step since
    run.refresh("b", 40, now=9)  # read again (it started plain decode late)
    run.refresh("gone", 1, now=9)  # no row: nothing
    np.testing.assert_array_equal(run.steps_left(rows, 10), [5, 39, 195])
    np.testing.assert_allclose(run.shared(rows, run.steps_left(rows, 10), 50.0), np.full(D, 0.1 + 0.78 + 1.0))
    run.remove("a")
    rows = run.sync(["b", "c", "d"], lambda i: None, lambda i: 7, now=10)  # "d" takes a's row, with its own end
    np.testing.assert_array_equal(run.steps_left(rows, 10), [39, 195, 7])


def test_the_guard_falls_back_to_fcfs_while_reorderings_lose_on_the_real_routing():
    from caps_vllm.guard import FcfsGuard

    p = planner(strategy="step_cost")
    p.guard = g = FcfsGuard(p.strategy.cost, unit_mass=4.0, window=16)
    running = np.array([8.0, 0, 0, 0])

    def rounds(n, start, truth_of_b, truth_of_hot):
        for i in range(start, start + n):
            order = p.plan(waiting((f"b{i}", 5), (f"hot{i}", 3)), vec, running, capacity=1, now=100.0)
            yield order
            g.routed(f"b{i}", truth_of_b / 2, prompt_done=False)  # a first chunk
            g.routed(f"b{i}", truth_of_b / 2, prompt_done=True)
            g.routed(f"hot{i}", truth_of_hot, prompt_done=True)

    # the predictor says "hot" shares the running experts and "b" does not; the model routes them the other way
    wrong = (VEC["hot"], VEC["c"])
    orders = list(rounds(15, 0, *wrong))
    assert all(o[0].startswith("hot") for o in orders) and not g.tripped and g.resolved == 15
    list(rounds(1, 15, *wrong))
    assert g.tripped and p.stats.guard_fallback == 0 and not g.wants("b3")  # resolved keys are forgotten
    # in the shadow: FCFS order, while the choices go on being scored (now the prediction is right)
    orders = list(rounds(16, 16, VEC["b"], VEC["hot"]))
    assert orders[:-1] == [None] * 15 and p.stats.guard_fallback == 16 and not g.tripped
    assert p.plan(waiting(("b99", 5), ("hot99", 3)), vec, running, capacity=1, now=100.0)[0] == "hot99"
    assert not p.passes.get("b0")  # passed-over counts come from what was applied, not the shadow
    for i in range(600):  # decisions whose requests are never routed expire instead of piling up
        g.decided([f"x{i}"], [f"y{i}"], running, 1.0)
    assert len(g.pending) == g.max_pending and g.expired > 0


def test_caps_changes_which_requests_are_admitted_not_how_many_nor_how_much():
    """Two long prompts, two short ones the strategy prefers, three slots and 1024 tokens: FCFS
    admits 2 (800 + a 224-token chunk); the short ones first would admit 3 and fill only 820,
    one short one first 3 (10 + 800 + a 214 chunk, vLLM's test_schedule_order): both kept FCFS."""

    def with_needs(*specs):
        return [Waiting(n, n, 100.0 - age, need=need) for n, age, need in specs]

    w = with_needs(("hot1", 4, 800), ("hot2", 3, 800), ("b", 2, 10), ("c", 1, 10))
    p = planner()
    running = np.array([8.0, 0, 0, 0])
    assert p.plan(w, vec, running, Capacity(slots=3, tokens=1024), now=100.0) is None
    assert p.stats.kept_fcfs == 1 and p.stats.plans == 1
    w2 = with_needs(("hot1", 4, 800), ("b", 3, 10), ("hot2", 2, 800), ("c", 1, 10))
    assert p.plan(w2, vec, running, Capacity(slots=3, tokens=1024), now=100.0) is None and p.stats.kept_fcfs == 2
    w = with_needs(("hot1", 4, 10), ("hot2", 3, 10), ("b", 2, 10), ("c", 1, 10))  # the same budget either way
    assert set(p.plan(w, vec, running, Capacity(slots=3, tokens=1024), now=100.0)[:3]) == {"hot1", "b", "c"}


def test_step_cost_skips_the_choice_when_fcfs_adds_less_than_min_gain(monkeypatch):
    """A choice can gain at most what FCFS's admissions add to the step: within min_gain, FCFS is
    kept without asking the strategy (the same decision, for less work)."""
    p = planner(strategy="step_cost", min_gain=0.5)
    monkeypatch.setattr(p.strategy, "select", lambda *a, **k: pytest.fail("no choice to make"))
    w = waiting(("b", 5), ("c", 4), ("hot1", 3))
    assert p.plan(w, vec, np.array([50.0, 50.0, 50.0, 50.0]), capacity=1, now=100.0) is None
    assert p.stats.kept_fcfs == 1 and p.stats.plans == 1


def test_a_steps_admission_counts_are_the_change_since_its_start():
    from dataclasses import replace

    from caps_vllm.admission import AdmissionStats

    st = AdmissionStats(engaged=3, plans=2, ranked=7, last_selection_s=0.5)
    before = replace(st)
    st.engaged, st.plans, st.ranked, st.kept_fcfs, st.last_selection_s = 4, 2, 7, 1, 0.25
    d = st.since(before)
    assert (d.engaged, d.plans, d.ranked, d.kept_fcfs, d.reordered) == (1, 0, 0, 1, 0)
    assert d.last_selection_s == 0.25 and before.engaged == 3  # the copy is untouched
