"""vLLM general plugin (entry point ``vllm.general_plugins``), loaded by vLLM in every process.

Three jobs, all inert unless the CAPS scheduler is configured:

* In the process that runs the model, it wraps the model runner so that, once the model is
  loaded, every MoE router's decisions are counted per step (:mod:`caps_vllm.capture`) and
  attached to the step's ``ModelRunnerOutput`` as ``caps_routing``, which reaches the
  scheduler (pickled with the output where the worker is another process).
* In the ``vllm serve`` front-end process, it makes the EngineCore's metrics visible on the
  server's own ``/metrics``: prometheus_client's multiprocess mode needs
  ``PROMETHEUS_MULTIPROC_DIR`` before any metric exists. If the user did not set it, a fresh
  private folder is created (so no stale file from another run can leak in) and removed at
  exit; if the user did, files left by processes that no longer exist are removed first.
* In the EngineCore process, it predicts each request's expert load where vLLM prepares the
  request (``EngineCore.preprocess_add_request``: a serving engine's input thread, which vLLM
  runs in parallel with the model's forward pass for this kind of per-request work, block
  hashing among it), so that ``schedule()`` finds the prediction done (``Caps.arrived``).

The runner classes are patched when their modules are imported, so processes that never run
a model (the API server) never import them.
"""

from __future__ import annotations

import atexit
import functools
import importlib.abc
import importlib.util
import logging
import multiprocessing
import os
import re
import shutil
import sys
import tempfile
from collections.abc import Callable
from pathlib import Path

from caps_vllm.logs import OWNED_ENV, route_logs_through_vllm

logger = logging.getLogger("caps_vllm.plugin")

_RUNNER_MODULES = ("vllm.v1.worker.gpu_model_runner", "vllm.v1.worker.cpu_model_runner")
_ENGINE_MODULE = "vllm.v1.engine.core"
_registered = False


def register() -> None:
    global _registered
    if _registered:
        return
    _registered = True
    if multiprocessing.parent_process() is None:  # children inherit the environment
        prepare_metrics_dir()
    for name in _RUNNER_MODULES:
        after_import(name, _patch_runner_module)
    after_import(_ENGINE_MODULE, _patch_engine_module)


# --- requests on arrival --------------------------------------------------------------------


def _patch_engine_module(module) -> None:
    """Wrap ``EngineCore.preprocess_add_request`` (vLLM 0.32.0 and 0.33.0; absent: nothing done,
    the scheduler predicts when it needs a load) to hand each prepared request to CAPS."""
    cls = getattr(module, "EngineCore", None)
    original = getattr(cls, "preprocess_add_request", None)
    if original is None or getattr(original, "caps_wrapped", False):
        return

    @functools.wraps(original)
    def preprocess_add_request(self, request):
        prepared = original(self, request)
        caps = getattr(getattr(self, "scheduler", None), "__dict__", {}).get("caps")  # CAPS's scheduler only
        if caps is not None:
            caps.arrived(prepared[0])
        return prepared

    preprocess_add_request.caps_wrapped = True
    cls.preprocess_add_request = preprocess_add_request


# --- metrics folder -------------------------------------------------------------------------


def _is_vllm_serve(argv: list[str]) -> bool:
    prog = os.path.basename(argv[0]) if argv else ""
    return (prog == "vllm" and argv[1:2] == ["serve"]) or argv[0].endswith(
        os.path.join("entrypoints", "openai", "api_server.py")
    )


def remove_stale_files(folder: str) -> list[str]:
    """Delete multiprocess files (``<kind>_<pid>.db``) whose process no longer exists."""
    removed = []
    for path in Path(folder).glob("*.db"):
        m = re.search(r"_(\d+)\.db$", path.name)
        if m is None:
            continue
        pid = int(m.group(1))
        try:
            os.kill(pid, 0)
            continue  # alive (or not ours to signal): keep
        except ProcessLookupError:
            pass
        except PermissionError:
            continue
        path.unlink(missing_ok=True)
        removed.append(path.name)
    return removed


def prepare_metrics_dir(argv: list[str] | None = None) -> str | None:
    """Set up (or clean) the multiprocess metrics folder; returns it, or None if left unset."""
    folder = os.environ.get("PROMETHEUS_MULTIPROC_DIR")
    if folder:
        if not os.path.isdir(folder):
            try:
                os.makedirs(folder)
                logger.warning("CAPS: PROMETHEUS_MULTIPROC_DIR=%s did not exist; created it", folder)
            except OSError as exc:
                raise RuntimeError(
                    f"PROMETHEUS_MULTIPROC_DIR={folder} is not a folder and cannot be created ({exc}): "
                    "point it at a writable empty folder, or unset it (vllm serve then makes a "
                    "private one)"
                ) from None
        else:
            removed = remove_stale_files(folder)
            if removed:
                logger.info("CAPS: removed %d metrics files of finished processes from %s", len(removed), folder)
        return folder
    if not _is_vllm_serve(sys.argv if argv is None else argv):
        return None
    folder = tempfile.mkdtemp(prefix="caps_vllm_metrics_")
    os.environ["PROMETHEUS_MULTIPROC_DIR"] = folder
    os.environ[OWNED_ENV] = folder  # tells the scheduler's startup log who made it
    atexit.register(shutil.rmtree, folder, ignore_errors=True)
    values = sys.modules.get("prometheus_client.values")
    if values is not None:  # imported already: switch the value class before any metric exists
        values.ValueClass = values.get_value_class()
    return folder


# --- model runner ---------------------------------------------------------------------------


class _HookedLoader(importlib.abc.Loader):
    def __init__(self, inner, hook: Callable) -> None:
        self.inner, self.hook = inner, hook

    def create_module(self, spec):
        return self.inner.create_module(spec)

    def exec_module(self, module) -> None:
        self.inner.exec_module(module)
        self.hook(module)


class _AfterImport(importlib.abc.MetaPathFinder):
    """Runs a hook on a module right after it is first imported."""

    hooks: dict[str, Callable] = {}

    def find_spec(self, name, path, target=None):
        hook = self.hooks.pop(name, None)
        if hook is None:
            return None
        spec = importlib.util.find_spec(name)  # the other finders (this one no longer matches)
        if spec is None or spec.loader is None:
            return None
        spec.loader = _HookedLoader(spec.loader, hook)
        return spec


def after_import(name: str, hook: Callable) -> None:
    module = sys.modules.get(name)
    if module is not None:
        hook(module)
        return
    _AfterImport.hooks[name] = hook
    if not any(isinstance(f, _AfterImport) for f in sys.meta_path):
        sys.meta_path.insert(0, _AfterImport())


def capture_wanted(vllm_config) -> bool:
    """Capture only where the CAPS scheduler runs and ``caps.capture`` is not false."""
    cls = vllm_config.scheduler_config.scheduler_cls
    name = cls if isinstance(cls, str) else f"{getattr(cls, '__module__', '')}.{getattr(cls, '__qualname__', '')}"
    if "caps_vllm" not in str(name):
        return False
    caps = (vllm_config.additional_config or {}).get("caps") or {}
    return not (isinstance(caps, dict) and caps.get("capture") is False)


def _install(runner) -> None:
    route_logs_through_vllm()  # vLLM configures its logging after plugins load: route on first use
    runner.caps_capture = None
    runner.caps_pending = None
    if not capture_wanted(runner.vllm_config):
        return
    from caps_vllm.capture import StepCapture

    try:
        runner.caps_capture = StepCapture(runner.vllm_config, runner.get_model())
    except ValueError as exc:  # no MoE layer / unsupported router: one warning, capture off
        logger.warning("CAPS routing capture is off for this model: %s", exc)
        return
    logger.info(
        "CAPS routing capture on: %d MoE layers, %d experts",
        len(runner.caps_capture.moe_layers),
        runner.caps_capture.num_experts,
    )


def _attach(runner, output) -> None:
    pending, runner.caps_pending = runner.caps_pending, None
    if pending is None or not (hasattr(output, "req_id_to_index") or hasattr(output, "get_output")):
        return  # nothing ran, or a pipeline stage's intermediate tensors
    if hasattr(output, "get_output"):  # async output: copy when vLLM resolves it, off the busy loop
        resolve = output.get_output

        def get_output():
            out = resolve()
            out.caps_routing = pending.get()
            return out

        output.get_output = get_output
    else:
        output.caps_routing = pending.get()


def _patch_runner_module(module) -> None:
    for cls in vars(module).values():
        if not (isinstance(cls, type) and cls.__module__ == module.__name__ and cls.__name__.endswith("ModelRunner")):
            continue
        if "load_model" in vars(cls):
            cls.load_model = _wrap_load_model(vars(cls)["load_model"])
        if "execute_model" in vars(cls):
            cls.execute_model = _wrap_execute(vars(cls)["execute_model"])
        if "sample_tokens" in vars(cls):
            cls.sample_tokens = _wrap_sample(vars(cls)["sample_tokens"])


def _wrap_load_model(load_model):
    def wrapped(self, *args, **kwargs):
        out = load_model(self, *args, **kwargs)
        if getattr(self, "caps_capture", None) is None:  # a subclass may call its parent's
            _install(self)
        return out

    return wrapped


def _wrap_execute(execute_model):
    def wrapped(self, scheduler_output, *args, **kwargs):
        out = execute_model(self, scheduler_output, *args, **kwargs)
        cap = getattr(self, "caps_capture", None)
        if cap is not None:
            try:
                self.caps_pending = cap.reduce(scheduler_output, self.input_batch)
            except Exception:  # never let observability take the engine down
                self.caps_capture = self.caps_pending = None
                logger.exception("CAPS routing capture failed; it is off from now on")
            if out is not None:
                _attach(self, out)
        return out

    return wrapped


def _wrap_sample(sample_tokens):
    def wrapped(self, *args, **kwargs):
        out = sample_tokens(self, *args, **kwargs)
        if getattr(self, "caps_pending", None) is not None:
            _attach(self, out)
        return out

    return wrapped
