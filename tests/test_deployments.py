"""Step models of offloaded / cached / CPU-computed experts (sim/deployments.py), the topic
routing drawn from OLMoE's statistics (sim/topic_routing.py) and one regime-map cell."""

from __future__ import annotations

import json

import numpy as np
import pytest

from sim.deployments import (
    CARDS,
    HOSTS,
    PCIE,
    CpuExperts,
    ExpertCache,
    Offloaded,
    build,
    expert_bytes_total,
    free_for_experts,
)
from sim.step_time import ModelShape, StepBatch
from tests.servers import ROOT

MODELS = ROOT / "sim" / "models"
OLMOE_STATS = ROOT.parent / "shared" / "data" / "routing" / "olmoe_routing_stats.npz"
QWEN3 = ModelShape.from_config(MODELS / "qwen3-30b-a3b")


def decode(counts: np.ndarray) -> StepBatch:
    tokens = int(counts[0].sum()) // QWEN3.top_k
    return StepBatch(tokens, tokens * 300, counts, decode_requests=tokens)


def counts_touching(distinct: int, layers: int = len(QWEN3.moe_layers)) -> np.ndarray:
    c = np.zeros((layers, QWEN3.experts))
    c[:, :distinct] = 1.0
    return c


def test_offloaded_layers_pay_pcie_per_distinct_expert_and_count_the_bytes():
    card = CARDS["rtx4090"]
    none, half = Offloaded(card, QWEN3, 0), Offloaded.with_share(card, QWEN3, 0.5)
    assert half.offloaded.sum() == len(QWEN3.moe_layers) // 2 and half.offloaded[0] and not half.offloaded[-1]
    a, b = counts_touching(16), counts_touching(32)
    extra = half.seconds(decode(b)) - half.seconds(decode(a)) - (none.seconds(decode(b)) - none.seconds(decode(a)))
    # 16 more distinct experts in each of the 24 offloaded layers, each over PCIe instead of GDDR
    per = QWEN3.expert_bytes / PCIE["gen4"] - QWEN3.expert_bytes / (card.hardware.bandwidth * 0.8)
    assert extra == pytest.approx(16 * 24 * per, rel=1e-6)
    assert half.host_bytes == pytest.approx((16 + 32) * 24 * QWEN3.expert_bytes)
    assert none.host_bytes == 0.0 and none.tallies()["host_bytes_per_step"] == 0.0


@pytest.mark.parametrize("share", [-0.1, 1.5, float("nan"), True])
def test_an_offload_share_outside_0_1_is_refused_by_name(share):
    with pytest.raises(ValueError, match="offload_share"):
        Offloaded.with_share(CARDS["l4"], QWEN3, share)


def test_the_card_is_sized_what_does_not_fit_is_offloaded_and_what_cannot_run_is_refused():
    vocab = 151936
    off = build("offload", "rtx4090", QWEN3, vocab, 2**30)
    over = expert_bytes_total(QWEN3) - free_for_experts(CARDS["rtx4090"], QWEN3, vocab, 2**30)
    per_layer = QWEN3.experts * QWEN3.expert_bytes
    assert 0.5 < off.offload_share < 1.0
    assert over <= off.offload_gib * 2**30 < over + per_layer  # what exceeds the card, rounded up to a layer
    with pytest.raises(ValueError, match="routed experts do not fit in HBM"):
        build("hbm", "rtx4090", QWEN3, vocab, 2**30)
    v3 = ModelShape.from_config(MODELS / "deepseek-v3-like")
    with pytest.raises(ValueError, match="non-expert weights and KV cache need"):
        build("cpu-experts", "l4", v3, 129280, 2**30)
    with pytest.raises(ValueError, match="card 'a100'"):
        build("offload", "a100", QWEN3, vocab, 2**30)
    with pytest.raises(ValueError, match="deployment kind"):
        build("nvme", "l4", QWEN3, vocab, 2**30)


def test_a_config_without_moe_layers_is_refused(tmp_path):
    (tmp_path / "config.json").write_text(
        json.dumps({"model_type": "llama", "hidden_size": 64, "num_hidden_layers": 2, "vocab_size": 10})
    )
    with pytest.raises(ValueError, match="no MoE layers"):
        ModelShape.from_config(tmp_path)


@pytest.mark.parametrize("slots", [0, QWEN3.experts + 1])
def test_a_cache_larger_than_the_experts_or_empty_is_refused(slots):
    with pytest.raises(ValueError, match="cache_slots"):
        ExpertCache(CARDS["l4"], QWEN3, slots)


def one_layer(*experts: int) -> np.ndarray:
    c = np.zeros((len(QWEN3.moe_layers), QWEN3.experts))
    c[0, list(experts)] = 1.0
    return c


@pytest.mark.parametrize("policy,kept", [("lru", 1), ("lfru", 0)])
def test_the_cache_hits_what_it_holds_and_evicts_by_its_policy(policy, kept):
    cache = ExpertCache(CARDS["l4"], QWEN3, slots=2, policy=policy)
    for need in ((0,), (0,), (0,), (1,), (2,)):  # 0 used often long ago, 1 once recently; 2 needs a slot
        cache.moe_seconds(one_layer(*need))
        cache.steps += 1
    assert set(np.nonzero(cache.resident[0])[0]) == {kept, 2}  # LRU drops 0 (oldest), LFRU drops 1 (rarest)
    assert (cache.hits, cache.lookups) == (2, 5)
    hit = cache.moe_seconds(one_layer(2))
    miss = cache.moe_seconds(one_layer(3)) - hit
    assert miss == pytest.approx(QWEN3.expert_bytes / PCIE["gen4"], rel=1e-6)  # a miss crosses PCIe, a hit not


def test_cpu_experts_cost_their_dram_reads():
    cpu = CpuExperts(CARDS["rtx4090"], QWEN3, HOSTS["epyc-9654"])
    a, b = cpu.moe_seconds(counts_touching(8)), cpu.moe_seconds(counts_touching(16))
    bw = cpu.host.bandwidth * cpu.host.bandwidth_efficiency
    assert b - a == pytest.approx(8 * len(QWEN3.moe_layers) * QWEN3.expert_bytes / bw, rel=1e-6)


@pytest.mark.skipif(not OLMOE_STATS.exists(), reason="../shared routing statistics not present")
def test_topic_tokens_route_like_olmoe_and_keep_their_topic():
    from sim.topic_routing import TopicTokens

    r = TopicTokens(OLMOE_STATS, layers=48, experts=128, top_k=8, seed=0)
    r.bind("a", "github", 40, 60, key=1)
    rows = r.rows("a", 0, 100)
    assert rows.shape == (100, 48, 8) and rows.min() >= 0 and rows.max() < 128
    assert all(len(set(t)) == 8 for t in rows.reshape(-1, 8))  # top-k: distinct experts per token and layer
    again = TopicTokens(OLMOE_STATS, layers=48, experts=128, top_k=8, seed=0)
    again.bind("a", "github", 40, 60, key=1)
    assert np.array_equal(again.rows("a", 0, 100), rows)  # seeded: every arm sees the same routing
    # A batch of one topic touches fewer experts than a mixed one (the locality CAPS uses)
    small = TopicTokens(OLMOE_STATS, layers=16, experts=64, top_k=8, seed=0)
    one, mixed = [], []
    for k in range(40):
        doms = ["arxiv"] * 8 if k % 2 else [small.domains[i % 4] for i in range(8)]
        for i, d in enumerate(doms):
            small.bind(f"{k}-{i}", d, 1, 1, key=k * 10 + i)
        c = small.counts([(f"{k}-{i}", 1, 1) for i in range(8)])
        (one if k % 2 else mixed).append((c > 0).sum(axis=1).mean())
    assert np.mean(one) < 0.97 * np.mean(mixed)
    # the prompt predicts the decode tokens' routing through the topic only
    assert r.vector("a", decode=False, output_tokens=60).sum() == pytest.approx(48 * 8)


@pytest.mark.vllm
@pytest.mark.skipif(not OLMOE_STATS.exists(), reason="../shared routing statistics not present")
def test_a_regime_map_cell_serves_every_request_in_every_arm(tmp_path):
    pytest.importorskip("vllm")
    from sim.regime_map import run_model
    from sim.regime_report import summarize_cell

    traffic = [("offline", 0.0), ("poisson", 1.2)]
    kinds = ("offload", "cache-lru")
    doc = run_model("olmoe-1b-7b", [4], traffic, 0, tmp_path, log=lambda s: None, kinds=kinds, requests=24)
    run = [c for c in doc["cells"] if "arms" in c]
    refused = [c for c in doc["cells"] if "refused" in c]
    assert [c["deployment"] for c in run] == ["cache-lru", "cache-lru"]
    assert [c["deployment"] for c in refused] == ["offload"] and "nothing to offload" in refused[0]["refused"][-1]
    for c in run:
        assert c["requests"] == 24 and all(a["requests"] == 24 for a in c["arms"].values())
        assert 0 < c["arms"]["fcfs"]["cache_hit_rate"] < 1 and c["arms"]["fcfs"]["host_bytes_per_step"] > 0
        x = summarize_cell(c)
        assert np.isfinite(x["headroom"]) and np.isfinite(x["caps_gain"])
    poisson = [c for c in run if c["traffic"] == "poisson"]
    assert all(c["rate_rps"] == pytest.approx(1.2 * c["capacity_rps"]) for c in poisson)
    assert json.loads((tmp_path / "olmoe-1b-7b.json").read_text())["cells"]


def test_the_gpu_measurement_script_dry_runs_on_the_cpu(tmp_path):
    """The script a lent GPU runs (tests/benchmarks/gpu_expert_reads.py), at a toy shape on the CPU."""
    from tests.benchmarks.gpu_expert_reads import main

    out = tmp_path / "reads.json"
    assert (
        main(
            [
                "--device",
                "cpu",
                "--shapes",
                "tiny",
                "--experts",
                "4",
                "--distinct",
                "1",
                "2",
                "4",
                "--tokens",
                "1",
                "2",
                "--repeats",
                "2",
                "--out",
                str(out),
            ]
        )
        == 0
    )
    doc = json.loads(out.read_text())["shapes"]["tiny"]
    assert [r["distinct"] for r in doc["rows"]] == [1, 2, 4]
    assert all(r["bytes"] == r["distinct"] * 3 * 64 * 32 * 2 and "gemm_t2_s" in r for r in doc["rows"])
    assert doc["fit_h2d"] is not None and doc["fit_uva"] is None  # no GPU: no in-place reads


@pytest.mark.vllm
@pytest.mark.skipif(not OLMOE_STATS.exists(), reason="../shared routing statistics not present")
def test_dispatch_policies_serve_every_request_once_across_replicas_each_with_its_own_cache():
    pytest.importorskip("vllm")
    from sim.dispatch_study import run_policy
    from sim.regime_map import ROOT as SIM_ROOT
    from sim.regime_map import kv_bytes, prompt_lengths, routing_for, workload
    from sim.twin import Deployment

    model_dir = SIM_ROOT / "sim" / "models" / "olmoe-1b-7b"
    shape = ModelShape.from_config(model_dir)
    routing = routing_for("olmoe-1b-7b", shape, 0)
    w = workload(routing, "poisson", 24, 2.0, 0, prompt_lengths(routing.domains), 50304)
    kv = kv_bytes(shape, 4)
    d = Deployment(4, 2048, int(kv // (shape.kv_bytes_per_token * 16)), max_model_len=4096)
    made = []

    def make():
        made.append(ExpertCache(CARDS["l4"], shape, 16))
        return made[-1]

    for policy in ("least_loaded", "domain_oracle_tight"):
        made.clear()
        r = run_policy(policy, w.requests, routing, make, d, model_dir, 2)
        assert r["requests"] == 24 and sum(r["per_replica_requests"]) == 24
        assert len(made) == 2 and all(m.lookups > 0 for m in made)  # each replica stepped its own cache
        assert 0 < r["cache_hit_rate"] < 1
