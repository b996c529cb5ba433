"""Tune a PyTorch Lightning module on post-hoc metrics with PostHocLightningCallback.

The LightningModule and the Trainer below are ordinary Lightning. posthoc_tune adds one
callback: at the end of every training epoch (after validation) it folds the weights into the
SWA average, evaluates, fits temperature scaling, stores the logits and makes the epoch's one
Tune result, holding the post-hoc metrics next to what the module logs (``val_loss``,
``train_loss``). PostHocASHA then prunes whole seed groups on the ensemble's post-hoc loss
``val/swa+ens+ts/nll``. Each trial trains in one process (``devices=1``).

Runs offline on scikit-learn's bundled digits with 40% symmetric label noise:

    python examples/lightning_trainable.py --epochs 20
"""

from __future__ import annotations

import argparse
import os
from collections.abc import Sequence
from typing import Any

import lightning.pytorch as pl
import torch
from ray import tune
from torch.utils.data import DataLoader, TensorDataset

import posthoc_tune as pht
from posthoc_tune.datasets import NoisyDataset, load
from posthoc_tune.lightning import PostHocLightningCallback

SEED_KEY = "_seed"  # sorts first in the grid, so a configuration's seeds start together
METRIC = "val/swa+ens+ts/nll"


class MLP(pl.LightningModule):
    """A BatchNorm MLP classifier; ``forward`` returns logits, which the reporter evaluates."""

    def __init__(self, n_in: int, n_classes: int, width: int, lr: float) -> None:
        super().__init__()
        self.lr = lr
        self.net = torch.nn.Sequential(
            torch.nn.Linear(n_in, width),
            torch.nn.BatchNorm1d(width),
            torch.nn.ReLU(),
            torch.nn.Linear(width, n_classes),
        )

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.net(x)

    def training_step(self, batch: list[torch.Tensor], batch_idx: int) -> torch.Tensor:
        x, y = batch
        loss = torch.nn.functional.cross_entropy(self(x), y)
        self.log("train_loss", loss, on_step=False, on_epoch=True)
        return loss

    def validation_step(self, batch: list[torch.Tensor], batch_idx: int) -> None:
        x, y = batch
        self.log("val_loss", torch.nn.functional.cross_entropy(self(x), y))

    def configure_optimizers(self) -> torch.optim.Optimizer:
        return torch.optim.SGD(self.parameters(), lr=self.lr, momentum=0.9, weight_decay=5e-4)


def train(config: dict[str, Any], data: NoisyDataset) -> None:
    pl.seed_everything(config[SEED_KEY], verbose=False)
    module = MLP(data.x_train.shape[1], data.n_classes, config["width"], config["lr"])

    def loader(x: torch.Tensor, y: torch.Tensor, shuffle: bool = False) -> DataLoader[Any]:
        return DataLoader(TensorDataset(x, y), batch_size=64, shuffle=shuffle)

    trainer = pl.Trainer(
        max_epochs=config["epochs"],
        devices=1,  # one process per trial: see the README for several
        callbacks=[  # posthoc_tune: val is the trainer's val dataloader
            PostHocLightningCallback(
                config, test=loader(data.x_test, data.y_test), seed_key=SEED_KEY
            )
        ],
        logger=False,
        enable_checkpointing=False,
        enable_progress_bar=False,
        enable_model_summary=False,
    )
    trainer.fit(
        module,
        loader(data.x_train, data.y_train, shuffle=True),
        loader(data.x_val, data.y_val),  # not shuffled: the reporter evaluates it too
    )


def main(argv: Sequence[str] | None = None) -> tune.ResultGrid:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--epochs", type=int, default=20)
    parser.add_argument("--lrs", type=float, nargs="+", default=[0.01, 0.1])
    parser.add_argument("--width", type=int, default=64)
    parser.add_argument("--seeds", type=int, default=2)
    parser.add_argument("--storage", default="example_output")
    args = parser.parse_args(argv)

    scheduler = pht.PostHocASHA(
        max_t=args.epochs,
        grace_period=1,
        reduction_factor=2,
        seed_key=SEED_KEY,
        run_ahead=None,  # results carry no Tune checkpoint to resume from: never pause
    )
    space = {"lr": tune.grid_search(args.lrs), "width": args.width, "epochs": args.epochs}
    tuner = tune.Tuner(
        tune.with_parameters(train, data=load("digits", noise=0.4)),
        param_space=pht.with_seeds(space, n=args.seeds, key=SEED_KEY),
        tune_config=tune.TuneConfig(metric=METRIC, mode="min", scheduler=scheduler),
        run_config=tune.RunConfig(
            name="lightning_trainable",
            storage_path=os.path.abspath(args.storage),
            callbacks=[scheduler.callback],  # scheduler state and ensemble values in results
            verbose=0,
        ),
    )
    results = tuner.fit()
    best = results.get_best_result(scope="all")
    assert best.config is not None
    print(f"best by {METRIC}: lr={best.config['lr']}")
    print(pht.leaderboard(results, metric=METRIC).to_string(index=False))
    return results


if __name__ == "__main__":
    main()
