"""Add posthoc_tune to an existing PyTorch training loop in a Ray Tune trainable.

The loop below is ordinary PyTorch (DataLoaders, a BatchNorm MLP, SGD with a cosine schedule).
posthoc_tune adds three things: a PostHocReporter built after the model, a loop that starts at
``reporter.epoch`` (non-zero when Tune retries the trial from its checkpoint), and
``reporter.step()`` at the end of each epoch instead of ``tune.report``. Any stock Tune
scheduler can then prune on a post-hoc key such as ``val/swa+ts/nll``.

Runs offline on scikit-learn's bundled digits with 40% symmetric label noise:

    python examples/custom_trainable.py --epochs 30
"""

from __future__ import annotations

import argparse
import os
from collections.abc import Sequence
from typing import Any

import torch
from ray import tune
from ray.tune.schedulers import ASHAScheduler
from torch.utils.data import DataLoader, TensorDataset

import posthoc_tune as pht
from posthoc_tune.datasets import NoisyDataset, load


def train(config: dict[str, Any], data: NoisyDataset) -> None:
    torch.manual_seed(config["seed"])
    model = torch.nn.Sequential(
        torch.nn.Linear(data.x_train.shape[1], config["width"]),
        torch.nn.BatchNorm1d(config["width"]),
        torch.nn.ReLU(),
        torch.nn.Linear(config["width"], data.n_classes),
    )
    opt = torch.optim.SGD(model.parameters(), lr=config["lr"], momentum=0.9, weight_decay=5e-4)
    sched = torch.optim.lr_scheduler.CosineAnnealingLR(opt, T_max=config["epochs"])
    train_loader = DataLoader(
        TensorDataset(data.x_train, data.y_train), batch_size=64, shuffle=True
    )
    val_loader = DataLoader(TensorDataset(data.x_val, data.y_val), batch_size=256)
    test_loader = DataLoader(TensorDataset(data.x_test, data.y_test), batch_size=256)

    reporter = pht.PostHocReporter(  # posthoc_tune (1/3)
        model,
        config,
        val=val_loader,  # SWA's BatchNorm statistics are re-estimated on the val inputs
        test=test_loader,
        checkpoint={"optimizer": opt, "scheduler": sched},  # resumed exactly on a retry
    )
    for _ in range(reporter.epoch, config["epochs"]):  # posthoc_tune (2/3)
        model.train()
        for x, y in train_loader:
            opt.zero_grad()
            torch.nn.functional.cross_entropy(model(x), y).backward()
            opt.step()
        sched.step()
        reporter.step({"lr": sched.get_last_lr()[0]})  # posthoc_tune (3/3)


def main(argv: Sequence[str] | None = None) -> tune.ResultGrid:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--epochs", type=int, default=30)
    parser.add_argument("--seeds", type=int, default=2)
    parser.add_argument("--storage", default="example_output")
    args = parser.parse_args(argv)

    space = pht.with_seeds(
        {"lr": tune.grid_search([0.02, 0.1]), "width": 128, "epochs": args.epochs}, n=args.seeds
    )
    tuner = tune.Tuner(
        tune.with_parameters(train, data=load("digits", noise=0.4)),
        param_space=space,
        tune_config=tune.TuneConfig(
            scheduler=ASHAScheduler(
                metric="val/swa+ts/nll", mode="min", max_t=args.epochs, grace_period=3
            ),
            reuse_actors=True,
        ),
        run_config=tune.RunConfig(
            name="custom_trainable",
            storage_path=os.path.abspath(args.storage),
            failure_config=tune.FailureConfig(max_failures=2),
            checkpoint_config=tune.CheckpointConfig(num_to_keep=2),
            verbose=0,
        ),
    )
    results = tuner.fit()
    for key in ("val/base/nll", "val/swa+ts/nll"):
        best = results.get_best_result(metric=key, mode="min", scope="all")
        df, config = best.metrics_dataframe, best.config
        assert df is not None and config is not None
        row = df.loc[df[key].idxmin()]
        print(
            f"selected by {key:15s}: lr={config['lr']} seed={config['seed']} "
            f"epoch {int(row['epoch'])}: test/swa+ts/nll {row['test/swa+ts/nll']:.4f}, "
            f"test/swa+ts/error {row['test/swa+ts/error']:.3f}"
        )
    return results


if __name__ == "__main__":
    main()
