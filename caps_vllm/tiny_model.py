"""The embedded default model: a small random-weight Qwen2-MoE generated locally.

No model hub is needed: the weights come from a seeded ``Qwen2MoeForCausalLM`` (60 routed
experts, top-4, a shared expert, like Qwen1.5-MoE but tiny) and the tokenizer is a byte-level
BPE trained on the project's own prompt pool. It produces nonsense text; it exists so that
vLLM, the router dry run and the scheduler run for real on any machine.

    python -m caps_vllm.tiny_model [OUT_DIR]      # default: ~/.cache/caps_vllm/models/tiny-qwen2-moe
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
from importlib import resources
from pathlib import Path

from caps_vllm.predictor import default_cache_dir

SPECIAL_TOKENS = ["<|endoftext|>", "<|im_start|>", "<|im_end|>"]
CHAT_TEMPLATE = (
    "{% for message in messages %}"
    "{{ '<|im_start|>' + message['role'] + '\n' + message['content'] + '<|im_end|>' + '\n' }}"
    "{% endfor %}"
    "{% if add_generation_prompt %}{{ '<|im_start|>assistant\n' }}{% endif %}"
)
VOCAB = 1024


def default_dir() -> Path:
    return default_cache_dir() / "models" / "tiny-qwen2-moe"


def prompt_pool() -> list[dict]:
    """The project's own labelled prompt pool (category, prompt)."""
    text = resources.files("caps_vllm").joinpath("data/topic_prompts.jsonl").read_text()
    return [json.loads(line) for line in text.splitlines() if line.strip()]


def build_tokenizer(out: Path):
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import PreTrainedTokenizerFast

    corpus = [row["prompt"] for row in prompt_pool()]
    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(vocab_size=VOCAB, special_tokens=SPECIAL_TOKENS,
                                  initial_alphabet=pre_tokenizers.ByteLevel.alphabet(), show_progress=False)
    tok.train_from_iterator(corpus, trainer=trainer)
    hf = PreTrainedTokenizerFast(tokenizer_object=tok, eos_token="<|im_end|>", pad_token="<|endoftext|>",
                                 model_max_length=2048)
    hf.chat_template = CHAT_TEMPLATE
    hf.save_pretrained(out)
    return hf


def generate(out: Path | str | None = None, layers: int = 4, seed: int = 0) -> Path:
    """Write the model (config, safetensors, tokenizer) to ``out`` unless it is already there."""
    out = Path(out) if out else default_dir()
    if (out / "config.json").exists() and (out / "model.safetensors").exists():
        return out
    import torch
    from transformers import Qwen2MoeConfig, Qwen2MoeForCausalLM

    tmp = out.with_name(out.name + f".tmp{os.getpid()}")
    tmp.mkdir(parents=True, exist_ok=True)
    tok = build_tokenizer(tmp)
    cfg = Qwen2MoeConfig(
        vocab_size=VOCAB, hidden_size=128, intermediate_size=256, num_hidden_layers=layers,
        num_attention_heads=4, num_key_value_heads=2, hidden_act="silu", max_position_embeddings=2048,
        rms_norm_eps=1e-6, tie_word_embeddings=False, decoder_sparse_step=1, mlp_only_layers=[],
        num_experts=60, num_experts_per_tok=4, moe_intermediate_size=64, shared_expert_intermediate_size=128,
        norm_topk_prob=False, qkv_bias=True,
        bos_token_id=tok.convert_tokens_to_ids("<|endoftext|>"), eos_token_id=tok.convert_tokens_to_ids("<|im_end|>"),
        pad_token_id=tok.convert_tokens_to_ids("<|endoftext|>"),
    )
    torch.manual_seed(seed)
    model = Qwen2MoeForCausalLM(cfg).to(torch.bfloat16)
    model.save_pretrained(tmp, safe_serialization=True)
    (tmp / "generation_config.json").write_text(json.dumps(
        {"bos_token_id": cfg.bos_token_id, "eos_token_id": cfg.eos_token_id, "pad_token_id": cfg.pad_token_id}, indent=2))
    if out.exists():  # an incomplete earlier attempt
        shutil.rmtree(out)
    tmp.replace(out)
    return out


def main(argv: list[str] | None = None) -> None:
    ap = argparse.ArgumentParser(prog="python -m caps_vllm.tiny_model", description=__doc__.split("\n")[0])
    ap.add_argument("out", nargs="?", default=None, help=f"output folder (default {default_dir()})")
    ap.add_argument("--layers", type=int, default=4)
    a = ap.parse_args(argv)
    print(generate(a.out, layers=a.layers))


if __name__ == "__main__":
    main()
