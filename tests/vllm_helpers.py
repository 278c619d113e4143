"""Build vLLM schedulers and requests directly, without a model runner (vLLM's own test
helpers are not in the wheel). Used by the scheduler tests and the benchmarks."""

from __future__ import annotations

import torch
from vllm.config import CacheConfig, ModelConfig, SchedulerConfig, VllmConfig
from vllm.sampling_params import SamplingParams
from vllm.utils.hashing import sha256
from vllm.v1.core.kv_cache_utils import get_request_block_hasher, init_none_hash
from vllm.v1.core.sched.scheduler import Scheduler
from vllm.v1.core.single_type_kv_cache_manager import register_all_kvcache_specs
from vllm.v1.kv_cache_interface import FullAttentionSpec, KVCacheConfig, KVCacheGroupSpec
from vllm.v1.outputs import ModelRunnerOutput
from vllm.v1.request import Request
from vllm.v1.structured_output import StructuredOutputManager

BLOCK = 16
init_none_hash(sha256)
_hasher = get_request_block_hasher(BLOCK, sha256)


def make_scheduler(model: str, cls=Scheduler, caps: dict | None = None, max_num_seqs: int = 16,
                   max_num_batched_tokens: int = 8192, num_blocks: int = 10000, policy: str = "fcfs",
                   async_scheduling: bool = False, enable_prefix_caching: bool = False):
    model_config = ModelConfig(model=model, dtype="float32", seed=0, max_model_len=2048, skip_tokenizer_init=True)
    scheduler_config = SchedulerConfig(max_num_seqs=max_num_seqs, max_num_batched_tokens=max_num_batched_tokens,
                                       max_model_len=2048, enable_chunked_prefill=True, is_encoder_decoder=False,
                                       async_scheduling=async_scheduling, policy=policy, watermark=0.0)
    cache_config = CacheConfig(block_size=BLOCK, gpu_memory_utilization=0.9, cache_dtype="auto",
                               enable_prefix_caching=enable_prefix_caching)
    vllm_config = VllmConfig(scheduler_config=scheduler_config, model_config=model_config, cache_config=cache_config,
                             additional_config={"caps": caps} if caps is not None else {})
    # The CPU platform forces async scheduling off; tests of the async path set it back.
    vllm_config.scheduler_config.async_scheduling = async_scheduling
    kv_cache_config = KVCacheConfig(
        num_blocks=num_blocks, kv_cache_tensors=[],
        kv_cache_groups=[KVCacheGroupSpec(["layer"], FullAttentionSpec(block_size=BLOCK, num_kv_heads=1, head_size=1,
                                                                       dtype=torch.float32))],
    )
    cache_config.num_gpu_blocks = num_blocks
    register_all_kvcache_specs(vllm_config)
    return cls(vllm_config=vllm_config, kv_cache_config=kv_cache_config, block_size=BLOCK, log_stats=True,
               structured_output_manager=StructuredOutputManager(vllm_config))


def make_request(rid: str, tokens: list[int] | None, arrival: float, max_tokens: int = 4, priority: int = 0,
                 prompt_embeds=None) -> Request:
    sp = SamplingParams(max_tokens=max_tokens, ignore_eos=True)
    sp.update_from_generation_config({}, None)
    return Request(request_id=rid, prompt_token_ids=tokens, sampling_params=sp, pooling_params=None,
                   arrival_time=arrival, priority=priority, prompt_embeds=prompt_embeds, block_hasher=_hasher)


def step(scheduler, token: int = 7, finished: list[str] | None = None, worker=None):
    """One engine step: schedule, then feed back one sampled token per request that finished
    its prefill (chunked prefills get none). Returns the SchedulerOutput; the ids of requests
    that finished in this step are appended to ``finished``. ``worker(out, mro)`` may add
    what a model runner would attach to the output (routing)."""
    out = scheduler.schedule()
    ids = list(out.num_scheduled_tokens)
    sampled = []
    for rid in ids:
        req = scheduler.requests[rid]  # schedule() already advanced num_computed_tokens
        sampled.append([token] if req.num_computed_tokens >= req.num_prompt_tokens else [])
    mro = ModelRunnerOutput(req_ids=ids, req_id_to_index={r: i for i, r in enumerate(ids)}, sampled_token_ids=sampled,
                            logprobs=None, prompt_logprobs_dict={}, pooler_output=[])
    if worker is not None:
        worker(out, mro)
    engine_outputs = scheduler.update_from_output(out, mro)
    if finished is not None:
        for eco in engine_outputs.values():
            finished += [o.request_id for o in eco.outputs if o.finish_reason is not None]
    return out
