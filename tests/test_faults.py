"""Faults in real Tune runs: a worker killed mid-write, a driver interrupted and restored."""

from __future__ import annotations

import os
import signal
from pathlib import Path
from typing import Any

import numpy as np
import optuna
import pandas as pd
import pyarrow.parquet as pq
import pytest
from ray import tune

import posthoc_tune as pht
from posthoc_tune import PostHocASHA, PredictionStore
from tests import reference as ref
from tests.interrupt import Interrupt

pytestmark = pytest.mark.slow

SEEDS, EPOCHS, KILL_EPOCH = 2, 5, 3
GROUP_KEY = "val/swa+ens+ts/nll"


def _die_after_first_row_group() -> None:
    """SIGKILL this worker process once the next Parquet file holds one part of an epoch:
    the epoch is half written, as when a node dies mid-epoch."""
    write_table = pq.ParquetWriter.write_table

    def write_then_die(self: pq.ParquetWriter, *args: Any, **kwargs: Any) -> None:
        write_table(self, *args, **kwargs)
        os.kill(os.getpid(), signal.SIGKILL)

    pq.ParquetWriter.write_table = write_then_die


def train(config: dict[str, Any]) -> None:
    """Deterministic training; with ``kill``, seed 1 dies once in epoch 3, in the write."""
    marker = Path(config.get("marker", "/nonexistent"))

    def kill_once(epoch: int) -> None:
        killed = config.get("kill") and config["seed"] == 1 and epoch == KILL_EPOCH
        if killed and not marker.exists():
            marker.touch()
            _die_after_first_row_group()

    ref.teacher_trial(config, epochs=EPOCHS, checkpoint=True, before_report=kill_once)


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

    # The killed member's group was evaluated with it at every epoch (and decided at every
    # milestone), on values equal to the ensemble recomputed from the store.
    table = pht.ensemble_table(store)
    killed_group = store.metadata(killed)["group"]
    rows = table[(table["group"] == killed_group) & (table["key"] == GROUP_KEY)]
    assert list(rows["epoch"]) == list(range(1, EPOCHS + 1))
    judged = scheduler.decisions[scheduler.decisions["arm"] == killed_group]
    assert sorted(judged["epoch"]) == [1, 2, 4] and set(judged["n_members"]) == {2}
    y = store.labels("val")
    for epoch, members, value in zip(rows["epoch"], rows["members"], rows["value"], strict=True):
        assert sorted(members) == sorted([ids[True, 0], killed])
        val = [store.read(m, int(epoch), "val", "swa") for m in members]
        ev, _ = ref.ensemble(val, val, y)
        assert value == pytest.approx(ref.nll(ev, y), rel=1e-3)


def _search(tmp_path: Path, name: str, crash_after: int | None) -> Path:
    """PostHocSearch + PostHocASHA over 3 configurations x 2 seeds; returns the experiment
    path. Runs one configuration's seeds at a time (max_concurrent_trials = seeds), so the
    order of rung decisions and of Optuna's asks does not depend on timing."""
    search = pht.PostHocSearch(
        space={"lr": tune.loguniform(0.01, 0.5)},
        metric=GROUP_KEY,
        mode="min",
        n_seeds=SEEDS,
        sampler=optuna.samplers.TPESampler(seed=7),
        storage=f"sqlite:///{tmp_path / name}.db",
        study_name=name,
    )
    # Rungs at max_t only: which members of a losing group run on after its stop depends on
    # timing (the README lists the sources of nondeterminism); the stored epochs would too.
    scheduler = PostHocASHA(
        metric=GROUP_KEY, mode="min", max_t=EPOCHS, grace_period=EPOCHS, reduction_factor=2
    )
    callbacks: list[tune.Callback] = [pht.PostHocCallback(scheduler, search)]
    if crash_after is not None:
        callbacks.append(Interrupt(tmp_path / f"{name}-crashed", after=crash_after))
    trainable = tune.with_resources(train, {"cpu": 0.5})
    tuner = tune.Tuner(
        trainable,
        tune_config=tune.TuneConfig(
            search_alg=search,
            scheduler=scheduler,
            num_samples=3 * SEEDS,
            max_concurrent_trials=SEEDS,
            time_budget_s=180,
            reuse_actors=True,  # a fresh actor costs seconds of imports
        ),
        run_config=tune.RunConfig(
            name=name, storage_path=str(tmp_path / "ray"), verbose=0, callbacks=callbacks
        ),
    )
    path = tmp_path / "ray" / name
    if crash_after is None:
        assert not tuner.fit().errors
        return path
    with pytest.raises(Exception, match="simulated driver crash"):
        tuner.fit()
    results = tune.Tuner.restore(str(path), trainable, resume_unfinished=True).fit()
    assert len(results) == 3 * SEEDS and not results.errors
    return path


def _outcome(path: Path, name: str) -> dict[str, pd.DataFrame]:
    """What a user reads at the end, without trial ids (they differ between experiments)."""
    store = PredictionStore.open(path)
    study = optuna.load_study(study_name=name, storage=f"sqlite:///{path.parents[1] / name}.db")
    return {
        "table": pht.selection_table(path, over="configs+epochs"),
        "leaderboard": pht.leaderboard(path, GROUP_KEY),
        "ensembles": pht.ensemble_table(store).drop(columns=["members"]),
        "study": pd.DataFrame(
            [(t.number, t.params["lr"], t.value, t.state.name) for t in study.trials],
            columns=["number", "lr", "value", "state"],
        ),
        "epochs": pd.DataFrame({"epochs": sorted(len(store.epochs(t)) for t in store.trials())}),
    }


def test_a_restored_driver_ends_with_the_uninterrupted_run_s_tables(
    ray_session: None, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setenv("TUNE_GLOBAL_CHECKPOINT_S", "0")  # checkpoint the experiment every step
    straight = _outcome(_search(tmp_path, "straight", None), "straight")
    restored_path = _search(tmp_path, "restored", crash_after=3)  # mid-way: a group half done
    restored = _outcome(restored_path, "restored")
    assert (straight["study"]["state"] == "COMPLETE").all() and len(straight["study"]) == 3
    assert len(straight["ensembles"]) > 0
    for name, expected in straight.items():
        pd.testing.assert_frame_equal(
            restored[name], expected, check_exact=False, rtol=1e-6, obj=name
        )
