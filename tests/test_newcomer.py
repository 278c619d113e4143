"""The newcomer path: the README's two commands, the deployment manifests, and error messages a
person can act on (vLLM missing, a dense model, no GPU, no metrics folder, an unknown strategy)."""

from __future__ import annotations

import json
import logging
import os
import re
import shlex
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import yaml

ROOT = Path(__file__).resolve().parents[1]
SAMPLE = {"HEAD_IP": "10.0.0.1", "START_RANK": "8"}  # what a user exports for the roles that need it


def test_readme_quick_start_is_two_make_targets():
    out = subprocess.run(
        ["bash", str(ROOT / ".ci" / "fresh_clone_check.sh"), "--list"], capture_output=True, text=True, check=True
    ).stdout.split("\n")
    commands = [c for c in out if c]
    assert commands == ["make demo", "make test"]
    makefile = (ROOT / "Makefile").read_text()
    for c in commands:
        assert re.search(rf"^{c.split()[1]}:", makefile, re.M), f"{c}: no such Makefile target"
    assert "fresh_clone_check.sh" in (ROOT / ".ci" / "run").read_text()


def _compose_value(value: str) -> str:
    """Compose's ${VAR:-default} with the user's sample exports."""
    return re.sub(r"\$\{(\w+):-([^}]*)\}", lambda m: SAMPLE.get(m.group(1), m.group(2)), str(value))


def _launches() -> list[tuple[str, dict[str, str]]]:
    """(where, environment) of every container started through deploy/serve.sh."""
    found = []
    for path in sorted((ROOT / "deploy").glob("compose*.yaml")):
        for name, svc in yaml.safe_load(path.read_text())["services"].items():
            if svc.get("entrypoint") == ["caps-serve"]:
                found.append((f"{path.name}:{name}", {k: _compose_value(v) for k, v in svc["environment"].items()}))
    for path in sorted((ROOT / "deploy" / "k8s").glob("*.yaml")):
        for doc in yaml.safe_load_all(path.read_text()):
            spec = doc["spec"]
            templates = (
                [
                    ("leader", spec["leaderWorkerTemplate"]["leaderTemplate"]),
                    ("worker", spec["leaderWorkerTemplate"]["workerTemplate"]),
                ]
                if doc["kind"] == "LeaderWorkerSet"
                else [("pod", spec["template"])]
                if doc["kind"] == "Deployment"
                else []
            )
            for role, tpl in templates:
                for c in tpl["spec"]["containers"]:
                    assert c["command"] == ["caps-serve"]
                    env = {}
                    for e in c["env"]:
                        env[e["name"]] = e["value"] if "value" in e else "10.0.0.2"  # fieldRef: the pod's IP
                    env = {k: v.replace("$(LWS_LEADER_ADDRESS)", "10.0.0.1") for k, v in env.items()}
                    if doc["kind"] == "LeaderWorkerSet":
                        env["LWS_WORKER_INDEX"] = "0" if role == "leader" else "1"
                    found.append((f"{path.name}:{doc['metadata']['name']}:{role}", env))
    return found


def _serve_argv(env: dict[str, str]) -> list[str]:
    out = subprocess.run(
        ["bash", str(ROOT / "deploy" / "serve.sh")],
        env={"PATH": os.environ["PATH"], **env, "DRY_RUN": "1"},
        capture_output=True,
        text=True,
    )
    assert out.returncode == 0, out.stderr
    return shlex.split(out.stdout)


@pytest.mark.vllm
def test_every_deployment_runs_a_command_vllm_accepts_with_caps():
    """Each manifest's `vllm serve` line, as deploy/serve.sh builds it, parsed by vLLM's own
    serve parser: CAPS scheduler, a valid caps object, the data/expert-parallel layout asked for."""
    from vllm.entrypoints.launchers.cli_args import make_arg_parser
    from vllm.utils.argparse_utils import FlexibleArgumentParser

    from caps_vllm.config import CapsConfig

    launches = _launches()
    roles = {env["ROLE"] for _, env in launches}
    assert roles == {"single", "head", "worker", "ray-head", "ray-worker"}, roles
    for where, env in launches:
        argv = _serve_argv(env)
        if env["ROLE"] == "ray-worker":
            assert (
                argv[:2] == ["ray", "start"] and argv[2] == f"--address={env['HEAD_IP']}:6379" and "--block" in argv
            ), where
            continue
        assert argv[:2] == ["vllm", "serve"], where
        a = make_arg_parser(FlexibleArgumentParser()).parse_args(["--model", argv[2], *argv[3:]])
        assert a.scheduler_cls == "caps_vllm.CapsScheduler", where
        raw = a.additional_config if isinstance(a.additional_config, dict) else json.loads(a.additional_config)
        CapsConfig.from_dict(raw["caps"])
        dp = int(env.get("DP", "1"))
        assert a.data_parallel_size == dp, where
        assert a.enable_expert_parallel == (dp > 1), where
        if env["ROLE"] == "head":
            assert a.data_parallel_address and not a.headless, where
        if env["ROLE"] == "worker":
            local = int(env.get("DP_LOCAL", dp))
            assert a.headless and a.data_parallel_start_rank == int(env.get("START_RANK") or local), where
        if env["ROLE"] == "ray-head":
            assert a.data_parallel_backend == "ray", where


def test_launcher_names_what_is_missing():
    def run(**env):
        return subprocess.run(
            ["bash", str(ROOT / "deploy" / "serve.sh")],
            env={"PATH": os.environ["PATH"], "DRY_RUN": "1", **env},
            capture_output=True,
            text=True,
        )

    r = run(ROLE="head")
    assert r.returncode == 2 and "needs HEAD_IP" in r.stderr
    r = run(ROLE="worker", HEAD_IP="10.0.0.1")
    assert r.returncode == 2 and "LWS_WORKER_INDEX" in r.stderr and "START_RANK" in r.stderr
    r = run(ROLE="leader")
    assert r.returncode == 2 and "valid: single, head, worker, ray-head, ray-worker" in r.stderr


def test_vllm_missing_says_how_to_install_it():
    code = "import sys; sys.modules['vllm'] = None; import caps_vllm; caps_vllm.CapsScheduler"
    r = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, cwd=ROOT)
    assert r.returncode != 0
    assert "caps_vllm.CapsScheduler runs inside vLLM" in r.stderr and "pip install -e '.[gpu]'" in r.stderr
    assert "make setup" in r.stderr
    # what needs no vLLM keeps working without it
    code = "import sys; sys.modules['vllm'] = None; from caps_vllm.strategies import make_strategy; make_strategy('step_cost')"
    assert subprocess.run([sys.executable, "-c", code], cwd=ROOT).returncode == 0


def test_gpu_only_option_without_a_gpu_says_so():
    import torch

    if torch.cuda.is_available():
        pytest.skip("this machine has a GPU")
    r = subprocess.run(
        [sys.executable, "-m", "caps_vllm.cli", "profile-moe", "--device", "cuda", "--out", "/dev/null"],
        capture_output=True,
        text=True,
        cwd=ROOT,
    )
    assert r.returncode == 1
    assert "--device cuda needs a CUDA GPU" in r.stderr and "leave out --device" in r.stderr


@pytest.mark.vllm
def test_gpu_reference_moe_matches_vllms_cpu_op():
    """The --device cuda path's per-expert matmuls compute what vLLM's fused op computes (run on CPU)."""
    import torch
    from vllm import _custom_ops as ops
    from vllm.platforms import current_platform

    from caps_vllm.profiling.moe_kernel import routing, torch_moe

    current_platform.import_kernels()
    if hasattr(torch._C, "_cpu") and hasattr(torch._C._cpu, "_init_amx"):
        torch._C._cpu._init_amx()
    torch.manual_seed(0)
    e, hidden, inter, k, tokens = 8, 64, 32, 2, 10
    w13, w2 = torch.randn(e, 2 * inter, hidden).bfloat16(), torch.randn(e, hidden, inter).bfloat16()
    x = torch.randn(tokens, hidden).bfloat16()
    ids = torch.from_numpy(routing(tokens, e, k, 0, "dirichlet-0.5", np.random.default_rng(1)).astype(np.int32))
    weights = torch.rand(tokens, k, dtype=torch.float32)
    ref = torch.empty_like(x)
    ops.cpu_fused_moe(
        ref,
        x,
        ops.cpu_prepack_moe_weight(w13, "vec"),
        ops.cpu_prepack_moe_weight(w2, "vec"),
        None,
        None,
        weights,
        ids,
        "silu",
        "vec",
    )
    got = torch_moe(x.float(), w13.float(), w2.float(), ids.long(), weights)
    torch.testing.assert_close(got, ref.float(), rtol=0.05, atol=0.05 * float(ref.float().abs().max()))


def test_metrics_folder_that_does_not_exist_is_created(tmp_path, monkeypatch):
    from caps_vllm.plugin import prepare_metrics_dir

    folder = tmp_path / "metrics"
    monkeypatch.setenv("PROMETHEUS_MULTIPROC_DIR", str(folder))
    assert prepare_metrics_dir(["python"]) == str(folder) and folder.is_dir()
    blocked = tmp_path / "file"
    blocked.write_text("")
    monkeypatch.setenv("PROMETHEUS_MULTIPROC_DIR", str(blocked / "sub"))
    with pytest.raises(RuntimeError, match="point it at a writable empty folder, or unset it"):
        prepare_metrics_dir(["python"])


@pytest.mark.vllm
def test_unset_metrics_folder_and_dense_model_warnings_say_what_to_do(tiny_model, tmp_path, monkeypatch, caplog):
    import torch
    import transformers

    from caps_vllm.scheduler import CapsScheduler
    from tests.vllm_helpers import make_scheduler

    monkeypatch.delenv("PROMETHEUS_MULTIPROC_DIR", raising=False)
    caplog.set_level(logging.WARNING, logger="caps_vllm")
    logging.getLogger("caps_vllm").propagate = True
    make_scheduler(str(tiny_model), CapsScheduler, caps={})
    assert "export PROMETHEUS_MULTIPROC_DIR=$(mktemp -d)" in caplog.text
    cfg = transformers.Qwen2Config(
        vocab_size=64,
        hidden_size=32,
        intermediate_size=64,
        num_hidden_layers=1,
        num_attention_heads=2,
        num_key_value_heads=1,
        max_position_embeddings=4096,
    )
    torch.manual_seed(0)
    transformers.Qwen2ForCausalLM(cfg).save_pretrained(tmp_path)
    caplog.clear()
    make_scheduler(str(tmp_path), CapsScheduler, caps={})
    assert "is not a Mixture-of-Experts model CAPS knows" in caplog.text
    assert "leave out --scheduler-cls" in caplog.text


@pytest.mark.vllm
def test_unknown_strategy_lists_the_valid_ones_everywhere(tiny_model):
    from caps_vllm.scheduler import CapsScheduler
    from tests.vllm_helpers import make_scheduler

    with pytest.raises(ValueError, match="'fastest' is not a strategy; valid: fcfs, .*step_cost"):
        make_scheduler(str(tiny_model), CapsScheduler, caps={"strategy": "fastest"})
    for cli in (
        ["-m", "sim.evaluate", "--strategies", "fastest", "--no-figures"],
        ["-m", "loadtest.compare", "--strategies", "fcfs", "fastest"],
    ):
        r = subprocess.run([sys.executable, *cli], capture_output=True, text=True, cwd=ROOT)
        assert r.returncode == 2 and "fastest" in r.stderr and "step_cost" in r.stderr, r.stderr[-500:]
