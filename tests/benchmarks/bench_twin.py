"""Speed of the vLLM twin: simulated seconds per wall second on the Azure conversation trace
(DeepSeek-V2-Lite on the H100 roofline, vLLM's H100 defaults, stock Scheduler, uniform routing
so that ../shared is needed only for the trace), for the first N requests or the whole hour
(19,366 requests; target: ≤ 10 minutes). A printed figure, not a test.

    python tests/benchmarks/bench_twin.py [--requests N | --full]
"""

from __future__ import annotations

import argparse
import json
import sys
import tempfile
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]
sys.path.insert(0, str(ROOT))
TRACE = ROOT.parent / "shared" / "data" / "traces" / "azure_llm_2023_conv.csv"


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--requests", type=int, default=3000)
    ap.add_argument("--full", action="store_true", help="the whole hour")
    args = ap.parse_args()
    if not TRACE.exists():
        print(f"twin speed: skipped ({TRACE} is not beside the checkout)")
        return
    from sim import twin_run

    n = 20000 if args.full else args.requests
    with tempfile.TemporaryDirectory() as out:
        twin_run.main(
            [
                "--trace",
                str(TRACE),
                "--requests",
                str(n),
                "--routing",
                "uniform",
                "--strategies",
                "stock",
                "--no-progress",
                "--out",
                out,
            ]
        )
        r = json.loads((Path(out) / "results.json").read_text())["results"]["stock"]
    print(
        f"twin speed: {r['requests']} requests of the Azure trace, {r['simulated_s']:.0f} simulated s in "
        f"{r['wall_s']:.1f} wall s: {r['simulated_s_per_wall_s']:.1f} simulated s per wall s; vLLM's scheduler "
        f"itself {r['scheduler_wall_s']:.1f} s of it"
        + (
            ""
            if args.full
            else f"; the hour (19,366 requests) extrapolates to {3600 / r['simulated_s_per_wall_s'] / 60:.1f} min "
            "(target ≤ 10)"
        )
    )


if __name__ == "__main__":
    main()
