"""Everything CAPS reads of vLLM's scheduler, its requests and its outputs, in one place.

CAPS decides order and vLLM enforces every budget, but to know whether there is a decision
(how many waiting requests vLLM would admit this step) CAPS estimates what vLLM has left. The
attributes read here are vLLM's internals, not an API: each is known for vLLM 0.32.0 (run in
CI, with vLLM's own scheduler tests) and was checked by reading vLLM 0.33.0's source (docs/
deployment.md, *Supported vLLM versions*). ``getattr`` with a default marks what older or
newer versions may lack. Nothing else in caps_vllm reads a vLLM object's fields.
"""

from __future__ import annotations

import itertools
import operator
from collections.abc import Callable, Iterable, Iterator, Mapping
from typing import NamedTuple

import numpy as np
from vllm.v1.core.sched.request_queue import SchedulingPolicy
from vllm.v1.request import Request, RequestStatus

from caps_vllm.admission import Capacity, Waiting

WALK_ALL = 64  # up to this many running requests the budget estimate reads every one (exact, and cheap)


class RunningPass(NamedTuple):
    """What one pass over the running batch keeps for the shared load: ids, decode steps left
    and the requests themselves (the ``i``-th key's)."""

    keys: list[str]
    remaining: list[int]
    requests: list[Request]


def steps_left(r: Request) -> int:
    """Decode steps a running request has left at most (it may stop early at EOS)."""
    return r.max_tokens - r.num_output_tokens


def _capped(n: int, thr: int) -> int:
    """``n`` tokens as vLLM caps a request's tokens in a step (long_prefill_token_threshold ``thr``)."""
    return thr if 0 < thr < n else n


def _next_tokens(r: Request) -> int:
    """A running request's tokens this step before any cap (1 in plain decode)."""
    return r.num_tokens_with_spec + r.num_output_placeholders - r.num_computed_tokens


def _blocks_opened(c: int, n: int, bs: int) -> int:
    """KV blocks that ``n`` more tokens after ``c`` computed ones start: ceil((c + n) / bs) - ceil(c / bs)."""
    return (c + n - 1) // bs - (c - 1) // bs


def need(s, r: Request) -> int:
    """A waiting request's tokens this step as vLLM caps them (long_prefill_token_threshold)."""
    return _capped(r.num_tokens - r.num_computed_tokens, s.scheduler_config.long_prefill_token_threshold)


def free_slots(s) -> int:
    """Sequence slots vLLM can still fill from the waiting queue this step."""
    max_active = getattr(s, "max_num_active_reqs", s.max_num_running_reqs)
    return (
        max_active
        - len(s.running)
        - getattr(s, "num_waiting_for_streaming_input", 0)
        - len(getattr(s, "kv_holding_waiting", ()))
    )


def by_priority(s) -> bool:
    return s.policy == SchedulingPolicy.PRIORITY


def walks_all(s) -> bool:
    """Whether the budget estimate reads every running request (few running, or speculative decoding)."""
    return len(s.running) <= WALK_ALL or bool(spec_tokens(s))


def spec_tokens(s) -> int:
    return getattr(s, "num_spec_tokens", 0)


def left(s, free: int, tokens: int, opened: int) -> Capacity:
    """The capacity left: ``tokens`` of the budget, the free KV blocks less ``opened``."""
    bs = s.block_size
    kv = (s.kv_cache_manager.block_pool.get_num_free_blocks() - opened) * bs
    return Capacity(free, tokens, max(kv, 0), s.scheduler_config.enable_chunked_prefill, bs)


def capacity_walk(s, free: int) -> tuple[Capacity, RunningPass]:
    """What vLLM will have left for waiting requests this step, as its ``schedule()`` spends it,
    by one pass over every running request: the token budget after every running request's
    next tokens (decode, prefill chunks, capped by long_prefill_token_threshold) and the free KV
    blocks after those the running requests' next tokens open (prefix-cache hits and the
    watermark are not counted: an estimate). The pass also keeps what the shared load needs."""
    tokens, bs = s.max_num_scheduled_tokens, s.block_size
    thr = s.scheduler_config.long_prefill_token_threshold
    opened = 0  # KV blocks the running requests' next tokens start
    keys: list[str] = []
    remaining: list[int] = []
    for r in s.running:
        n = min(_capped(_next_tokens(r), thr), tokens)
        if n > 0:
            tokens -= n
            opened += _blocks_opened(r.num_computed_tokens, n, bs)
        keys.append(r.request_id)
        remaining.append(steps_left(r))
    return left(s, free, tokens, opened), RunningPass(keys, remaining, list(s.running))


def capacity_next(s, running: list[Request], free: int, scheduled: Mapping[str, int]) -> tuple[Capacity, RunningPass]:
    """:func:`capacity_walk` for the *next* ``schedule()``, read right after this one (caps_vllm.
    ahead: CAPS plans while the model runs): ``running`` is the batch, ``free`` its free slots and
    ``scheduled`` the SchedulerOutput's tokens per request. Before the next ``schedule()`` one
    update reaches the requests: this step's token, for each request it scheduled to make one
    (vLLM's Scheduler); with async scheduling, whose tokens are on their way
    (``num_output_placeholders``), the step before's. A request that token takes to
    ``max_tokens`` frees its slot (a stop at EOS is not foreseen); one whose tokens on their way
    already reach it is skipped by vLLM (no tokens); the others decode one token (plus
    speculative ones) or, still prefilling, take their next chunk. KV as in :func:`capacity_walk`,
    plus the blocks of the requests that end (blocks shared through the prefix cache may stay
    taken: an over-estimate there, which vLLM's own check corrects)."""
    tokens, bs, spec = s.max_num_scheduled_tokens, s.block_size, spec_tokens(s)
    thr = s.scheduler_config.long_prefill_token_threshold
    opened = 0  # (less the blocks the ending requests free)
    keys: list[str] = []
    remaining: list[int] = []
    kept: list[Request] = []
    for r in running:
        c, pending = r.num_computed_tokens, r.num_output_placeholders
        now = r.request_id in scheduled
        if c >= r.num_prompt_tokens:
            got = min(pending - now, 1) if pending else int(now)  # the token that arrives before then
            made = r.num_output_tokens + got
            if made >= r.max_tokens:
                free += 1
                opened -= -(-c // bs)
                continue
            steps = r.max_tokens - made - (pending - got if pending else 0)
            n = 1 + spec if steps > 0 else 0
        else:
            steps, n = steps_left(r), _capped(r.num_prompt_tokens - c, thr)
        n = min(n, tokens)
        if n > 0:
            tokens -= n
            opened += _blocks_opened(c, n, bs)
        keys.append(r.request_id)
        remaining.append(steps)
        kept.append(r)
    return left(s, free, tokens, opened), RunningPass(keys, remaining, kept)


def capacity_busy(s, free: int, busy: dict[str, Request], on_decode: Callable[[str, Request], None]) -> Capacity:
    """:func:`capacity_walk` reading only ``busy``, the running requests not known to be in plain
    decode (admitted or resumed, prefilling, chunked): a request in plain decode schedules one
    token a step, so the token budget left is the same as the full pass gives, and the KV
    estimate counts a new block for every decoding request (an under-estimate). Requests found
    stopped or in plain decode leave ``busy``; ``on_decode`` hears of the latter."""
    tokens, bs = s.max_num_scheduled_tokens, s.block_size
    thr = s.scheduler_config.long_prefill_token_threshold
    opened = counted = 0
    for rid, r in list(busy.items()):
        if r.status != RequestStatus.RUNNING:
            del busy[rid]  # finished or preempted (a resumed request comes back through schedule())
            continue
        n = _next_tokens(r)
        if n == 1:
            del busy[rid]  # plain decode from now on: counted below with the others
            on_decode(rid, r)
            continue
        counted += 1
        n = _capped(n, thr)
        if n > 0:
            tokens -= n
            opened += _blocks_opened(r.num_computed_tokens, n, bs)
    decoding = len(s.running) - counted
    return left(s, free, max(tokens - decoding, 0), opened + decoding)


class QueueHead:
    """The waiting queue's requests in order with their tokens this step (:func:`need`), each read
    once and only as far as asked: the budget estimates stop where vLLM would stop admitting, and
    the planner reads that many plus its window."""

    def __init__(self, s, queue: Iterable[Request] | None = None) -> None:
        """``queue``: the waiting requests in order (default: the scheduler's queue itself)."""
        self._s, self._rest = s, iter(s.waiting if queue is None else queue)
        self.requests: list[Request] = []
        self.needs: list[int] = []

    def _read(self) -> bool:
        r = next(self._rest, None)
        if r is None:
            return False
        self.requests.append(r)
        self.needs.append(need(self._s, r))
        return True

    def stream(self) -> Iterator[int]:
        """The needs in queue order, from the first (what is read already, then further)."""
        i = 0
        while i < len(self.needs) or self._read():
            yield self.needs[i]
            i += 1

    def waiting(self, n: int) -> list[Waiting]:
        """The first ``n`` requests as the planner reads them."""
        while len(self.requests) < n and self._read():
            pass
        return [
            Waiting(r, r.request_id, r.arrival_time, r.status == RequestStatus.PREEMPTED, r.priority, k)
            for r, k in zip(self.requests[:n], self.needs)
        ]


def head_is(s, head: list[Request]) -> bool:
    """Whether the waiting queue still starts with exactly ``head`` (the same objects, in order)."""
    waiting = s.waiting
    return len(waiting) >= len(head) and all(map(operator.is_, itertools.islice(waiting, len(head)), head))


def reorder_head(s, order: list[Request]) -> None:
    """Put ``order`` (a permutation of the queue's first ``len(order)``) at the queue's front."""
    waiting = s.waiting
    new = order + list(itertools.islice(waiting, len(order), None))  # built before the queue is touched
    waiting.clear()
    waiting.extend(new)


def running_keys(s) -> list[str]:
    return [r.request_id for r in s.running]


def finished_since_schedule(s) -> Iterable[str]:
    """Requests that finished or were aborted since the last ``schedule()`` (vLLM reports them in
    the next SchedulerOutput; until then they are in ``finished_req_ids``)."""
    return s.finished_req_ids


def admitted_ids(out) -> Iterable[str]:
    """Requests a SchedulerOutput put into the running batch (new, or resumed after preemption)."""
    return itertools.chain((r.req_id for r in out.scheduled_new_reqs), out.scheduled_cached_reqs.resumed_req_ids)


def left_ids(out) -> Iterable[str]:
    """Requests that left the running batch since the last SchedulerOutput: finished (or aborted), preempted."""
    return itertools.chain(out.finished_req_ids, out.preempted_req_ids or ())


def is_running(r: Request) -> bool:
    return r.status == RequestStatus.RUNNING


def prompt_ids(r: Request) -> np.ndarray | list[int] | None:
    """The prompt's token ids without multimodal placeholder positions; None for prompt embeddings."""
    ids = r.prompt_token_ids
    if ids is None or not r.mm_features:
        return ids
    keep = np.ones(len(ids), dtype=bool)
    for f in r.mm_features:
        pos = f.mm_position
        keep[pos.offset : pos.offset + pos.length] = False
    return np.asarray(ids)[keep]


def routed_prompt(r: Request | None) -> list[int] | None:
    """Prompt ids whose routed positions are its token positions (None: gone, embeddings, multimodal)."""
    return None if r is None or r.prompt_token_ids is None or r.mm_features else r.prompt_token_ids


def prompt_done(r: Request) -> bool:
    return r.num_computed_tokens >= r.num_prompt_tokens


def finished_ids(outputs) -> list[str]:
    """Requests update_from_output's EngineCoreOutputs report finished."""
    return [o.request_id for eco in outputs.values() for o in eco.outputs if o.finish_reason is not None]


def expert_parallel(vllm_config) -> tuple[int, str, bool]:
    """(ranks of vLLM's expert-parallel group, its placement, EPLB on). The group spans data x
    tensor (x prefill-context) parallel ranks; every data-parallel engine has its own scheduler."""
    pc = vllm_config.parallel_config
    ranks = 1
    if pc.enable_expert_parallel:
        ranks = pc.data_parallel_size * pc.tensor_parallel_size * getattr(pc, "prefill_context_parallel_size", 1)
    return ranks, pc.expert_placement_strategy, bool(pc.enable_expert_parallel and getattr(pc, "enable_eplb", False))


def holds_prefills(s, throttle_prefills: bool = False, *_, **__) -> bool:
    """Whether vLLM's ``schedule(throttle_prefills)`` admits no new request this step, so there is
    no admission to decide: data-parallel prefill throttling (0.32.0: ``throttle_prefills``, set
    by the EngineCore, unless the engine is prefill-capacity bound), and 0.33.0's local prefill
    cadence (``prefill_schedule_interval`` > 1 without DP; read in its source, not run here)."""
    interval = getattr(s, "local_prefill_interval", 1)
    held = throttle_prefills or (
        interval > 1 and getattr(s, "num_executed_steps", 0) + 1 - getattr(s, "last_prefill_step", 0) < interval
    )
    return held and not getattr(s, "prefill_capacity_bound", False) and any(not r.is_prefill_chunk for r in s.running)
