"""The embedded default model: a tiny Qwen2-MoE trained on real text, shipped with the package.

No model hub is needed: ``caps_vllm/data/tiny-qwen2-moe/`` holds bf16 weights (15 MB), a
byte-level BPE tokenizer (4096 ids) and the training record, written by :mod:`caps_vllm.train_tiny`
(60 routed experts, top-4 and a shared expert like Qwen1.5-MoE, 4 layers of hidden 128).
Its routers learned from the prompt pool, so expert loads follow topics as in a real MoE;
``generate`` copies it into the cache folder where vLLM and the predictor read it. The
seeded *untrained* model of the same shape (``--untrained``) is kept for comparisons.

    python -m caps_vllm.tiny_model [OUT_DIR]   # default: ~/.cache/caps_vllm/models/tiny-qwen2-moe
    caps-vllm tiny-model --real-cost          # the same function at Qwen1.5-MoE's expert size (caps_vllm.real_cost)
"""

from __future__ import annotations

import argparse
import hashlib
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
VOCAB = 4096
SHIPPED = "data/tiny-qwen2-moe"
MODEL_FILES = (
    "config.json",
    "generation_config.json",
    "model.safetensors",
    "tokenizer.json",
    "tokenizer_config.json",
    "chat_template.jinja",
    "caps_model.json",
)


def default_dir() -> Path:
    return default_cache_dir() / "models" / "tiny-qwen2-moe"


def prompt_pool(path: Path | str | None = None) -> list[dict]:
    """The rows of a JSON-lines prompt pool (category, prompt, ...); the project's own by default.

    Lines are split on newlines only: real prompts hold characters (U+2028) that
    ``str.splitlines`` would also break on."""
    if path is None:
        text = resources.files("caps_vllm").joinpath("data/topic_prompts.jsonl").read_text()
    else:
        text = Path(path).read_text()
    return [json.loads(line) for line in text.split("\n") if line.strip()]


def build_tokenizer(corpus: list[str], out: Path, vocab: int = VOCAB):
    """A byte-level BPE of ``vocab`` ids trained on ``corpus`` (deterministic), saved to ``out``."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import PreTrainedTokenizerFast

    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=vocab,
        special_tokens=SPECIAL_TOKENS,
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=False,
    )
    tok.train_from_iterator(corpus, trainer=trainer)
    hf = PreTrainedTokenizerFast(
        tokenizer_object=tok, eos_token="<|im_end|>", pad_token="<|endoftext|>", model_max_length=2048
    )
    hf.chat_template = CHAT_TEMPLATE
    hf.save_pretrained(out)
    return hf


def model_config(tok, layers: int = 4, aux_coef: float = 0.001):
    """The embedded model's Qwen2-MoE shape (trained and untrained alike)."""
    from transformers import Qwen2MoeConfig

    return Qwen2MoeConfig(
        vocab_size=len(tok),
        hidden_size=128,
        intermediate_size=256,
        num_hidden_layers=layers,
        num_attention_heads=4,
        num_key_value_heads=2,
        hidden_act="silu",
        max_position_embeddings=2048,
        rms_norm_eps=1e-6,
        tie_word_embeddings=False,
        decoder_sparse_step=1,
        mlp_only_layers=[],
        num_experts=60,
        num_experts_per_tok=4,
        moe_intermediate_size=64,
        shared_expert_intermediate_size=128,
        norm_topk_prob=False,
        qkv_bias=True,
        router_aux_loss_coef=aux_coef,
        bos_token_id=tok.convert_tokens_to_ids("<|endoftext|>"),
        eos_token_id=tok.convert_tokens_to_ids("<|im_end|>"),
        pad_token_id=tok.convert_tokens_to_ids("<|endoftext|>"),
    )


def save_model(model, tok, out: Path, record: dict) -> Path:
    """bf16 safetensors + tokenizer + ``caps_model.json`` (``record``), written atomically."""
    import torch

    out = Path(out)
    tmp = out.with_name(out.name + f".tmp{os.getpid()}")
    if tmp.exists():
        shutil.rmtree(tmp)
    tmp.mkdir(parents=True)
    tok.save_pretrained(tmp)
    model.to(torch.bfloat16).save_pretrained(tmp, safe_serialization=True)
    cfg = model.config
    (tmp / "generation_config.json").write_text(
        json.dumps(
            {"bos_token_id": cfg.bos_token_id, "eos_token_id": cfg.eos_token_id, "pad_token_id": cfg.pad_token_id},
            indent=2,
        )
    )
    (tmp / "caps_model.json").write_text(json.dumps(record, indent=1) + "\n")
    if out.exists():
        shutil.rmtree(out)
    tmp.replace(out)
    return out


def digest(folder: Path) -> str:
    h = hashlib.sha256()
    for name in MODEL_FILES:
        p = folder / name
        h.update(name.encode() + (p.read_bytes() if p.exists() else b"-"))
    return h.hexdigest()


def shipped_dir() -> Path:
    return Path(str(resources.files("caps_vllm").joinpath(SHIPPED)))


def generate(out: Path | str | None = None) -> Path:
    """The shipped trained model, copied to ``out`` (the cache by default) unless an identical copy is there."""
    out = Path(out) if out else default_dir()
    src = shipped_dir()
    if not (src / "model.safetensors").exists():
        raise FileNotFoundError(f"the embedded model is missing from the package ({src}); reinstall caps-vllm")
    if out.is_dir() and digest(out) == digest(src):
        return out
    tmp = out.with_name(out.name + f".tmp{os.getpid()}")
    if tmp.exists():
        shutil.rmtree(tmp)
    tmp.mkdir(parents=True)
    for name in MODEL_FILES:
        if (src / name).exists():
            shutil.copy2(src / name, tmp / name)
    if out.exists():  # an older or incomplete copy
        shutil.rmtree(out)
    tmp.replace(out)
    return out


def untrained(out: Path | str, seed: int = 0) -> Path:
    """The embedded model's shape and tokenizer with seeded random weights (the training's start)."""
    import torch
    from transformers import AutoTokenizer, Qwen2MoeForCausalLM

    tok = AutoTokenizer.from_pretrained(str(shipped_dir()))
    torch.manual_seed(seed)
    model = Qwen2MoeForCausalLM(model_config(tok))
    return save_model(model, tok, Path(out), {"untrained": {"seed": seed}})


def main(argv: list[str] | None = None) -> None:
    ap = argparse.ArgumentParser(prog="python -m caps_vllm.tiny_model", description=__doc__.split("\n")[0])
    ap.add_argument("out", nargs="?", default=None, help=f"output folder (default {default_dir()})")
    ap.add_argument("--untrained", action="store_true", help="write the seeded untrained model instead (needs OUT)")
    ap.add_argument(
        "--real-cost",
        action="store_true",
        help="the same model zero-padded to Qwen1.5-MoE-A2.7B's layer widths (4.6 GB, built once; "
        "default OUT: ~/.cache/caps_vllm/models/tiny-qwen2-moe-real-cost)",
    )
    ap.add_argument("--seed", type=int, default=0)
    a = ap.parse_args(argv)
    if a.untrained and a.real_cost:
        ap.error("--untrained and --real-cost exclude each other")
    if a.real_cost:
        from caps_vllm.real_cost import CannotBuild, build

        try:
            print(build(a.out))
        except CannotBuild as exc:  # too little disk or memory, not the shipped checkpoint
            raise SystemExit(f"caps-vllm tiny-model --real-cost: {exc}") from None
    elif a.untrained:
        if a.out is None:
            ap.error("--untrained needs an output folder")
        print(untrained(a.out, a.seed))
    else:
        print(generate(a.out))


if __name__ == "__main__":
    main()
