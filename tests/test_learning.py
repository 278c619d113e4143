"""The learning predictor on a synthetic model whose routing is a known token table.

A "model" routes token t at layer l to TRUE[t, l] (its top-k), except for a share of noisy
choices; the dry-run prior is a different random table. The learning table must converge to
the true table, never hold more tokens than its bound, resume from its persisted state, and
fall back to the prior when that state belongs to another model.
"""

from __future__ import annotations

import logging

import numpy as np
import pytest

from caps_vllm.learned_table import LearnedTable, topk_hits
from caps_vllm.learner import OnlineLearner
from caps_vllm.predictor import ExpertPredictor
from caps_vllm.routing import RoutingRecord

VOCAB, LAYERS, EXPERTS, K = 300, 3, 16, 2


def _table(seed: int) -> np.ndarray:
    rng = np.random.default_rng(seed)
    rows = [[rng.choice(EXPERTS, K, replace=False) for _ in range(LAYERS)] for _ in range(VOCAB)]
    return np.stack(rows).astype(np.uint8)


TRUE, PRIOR = _table(1), _table(2)


def _route(ids: np.ndarray, rng, noise: float = 0.2) -> np.ndarray:
    """The synthetic model: the true table, with a share of choices replaced by random experts."""
    rows = TRUE[ids].astype(np.int64).copy()
    flip = rng.random(rows.shape) < noise
    rows[flip] = rng.integers(0, EXPERTS, int(flip.sum()))
    return rows


def _zipf_ids(rng, n: int) -> np.ndarray:
    p = 1.0 / np.arange(1, VOCAB + 1)
    return rng.choice(VOCAB, n, p=p / p.sum())


def _recall(table: np.ndarray, ids: np.ndarray, rows: np.ndarray) -> float:
    return float(topk_hits(table, ids, rows).mean())


def test_converges_to_the_true_table_and_its_recall_climbs():
    rng = np.random.default_rng(0)
    lt = LearnedTable(PRIOR, EXPERTS, max_tokens=VOCAB, half_life_tokens=1e6)
    test_ids = _zipf_ids(rng, 5000)
    test_rows = _route(test_ids, rng)
    ceiling = _recall(TRUE, test_ids, test_rows)
    assert _recall(lt.table, test_ids, test_rows) < 0.3  # the prior is another table
    first = None
    for batch in range(60):
        ids = _zipf_ids(rng, 256)
        lt.observe(ids, _route(ids, rng))
        if batch == 0:
            first = lt.recall.learned_hits / lt.recall.picks
    assert _recall(lt.table, test_ids, test_rows) >= 0.95 * ceiling
    seen = np.flatnonzero(lt.slot >= 0)
    assert (np.sort(lt.table[seen], axis=2) == np.sort(TRUE[seen], axis=2)).mean() > 0.95
    unseen = np.flatnonzero(lt.slot < 0)
    assert (lt.table[unseen] == PRIOR[unseen]).all()  # never seen: the dry run's prediction
    # prequential recall (scored before learning) climbs above the prior's
    assert lt.recall.learned_hits / lt.recall.picks > first
    assert lt.recall.learned_hits > 2 * lt.recall.prior_hits


def test_never_grows_past_its_bound():
    rng = np.random.default_rng(3)
    lt = LearnedTable(PRIOR, EXPERTS, max_tokens=40)
    nbytes = lt.bytes
    for _ in range(50):
        ids = rng.integers(0, VOCAB, 128)
        lt.observe(ids, _route(ids, rng))
        assert lt.used <= 40 and (lt.slot >= 0).sum() == lt.used
        assert sorted(lt.owner[lt.owner >= 0]) == sorted(np.flatnonzero(lt.slot >= 0))
    assert lt.bytes == nbytes and lt.evicted > 0
    evicted = np.flatnonzero(lt.slot < 0)
    assert (lt.table[evicted] == PRIOR[evicted]).all()  # an evicted token is predicted by the prior again


def test_decay_lets_new_routing_replace_old():
    lt = LearnedTable(PRIOR, EXPERTS, max_tokens=VOCAB, half_life_tokens=200)
    ids = np.zeros(100, dtype=np.int64)
    old = np.tile(np.array([[0, 1]] * LAYERS), (100, 1, 1))
    new = np.tile(np.array([[2, 3]] * LAYERS), (100, 1, 1))
    for _ in range(5):
        lt.observe(ids, old)
    assert sorted(lt.table[0, 0]) == [0, 1]
    for _ in range(5):  # as many rows again, but more recent: they outweigh the old ones
        lt.observe(ids, new)
    assert sorted(lt.table[0, 0]) == [2, 3]


def test_bad_rows_are_refused_and_unknown_tokens_skipped():
    lt = LearnedTable(PRIOR, EXPERTS)
    with pytest.raises(ValueError, match="rows must be"):
        lt.observe(np.array([1, 2]), np.zeros((2, LAYERS, K + 1)))
    assert lt.observe(np.array([-1, VOCAB]), np.zeros((2, LAYERS, K), dtype=np.int64)).size == 0
    assert lt.rows_learned == 0


def _predictor(tmp_path, fingerprint="model-a") -> ExpertPredictor:
    return ExpertPredictor(PRIOR, EXPERTS, fingerprint=fingerprint, learned_path=tmp_path / "learned.npz")


def _serve(learner: OnlineLearner, rng, requests: int) -> None:
    """Requests whose prompts' routing comes back in records, as the scheduler hands them over."""
    prompts = {}
    for i in range(requests):
        ids = _zipf_ids(rng, 40)
        rid = f"r{i}"
        prompts[rid] = ids
        rec = RoutingRecord(tuple(range(LAYERS)), np.zeros((LAYERS, EXPERTS)), len(ids))
        rec.prompt_rows[rid] = _route(ids[10:], rng)  # a chunk from position 10 on
        rec.prompt_start[rid] = 10
        learner.observe(rec, prompts.get)


def test_online_learner_feeds_the_predictor_and_survives_a_restart(tmp_path):
    rng = np.random.default_rng(5)
    pred = _predictor(tmp_path)
    learner = OnlineLearner(pred, max_tokens=VOCAB, half_life_tokens=1e6)  # learns on its own thread
    assert not learner.resumed
    ids = np.arange(VOCAB)
    before = pred.vector(ids)
    _serve(learner, rng, 300)
    learner.flush()
    assert learner.table.rows_learned == 300 * 30 and learner.dropped_rows == 0
    learned = learner.table.table.copy()
    after = pred.vector(ids)
    assert not np.array_equal(before, after)
    # the predictor predicts exactly what the learning table holds
    assert np.array_equal(after, ExpertPredictor(learned, EXPERTS).vector(ids))
    learner.close()
    assert (tmp_path / "learned.npz").exists()

    pred2 = _predictor(tmp_path)
    learner2 = OnlineLearner(pred2, max_tokens=VOCAB, half_life_tokens=1e6, background=False)
    assert learner2.resumed and learner2.table.rows_learned == learner.table.rows_learned
    assert np.array_equal(learner2.table.table, learned)
    assert np.array_equal(pred2.vector(ids), after)


def test_a_state_of_another_model_falls_back_to_the_dry_run(tmp_path, caplog):
    rng = np.random.default_rng(6)
    learner = OnlineLearner(_predictor(tmp_path, "model-a"), max_tokens=VOCAB, half_life_tokens=1e6, background=False)
    _serve(learner, rng, 100)
    learner.close()
    other = _predictor(tmp_path, "model-b")  # same path, another model's fingerprint
    with caplog.at_level(logging.WARNING, logger="caps_vllm.learned_table"):
        learner_b = OnlineLearner(other, max_tokens=VOCAB, half_life_tokens=1e6)
    assert not learner_b.resumed and "another model" in caplog.text
    ids = np.arange(VOCAB)
    assert np.array_equal(other.vector(ids), ExpertPredictor(PRIOR, EXPERTS).vector(ids))
    (tmp_path / "learned.npz").write_bytes(b"not a numpy file")
    with caplog.at_level(logging.WARNING, logger="caps_vllm.learned_table"):
        assert not OnlineLearner(_predictor(tmp_path), max_tokens=VOCAB, half_life_tokens=1e6).resumed
    assert "unreadable" in caplog.text


def test_the_step_thread_only_queues_and_a_full_queue_drops_rows(tmp_path):
    rng = np.random.default_rng(8)
    learner = OnlineLearner(_predictor(tmp_path), max_tokens=VOCAB, half_life_tokens=1e6, queue_rows=50)
    with learner._cv:  # the learning thread cannot take the queue meanwhile
        for _ in range(3):
            _serve(learner, rng, 1)  # 30 rows each: the second and third do not fit
        assert learner._queued == 30 and learner.dropped_rows == 60
    learner.flush()
    assert learner.table.rows_learned == 30
    recall = learner.observe(RoutingRecord((0,), np.zeros((LAYERS, EXPERTS)), 0), {}.get)
    assert recall.picks == 30 * LAYERS * K  # reported to the metrics once, on the next step
    assert learner.observe(RoutingRecord((0,), np.zeros((LAYERS, EXPERTS)), 0), {}.get).picks == 0
    learner.close()


def test_a_smaller_bound_resumes_the_heaviest_tokens(tmp_path):
    rng = np.random.default_rng(7)
    learner = OnlineLearner(_predictor(tmp_path), max_tokens=VOCAB, half_life_tokens=1e6, background=False)
    _serve(learner, rng, 200)
    learner.close()
    small = OnlineLearner(_predictor(tmp_path), max_tokens=20, half_life_tokens=1e6)
    assert small.resumed and small.table.used == 20
    heaviest = learner.table.owner[np.argsort(-learner.table.mass)[:20]]
    assert set(small.table.owner[small.table.owner >= 0]) == set(heaviest)


def test_the_ceiling_is_the_best_token_table_and_exact_for_deterministic_routing():
    from sim.predictor_study import ceiling_table, token_recall

    rng = np.random.default_rng(9)
    ids = _zipf_ids(rng, 4000)
    exact = TRUE[ids].astype(np.int64)
    table, recall = ceiling_table(ids, exact, VOCAB, EXPERTS)
    assert np.allclose(recall, 1.0) and np.allclose(token_recall(table, ids, exact), 1.0)
    noisy = _route(ids, rng)
    table, recall = ceiling_table(ids, noisy, VOCAB, EXPERTS)
    assert np.allclose(token_recall(table, ids, noisy), recall)
    for other in (TRUE, PRIOR):  # no token-id table does better in-sample
        assert (token_recall(other, ids, noisy) <= recall + 1e-12).all()
    assert (token_recall(PRIOR, ids, noisy) < 0.3).all()


def test_jensen_shannon_divergence_in_bits():
    from sim.model_study import js

    p = np.array([1.0, 1, 0, 0])
    assert js(p, p) == 0 and js(p, np.array([0, 0, 1.0, 1])) == pytest.approx(1.0)
    assert 0 < js(p, np.array([1.0, 1, 1, 1])) < 1
