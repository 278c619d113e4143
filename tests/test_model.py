"""The embedded trained model: a seeded training script and the shipped weights."""

from __future__ import annotations

import json

import pytest

torch = pytest.importorskip("torch")
pytest.importorskip("transformers")

from caps_vllm.tiny_model import generate, prompt_pool, shipped_dir  # noqa: E402
from caps_vllm.train_tiny import split, train  # noqa: E402


@pytest.fixture(scope="module")
def small_pool(tmp_path_factory):
    path = tmp_path_factory.mktemp("pool") / "pool.jsonl"
    path.write_text("".join(json.dumps({**r, "id": i}) + "\n" for i, r in enumerate(prompt_pool())))
    return path


def _weights(seed: int, pool) -> dict:
    threads = torch.get_num_threads()
    try:
        model, _, report = train(
            pool, None, steps=3, seed=seed, batch=2, seq_len=32, eval_every=100, eval_blocks=2, log=lambda *_: None
        )
    finally:
        torch.set_num_threads(threads)
    assert report["steps"] == 3 and report["held_out_ppl"] < report["held_out_ppl_untrained"] * 2
    return {k: v.detach().clone() for k, v in model.state_dict().items()}


def test_training_gives_the_same_weights_for_the_same_seed(small_pool):
    a, b, c = _weights(0, small_pool), _weights(0, small_pool), _weights(1, small_pool)
    assert a.keys() == b.keys()
    assert all(torch.equal(a[k], b[k]) for k in a)
    assert not all(torch.equal(a[k], c[k]) for k in a)


def test_held_out_prompts_never_train():
    rows = [{"id": i, "prompt": str(i)} for i in range(100)]
    train_rows, held = split(rows)
    assert {r["id"] for r in held} == set(range(0, 100, 20))
    assert not {r["id"] for r in held} & {r["id"] for r in train_rows}


def test_shipped_model_is_the_trained_qwen2_moe(tmp_path):
    src = shipped_dir()
    cfg = json.loads((src / "config.json").read_text())
    assert cfg["model_type"] == "qwen2_moe" and cfg["num_experts"] == 60 and cfg["num_experts_per_tok"] == 4
    assert cfg["shared_expert_intermediate_size"] > 0
    assert (src / "model.safetensors").stat().st_size <= 16 * 2**20
    record = json.loads((src / "caps_model.json").read_text())["training"]
    assert record["held_out_ppl"] < record["held_out_ppl_untrained"] / 10  # it learned the text
    out = generate(tmp_path / "m")
    assert (out / "model.safetensors").read_bytes() == (src / "model.safetensors").read_bytes()
    (out / "config.json").write_text("{}")  # a stale or damaged copy is replaced
    assert json.loads((generate(out) / "config.json").read_text()) == cfg
