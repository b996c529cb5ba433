"""Quickstart: a Ray Tune search that selects and prunes by post-hoc metrics, offline.

The same run as ``posthoc-tune demo``, written out top to bottom. On MNIST-1D (generated
locally) with 40% symmetric label noise, base models overfit after a few epochs while their
SWA + seed-ensemble + temperature-scaled versions keep improving. So:

1. the training loop adds a ``PostHocReporter`` (SWA, evaluation, TS, the prediction store,
   ``tune.report`` of naive and post-hoc keys every epoch);
2. ``PostHocSearch`` runs each configuration as 4 seeds and tells Optuna the ensemble's
   post-hoc loss; ``PostHocASHA`` prunes whole seed groups on that same loss;
3. ``selection_table`` and ``leaderboard`` compare naive with post-hoc selection.

    python examples/quickstart.py                                   # ~3 minutes on 2 cores
    python examples/quickstart.py --configs 2 --seeds 2 --epochs 5  # a smoke run
"""

from __future__ import annotations

import argparse
import os
from collections.abc import Sequence
from typing import Any

import torch
from ray import tune

import posthoc_tune as pht
from posthoc_tune.datasets import NoisyDataset, load
from search_spaces.mnist1d import mlp_space

METRIC = "val/swa+ens+ts/nll"  # the model we will ship: SWA members, ensembled, with TS


def train(config: dict[str, Any], data: NoisyDataset) -> None:
    """Ordinary PyTorch training; the reporter is the only addition."""
    torch.manual_seed(config["seed"])  # the seed PostHocSearch gave this ensemble member
    width = config["width"]
    model = torch.nn.Sequential(
        torch.nn.Linear(data.x_train.shape[1], width),
        torch.nn.ReLU(),
        torch.nn.Linear(width, width),
        torch.nn.ReLU(),
        torch.nn.Linear(width, data.n_classes),
    )
    opt = torch.optim.SGD(
        model.parameters(), lr=config["lr"], momentum=0.9, weight_decay=config["weight_decay"]
    )
    loader = torch.utils.data.DataLoader(
        torch.utils.data.TensorDataset(data.x_train, data.y_train),
        batch_size=config["batch_size"],
        shuffle=True,
    )
    reporter = pht.PostHocReporter(
        model, config, val=(data.x_val, data.y_val), test=(data.x_test, data.y_test)
    )
    for _ in range(reporter.epoch, config["epochs"]):
        model.train()
        for x, y in loader:
            opt.zero_grad()
            torch.nn.functional.cross_entropy(model(x), y).backward()
            opt.step()
        reporter.step()  # instead of tune.report


def main(argv: Sequence[str] | None = None) -> tune.ResultGrid:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--configs", type=int, default=8, help="configurations to try")
    parser.add_argument("--seeds", type=int, default=4, help="seeds (ensemble members) each")
    parser.add_argument("--epochs", type=int, default=30)
    parser.add_argument("--samples", type=int, default=12000, help="MNIST-1D samples")
    parser.add_argument("--storage", default="example_output")
    args = parser.parse_args(argv)

    data = load("mnist1d", noise=0.4, n_samples=args.samples)
    searcher = pht.PostHocSearch(metric=METRIC, mode="min", n_seeds=args.seeds)
    scheduler = pht.PostHocASHA(
        metric=METRIC,
        mode="min",
        max_t=args.epochs,
        grace_period=4,
        reduction_factor=3,
        # The seeds train side by side and never wait long for one another: no pausing,
        # which would need a checkpoint every epoch (PostHocReporter(checkpoint=...)).
        run_ahead=None,
    )
    tuner = tune.Tuner(
        # Half a CPU per trial: a configuration's 4 seeds train side by side on 2 cores.
        tune.with_resources(tune.with_parameters(train, data=data), {"cpu": 0.5}),
        param_space=mlp_space(args.epochs),  # lr, width, weight decay; no seed key
        tune_config=tune.TuneConfig(
            search_alg=searcher,
            scheduler=scheduler,
            num_samples=args.configs * args.seeds,  # trials, not configurations
            max_concurrent_trials=args.seeds,  # one group at a time, judged without waiting
            reuse_actors=False,  # fresh actors start a group's seeds in order
        ),
        run_config=tune.RunConfig(
            name="quickstart",
            storage_path=os.path.abspath(args.storage),
            callbacks=[pht.PostHocCallback(scheduler, searcher)],  # state, store, annotations
            verbose=1,
        ),
    )
    results = tuner.fit()

    table = pht.selection_table(results, over="configs+epochs")
    columns = ["naive/test/nll", "posthoc/test/nll", "naive/epoch", "posthoc/epoch"]
    print("\nNaive vs post-hoc selection (noisy test labels):\n")
    print(table[columns].to_string(float_format=lambda v: f"{v:.4f}"))
    print(f"\nConfigurations ranked by {METRIC}:\n")
    print(pht.leaderboard(results, METRIC).drop(columns=["group"]).to_string(index=False))
    return results


if __name__ == "__main__":
    main()
