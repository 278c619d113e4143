"""The router dry-run predictor against transformers' own router modules on the same weights."""

from __future__ import annotations

import json
import logging

import numpy as np
import pytest

torch = pytest.importorskip("torch")
transformers = pytest.importorskip("transformers")

from caps_vllm.predictor import (  # noqa: E402
    ExpertPredictor,
    PredictorUnavailable,
    build_table,
    fingerprint,
    load_or_build_table,
    router_spec,
    table_path,
)

COMMON = dict(
    vocab_size=300,
    hidden_size=32,
    intermediate_size=64,
    num_attention_heads=4,
    num_key_value_heads=2,
    max_position_embeddings=128,
    tie_word_embeddings=False,
)


def _qwen2(tf):
    return tf.Qwen2MoeConfig(
        **COMMON,
        num_hidden_layers=4,
        num_experts=12,
        num_experts_per_tok=3,
        moe_intermediate_size=16,
        shared_expert_intermediate_size=16,
        decoder_sparse_step=1,
        mlp_only_layers=[1],
    )


def _qwen3(tf):
    return tf.Qwen3MoeConfig(
        **COMMON,
        num_hidden_layers=3,
        num_experts=10,
        num_experts_per_tok=2,
        moe_intermediate_size=16,
        decoder_sparse_step=1,
        mlp_only_layers=[],
        head_dim=8,
    )


def _mixtral(tf):
    return tf.MixtralConfig(**COMMON, num_hidden_layers=2, num_local_experts=8, num_experts_per_tok=2)


def _deepseek_v2(tf):
    return tf.DeepseekV2Config(
        **COMMON,
        num_hidden_layers=3,
        n_routed_experts=16,
        num_experts_per_tok=3,
        moe_intermediate_size=16,
        n_shared_experts=1,
        first_k_dense_replace=1,
        topk_method="group_limited_greedy",
        n_group=4,
        topk_group=2,
        kv_lora_rank=8,
        q_lora_rank=None,
        qk_rope_head_dim=4,
        qk_nope_head_dim=4,
        v_head_dim=8,
    )


def _deepseek_v3(tf):
    return tf.DeepseekV3Config(
        **COMMON,
        num_hidden_layers=3,
        n_routed_experts=16,
        num_experts_per_tok=3,
        moe_intermediate_size=16,
        n_shared_experts=1,
        first_k_dense_replace=1,
        n_group=4,
        topk_group=2,
        kv_lora_rank=8,
        q_lora_rank=16,
        qk_rope_head_dim=4,
        qk_nope_head_dim=4,
        v_head_dim=8,
    )


FAMILIES = {
    "qwen2_moe": (_qwen2, "Qwen2MoeForCausalLM"),
    "qwen3_moe": (_qwen3, "Qwen3MoeForCausalLM"),
    "mixtral": (_mixtral, "MixtralForCausalLM"),
    "deepseek_v2": (_deepseek_v2, "DeepseekV2ForCausalLM"),
    "deepseek_v3": (_deepseek_v3, "DeepseekV3ForCausalLM"),
}


def _save(family, path, seed=0):
    make_cfg, cls = FAMILIES[family]
    torch.manual_seed(seed)
    model = getattr(transformers, cls)(make_cfg(transformers)).float().eval()
    for layer in model.model.layers:  # random norms and correction biases, so they matter
        with torch.no_grad():
            layer.post_attention_layernorm.weight.uniform_(0.5, 1.5)
            gate = getattr(layer.mlp, "gate", None)
            if gate is not None and hasattr(gate, "e_score_correction_bias"):
                gate.e_score_correction_bias.uniform_(-0.05, 0.05)
    model.save_pretrained(path, safe_serialization=True)
    return model


def _reference(model, spec, vocab):
    """Top-k expert sets per token from transformers' modules: embed -> norm -> router."""
    ids = torch.arange(vocab)
    out = np.zeros((vocab, len(spec.moe_layers), spec.top_k), dtype=np.int64)
    with torch.no_grad():
        emb = model.model.embed_tokens(ids)
        for n, i in enumerate(spec.moe_layers):
            layer = model.model.layers[i]
            _, _, idx = layer.mlp.gate(layer.post_attention_layernorm(emb))
            out[:, n] = idx.numpy()
    return np.sort(out, axis=-1)


@pytest.mark.parametrize("family", sorted(FAMILIES))
def test_table_matches_transformers_router(family, tmp_path):
    model = _save(family, tmp_path)
    config = json.loads((tmp_path / "config.json").read_text())
    spec = router_spec(config)
    expect_layers = {
        "qwen2_moe": (0, 2, 3),
        "qwen3_moe": (0, 1, 2),
        "mixtral": (0, 1),
        "deepseek_v2": (1, 2),
        "deepseek_v3": (1, 2),
    }[family]
    assert spec.moe_layers == expect_layers
    table = build_table(tmp_path, spec, chunk=64)
    np.testing.assert_array_equal(
        np.sort(table.astype(np.int64), axis=-1), _reference(model, spec, config["vocab_size"])
    )


def test_request_vector_is_per_layer_expert_counts(tmp_path, caplog):
    _save("qwen2_moe", tmp_path)
    with caplog.at_level(logging.INFO, logger="caps_vllm.predictor"):
        pred = ExpertPredictor.from_model(str(tmp_path), cache_dir=tmp_path / "cache")
    assert any("layer 3/3" in r.message for r in caplog.records), "building the table logs progress"
    assert (pred.vocab, pred.layers, pred.top_k, pred.d) == (300, 3, 3, 36)
    ids = [5, 7, 5, 299]
    v = pred.vector(ids)
    per_layer = v.reshape(3, 12)
    np.testing.assert_array_equal(per_layer.sum(axis=1), [12, 12, 12])  # 4 tokens x top-3 per layer
    table = np.load(next((tmp_path / "cache").glob("router_table-*.npy")))
    expect = np.zeros((3, 12))
    for t in ids:
        for layer in range(3):
            expect[layer, table[t, layer]] += 1
    np.testing.assert_array_equal(per_layer, expect)
    np.testing.assert_allclose(pred.vector(ids, per_token=True), v / 4)


def test_bad_tokens_and_empty_prompts(tmp_path):
    _save("qwen2_moe", tmp_path)
    pred = ExpertPredictor.from_model(str(tmp_path), cache_dir=tmp_path / "cache")
    assert pred.vector([]) is None
    assert pred.vector([300, 1000, -1]) is None  # only ids beyond the table (added tokens)
    assert pred.unknown_tokens == 3
    v = pred.vector([1, 300])
    assert v.sum() == 3 * 3 and pred.unknown_tokens == 4


def test_table_is_cached_on_disk(tmp_path, caplog):
    _save("qwen2_moe", tmp_path)
    spec = router_spec(json.loads((tmp_path / "config.json").read_text()))
    first = load_or_build_table(tmp_path, spec, cache_dir=tmp_path / "c")
    with caplog.at_level(logging.INFO, logger="caps_vllm.predictor"):
        again = load_or_build_table(tmp_path, spec, cache_dir=tmp_path / "c")
    assert any("loaded from" in r.message for r in caplog.records)
    np.testing.assert_array_equal(first, again)
    # A different revision is a different key.
    load_or_build_table(tmp_path, spec, revision="abc", cache_dir=tmp_path / "c")
    assert len(list((tmp_path / "c").glob("router_table-*.npy"))) == 2
    # A cached table naming experts the model lacks is rebuilt, never counted out of bounds.
    path = table_path(tmp_path, fingerprint(tmp_path), tmp_path / "c")
    bad = first.copy()
    bad[0, 0, 0] = spec.num_experts
    np.save(path, bad)
    with caplog.at_level(logging.WARNING, logger="caps_vllm.predictor"):
        np.testing.assert_array_equal(load_or_build_table(tmp_path, spec, cache_dir=tmp_path / "c"), first)
    assert any("unreadable" in r.message and "outside" in r.message for r in caplog.records)


def test_models_without_routers_are_refused_clearly(tmp_path):
    with pytest.raises(PredictorUnavailable, match="not a Mixture-of-Experts model CAPS knows"):
        router_spec({"model_type": "llama", "num_hidden_layers": 2})
    with pytest.raises(PredictorUnavailable, match="no MoE layers"):
        router_spec({"model_type": "qwen2_moe", "num_hidden_layers": 2, "num_experts": 0, "num_experts_per_tok": 2})
    _save("qwen2_moe", tmp_path)
    from safetensors.torch import load_file, save_file

    weights = load_file(tmp_path / "model.safetensors")
    del weights["model.layers.2.mlp.gate.weight"]
    save_file(weights, tmp_path / "model.safetensors")
    with pytest.raises(PredictorUnavailable, match="model.layers.2.mlp.gate.weight"):
        ExpertPredictor.from_model(str(tmp_path), cache_dir=tmp_path / "cache")
    with pytest.raises(PredictorUnavailable, match="cannot find"):
        ExpertPredictor.from_model("nobody/no-such-model", cache_dir=tmp_path / "cache")
