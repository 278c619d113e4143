"""Worker side of the routing capture: what every MoE router chose, counted per step on the device.

vLLM's own ``--enable-return-routed-experts`` needs the V2 model runner (Triton, GPU only) and
ships every token's top-k ids to the front end. Here vLLM's capturer is reused for what it does
well (binding every router's ``capture_fn``, slicing out this rank's tokens under data
parallelism), but its rows never leave the device whole: after the forward pass they are
reduced to a ``[moe_layers, experts]`` count matrix plus one such matrix per request that had
prompt tokens in the step (with ``caps.capture_decode``, one more per request for its decode
tokens), with one ``bincount`` each; with ``caps.learn`` the routed ids of at most
``learn_rows_per_step`` prompt tokens come back too, for the learning table. All of it returns
on the step's ``ModelRunnerOutput`` as a :class:`~caps_vllm.routing.RoutingRecord`.

The capture function is a plain tensor write, so it is traced into torch.compile graphs like
vLLM's own; it also runs during warm-up and profiling runs, which is harmless because only
rows of real steps are read.
"""

from __future__ import annotations

import logging

import numpy as np
import torch
from vllm.model_executor.layers.fused_moe.routed_experts_capturer import (
    RoutedExpertsCapturer,
    bind_routed_experts_capturer,
)

from caps_vllm.routing import RoutingRecord

logger = logging.getLogger("caps_vllm.capture")


def capture_options(vllm_config) -> dict:
    """The capture's CAPS options; defaults where the config is invalid (the scheduler names the error)."""
    from caps_vllm.config import CapsConfig

    try:
        cfg = CapsConfig.from_dict((vllm_config.additional_config or {}).get("caps"))
    except (ValueError, TypeError):
        cfg = CapsConfig()
    return {"learn": cfg.learn, "learn_rows_per_step": cfg.learn_rows_per_step, "capture_decode": cfg.capture_decode}


class StepCapture(RoutedExpertsCapturer):
    """vLLM's device buffer of routed ids plus the per-step reduction to counts."""

    def __init__(self, vllm_config, model: torch.nn.Module) -> None:
        sc = vllm_config.scheduler_config
        # Room for every token a step can carry (decode steps pad up to a CUDA-graph size).
        super().__init__(max(sc.max_num_batched_tokens, sc.max_num_seqs), vllm_config)
        bind_routed_experts_capturer(model, self)  # ValueError when the model has no MoE router
        from vllm.model_executor.layers.fused_moe.layer import MoERunner

        layers = sorted({m.layer_id for m in model.modules() if isinstance(m, MoERunner)})
        self.moe_layers = tuple(layers)
        self.num_experts = vllm_config.model_config.get_num_experts()
        device = self.device_buffer.device
        self._layer_index = torch.tensor(layers, dtype=torch.long, device=device)
        self._offsets = (torch.arange(len(layers), device=device) * self.num_experts).view(1, -1, 1)
        self._layout_warned = False
        self._row_dtype = torch.uint8 if self.num_experts <= 256 else torch.int16
        opts = capture_options(vllm_config)
        #: prompt tokens per step whose routed ids are shipped for the learning table (0: none)
        self.rows_per_step = opts["learn_rows_per_step"] if opts["learn"] else 0
        #: per-request counts of decode tokens too (bounded: one [layers, experts] matrix per request)
        self.decode_counts = opts["capture_decode"]

    def reduce(self, scheduler_output, input_batch) -> PendingRecord | None:
        """Counts of the step that just ran (device tensors; copied to the host on ``get``)."""
        n = int(scheduler_output.total_num_scheduled_tokens)
        if n == 0:
            return None
        ld = len(self.moe_layers) * self.num_experts
        routed = self.device_buffer[:n].index_select(1, self._layer_index)
        bins = (routed.long() + self._offsets).view(n, -1)
        layer_counts = torch.bincount(bins.reshape(-1), minlength=ld)

        # Tokens per request: the batch lays tokens out in input_batch.req_ids order.
        req_ids = list(input_batch.req_ids)
        k = len(req_ids)
        sched = np.array([scheduler_output.num_scheduled_tokens.get(r, 0) for r in req_ids], dtype=np.int64)
        computed = np.asarray(input_batch.num_computed_tokens_cpu[:k], dtype=np.int64)
        prompt = np.asarray(input_batch.num_prompt_tokens[:k], dtype=np.int64)
        in_prompt = np.minimum(sched, np.maximum(prompt - computed, 0))
        if int(sched.sum()) != n:  # a layout this reduction does not know; totals stay right
            if not self._layout_warned:
                self._layout_warned = True
                logger.warning(
                    "CAPS capture: %d scheduled tokens but the batch lays out %d; per-request counts are skipped",
                    n,
                    int(sched.sum()),
                )
            return PendingRecord(self, n, layer_counts, None, [], [], [], None)
        owners = [i for i in range(k) if in_prompt[i] > 0]
        decoders = [i for i in range(k) if sched[i] > in_prompt[i]] if self.decode_counts else []
        starts = np.concatenate(([0], np.cumsum(sched)[:-1]))
        per_request = None
        if owners or decoders:
            # One bincount: bucket s < len(owners) holds owner s's prompt tokens, the rest decode tokens.
            bucket = np.full(n, -1, dtype=np.int64)
            for s, i in enumerate(owners):
                bucket[starts[i] : starts[i] + in_prompt[i]] = s
            for s, i in enumerate(decoders, start=len(owners)):
                bucket[starts[i] + in_prompt[i] : starts[i] + sched[i]] = s
            bucket_t = torch.from_numpy(bucket).to(bins.device)
            mask = bucket_t >= 0
            flat = (bins[mask] + (bucket_t[mask] * ld).view(-1, 1)).reshape(-1)
            per_request = torch.bincount(flat, minlength=(len(owners) + len(decoders)) * ld)
        rows, lengths, budget = None, [], self.rows_per_step
        if owners and budget:
            # The first prompt tokens of the step, up to the budget, as [tokens, layers, top_k] ids.
            take = []
            for i in owners:
                t = int(min(in_prompt[i], budget))
                lengths.append(t)
                take.append(np.arange(starts[i], starts[i] + t))
                budget -= t
                if budget == 0:
                    break
            rows = routed[torch.from_numpy(np.concatenate(take)).to(routed.device)].to(self._row_dtype)
        return PendingRecord(
            self,
            n,
            layer_counts,
            per_request,
            [req_ids[i] for i in owners],
            [int(computed[i]) for i in owners],
            [req_ids[i] for i in decoders],
            (rows, lengths),
        )


class PendingRecord:
    """A step's counts still on the device; ``get()`` copies them (once) to a RoutingRecord."""

    def __init__(self, cap: StepCapture, n, layer_counts, per_request, owners, starts, decoders, rows) -> None:
        self._cap, self._n = cap, n
        self._layer_counts, self._per_request = layer_counts, per_request
        self._owners, self._starts, self._decoders = owners, starts, decoders
        self._rows = rows

    def get(self) -> RoutingRecord:
        cap = self._cap
        shape = (len(cap.moe_layers), cap.num_experts)
        rec = RoutingRecord(cap.moe_layers, self._layer_counts.cpu().numpy().reshape(shape), self._n)
        if self._per_request is not None:
            per = self._per_request.cpu().numpy().reshape(-1, *shape)
            p = len(self._owners)
            rec.prompt_counts = dict(zip(self._owners, per[:p]))
            rec.prompt_start = dict(zip(self._owners, self._starts))
            rec.decode_counts = dict(zip(self._decoders, per[p:]))
        if self._rows is not None and self._rows[0] is not None:
            rows, lengths = self._rows[0].cpu().numpy(), self._rows[1]
            bounds = np.cumsum([0] + lengths)
            owners = self._owners[: len(lengths)]
            rec.prompt_rows = {rid: rows[bounds[j] : bounds[j + 1]] for j, rid in enumerate(owners)}
        return rec
