"""Faults in real Tune runs: a worker killed mid-write resumes from its checkpoint."""

from __future__ import annotations

import os
import signal
from pathlib import Path
from typing import Any

import numpy as np
import pyarrow.parquet as pq
import pytest
import torch
from ray import tune

import posthoc_tune as pht
from posthoc_tune import PostHocASHA, PostHocReporter, PredictionStore
from tests import reference as ref

pytestmark = pytest.mark.slow

N_IN, C, SEEDS, EPOCHS, KILL_EPOCH = 8, 5, 2, 5, 3
GROUP_KEY = "val/swa+ens+ts/nll"


def _data() -> dict[str, torch.Tensor]:
    return ref.linear_teacher(N_IN, C, {"": 200, "_val": 80, "_test": 70}, noise=2.0)


def _die_after_first_row_group() -> None:
    """SIGKILL this worker process once the next Parquet file holds one part of an epoch:
    the epoch is half written, as when a node dies mid-epoch."""
    write_table = pq.ParquetWriter.write_table

    def write_then_die(self: pq.ParquetWriter, *args: Any, **kwargs: Any) -> None:
        write_table(self, *args, **kwargs)
        os.kill(os.getpid(), signal.SIGKILL)

    pq.ParquetWriter.write_table = write_then_die


def train(config: dict[str, Any]) -> None:
    """Deterministic full-batch training; with ``kill``, seed 1 dies once in epoch 3."""
    d = _data()
    torch.manual_seed(config["seed"])
    model = ref.bn_mlp(N_IN, C)
    opt = torch.optim.SGD(model.parameters(), lr=0.1, momentum=0.9)
    reporter = PostHocReporter(
        model,
        config,
        val=(d["x_val"], d["y_val"]),
        test=(d["x_test"], d["y_test"]),
        checkpoint={"optimizer": opt},
    )
    marker = Path(config["marker"])
    for epoch in range(reporter.epoch + 1, EPOCHS + 1):
        ref.full_batch_step(model, opt, d["x"], d["y"])
        if config["kill"] and config["seed"] == 1 and epoch == KILL_EPOCH and not marker.exists():
            marker.touch()
            _die_after_first_row_group()
        reporter.step()


def test_a_worker_killed_mid_write_resumes_and_its_group_uses_the_resumed_member(
    run_tune: Any, tmp_path: Path
) -> None:
    marker = tmp_path / "killed-once"
    scheduler = PostHocASHA(
        metric=GROUP_KEY, mode="min", max_t=EPOCHS, grace_period=1, reduction_factor=2
    )
    space = pht.with_seeds({"kill": tune.grid_search([False, True]), "marker": str(marker)}, SEEDS)
    results = run_tune(
        tune.with_resources(train, {"cpu": 0.5}),
        space,
        tune_config={"scheduler": scheduler},
        run_config={
            "failure_config": tune.FailureConfig(max_failures=1),
            "callbacks": [scheduler.callback],
        },
    )
    assert marker.exists() and not results.errors  # killed once, recovered
    store = PredictionStore.open(results.experiment_path)
    ids = {(r.config["kill"], r.config["seed"]): r.metrics["trial_id"] for r in results}
    killed = ids[True, 1]

    assert all(r.metrics["epoch"] == EPOCHS for r in results)  # every group kept to max_t
    # The store holds each epoch once, and no leftover of the half-written file.
    for trial_id in ids.values():
        assert store.epochs(trial_id) == list(range(1, EPOCHS + 1))
        names = sorted(p.name for p in Path(store.root, "logits", trial_id).iterdir())
        assert names == [f"epoch_{e:06d}.parquet" for e in range(1, EPOCHS + 1)]
    assert not [p for p in Path(store.root).rglob("*") if ".tmp-" in p.name]

    # The resumed member's logits, SWA included, equal its uninterrupted twin's (the same
    # seed in the group that was not killed): the SWA average resumed exactly.
    for epoch in range(1, EPOCHS + 1):
        for split in ("val", "test"):
            for variant in ("base", "swa"):
                np.testing.assert_array_equal(
                    store.read(killed, epoch, split, variant),
                    store.read(ids[False, 1], epoch, split, variant),
                )

    # The killed member's group was decided with it, at every milestone, on values equal
    # to the ensemble recomputed from the store.
    table = pht.ensemble_table(store)
    killed_group = store.metadata(killed)["group"]
    rows = table[(table["group"] == killed_group) & (table["key"] == GROUP_KEY)]
    assert list(rows["epoch"]) == [1, 2, 4]
    y = store.labels("val")
    for epoch, members, value in zip(rows["epoch"], rows["members"], rows["value"], strict=True):
        assert sorted(members) == sorted([ids[True, 0], killed])
        val = [store.read(m, int(epoch), "val", "swa") for m in members]
        ev, _ = ref.ensemble(val, val, y)
        assert value == pytest.approx(ref.nll(ev, y), rel=1e-3)
