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


@pytest.fixture(scope="session")
def real_cost_model(caps_cache):
    """The real-cost model (4.3 GB), built once per session."""
    pytest.importorskip("torch")
    from caps_vllm.real_cost import build

    return build(caps_cache / "models" / "tiny-qwen2-moe-real-cost")


@pytest.fixture(scope="session")
def model(tiny_model) -> str:
    return str(tiny_model)


@pytest.fixture(scope="session")
def tokens(model):
    """A hot token of the embedded model, and the tokens sharing no expert with it."""
    import numpy as np

    from caps_vllm.predictor import ExpertPredictor

    pred = ExpertPredictor.from_model(model)
    vecs = np.array([pred.vector([t]) for t in range(pred.vocab)])
    hot = 10
    return hot, [int(t) for t in np.flatnonzero((vecs @ vecs.T)[hot] == 0)]
