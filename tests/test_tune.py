"""Real Ray Tune runs with the reporter and a stock scheduler on a post-hoc key."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import numpy as np
import pytest
import torch
from ray import tune
from ray.tune.schedulers import ASHAScheduler

import posthoc_tune as pht
from posthoc_tune import PredictionStore
from tests import reference as ref

pytestmark = pytest.mark.slow


def train(config: dict[str, Any]) -> None:
    """Deterministic training; ``fail_at``: raise once, after that epoch's training step."""
    marker = Path(config.get("marker", "/nonexistent"))

    def fail_once(epoch: int) -> None:
        if epoch == config.get("fail_at") and not marker.exists():
            marker.touch()
            raise RuntimeError("simulated worker failure")

    ref.teacher_trial(
        config,
        epochs=config["epochs"],
        checkpoint=bool(config.get("checkpoint")),
        before_report=fail_once,
    )


def _result_rows(result: tune.Result) -> list[dict[str, Any]]:
    text = (Path(result.path) / "result.json").read_text()
    return [json.loads(line) for line in text.splitlines() if line.strip()]


def test_tune_run_reports_stable_keys_and_stores_every_epoch(run_tune: Any) -> None:
    space = pht.with_seeds({"lr": tune.grid_search([0.05, 0.2]), "epochs": 3}, n=2)
    results = run_tune(
        train,
        space,
        tune_config={
            "scheduler": ASHAScheduler(
                metric="val/swa+ts/nll", mode="min", max_t=3, grace_period=1, reduction_factor=2
            )
        },
    )
    assert len(results) == 4 and not results.errors
    store = PredictionStore.open(results.experiment_path)
    assert store.trials() == sorted(r.metrics["trial_id"] for r in results)

    key_sets = set()
    for result in results:
        rows = _result_rows(result)
        trial_id = rows[0]["trial_id"]
        key_sets |= {frozenset(k for k in row if k in _posthoc_keys()) for row in rows}
        assert (
            store.epochs(trial_id)
            == [row["epoch"] for row in rows]
            == list(range(1, len(rows) + 1))
        )
        meta = store.metadata(trial_id)
        assert (
            meta["group"] == pht.group_key(result.config) and meta["seed"] == result.config["seed"]
        )
        for row in rows:
            epoch = row["epoch"]
            assert set(store.read_epoch(trial_id, epoch)) == {
                (s, v) for s in ("val", "test") for v in ("base", "swa")
            }
            for split in ("val", "test"):
                y = store.labels(split)
                for variant in ("base", "swa"):
                    z = store.read(trial_id, epoch, split, variant)
                    assert row[f"{split}/{variant}/nll"] == pytest.approx(ref.nll(z, y), rel=1e-6)
                    assert row[f"{split}/{variant}/error"] == pytest.approx(ref.error(z, y))
                z_val = store.read(trial_id, epoch, "val", "swa")
                t = ref.grid_temperature(z_val, store.labels("val"))
                z = store.read(trial_id, epoch, split, "swa")
                assert row[f"{split}/swa+ts/nll"] == pytest.approx(ref.nll(z / t, y), rel=1e-3)
    assert key_sets == {frozenset(_posthoc_keys())}


def _posthoc_keys() -> set[str]:
    return set(pht.metric_keys()) | {"epoch", "temperature/base", "temperature/swa", "train/loss"}


def test_a_retried_trial_resumes_its_swa_average_exactly(run_tune: Any, tmp_path: Path) -> None:
    epochs = 5
    config = {"lr": 0.1, "seed": 0, "epochs": epochs, "checkpoint": True}
    space = {
        **config,
        "fail_at": tune.grid_search([None, 3]),
        "marker": str(tmp_path / "failed-once"),
    }
    results = run_tune(
        train, space, run_config={"failure_config": tune.FailureConfig(max_failures=1)}
    )
    assert (tmp_path / "failed-once").exists() and not results.errors
    store = PredictionStore.open(results.experiment_path)
    by_fail = {r.config["fail_at"]: r.metrics["trial_id"] for r in results}
    for result in results:  # resumed from the epoch-2 checkpoint, not re-run from epoch 1
        assert [row["epoch"] for row in _result_rows(result)] == list(range(1, epochs + 1))
    for trial_id in by_fail.values():
        assert store.epochs(trial_id) == list(range(1, epochs + 1))
        logits_dir = Path(store.root, "logits", trial_id)
        assert sorted(p.name for p in logits_dir.iterdir()) == [
            f"epoch_{e:06d}.parquet" for e in range(1, epochs + 1)
        ]
    for epoch in range(1, epochs + 1):
        for variant in ("base", "swa"):
            np.testing.assert_array_equal(
                store.read(by_fail[3], epoch, "test", variant),
                store.read(by_fail[None], epoch, "test", variant),
            )


def float_labels(config: dict[str, Any]) -> None:
    d = ref.linear_teacher(ref.TEACHER_IN, ref.TEACHER_CLASSES, {"_val": 40}, noise=1.0)
    model = ref.bn_mlp(ref.TEACHER_IN, ref.TEACHER_CLASSES)
    reporter = pht.PostHocReporter(model, config, val=(d["x_val"], d["y_val"].float() + 0.5))
    reporter.step()


def test_float_labels_fail_the_trial_with_the_split_and_dtype_named(run_tune: Any) -> None:
    results = run_tune(float_labels, {"seed": 0}, name="float_labels")
    assert len(results.errors) == 1
    assert "val labels must have an integer dtype, got torch.float32" in str(results.errors[0])
    # Nothing was stored: the refusal comes before the first write.
    assert not PredictionStore.open(results.experiment_path).trials()


def report_myself(config: dict[str, Any]) -> None:
    """The reporter computes and stores; the trainable reports (once per epoch) itself."""
    d = ref.linear_teacher(ref.TEACHER_IN, ref.TEACHER_CLASSES, {"": 80, "_val": 40}, noise=1.0)
    model = ref.bn_mlp(ref.TEACHER_IN, ref.TEACHER_CLASSES)
    opt = torch.optim.SGD(model.parameters(), lr=0.1)
    reporter = pht.PostHocReporter(model, config, val=(d["x_val"], d["y_val"]), report=False)
    for _ in range(3):
        ref.full_batch_step(model, opt, d["x"], d["y"])
        metrics = reporter.step()
        tune.report({"mine/nll": metrics["val/swa+ts/nll"], "epoch": metrics["epoch"]})


def test_report_false_computes_and_stores_but_leaves_reporting_to_the_trainable(
    run_tune: Any,
) -> None:
    results = run_tune(report_myself, {"seed": 0}, name="report_myself")
    assert not results.errors
    rows = _result_rows(results[0])
    assert [r["epoch"] for r in rows] == [1, 2, 3]  # one Tune iteration per epoch, not two
    assert "val/swa+ts/nll" not in rows[-1]
    store = PredictionStore.open(results.experiment_path)
    trial = rows[-1]["trial_id"]
    assert store.epochs(trial) == [1, 2, 3]
    for row in rows:  # what the trainable reported is the value of the stored SWA logits
        z = store.read(trial, row["epoch"], "val", "swa")
        t = store.temperatures(trial, row["epoch"])["swa"]
        assert row["mine/nll"] == pytest.approx(ref.nll(z / t, store.labels("val")), rel=1e-4)
