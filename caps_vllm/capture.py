"""Worker side of the routing capture: what every MoE router chose, counted per step on the device.

vLLM's own ``--enable-return-routed-experts`` needs the V2 model runner (Triton, GPU only) and
ships every token's top-k ids to the front end. Here vLLM's capturer is reused for what it does
well (binding every router's ``capture_fn``, slicing out this rank's tokens under data
parallelism), but its rows never leave the device: after the forward pass they are reduced to a
``[moe_layers, experts]`` count matrix plus one such matrix per request that had prompt tokens
in the step, with one ``bincount`` each, and sent back to the scheduler on the step's
``ModelRunnerOutput`` as a :class:`~caps_vllm.routing.RoutingRecord`.

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

    def reduce(self, scheduler_output, input_batch) -> "PendingRecord | None":
        """Counts of the step that just ran (device tensors; copied to the host on ``get``)."""
        n = int(scheduler_output.total_num_scheduled_tokens)
        if n == 0:
            return None
        ld = len(self.moe_layers) * self.num_experts
        bins = (self.device_buffer[:n].index_select(1, self._layer_index).long() + self._offsets).view(n, -1)
        layer_counts = torch.bincount(bins.reshape(-1), minlength=ld)

        # Prompt tokens per request: the batch lays tokens out in input_batch.req_ids order.
        req_ids = list(input_batch.req_ids)
        k = len(req_ids)
        sched = np.array([scheduler_output.num_scheduled_tokens.get(r, 0) for r in req_ids], dtype=np.int64)
        computed = np.asarray(input_batch.num_computed_tokens_cpu[:k], dtype=np.int64)
        prompt = np.asarray(input_batch.num_prompt_tokens[:k], dtype=np.int64)
        in_prompt = np.minimum(sched, np.maximum(prompt - computed, 0))
        if int(sched.sum()) != n:  # a layout this reduction does not know; totals stay right
            if not self._layout_warned:
                self._layout_warned = True
                logger.warning("CAPS capture: %d scheduled tokens but the batch lays out %d; per-request "
                               "prompt counts are skipped", n, int(sched.sum()))
            in_prompt[:] = 0
        owners = [i for i in range(k) if in_prompt[i] > 0]
        prompt_counts = None
        if owners:
            starts = np.concatenate(([0], np.cumsum(sched)[:-1]))
            slot = np.full(n, -1, dtype=np.int64)
            for s, i in enumerate(owners):
                slot[starts[i] : starts[i] + in_prompt[i]] = s
            slot_t = torch.from_numpy(slot).to(bins.device)
            mask = slot_t >= 0
            flat = (bins[mask] + (slot_t[mask] * ld).view(-1, 1)).reshape(-1)
            prompt_counts = torch.bincount(flat, minlength=len(owners) * ld)
        return PendingRecord(
            self, n, layer_counts, prompt_counts,
            [req_ids[i] for i in owners], [int(computed[i]) for i in owners],
        )


class PendingRecord:
    """A step's counts still on the device; ``get()`` copies them (once) to a RoutingRecord."""

    def __init__(self, cap: StepCapture, n, layer_counts, prompt_counts, owners, starts) -> None:
        self._cap, self._n = cap, n
        self._layer_counts, self._prompt_counts = layer_counts, prompt_counts
        self._owners, self._starts = owners, starts

    def get(self) -> RoutingRecord:
        cap = self._cap
        shape = (len(cap.moe_layers), cap.num_experts)
        rec = RoutingRecord(cap.moe_layers, self._layer_counts.cpu().numpy().reshape(shape), self._n)
        if self._prompt_counts is not None:
            per = self._prompt_counts.cpu().numpy().reshape(len(self._owners), *shape)
            rec.prompt_counts = dict(zip(self._owners, per))
            rec.prompt_start = dict(zip(self._owners, self._starts))
        return rec
