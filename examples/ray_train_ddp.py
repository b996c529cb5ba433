"""Multi-worker trials: each Tune trial a Ray Train TorchTrainer (DDP), selected post hoc.

Every trial trains an MLP with DistributedDataParallel on ``--workers`` CPU processes (gloo;
on GPUs set ``use_gpu=True`` in the ScalingConfig). The val loader goes through Ray's
``prepare_data_loader``, so each rank evaluates its shard and rank 0 gathers the logits; rank 0
alone writes the prediction store and reports. PostHocASHA prunes seed groups on their
ensembles' post-hoc loss. Runs offline on scikit-learn's bundled digits with 40% symmetric
label noise:

    python examples/ray_train_ddp.py --epochs 10
"""

from __future__ import annotations

import argparse
import os
from collections.abc import Sequence
from typing import Any

import ray.train
import torch
from ray import tune
from ray.train.torch import prepare_data_loader, prepare_model
from torch.utils.data import DataLoader, TensorDataset

import posthoc_tune as pht
from posthoc_tune.datasets import load
from posthoc_tune.ray_train import torch_trainable

METRIC = "val/swa+ens+ts/nll"


def train_loop_per_worker(config: dict[str, Any]) -> None:
    """What every worker runs: ordinary DDP training, plus the reporter."""
    data = load("digits", noise=0.4)
    torch.manual_seed(config["_seed"])
    model = prepare_model(
        torch.nn.Sequential(
            torch.nn.Linear(data.x_train.shape[1], config["width"]),
            torch.nn.ReLU(),
            torch.nn.Linear(config["width"], data.n_classes),
        )
    )
    opt = torch.optim.SGD(model.parameters(), lr=config["lr"], momentum=0.9, weight_decay=5e-4)
    train_loader = prepare_data_loader(
        DataLoader(TensorDataset(data.x_train, data.y_train), batch_size=64, shuffle=True)
    )
    val_loader = prepare_data_loader(  # a DistributedSampler: each rank evaluates its shard
        DataLoader(TensorDataset(data.x_val, data.y_val), batch_size=256)
    )
    reporter = pht.PostHocReporter(
        model,
        config,
        val=val_loader,
        test=(data.x_test, data.y_test),  # unsharded: rank 0 evaluates it alone
        seed_key="_seed",
        checkpoint={"optimizer": opt},
    )
    for epoch in range(reporter.epoch, config["epochs"]):
        if ray.train.get_context().get_world_size() > 1:
            train_loader.sampler.set_epoch(epoch)  # type: ignore[attr-defined]
        model.train()
        for x, y in train_loader:
            opt.zero_grad()
            torch.nn.functional.cross_entropy(model(x), y).backward()
            opt.step()
        reporter.step()  # every rank, once per epoch


def main(argv: Sequence[str] | None = None) -> tune.ResultGrid:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--epochs", type=int, default=10, help="epochs per trial at most")
    parser.add_argument("--seeds", type=int, default=2, help="seeds per configuration")
    parser.add_argument("--workers", type=int, default=2, help="Train workers per trial")
    parser.add_argument("--storage", default="example_output", help="Tune storage_path")
    args = parser.parse_args(argv)

    scheduler = pht.PostHocASHA(
        metric=METRIC,
        mode="min",
        max_t=args.epochs,
        grace_period=2,
        reduction_factor=2,
        time_attr="epoch",  # training_iteration restarts at 1 after a Tune-level retry
        seed_key="_seed",
        run_ahead=None,  # Tune cannot pause Train trials (their checkpoints are Train's)
    )
    trainable = torch_trainable(
        train_loop_per_worker,
        scaling_config=ray.train.ScalingConfig(
            num_workers=args.workers, resources_per_worker={"CPU": 0.2}
        ),
    )
    tuner = tune.Tuner(
        tune.with_resources(trainable, {"cpu": 0.1}),
        param_space=pht.with_seeds(
            {"lr": tune.grid_search([0.02, 0.1]), "width": 128, "epochs": args.epochs},
            n=args.seeds,
            key="_seed",
        ),
        tune_config=tune.TuneConfig(scheduler=scheduler, max_concurrent_trials=4),
        run_config=tune.RunConfig(
            name="ray_train_ddp",
            storage_path=os.path.abspath(args.storage),
            callbacks=[scheduler.callback],
            verbose=0,
        ),
    )
    results = tuner.fit()
    best = results.get_best_result(METRIC, "min", scope="all")
    print(f"best configuration by {METRIC}: {best.config}")
    print(pht.leaderboard(results, METRIC).to_string(index=False))
    return results


if __name__ == "__main__":
    main()
