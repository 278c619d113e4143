"""The real-cost model: the shipped tiny model's function at Qwen1.5-MoE-A2.7B's layer widths."""

from __future__ import annotations

import json
import shutil
import subprocess
import sys

import numpy as np
import pytest

torch = pytest.importorskip("torch")
pytest.importorskip("transformers")

from caps_vllm.real_cost import QWEN15_MOE, CannotBuild, Shape, build, planned_bytes, room_problem  # noqa: E402
from caps_vllm.tiny_model import prompt_pool, shipped_dir  # noqa: E402

#: a padded shape small enough to run in float32 beside the shipped model: hidden x4, head_dim x4
MID = Shape(512, 4, 4, 256, 512)


def _forward(model_dir, dtype, prompts):
    """Per prompt: (logits [tokens, vocab], top-4 experts [layers, tokens, 4] sorted) by transformers."""
    from transformers import AutoTokenizer, Qwen2MoeForCausalLM

    tok = AutoTokenizer.from_pretrained(str(shipped_dir()))
    model = Qwen2MoeForCausalLM.from_pretrained(str(model_dir), dtype=dtype).eval()
    out = []
    with torch.no_grad():
        for p in prompts:
            ids = torch.tensor([tok(p, add_special_tokens=False)["input_ids"][:256]])
            o = model(ids, output_router_logits=True)
            experts = torch.stack([r.topk(4).indices.sort().values for r in o.router_logits])
            out.append((o.logits[0].float().numpy(), experts.numpy()))
    del model
    return out


def _real_prompts(n: int) -> list[str]:
    rows = prompt_pool()
    return [r["prompt"] for r in rows[:: max(1, len(rows) // n)][:n]]


def test_padding_keeps_the_shipped_models_logits_and_routing(tmp_path):
    out = build(tmp_path / "mid", shape=MID)
    cfg = json.loads((out / "config.json").read_text())
    assert cfg["hidden_size"] == 512 and cfg["moe_intermediate_size"] == 256
    assert cfg["rms_norm_eps"] == pytest.approx(1e-6 / 4)
    prompts = _real_prompts(12)
    for (la, ea), (lb, eb) in zip(
        _forward(shipped_dir(), torch.float32, prompts), _forward(out, torch.float32, prompts)
    ):
        assert np.array_equal(ea, eb)  # every token picks the same experts in every layer
        np.testing.assert_allclose(la, lb, atol=1e-4 * np.abs(la).max())


def test_an_existing_build_is_reused_and_a_damaged_one_rebuilt(tmp_path):
    out = build(tmp_path / "mid", shape=MID)
    stamp = (out / "model.safetensors").stat().st_mtime_ns
    assert build(out, shape=MID) == out and (out / "model.safetensors").stat().st_mtime_ns == stamp
    (out / "model.safetensors").write_bytes(b"")  # cut short
    build(out, shape=MID)
    assert (out / "model.safetensors").stat().st_size == json.loads((out / "caps_model.json").read_text())["real_cost"][
        "bytes"
    ] + 8 + int.from_bytes((out / "model.safetensors").read_bytes()[:8], "little")


def test_a_checkpoint_other_than_the_shipped_one_is_refused_before_writing(tmp_path):
    other = tmp_path / "other"
    shutil.copytree(shipped_dir(), other)
    cfg = json.loads((other / "config.json").read_text())
    (other / "config.json").write_text(json.dumps({**cfg, "num_experts_per_tok": 2}))
    with pytest.raises(CannotBuild, match="not the shipped embedded model"):
        build(tmp_path / "out", src=other, shape=MID)
    with pytest.raises(CannotBuild, match="no checkpoint"):
        build(tmp_path / "out", src=tmp_path / "nowhere", shape=MID)
    with pytest.raises(CannotBuild, match="power of two"):
        build(tmp_path / "out", shape=Shape(256, 4, 4, 256, 512))  # hidden x2: RMSNorm's scale sqrt(2) is not exact
    assert not (tmp_path / "out").exists() and not list(tmp_path.glob("out.tmp*"))


def test_too_little_disk_is_refused_before_writing(tmp_path):
    disk = tmp_path / "small"
    disk.mkdir()
    if subprocess.run(["mount", "-t", "tmpfs", "-o", "size=64m", "tmpfs", str(disk)], capture_output=True).returncode:
        pytest.skip("mounting a small tmpfs needs root")
    try:
        with pytest.raises(CannotBuild, match="not enough disk .* 4.3 GiB"):
            build(disk / "real-cost")
        assert not list(disk.iterdir())
    finally:
        subprocess.run(["umount", str(disk)], check=True)


def test_room_names_what_is_missing():
    need = planned_bytes(shipped_dir(), QWEN15_MOE)
    assert 4.2 * 2**30 < need < 4.4 * 2**30  # 4 layers of Qwen1.5-MoE-A2.7B's widths, bf16
    assert room_problem(need, free_disk=need + 2**30, memory=need + 2**30) is None
    assert "disk" in room_problem(need, free_disk=need, memory=None)
    assert "memory" in room_problem(need, free_disk=need + 2**30, memory=need // 2)


@pytest.mark.heavy
def test_the_real_cost_model_has_qwen15_moe_layers_and_the_shipped_routing(real_cost_model):
    """The full build, found up to date through the command a user runs, then the same comparison
    in bf16 (float32 would take 18 GB): the same experts for every token, logits within bf16's
    rounding."""
    rc = real_cost_model
    out = subprocess.run(
        [sys.executable, "-m", "caps_vllm.cli", "tiny-model", "--real-cost", str(rc)],
        capture_output=True,
        text=True,
        check=True,
    ).stdout.strip()
    assert out == str(rc)
    cfg = json.loads((rc / "config.json").read_text())
    assert (cfg["hidden_size"], cfg["num_attention_heads"], cfg["num_key_value_heads"]) == (2048, 16, 16)
    assert (cfg["moe_intermediate_size"], cfg["shared_expert_intermediate_size"], cfg["num_experts"]) == (
        1408,
        5632,
        60,
    )
    from safetensors import safe_open

    with safe_open(str(rc / "model.safetensors"), "pt") as f:
        expert = f.get_slice("model.layers.0.mlp.experts.0.gate_proj.weight").get_shape()
    assert expert == [1408, 2048]  # 3 x 1408 x 2048 x 2 bytes: 17.3 MB an expert
    prompts = _real_prompts(6)
    for (la, ea), (lb, eb) in zip(
        _forward(shipped_dir(), torch.bfloat16, prompts), _forward(rc, torch.bfloat16, prompts)
    ):
        assert np.array_equal(ea, eb)
        assert np.abs(la - lb).max() <= 2**-5 * np.abs(la).max()  # a bf16 rounding or two
        assert (la.argmax(-1) == lb.argmax(-1)).mean() >= 0.95


@pytest.mark.server
def test_a_server_with_too_little_kv_space_refuses_to_start(real_cost_model, tmp_path):
    """vLLM's own error, not a hang: 32 KB of KV per token is 32 MB for one 1024-token request."""
    from loadtest.server import VllmServer

    server = VllmServer(
        real_cost_model,
        ["--max-model-len", "1024", "--enforce-eager", "--max-num-seqs", "4", "--kv-cache-memory-bytes", "8000000"],
        tmp_path / "serve.log",
    )
    try:
        with pytest.raises(RuntimeError, match="vllm serve exited"):
            server.wait_ready(300)
    finally:
        server.stop()
    log = (tmp_path / "serve.log").read_text()
    assert "KV cache is needed, which is larger than the available KV cache memory" in log, log[-3000:]
