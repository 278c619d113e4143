"""Routing arithmetic, the metrics observer and the plugin's process-level pieces (no engine)."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import textwrap
from types import SimpleNamespace

import numpy as np
import pytest

from caps_vllm.routing import RoutingRecord, cosine, counts_from_rows, load_shape, topk_overlap

pytest.importorskip("prometheus_client")
from prometheus_client import REGISTRY  # noqa: E402

from caps_vllm import plugin  # noqa: E402
from caps_vllm.metrics import SPEC, CapsMetrics  # noqa: E402
from caps_vllm.observer import RoutingObserver  # noqa: E402


def test_load_shape_by_hand():
    load = np.array([[4, 0, 0, 0], [1, 1, 1, 1], [0, 0, 0, 0]])
    s = load_shape(load)
    # layer 0: mean 1, max 4, std sqrt(3); layer 1: flat; layer 2: empty, left out
    assert s.cv == pytest.approx((np.sqrt(3) + 0) / 2)
    assert s.max_over_mean == pytest.approx((4 + 1) / 2)
    assert s.distinct == pytest.approx((1 + 4) / 2)
    assert list(s.per_layer_max_over_mean) == [4.0, 1.0, 0.0]
    assert load_shape(np.zeros((2, 3))) is None


def test_counts_from_rows():
    rows = np.array([[[0, 1], [2, 0]], [[1, 2], [2, 1]]])  # 2 tokens, 2 layers, top-2
    assert counts_from_rows(rows, 3).tolist() == [[1, 2, 1], [1, 1, 2]]
    assert counts_from_rows(np.zeros((0, 2, 2), dtype=np.uint8), 3).tolist() == [[0, 0, 0], [0, 0, 0]]
    with pytest.raises(ValueError, match="tokens, layers, top_k"):
        counts_from_rows(np.zeros((2, 2)), 3)


def test_cosine_and_topk_overlap():
    assert cosine([1, 0], [2, 0]) == pytest.approx(1.0)
    assert cosine([1, 0], [0, 3]) == pytest.approx(0.0)
    assert cosine([0, 0], [1, 1]) is None
    pred = np.array([[5, 4, 0, 0], [0, 0, 1, 9]])
    act = np.array([[3, 0, 2, 0], [0, 0, 0, 0]])  # layer 1 routed nothing: skipped
    assert topk_overlap(pred, act, 2) == pytest.approx(0.5)  # {0,1} vs {0,2}
    assert topk_overlap(pred, np.zeros((2, 4)), 2) is None


def _samples(name: str) -> dict:
    return {
        tuple(sorted(s.labels.items())): s.value for fam in REGISTRY.collect() for s in fam.samples if s.name == name
    }


def _value(name: str, model: str) -> float:
    return sum(v for labels, v in _samples(name).items() if ("model_name", model) in labels)


def _observer(model: str, predict=None, batch_steps: int = 1) -> RoutingObserver:
    return RoutingObserver(CapsMetrics(model, "0"), predict, layers=2, num_experts=4, top_k=2, batch_steps=batch_steps)


def test_predicted_step_load_weights_each_request_by_its_scheduled_tokens():
    obs = _observer("t-pred")
    vecs = {"a": np.array([2.0, 0, 0, 0, 0, 2, 0, 0]), "b": np.array([0, 0, 0, 2.0, 0, 0, 0, 2])}
    obs.on_schedule({"a": 3, "b": 1, "c": 2}, vecs.get)  # c: no prediction
    # a's per-token mass is 4 = layers*top_k: load layer0 = [3,0,0,1] -> max/mean = 3/1
    assert _value("vllm:caps_predicted_load_max_over_mean_sum", "t-pred") == pytest.approx((3 + 3) / 2)
    assert _value("vllm:caps_scheduled_tokens_total", "t-pred") == 6
    assert _value("vllm:caps_steps_total", "t-pred") == 1
    obs.on_schedule({}, vecs.get)  # an empty step is not a step
    assert _value("vllm:caps_steps_total", "t-pred") == 1


def test_predictor_accuracy_is_scored_once_the_prompt_is_routed_over_the_routed_positions():
    seen = []

    def predict(ids):
        seen.append(list(ids))
        return np.array([1.0, 1, 0, 0, 0, 0, 1, 1])

    obs = _observer("t-acc", predict)
    chunk1 = np.array([[1, 1, 0, 0], [0, 0, 1, 1]])
    rec = RoutingRecord((0, 1), chunk1, 2, {"r": chunk1}, {"r": 3})  # prefix cache hit: routed from 3
    prompts = {"r": ([9, 9, 9, 5, 6, 7], False)}
    obs.on_output(rec, prompts.get)
    assert _value("vllm:caps_predictor_cosine_count", "t-acc") == 0  # prompt not done yet
    prompts["r"] = ([9, 9, 9, 5, 6, 7], True)
    obs.on_output(RoutingRecord((0, 1), chunk1, 2, {"r": chunk1}, {"r": 5}), prompts.get)
    assert seen == [[5, 6, 7]]
    assert _value("vllm:caps_predictor_cosine_count", "t-acc") == 1
    assert _value("vllm:caps_predictor_cosine_sum", "t-acc") == pytest.approx(1.0)
    assert _value("vllm:caps_predictor_topk_overlap_sum", "t-acc") == pytest.approx(1.0)
    assert _value("vllm:caps_routed_tokens_total", "t-acc") == 4
    # a request that disappears before its prompt is routed is forgotten, not scored
    obs.on_output(RoutingRecord((0, 1), chunk1, 2, {"gone": chunk1}, {"gone": 0}), {}.get)
    assert obs._prompts == {} and _value("vllm:caps_predictor_cosine_count", "t-acc") == 1


def test_decode_accuracy_is_scored_against_the_prompts_prediction_once_the_request_finishes():
    obs = _observer("t-dec", lambda ids: np.array([1.0, 1, 0, 0, 0, 0, 1, 1]))
    step = np.array([[1, 0, 1, 0], [0, 0, 1, 1]])
    alive = {"r": ([4, 5], True)}
    for _ in range(3):  # three decode steps of r
        obs.on_output(RoutingRecord((0, 1), step, 1, decode_counts={"r": step}), alive.get)
    assert _value("vllm:caps_predictor_decode_cosine_count", "t-dec") == 0  # still running
    obs.on_finished(["r"])
    assert _value("vllm:caps_predictor_decode_cosine_count", "t-dec") == 1
    # prediction [1,1,0,0] vs decode [3,0,3,0] in layer 0 (cosine 0.5), [0,0,1,1] vs [0,0,3,3] in layer 1 (1.0)
    assert _value("vllm:caps_predictor_decode_cosine_sum", "t-dec") == pytest.approx(
        cosine(np.array([1.0, 1, 0, 0, 0, 0, 1, 1]), np.array([3.0, 0, 3, 0, 0, 0, 3, 3]))
    )
    assert _value("vllm:caps_predictor_decode_topk_overlap_sum", "t-dec") == pytest.approx((0.5 + 1.0) / 2)
    assert obs._decodes == {}
    obs.on_output(RoutingRecord((0, 1), step, 1, decode_counts={"q": step}), {"q": ([4], True)}.get)
    obs.on_finished(["q"], score=False)  # aborted: forgotten, not scored
    assert obs._decodes == {} and _value("vllm:caps_predictor_decode_cosine_count", "t-dec") == 1


def test_learning_counters():
    from caps_vllm.learned_table import Recall

    obs = _observer("t-learn")
    obs.on_learning(Recall(picks=40, learned_hits=30, prior_hits=10))
    obs.on_learning(Recall(picks=8, learned_hits=8, prior_hits=1))
    assert _value("vllm:caps_learning_routed_picks_total", "t-learn") == 48
    hits = {
        dict(k)["table"]: v
        for k, v in _samples("vllm:caps_learning_hits_total").items()
        if ("model_name", "t-learn") in k
    }
    assert hits == {"learned": 38, "dry_run": 11}


def test_admission_counters():
    obs = _observer("t-adm")
    obs.on_admission(admitted=3, ranked=2, bypassed=1, no_vector=1, selection_s=1e-4)
    obs.on_admission(admitted=2, ranked=None, bypassed=0, no_vector=0, selection_s=None)
    assert _value("vllm:caps_admitted_requests_total", "t-adm") == 0  # counted, exported with the step's figures
    obs.flush()
    got = {
        n: _value(n, "t-adm")
        for n in (
            "vllm:caps_admitted_requests_total",
            "vllm:caps_ranked_requests_total",
            "vllm:caps_max_wait_bypass_requests_total",
            "vllm:caps_fcfs_fallback_requests_total",
            "vllm:caps_predictor_fallback_requests_total",
            "vllm:caps_selection_seconds_count",
        )
    }
    assert list(got.values()) == [5, 2, 1, 2, 1, 1]


def test_series_do_not_grow_with_requests():
    obs = _observer("t-card", lambda ids: np.ones(8))
    rng = np.random.default_rng(0)

    def series() -> int:
        return sum(1 for fam in REGISTRY.collect() for s in fam.samples if s.labels.get("model_name") == "t-card")

    def traffic(first: int, n: int) -> None:
        for i in range(first, first + n):
            counts = rng.integers(0, 5, size=(2, 4))
            obs.on_schedule({f"r{i}": 3}, lambda rid: np.ones(8))
            obs.on_output(
                RoutingRecord((0, 1), counts, 3, {f"r{i}": counts}, {f"r{i}": 0}), lambda rid: ([1, 2, 3], True)
            )
            obs.on_admission(1, 1, 0, 0, 1e-4)

    traffic(0, 10)
    before = series()
    traffic(10, 500)
    assert series() == before
    assert _value("vllm:caps_predictor_cosine_count", "t-card") == 510


def test_metric_names_follow_vllm_conventions():
    for name, (kind, doc, _, extra) in SPEC.items():
        assert name.startswith("vllm:caps_") and doc
        assert set(extra) <= {"layer", "table"}  # bounded: the MoE layers; learned or dry_run
        assert not name.endswith("_total")  # prometheus_client adds it to counters
        if kind == "histogram" and "seconds" in name:
            assert name.endswith("_seconds")


def test_remove_stale_files_keeps_live_processes(tmp_path):
    dead = subprocess.run([sys.executable, "-c", "import os; print(os.getpid())"], capture_output=True, text=True)
    dead_pid = int(dead.stdout)
    for name in (f"counter_{dead_pid}.db", f"histogram_{os.getpid()}.db", "notes.txt"):
        (tmp_path / name).write_text("x")
    assert plugin.remove_stale_files(str(tmp_path)) == [f"counter_{dead_pid}.db"]
    assert sorted(p.name for p in tmp_path.iterdir()) == [f"histogram_{os.getpid()}.db", "notes.txt"]


def _in_subprocess(code: str, env: dict | None = None) -> dict:
    full_env = {k: v for k, v in os.environ.items() if k.lower() != "prometheus_multiproc_dir"}
    full_env.update(env or {})
    out = subprocess.run(
        [sys.executable, "-c", textwrap.dedent(code)], capture_output=True, text=True, env=full_env, timeout=120
    )
    assert out.returncode == 0, out.stderr
    return json.loads(out.stdout.strip().splitlines()[-1])


def test_vllm_serve_gets_a_private_metrics_folder_removed_at_exit():
    got = _in_subprocess("""
        import json, os, prometheus_client.values as v
        from caps_vllm.plugin import prepare_metrics_dir
        other = prepare_metrics_dir(["python", "train.py"])
        folder = prepare_metrics_dir(["/x/bin/vllm", "serve", "model"])
        print(json.dumps({"other": other, "folder": folder, "env": os.environ["PROMETHEUS_MULTIPROC_DIR"],
                          "exists": os.path.isdir(folder), "value": v.ValueClass.__name__}))
    """)
    assert got["other"] is None
    assert got["folder"] == got["env"] and got["exists"]
    assert got["value"] != "MutexValue"  # metrics made from now on are written to the folder
    assert not os.path.exists(got["folder"])  # removed when that process exited


def test_a_user_metrics_folder_is_kept_but_cleaned(tmp_path):
    (tmp_path / "counter_999999999.db").write_text("stale")
    got = _in_subprocess(
        """
        import json
        from caps_vllm.plugin import prepare_metrics_dir
        print(json.dumps({"folder": prepare_metrics_dir(["/x/bin/vllm", "serve", "m"])}))
    """,
        {"PROMETHEUS_MULTIPROC_DIR": str(tmp_path)},
    )
    assert got["folder"] == str(tmp_path) and tmp_path.exists()
    assert list(tmp_path.iterdir()) == []


def test_after_import_runs_the_hook_once_on_first_import(tmp_path, monkeypatch):
    (tmp_path / "caps_probe_mod.py").write_text("X = 1\n")
    monkeypatch.syspath_prepend(str(tmp_path))
    calls = []
    plugin.after_import("caps_probe_mod", lambda m: calls.append(m.X))
    assert calls == []
    import caps_probe_mod  # noqa: F401

    assert calls == [1]
    plugin.after_import("caps_probe_mod", lambda m: calls.append(2))  # already imported: runs now
    assert calls == [1, 2]
    sys.modules.pop("caps_probe_mod")


@pytest.mark.parametrize(
    "cls,caps,want",
    [
        ("caps_vllm.CapsScheduler", None, True),
        ("caps_vllm.CapsScheduler", {"capture": False}, False),
        ("vllm.v1.core.sched.scheduler.Scheduler", None, False),
    ],
)
def test_capture_only_with_the_caps_scheduler(cls, caps, want):
    cfg = SimpleNamespace(
        scheduler_config=SimpleNamespace(scheduler_cls=cls), additional_config={"caps": caps} if caps else {}
    )
    assert plugin.capture_wanted(cfg) is want


def test_incremental_predicted_load_equals_recomputation():
    """The running sum over steps whose scheduled sets change equals summing from scratch."""
    rng = np.random.default_rng(1)
    vecs = {f"r{i}": (rng.dirichlet(np.ones(8)) * 4 if i % 5 else None) for i in range(40)}
    obs = _observer("t-incr")
    expected = 0.0
    for _ in range(60):
        ids = rng.choice(40, size=rng.integers(1, 12), replace=False)
        scheduled = {f"r{i}": int(rng.choice([1, 1, 1, 5])) for i in ids}
        obs.on_schedule(scheduled, vecs.get)
        load = sum((vecs[r] * n for r, n in scheduled.items() if vecs[r] is not None), np.zeros(8))
        shape = load_shape(load.reshape(2, 4))
        expected += shape.max_over_mean if shape is not None else 0.0
    assert _value("vllm:caps_predicted_load_max_over_mean_sum", "t-incr") == pytest.approx(expected, rel=1e-9)


def test_the_metrics_reference_documents_every_metric():
    from pathlib import Path

    readme = (Path(__file__).resolve().parents[1] / "docs" / "metrics.md").read_text()
    for name, (kind, *_rest) in SPEC.items():
        assert (f"`{name}_total`" if kind == "counter" else f"`{name}") in readme or f"{name}_total" in readme, name


def test_deploy_files_agree():
    from pathlib import Path

    yaml = pytest.importorskip("yaml")
    deploy = Path(__file__).resolve().parents[1] / "deploy"
    compose = yaml.safe_load((deploy / "compose.yaml").read_text())
    prom = yaml.safe_load((deploy / "prometheus" / "prometheus.yml").read_text())
    target = prom["scrape_configs"][0]["static_configs"][0]["targets"][0]
    # the command itself (scheduler class, port 8000) is deploy/serve.sh's: test_newcomer parses it
    assert target == "vllm:8000" and "8000:8000" in compose["services"]["vllm"]["ports"]
    assert compose["services"]["vllm"]["entrypoint"] == ["caps-serve"]
    for svc in compose["services"].values():
        for vol in svc.get("volumes", []):
            src = vol.split(":")[0]
            if src.startswith("./"):
                assert (deploy / src).exists(), src
    ds = yaml.safe_load((deploy / "grafana/provisioning/datasources/prometheus.yml").read_text())
    dash = json.loads((deploy / "grafana/dashboards/caps-vllm.json").read_text())
    uids = {p["datasource"]["uid"] for p in dash["panels"]}
    assert uids == {ds["datasources"][0]["uid"]}
    assert (deploy / compose["services"]["vllm"]["build"]["dockerfile"].removeprefix("deploy/")).exists()


def test_the_predicted_load_from_step_changes_equals_the_full_set_difference():
    """Told what joined and left (and which ids may take several tokens), the observer keeps the
    same predicted load as by passes over every id; when the ids do not add up (a running
    request the budget left out, a change it was not told) it falls back to those passes."""
    rng = np.random.default_rng(0)
    vecs = {f"r{i}": rng.random(8) for i in range(40)}
    full, told = (_observer(f"t-chg-{k}") for k in ("full", "told"))
    drops, drop = [], told._drop
    told._drop = lambda ids: drops.append(1) or drop(ids)  # one call a step on the told path, two on the passes
    prev: dict[str, int] = {}
    for step in range(60):
        running = (
            {rid: 1 for rid in sorted(rng.choice(list(vecs), size=12, replace=False))}
            if step % 7 == 0
            else {rid: 1 for rid in prev if rng.random() > 0.1}
        )
        for rid in rng.choice(list(vecs), size=2):
            running.setdefault(str(rid), 5)  # a newcomer's prompt chunk
        if step % 11 == 5 and len(running) > 3:
            running.pop(next(iter(running)))  # left out this step, not told
        joined = [rid for rid in running if rid not in prev]
        left = [rid for rid in prev if rid not in running] if step % 13 else []  # sometimes not told
        multi = [rid for rid, n in running.items() if n > 1]
        full.on_schedule(running, vecs.get)
        told.on_schedule(running, vecs.get, sum(running.values()), (joined, left), multi)
        np.testing.assert_allclose(told._sum, full._sum, atol=1e-9)
        assert told._units.keys() == full._units.keys() == running.keys()
        prev = running
    assert 60 < len(drops) < 60 + 15  # the passes ran only where the ids did not add up


def test_batched_figures_equal_the_per_step_ones_once_flushed():
    rng = np.random.default_rng(1)
    vecs = {f"r{i}": rng.random(8) * (i % 3) for i in range(30)}  # some without load: skipped steps
    per_step, batched = _observer("t-batch-1"), _observer("t-batch-16", batch_steps=16)
    for step in range(40):
        scheduled = {f"r{i}": 1 + (i == step % 30) * 3 for i in rng.choice(30, size=5, replace=False)}
        routed = rng.integers(0, 4, size=(2, 4)) * (step % 7 != 0)  # some steps route nothing
        for obs in (per_step, batched):
            obs.on_schedule(scheduled, vecs.get)
            obs.on_output(RoutingRecord((0, 1), routed, int(routed.sum())), lambda rid: None)
    name = "vllm:caps_predicted_load_cv_count"
    assert 16 <= _value(name, "t-batch-16") < _value(name, "t-batch-1")  # batches out, the last steps held
    assert 16 <= _value("vllm:caps_steps_total", "t-batch-16") < _value("vllm:caps_steps_total", "t-batch-1") == 40
    batched.flush()
    for name in ("vllm:caps_steps_total", "vllm:caps_scheduled_tokens_total"):
        assert _value(name, "t-batch-16") == _value(name, "t-batch-1")
    for fig in ("predicted_load_cv", "predicted_load_max_over_mean", "predicted_distinct_experts", "actual_load_cv"):
        for part in ("count", "sum"):
            assert _value(f"vllm:caps_{fig}_{part}", "t-batch-16") == pytest.approx(
                _value(f"vllm:caps_{fig}_{part}", "t-batch-1"), rel=1e-12
            )
    assert _value("vllm:caps_actual_layer_load_max_over_mean_sum", "t-batch-16") == pytest.approx(
        _value("vllm:caps_actual_layer_load_max_over_mean_sum", "t-batch-1"), rel=1e-12
    )


def test_per_token_vectors_are_summed_as_they_are():
    """The scheduler's per-token vectors already sum to layers x top_k: the observer told so skips
    the rescaling and exports the same figures."""
    rng = np.random.default_rng(2)
    raw = {f"r{i}": rng.random(8) for i in range(12)}
    per_token = {rid: v / v.reshape(2, 4).sum(axis=1).repeat(4) * 2 for rid, v in raw.items()}  # top-2 per layer
    told = RoutingObserver(CapsMetrics("t-unit-told", "0"), None, 2, 4, 2, batch_steps=1, per_token=True)
    scaled = _observer("t-unit-scaled")
    for step in range(20):
        scheduled = {f"r{i}": 1 + (i == step % 12) for i in rng.choice(12, size=4, replace=False)}
        for obs in (told, scaled):
            obs.on_schedule(scheduled, per_token.get)
    for fig in ("load_cv", "load_max_over_mean", "distinct_experts"):
        assert _value(f"vllm:caps_predicted_{fig}_sum", "t-unit-told") == pytest.approx(
            _value(f"vllm:caps_predicted_{fig}_sum", "t-unit-scaled"), rel=1e-9
        )
    assert _value("vllm:caps_predicted_load_cv_count", "t-unit-told") == 20


def test_a_batch_of_observations_fills_the_histogram_as_one_at_a_time():
    from prometheus_client import CollectorRegistry, Histogram

    from caps_vllm.metrics import observe_many

    values = [0.0, 0.05, 0.1, 0.1000001, 0.7, 3.0, 1e9, 2.5, 2.5000001]  # on, between and past the bounds
    reg = CollectorRegistry()
    fam = Histogram("t_batch_hist", "test", ["how"], buckets=(0.1, 0.5, 1.0, 2.5, 10.0), registry=reg)
    for v in values:
        fam.labels("one").observe(v)
    observe_many(fam.labels("many"), values)
    samples = {how: {} for how in ("one", "many")}
    for s in next(iter(reg.collect())).samples:
        if not s.name.endswith("_created"):
            samples[s.labels["how"]][(s.name, s.labels.get("le"))] = s.value
    one, many = samples["one"], samples["many"]
    assert one.keys() == many.keys() and len(one) > 5
    for key, value in one.items():
        assert many[key] == (pytest.approx(value, rel=1e-12) if key[0].endswith("_sum") else value), key
