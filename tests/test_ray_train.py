"""Multi-worker trials: Ray Train TorchTrainers (2 CPU workers, gloo) launched by Tune trials,
with PostHocASHA judging seed groups on their ensembles."""

from __future__ import annotations

import os
from collections.abc import Callable
from pathlib import Path
from typing import Any

import numpy as np
import pytest
import torch
from ray import tune

import posthoc_tune as pht
from posthoc_tune import PostHocASHA, PostHocReporter, PredictionStore
from posthoc_tune.ray_train import TRIAL_KEY, torch_trainable
from posthoc_tune.reporter import STATE_FILE
from posthoc_tune.transforms import WeightAverager
from tests import reference as ref

EPOCHS, N_VAL, N_TEST = 4, 75, 61  # an odd val set: the sampler pads a shard
STOP_AT = 2  # the scheduler's max_t in the pruning test
GROUP_KEY = "val/swa+ens+ts/nll"


def _data() -> dict[str, torch.Tensor]:
    sizes = {"": 200, "_val": N_VAL, "_test": N_TEST}
    return ref.linear_teacher(ref.TEACHER_IN, ref.TEACHER_CLASSES, sizes, noise=2.0)


def _mlp() -> torch.nn.Module:
    return torch.nn.Sequential(
        torch.nn.Linear(ref.TEACHER_IN, 32),
        torch.nn.ReLU(),
        torch.nn.Linear(32, ref.TEACHER_CLASSES),
    )


def per_worker(
    config: dict[str, Any], before_step: Callable[[PostHocReporter], None] | None = None
) -> None:
    """DDP training on this rank's half of the rows; val sharded across ranks by Ray's
    prepare_data_loader (a DistributedSampler), test evaluated on rank 0 alone;
    ``before_step`` runs before each reporter step (where a test injects a failure)."""
    import ray.train
    from ray.train.torch import prepare_data_loader, prepare_model

    rank = ray.train.get_context().get_world_rank()
    world = ray.train.get_context().get_world_size()
    d = _data()
    torch.manual_seed(config["seed"])
    model = prepare_model(_mlp())
    opt = torch.optim.SGD(model.parameters(), lr=config["lr"], momentum=0.9)
    val = prepare_data_loader(
        torch.utils.data.DataLoader(
            torch.utils.data.TensorDataset(d["x_val"], d["y_val"]), batch_size=16
        )
    )
    reporter = PostHocReporter(
        model,
        config,
        val=val,
        test=(d["x_test"], d["y_test"]),
        checkpoint={"optimizer": opt},
    )
    for _ in range(reporter.epoch, EPOCHS):
        ref.full_batch_step(model, opt, d["x"][rank::world], d["y"][rank::world])
        if before_step is not None:
            before_step(reporter)
        reporter.step()


def test_multi_worker_trials_store_once_gather_in_row_order_and_stop_when_cut(
    run_tune: Any,
) -> None:
    import ray.train
    from ray.util import placement_group_table

    # Every trial is stopped mid-run: groups are judged at epoch 1, and at max_t = 2, where
    # ASHA stops its trials, while the training loops would go on to epoch 4.
    scheduler = PostHocASHA(
        metric=GROUP_KEY,
        mode="min",
        max_t=STOP_AT,
        grace_period=1,
        reduction_factor=2,
        time_attr="epoch",
        run_ahead=None,  # Tune cannot pause Train trials
    )
    trainable = torch_trainable(
        per_worker,
        scaling_config=ray.train.ScalingConfig(num_workers=2, resources_per_worker={"CPU": 0.2}),
    )
    # All four trials at once (a Train run takes ~20 s to start here): 0.1 CPU for each
    # trial's Tune trainable, 0.2 for each of its two workers.
    results = run_tune(
        tune.with_resources(trainable, {"cpu": 0.1}),
        pht.with_seeds({"lr": tune.grid_search([0.3, 0.002])}, 2),
        tune_config={"scheduler": scheduler, "max_concurrent_trials": 4, "reuse_actors": False},
        run_config={"callbacks": [scheduler.callback]},
    )
    assert len(results) == 4 and not results.errors
    store = PredictionStore.open(results.experiment_path)
    assert not [p.name for p in Path(store.root).rglob("*") if ".tmp-" in p.name]
    d = _data()
    for r in results:
        trial, last = r.metrics["trial_id"], int(r.metrics["epoch"])
        assert last <= STOP_AT
        # One file per epoch up to the last result Tune processed (rank 0 writes an epoch
        # only once Tune went on from the one before), written by rank 0 alone; the stored
        # config holds the trial's, not the context carried into the workers.
        files = sorted(p.name for p in Path(store.root, "logits", trial).iterdir())
        assert files == [f"epoch_{e:06d}.parquet" for e in range(1, last + 1)]
        assert TRIAL_KEY not in store.metadata(trial)["config"]
        # The gathered val logits (and rank 0's test logits) equal a single-process
        # evaluation of the checkpointed weights, which carry no DDP "module." prefix.
        state = torch.load(
            os.path.join(r.metrics["checkpoint_path"], STATE_FILE), weights_only=True
        )
        assert state["epoch"] == last
        assert not any(k.startswith("module.") for k in state["model"])
        model = _mlp()
        model.load_state_dict(state["model"])
        swa = WeightAverager(model)
        swa.load_state_dict(state["swa"])
        with torch.no_grad():
            for variant, net in (("base", model.eval()), ("swa", swa.model.eval())):
                for split in ("val", "test"):
                    expected = net(d[f"x_{split}"]).numpy()
                    got = store.read(trial, last, split, variant)
                    np.testing.assert_allclose(got, expected, rtol=1e-5, atol=1e-6)
        assert (store.labels("val") == d["y_val"].numpy()).all()

    # Groups were judged on ensembles equal to a recomputation from the store.
    table = pht.ensemble_table(store)
    y = store.labels("val")
    assert len(table) and set(table["n_members"]) == {2}
    for (_, epoch), rows in table.groupby(["group", "epoch"]):
        members = list(rows["members"].iloc[0])
        val = [store.read(m, int(epoch), "val", "swa") for m in members]
        value = dict(zip(rows["key"], rows["value"], strict=True))[GROUP_KEY]
        assert value == pytest.approx(ref.nll(ref.ensemble(val, val, y)[0], y), rel=1e-3)
    decisions = scheduler.decisions
    assert set(decisions["n_members"]) == {2} and "FINAL" in set(decisions["decision"])
    best = results.get_best_result(GROUP_KEY, "min", scope="all").config
    assert best is not None and best["lr"] == 0.3
    # Every Train run was aborted or ended: no worker group keeps its placement group.
    assert {pg["state"] for pg in placement_group_table().values()} == {"REMOVED"}


def test_the_example_runs_with_a_small_budget(
    ray_session: None, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    from examples import ray_train_ddp

    results = ray_train_ddp.main(["--epochs", "2", "--seeds", "1", "--storage", str(tmp_path)])
    assert len(results) == 2 and not results.errors
    out = capsys.readouterr().out
    assert f"best configuration by {GROUP_KEY}" in out
    store = PredictionStore.open(results.experiment_path)
    for i in range(len(results)):
        metrics = results[i].metrics
        assert metrics is not None and store.epochs(metrics["trial_id"])[:2] == [1, 2]


def failing_worker(config: dict[str, Any]) -> None:
    """per_worker's training, where ``kill`` makes rank 0 fail once, in epoch 2."""
    import ray.train

    marker = Path(config["marker"])

    def fail_once(reporter: PostHocReporter) -> None:
        rank = ray.train.get_context().get_world_rank()
        if config["kill"] and reporter.epoch == 1 and rank == 0 and not marker.exists():
            marker.touch()
            raise RuntimeError("simulated worker failure")

    per_worker(config, before_step=fail_once)


def test_a_restarted_worker_group_resumes_the_same_swa_average(
    run_tune: Any, tmp_path: Path
) -> None:
    import ray.train

    trainable = torch_trainable(
        failing_worker,
        scaling_config=ray.train.ScalingConfig(num_workers=2, resources_per_worker={"CPU": 0.2}),
        failure_config=ray.train.FailureConfig(max_failures=1),
    )
    results = run_tune(
        tune.with_resources(trainable, {"cpu": 0.1}),
        {
            "kill": tune.grid_search([False, True]),
            "seed": 0,
            "lr": 0.3,
            "marker": str(tmp_path / "m"),
        },
        tune_config={"max_concurrent_trials": 2, "reuse_actors": False},
    )
    assert not results.errors and (tmp_path / "m").exists()  # failed once, restarted
    store = PredictionStore.open(results.experiment_path)
    ids = {r.config["kill"]: r.metrics["trial_id"] for r in results}
    for trial in ids.values():
        assert store.epochs(trial) == list(range(1, EPOCHS + 1))
    # The restarted workers resumed from epoch 1's checkpoint: every epoch's logits, SWA's
    # included, equal those of the twin that never failed.
    for epoch in range(1, EPOCHS + 1):
        for variant in ("base", "swa"):
            np.testing.assert_allclose(
                store.read(ids[True], epoch, "val", variant),
                store.read(ids[False], epoch, "val", variant),
                rtol=1e-6,
                atol=1e-7,
            )


def test_the_channel_lets_rank_0_write_after_tune_went_on_and_not_after_a_stop(
    ray_session: None,
) -> None:
    """TrialChannel's rules, without a Train run. A call that must stay blocked is given
    0.3 s to return: it may not."""
    import ray

    from posthoc_tune.ray_train import TrialChannel

    def blocked(ref: Any) -> bool:
        ready, _ = ray.wait([ref], timeout=0.3)
        return not ready

    channel: Any = ray.remote(TrialChannel).remote()
    ray.get(channel.acquire.remote(None))  # a process's first write goes at once
    channel.release.remote()
    channel.put.remote({"epoch": 1}, "controller")
    assert ray.get(channel.get.remote()) == {"epoch": 1}  # Tune takes epoch 1's result
    second = channel.acquire.remote(1)  # rank 0 would write epoch 2
    assert blocked(second)  # Tune has not gone on from epoch 1 yet
    channel.accept.remote(1)
    ray.get(second)  # now it may; it is writing
    stopping = channel.stop.remote()
    assert blocked(stopping)  # a stop waits for the write in progress
    channel.release.remote()
    assert ray.get(stopping) == "controller"  # the controller to abort
    assert blocked(channel.acquire.remote(None))  # no write after a stop, even a first
    channel.close.remote()
    assert ray.get(channel.get.remote()) is None  # the run ended, every result taken
    ray.kill(channel)
