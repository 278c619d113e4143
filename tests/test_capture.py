"""The routing capture inside a real engine: exact against transformers, off for dense models."""

from __future__ import annotations

import json
import subprocess
import sys

import pytest

from tests.servers import ROOT

pytest.importorskip("vllm")


def _run(model, mode="eager") -> tuple[dict, str]:
    proc = subprocess.run(
        [sys.executable, str(ROOT / "tests" / "capture_run.py"), str(model), mode],
        capture_output=True,
        text=True,
        timeout=600,
        cwd=ROOT,
    )
    line = next((ln for ln in proc.stdout.splitlines() if ln.startswith("RESULT ")), None)
    assert proc.returncode == 0 and line, proc.stdout[-3000:] + proc.stderr[-5000:]
    return json.loads(line[len("RESULT ") :]), proc.stdout + proc.stderr


@pytest.mark.engine
def test_captured_routing_equals_transformers_router(tiny_model):
    result, _ = _run(tiny_model)
    steps, prompts = result["steps"], result["prompts"]
    assert len(prompts) == 9 and prompts[-1]["tokens"] > 64  # the last one was chunked
    assert all(p["equal"] for p in prompts), prompts
    # every scheduled token was routed exactly once per MoE layer to top_k experts
    assert steps["routed"] == steps["scheduled"] > 0
    assert steps["layer_sum"] == steps["routed"] * 4 * result["top_k"]
    # learning rows: exact routed ids, never more than learn_rows_per_step (40) a step
    assert all(p["rows_equal"] for p in prompts) and 0 < steps["max_rows"] <= 40
    assert sum(p["rows"] > 0 for p in prompts) >= 5
    assert sum(p["rows"] for p in prompts) < sum(p["tokens"] for p in prompts)  # the budget cut some
    # capture_decode: 3 generated tokens = 1 from the prefill + 2 decode steps, each routed to 4 layers x top-k
    assert all(p["decode_total"] == 2 * 4 * result["top_k"] for p in prompts), prompts


@pytest.mark.engine
def test_capture_switches_off_with_one_warning_for_a_dense_model(tmp_path, tiny_model):
    import shutil

    import torch
    import transformers

    cfg = transformers.Qwen2Config(
        vocab_size=transformers.AutoConfig.from_pretrained(tiny_model).vocab_size,  # the embedded tokenizer's ids
        hidden_size=128,
        intermediate_size=256,
        num_hidden_layers=2,
        num_attention_heads=2,
        num_key_value_heads=1,
        max_position_embeddings=4096,
    )
    torch.manual_seed(0)
    transformers.Qwen2ForCausalLM(cfg).save_pretrained(tmp_path)
    for f in tiny_model.iterdir():  # the embedded tokenizer
        if f.name.startswith(("tokenizer", "special_tokens", "vocab", "merges")):
            shutil.copy(f, tmp_path / f.name)
    result, log = _run(tmp_path)
    assert result["moe"] is False and result["steps"]["records"] == 0
    assert result["steps"]["scheduled"] > 0  # and it served
    assert log.count("CAPS routing capture is off for this model") == 1
