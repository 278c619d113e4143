"""The registry of batch-selection strategies, looked up by name.

Pure numpy, no vLLM: the live scheduler and the offline simulator both import from here.
"""

from __future__ import annotations

from caps_vllm.strategies.base import Strategy, check_loads
from caps_vllm.strategies.cost import StepCost
from caps_vllm.strategies.greedy import BestFit, Differencing, GreedyDotProduct, GreedyVariance, NormMinimizing
from caps_vllm.strategies.ordering import FCFS, LPT, KarmarkarKarp, LPTBalanced
from caps_vllm.strategies.pairwise import PairwiseCache
from caps_vllm.strategies.sampled import PowerOfD, PowerOfDDot, RandomSample

STRATEGIES: dict[str, type[Strategy]] = {
    cls.name: cls
    for cls in (
        FCFS,
        RandomSample,
        GreedyVariance,
        GreedyDotProduct,
        NormMinimizing,
        BestFit,
        PowerOfD,
        PowerOfDDot,
        LPT,
        LPTBalanced,
        KarmarkarKarp,
        Differencing,
        StepCost,
    )
}


def make_strategy(name: str, seed: int = 0, deployment: dict | None = None, **params: object) -> Strategy:
    """Build the strategy called ``name``; unknown names raise ValueError listing the valid ones.

    ``deployment``: facts about the serving setup (experts per layer, expert-parallel ranks,
    placement); a strategy receives the ones it lists in ``deployment_params``, unless
    ``params`` sets them.
    """
    try:
        cls = STRATEGIES[name]
    except KeyError:
        raise ValueError(f"unknown strategy {name!r}; valid names: {', '.join(STRATEGIES)}") from None
    known = {k: v for k, v in (deployment or {}).items() if k in cls.deployment_params}
    try:
        return cls(seed=seed, **{**known, **params})  # type: ignore[arg-type]
    except TypeError as exc:
        raise ValueError(f"bad parameters for strategy {name!r}: {exc}") from None


__all__ = ["STRATEGIES", "PairwiseCache", "Strategy", "check_loads", "make_strategy"]
