"""Profiling as product code: time the MoE layer on the serving hardware, fit the step-cost model.

``caps-vllm profile-moe`` (:mod:`.moe_kernel`) measures; ``caps-vllm fit-step-cost``
(:mod:`.fit_step_cost`) fits the coefficients the ``step_cost`` strategy prices with.
"""
