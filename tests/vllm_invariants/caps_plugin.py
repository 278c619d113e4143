"""pytest plugin: run vLLM's own scheduler tests with CAPS in place of the stock classes.

Loaded with ``-p caps_plugin``. After collection (every test module imported), each module
under ``tests.`` that bound vLLM's ``Scheduler`` or ``AsyncScheduler`` gets CAPS's classes
instead, so ``create_scheduler()`` and direct constructions build CAPS schedulers.
"""

from __future__ import annotations

import sys

import pytest


def pytest_collection_finish(session) -> None:
    from vllm.v1.core.sched.async_scheduler import AsyncScheduler
    from vllm.v1.core.sched.scheduler import Scheduler

    from caps_vllm.scheduler import CapsAsyncScheduler, CapsScheduler

    swapped = 0
    for name, module in list(sys.modules.items()):
        if not name.startswith("tests.") or module is None:
            continue
        if getattr(module, "Scheduler", None) is Scheduler:
            module.Scheduler = CapsScheduler
            swapped += 1
        if getattr(module, "AsyncScheduler", None) is AsyncScheduler:
            module.AsyncScheduler = CapsAsyncScheduler
            swapped += 1
    session.config._caps_swapped = swapped  # type: ignore[attr-defined]
    print(f"\ncaps_plugin: CAPS substituted in {swapped} bindings")


_reorders = [0]


def pytest_configure(config) -> None:
    import json
    import os

    from caps_vllm.admission import AdmissionPlanner
    from caps_vllm.config import CapsConfig

    # vLLM's create_scheduler() passes no additional_config: CAPS runs with its defaults,
    # unless the runner asks for others (--caps-config), e.g. to make CAPS reorder more often.
    overrides = json.loads(os.environ.get("CAPS_INVARIANTS_CONFIG") or "{}")
    if overrides:
        from_dict = CapsConfig.from_dict.__func__

        def with_overrides(cls, raw):
            return from_dict(cls, {**overrides, **(raw or {})})

        CapsConfig.from_dict = classmethod(with_overrides)

    plan = AdmissionPlanner.plan

    def counting_plan(self, *args, **kwargs):
        order = plan(self, *args, **kwargs)
        _reorders[0] += order is not None
        return order

    AdmissionPlanner.plan = counting_plan


@pytest.hookimpl(hookwrapper=True)
def pytest_runtest_call(item):
    """Record per test how many steps CAPS reordered (a junit property), for the report."""
    _reorders[0] = 0
    yield
    item.user_properties.append(("caps_reorders", _reorders[0]))
