"""Step models of MoE deployments whose steps pay for the distinct experts they read from slow memory.

Where the experts live decides what an admission order can save. With every expert in HBM a
step reads each one at HBM speed and a full batch touches all of them anyway (the twin study);
on limited hardware they live further away:

* ``offload``: vLLM's ``--cpu-offload-gb N --cpu-offload-params experts``. Whole layers' experts
  go to pinned host memory, first layers first, until N GB are offloaded (vLLM offloads module by
  module in order); the fused-MoE kernel reads them in place over PCIe (UVA, zero copy), so each
  step moves every *distinct* offloaded expert it touches once.
* ``cache`` (LRU / LFRU): a GPU cache of C expert slots per layer over host memory, as vLLM PR
  #37190 proposes (``--moe-expert-cache-size``): a miss copies the expert over PCIe before the
  layer runs (no prefetch modelled); LFRU evicts the lowest uses / (steps since last use + 1),
  our reading of that PR's "frequency-weighted LRU".
* ``cpu-experts``: routed experts computed on the host CPU (KTransformers, llama.cpp
  ``--n-cpu-moe``): each distinct expert read from DRAM, its tokens multiplied at the CPU's
  FLOP/s, plus a per-layer hand-over between GPU and CPU; attention and shared experts on the GPU.
* ``hbm``: every expert resident (:class:`sim.step_time.RooflineStep`), the reference.

Every figure below is a public peak figure with a stated efficiency: a model, not a measurement
(``tests/benchmarks/gpu_expert_reads.py`` measures the PCIe part the day a GPU is lent). Each
model keeps per-run tallies: expert bytes read from host memory and the cache's hits.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import numpy as np

from caps_vllm.step_cost import StepCostModel
from sim.step_time import Hardware, ModelShape, RooflineStep, StepBatch

GIB = 2**30

#: PCIe x16, effective bytes/s per direction: 80 % of the link's 31.5 / 63 GB/s (an assumption
#: the GPU script replaces with a measurement)
PCIE: dict[str, float] = {"gen4": 0.8 * 31.5e9, "gen5": 0.8 * 63.0e9}


@dataclass(frozen=True)
class Card:
    """A GPU as a deployment sees it: its roofline figures, memory and host link."""

    hardware: Hardware
    memory: float  # bytes
    pcie: str

    @property
    def name(self) -> str:
        return self.hardware.name


CARDS: dict[str, Card] = {
    # RTX 4090: 24 GB GDDR6X at 1008 GB/s, 82.6 TFLOP/s bf16 dense with fp32 accumulation
    "rtx4090": Card(Hardware("rtx4090", 1008e9, 82.6e12), 24e9, "gen4"),
    # L4: 24 GB GDDR6 at 300 GB/s, 121 TFLOP/s bf16 dense
    "l4": Card(Hardware("l4", 300e9, 121e12), 24e9, "gen4"),
    # H100 PCIe: 80 GB HBM2e at 2.0 TB/s, 756 TFLOP/s bf16 dense
    "h100-pcie": Card(Hardware("h100-pcie", 2.0e12, 756e12), 80e9, "gen5"),
}


@dataclass(frozen=True)
class HostCpu:
    """The host that computes routed experts in ``cpu-experts``."""

    name: str
    bandwidth: float  # DRAM bytes/s, peak
    flops: float  # bf16 FLOP/s, peak
    bandwidth_efficiency: float = 0.6
    flops_efficiency: float = 0.5
    layer_overhead_s: float = 50e-6  # per MoE layer: hidden states to the CPU and back, a sync


HOSTS: dict[str, HostCpu] = {
    # EPYC 9654: 12 channels DDR5-4800 (460.8 GB/s); 96 Zen 4 cores x 2.4 GHz x 64 bf16 FLOP/cycle
    "epyc-9654": HostCpu("epyc-9654", 460.8e9, 96 * 2.4e9 * 64),
}

KINDS = ("hbm", "offload", "cache-lru", "cache-lfru", "cpu-experts")
GPU_MEMORY_UTILIZATION = 0.9  # vLLM's default share of the card


def non_expert_bytes(shape: ModelShape, vocab: int) -> float:
    """Weights that stay on the GPU: attention, shared/dense MLPs, lm head and the embedding."""
    return (shape.dense_params_per_token + shape.hidden * vocab) * shape.dtype_bytes


def expert_bytes_total(shape: ModelShape) -> float:
    return len(shape.moe_layers) * shape.experts * shape.expert_bytes


def free_for_experts(card: Card, shape: ModelShape, vocab: int, kv_bytes: float) -> float:
    """Bytes of the card left for routed experts once the rest of the weights and the KV cache
    are placed; refused when even those do not fit."""
    usable = card.memory * GPU_MEMORY_UTILIZATION
    need = non_expert_bytes(shape, vocab) + kv_bytes
    if need > usable:
        raise ValueError(
            f"{shape.name} on {card.name}: the non-expert weights and KV cache need {need / GIB:.1f} GiB, "
            f"the card gives {usable / GIB:.1f} GiB (gpu_memory_utilization {GPU_MEMORY_UTILIZATION})"
        )
    return usable - need


class DeploymentStep:
    """A step model (``seconds(batch)``, as :class:`~sim.step_time.RooflineStep`) that also
    counts what it moved. ``moe`` is the per-layer cost CAPS's ``step_cost`` strategy prices
    candidates with: the deployment's mean cost per distinct expert and per (token, expert)."""

    kind = "hbm"

    def __init__(self, card: Card, shape: ModelShape) -> None:
        self.card, self.shape = card, shape
        self.gpu = RooflineStep(card.hardware, shape)
        self.moe = self.gpu.moe
        self.host_bytes = 0.0  # expert bytes read from host memory over the run
        self.steps = 0
        self.hits = self.lookups = 0

    def moe_seconds(self, counts: np.ndarray) -> float:
        return float(self.gpu.moe.layer_ms(counts).sum()) / 1e3

    def seconds(self, b: StepBatch) -> float:
        self.steps += 1
        moe = self.moe_seconds(np.asarray(b.moe_counts, dtype=np.float64)) if b.moe_counts.size else 0.0
        return self.card.hardware.fixed_s + self.gpu.dense_seconds(b) + moe

    def tallies(self) -> dict:
        return {
            "host_bytes_per_step": self.host_bytes / self.steps if self.steps else 0.0,
            "cache_hit_rate": self.hits / self.lookups if self.lookups else None,
        }

    def describe(self) -> dict:
        return {"kind": self.kind, "card": self.card.name, "pcie": self.card.pcie}


class Offloaded(DeploymentStep):
    """The first ``layers_offloaded`` MoE layers' experts in host memory, read over PCIe in place."""

    kind = "offload"

    def __init__(self, card: Card, shape: ModelShape, layers_offloaded: int) -> None:
        super().__init__(card, shape)
        n = len(shape.moe_layers)
        if not 0 <= layers_offloaded <= n:
            raise ValueError(f"layers_offloaded {layers_offloaded}; valid: 0 to {n} (the MoE layers)")
        self.offloaded = np.arange(n) < layers_offloaded
        pcie_ms = shape.expert_bytes / PCIE[card.pcie] * 1e3
        self.host_moe = StepCostModel(0.0, pcie_ms, self.gpu.moe.token_ms, "roofline")
        share = layers_offloaded / n if n else 0.0
        self.moe = StepCostModel(
            0.0, share * pcie_ms + (1 - share) * self.gpu.moe.weight_ms, self.gpu.moe.token_ms, "roofline"
        )

    @classmethod
    def with_share(cls, card: Card, shape: ModelShape, offload_share: float) -> Offloaded:
        """``offload_share`` of the MoE layers offloaded (rounded up to whole layers)."""
        if isinstance(offload_share, bool) or not 0.0 <= float(offload_share) <= 1.0:
            raise ValueError(f"offload_share {offload_share!r}; valid: 0 to 1")
        return cls(card, shape, math.ceil(float(offload_share) * len(shape.moe_layers) - 1e-9))

    @classmethod
    def sized(cls, card: Card, shape: ModelShape, vocab: int, kv_bytes: float) -> Offloaded:
        """Offloading what does not fit, whole layers (``--cpu-offload-gb`` rounded up to layers)."""
        free = free_for_experts(card, shape, vocab, kv_bytes)
        per_layer = shape.experts * shape.expert_bytes
        over = expert_bytes_total(shape) - free
        return cls(card, shape, min(len(shape.moe_layers), max(0, math.ceil(over / per_layer))))

    @property
    def offload_share(self) -> float:
        return float(self.offloaded.mean()) if self.offloaded.size else 0.0

    def moe_seconds(self, counts: np.ndarray) -> float:
        off = self.offloaded
        host = counts[off]
        self.host_bytes += float((host > 0).sum()) * self.shape.expert_bytes
        ms = self.gpu.moe.layer_ms(counts[~off]).sum() + self.host_moe.layer_ms(host).sum()
        return float(ms) / 1e3

    def describe(self) -> dict:
        return {**super().describe(), "offload_share": self.offload_share, "cpu_offload_gib": self.offload_gib}

    @property
    def offload_gib(self) -> float:
        return float(self.offloaded.sum()) * self.shape.experts * self.shape.expert_bytes / GIB


class ExpertCache(DeploymentStep):
    """A GPU cache of ``slots`` experts per MoE layer over host memory; a miss crosses PCIe."""

    def __init__(self, card: Card, shape: ModelShape, slots: int, policy: str = "lru") -> None:
        super().__init__(card, shape)
        if policy not in ("lru", "lfru"):
            raise ValueError(f"cache policy {policy!r}; valid: lru, lfru")
        if not 1 <= slots <= shape.experts:
            raise ValueError(f"cache_slots {slots}; valid: 1 to {shape.experts} (the experts per layer)")
        self.kind, self.slots, self.policy = f"cache-{policy}", slots, policy
        n = len(shape.moe_layers)
        self.resident = np.zeros((n, shape.experts), dtype=bool)
        self.last_use = np.zeros((n, shape.experts))
        self.uses = np.zeros((n, shape.experts))
        self.pcie_s = shape.expert_bytes / PCIE[card.pcie]
        miss_share = 1.0 - slots / shape.experts  # CAPS's price: a distinct expert misses this often at random
        self.moe = StepCostModel(
            0.0, self.gpu.moe.weight_ms + miss_share * self.pcie_s * 1e3, self.gpu.moe.token_ms, "roofline"
        )

    @classmethod
    def sized(cls, card: Card, shape: ModelShape, vocab: int, kv_bytes: float, policy: str) -> ExpertCache:
        """As many slots per layer as the card has room for (at most all but one expert)."""
        free = free_for_experts(card, shape, vocab, kv_bytes)
        slots = int(free // (len(shape.moe_layers) * shape.expert_bytes))
        if slots < 1:
            raise ValueError(f"{shape.name} on {card.name}: no room for one cached expert per layer")
        return cls(card, shape, min(slots, shape.experts - 1), policy)

    def moe_seconds(self, counts: np.ndarray) -> float:
        t = float(self.steps)
        need = counts > 0
        miss = need & ~self.resident
        self.lookups += int(need.sum())
        self.hits += int((need & self.resident).sum())
        misses = miss.sum(axis=1)
        self.host_bytes += float(misses.sum()) * self.shape.expert_bytes
        self.uses[need] += 1
        self.last_use[need] = t
        for layer in np.nonzero(misses)[0]:
            self._insert(layer, miss[layer], need[layer], t)
        return float(self.gpu.moe.layer_ms(counts).sum()) / 1e3 + float(misses.sum()) * self.pcie_s

    def _insert(self, layer: int, miss: np.ndarray, need: np.ndarray, t: float) -> None:
        """Misses enter the cache (as many as fit), evicting what this step does not use."""
        res = self.resident[layer]
        new = np.nonzero(miss)[0][: self.slots]
        evict = len(new) - (self.slots - int(res.sum()))
        if evict > 0:
            cand = np.nonzero(res & ~need)[0]
            age = t - self.last_use[layer, cand]
            score = -age if self.policy == "lru" else self.uses[layer, cand] / (age + 1.0)
            out = cand[np.argsort(score, kind="stable")[:evict]]
            res[out] = False
            new = new[: len(new) - max(0, evict - len(out))]  # the rest streams through uncached
        res[new] = True

    def describe(self) -> dict:
        return {**super().describe(), "cache_slots": self.slots, "policy": self.policy}


class CpuExperts(DeploymentStep):
    """Routed experts on ``host``'s CPU (DRAM reads, its FLOP/s); the rest on the GPU."""

    kind = "cpu-experts"

    def __init__(self, card: Card, shape: ModelShape, host: HostCpu) -> None:
        super().__init__(card, shape)
        self.host = host
        bw, fl = host.bandwidth * host.bandwidth_efficiency, host.flops * host.flops_efficiency
        self.moe = StepCostModel(
            host.layer_overhead_s * 1e3, shape.expert_bytes / bw * 1e3, shape.expert_flops_per_token / fl * 1e3
        )

    def moe_seconds(self, counts: np.ndarray) -> float:
        self.host_bytes += float((counts > 0).sum()) * self.shape.expert_bytes
        return float(self.moe.layer_ms(counts).sum()) / 1e3

    def describe(self) -> dict:
        return {**super().describe(), "host": self.host.name}


def build(kind: str, card: str, shape: ModelShape, vocab: int, kv_bytes: float, host: str = "epyc-9654"):
    """The step model of ``kind`` on ``card``, sized to what the card holds; bad input is refused
    with the field named."""
    if card not in CARDS:
        raise ValueError(f"card {card!r}; valid: {', '.join(CARDS)}")
    if kind not in KINDS:
        raise ValueError(f"deployment kind {kind!r}; valid: {', '.join(KINDS)}")
    c = CARDS[card]
    if kind == "hbm":
        if free_for_experts(c, shape, vocab, kv_bytes) < expert_bytes_total(shape):
            raise ValueError(f"{shape.name} on {card}: the routed experts do not fit in HBM (offload or cache them)")
        return DeploymentStep(c, shape)
    if kind == "offload":
        return Offloaded.sized(c, shape, vocab, kv_bytes)
    if kind.startswith("cache-"):
        return ExpertCache.sized(c, shape, vocab, kv_bytes, kind.split("-", 1)[1])
    if host not in HOSTS:
        raise ValueError(f"host {host!r}; valid: {', '.join(HOSTS)}")
    free_for_experts(c, shape, vocab, kv_bytes)
    return CpuExperts(c, shape, HOSTS[host])
