"""``caps-vllm``: the commands a user runs by name from an installed wheel.

Serving itself is vLLM's own command (``vllm serve MODEL --scheduler-cls caps_vllm.CapsScheduler``);
these are what CAPS adds around it.
"""

from __future__ import annotations

import argparse
import sys
from collections.abc import Callable

#: subcommand -> (module, one line); each module has ``main(argv)``
COMMANDS: dict[str, tuple[str, str]] = {
    "profile-moe": ("caps_vllm.profiling.moe_kernel", "time the MoE layer against per-expert token counts"),
    "fit-step-cost": ("caps_vllm.profiling.fit_step_cost", "fit the step-cost model to profile-moe's timings"),
    "tiny-model": ("caps_vllm.tiny_model", "write the embedded tiny Qwen2-MoE checkpoint and print its path"),
}


def _main_of(module: str) -> Callable[[list[str]], None]:
    import importlib

    return importlib.import_module(module).main


def main(argv: list[str] | None = None) -> None:
    argv = sys.argv[1:] if argv is None else argv
    ap = argparse.ArgumentParser(prog="caps-vllm", description="What CAPS adds around vllm serve.")
    ap.add_argument("command", choices=sorted(COMMANDS), help="; ".join(f"{k}: {v[1]}" for k, v in COMMANDS.items()))
    ap.add_argument("args", nargs=argparse.REMAINDER, help="the command's own options (caps-vllm COMMAND --help)")
    a = ap.parse_args(argv[:1])
    _main_of(COMMANDS[a.command][0])(argv[1:])


if __name__ == "__main__":
    main()
