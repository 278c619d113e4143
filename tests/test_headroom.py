"""The real-data headroom figures on hand-made routing files."""

from __future__ import annotations

import numpy as np
import pytest

from sim.headroom import ceiling, greedy
from sim.routing_replay import EsftReplay


def test_the_token_id_ceiling_is_the_best_tables_recall(tmp_path):
    # olmoe (top-8 of 64) at layer 0: token 5 always to experts 0-7 (80 assignments); token 6 to
    # experts 0-7 30 times and 8-15 10 times each: its best 8 catch 240 of 320.
    rows = [(5, 0, e, 10) for e in range(8)] + [(6, 0, e, 30) for e in range(8)] + [(6, 0, e, 10) for e in range(8, 16)]
    rows += [(5, lay, e, 1) for lay in (1, 2) for e in range(8)]
    np.savez(tmp_path / "s.npz", olmoe_arxiv_token_expert=np.array(rows), olmoe_arxiv_expert_counts=np.zeros((3, 64)))
    got = {c["layer"]: c for c in ceiling(tmp_path / "s.npz")}
    assert got[0]["ceiling_recall"] == pytest.approx((80 + 240) / (80 + 320)) and got[0]["chance"] == 8 / 64
    assert got[7]["ceiling_recall"] == 1.0 and got[0]["token_ids"] == 2


def test_greedy_picks_the_tokens_that_add_fewest_experts(tmp_path):
    arrays = {}
    for d in ("a", "b"):
        arrays[f"{d}_experts"] = np.zeros((4, 2, 2), dtype=np.uint8)
        arrays[f"{d}_seq_lens"] = np.array([4])
    np.savez(tmp_path / "r.npz", **arrays)
    rep = EsftReplay(tmp_path / "r.npz")
    rep.experts = 8
    window = np.array([[[0, 1], [0, 1]], [[4, 5], [6, 7]], [[0, 1], [0, 2]], [[0, 1], [0, 1]]])
    picked = greedy(rep, window, 3)
    # after the first (0,1 / 0,1), its twin adds nothing, then the one adding one new pair
    assert picked.tolist() == [window[0].tolist(), window[3].tolist(), window[2].tolist()]
