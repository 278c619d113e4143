"""Shared fixtures: a per-session cache (router tables, the tiny model) and vLLM helpers."""

from __future__ import annotations

import os

import pytest

# Engines and servers started by the tests (and their children) read these.
os.environ.setdefault("VLLM_CPU_KVCACHE_SPACE", "1")
os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")


@pytest.fixture(scope="session")
def caps_cache(tmp_path_factory):
    """An empty cache folder for the session (CAPS_VLLM_CACHE), so tests never read ~/.cache."""
    path = tmp_path_factory.mktemp("caps_cache")
    old = os.environ.get("CAPS_VLLM_CACHE")
    os.environ["CAPS_VLLM_CACHE"] = str(path)
    yield path
    if old is None:
        os.environ.pop("CAPS_VLLM_CACHE", None)
    else:
        os.environ["CAPS_VLLM_CACHE"] = old


@pytest.fixture(scope="session")
def tiny_model(caps_cache):
    """The embedded default model, generated once per session."""
    pytest.importorskip("transformers")
    from caps_vllm.tiny_model import generate

    return generate(caps_cache / "models" / "tiny-qwen2-moe")
