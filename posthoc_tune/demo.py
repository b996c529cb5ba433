"""The offline demo: a real Ray Tune search on noisy-label data, selected post hoc.

PostHocSearch proposes configurations of an MLP (width, learning rate, weight decay) with
Optuna and runs each as several seeds; every trial reports naive and post-hoc metrics and
stores its predictions; PostHocASHA prunes whole seed groups on the ensemble key
``val/swa+ens+ts/nll``. Afterwards the selection table compares naive with post-hoc selection
for every transform, the leaderboard ranks the configurations, and the plots show the curves.
"""

from __future__ import annotations

import os
import time
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pandas as pd
import torch
from ray import tune

from posthoc_tune.callback import PostHocCallback
from posthoc_tune.curves import configurations
from posthoc_tune.datasets import NoisyDataset, load
from posthoc_tune.display import leaderboard_view, render, selection_view
from posthoc_tune.groups import with_seeds
from posthoc_tune.reporter import PostHocReporter
from posthoc_tune.schedulers import PostHocASHA
from posthoc_tune.search import PostHocSearch
from posthoc_tune.selection import leaderboard, open_store, selection_table, write_frame
from search_spaces.mnist1d import mlp_space

METRIC = "val/swa+ens+ts/nll"


def mlp(n_in: int, width: int, n_classes: int) -> torch.nn.Module:
    """Two hidden ReLU layers."""
    return torch.nn.Sequential(
        torch.nn.Linear(n_in, width),
        torch.nn.ReLU(),
        torch.nn.Linear(width, width),
        torch.nn.ReLU(),
        torch.nn.Linear(width, n_classes),
    )


def train_mlp(config: dict[str, Any], data: NoisyDataset) -> None:
    """A plain PyTorch training loop with the reporter added: the function Tune runs."""
    torch.manual_seed(config["seed"])
    model = mlp(data.x_train.shape[1], config["width"], data.n_classes)
    opt = torch.optim.SGD(
        model.parameters(), lr=config["lr"], momentum=0.9, weight_decay=config["weight_decay"]
    )
    reporter = PostHocReporter(
        model, config, val=(data.x_val, data.y_val), test=(data.x_test, data.y_test)
    )
    batches = torch.utils.data.DataLoader(
        torch.utils.data.TensorDataset(data.x_train, data.y_train),
        batch_size=config["batch_size"],
        shuffle=True,
        generator=torch.Generator().manual_seed(config["seed"]),
    )
    for _ in range(reporter.epoch, config["epochs"]):
        model.train()
        total = 0.0
        for x, y in batches:
            opt.zero_grad()
            loss = torch.nn.functional.cross_entropy(model(x), y)
            loss.backward()
            opt.step()
            total += loss.item() * len(y)
        reporter.step({"train/loss": total / len(data.y_train)})


@dataclass
class DemoResult:
    """What the demo produced: Tune's results, the tables and the files written."""

    results: tune.ResultGrid
    table: pd.DataFrame
    leaderboard: pd.DataFrame
    epochs_run: int
    epochs_full: int
    files: list[Path]


def run(
    *,
    dataset: str = "mnist1d",
    noise: float = 0.4,
    n_samples: int = 12000,
    configs: int = 8,
    seeds: int = 4,
    epochs: int = 30,
    grace_period: int = 4,
    reduction_factor: float = 3,
    cpus_per_trial: float = 0.5,
    storage: str = "demo_output/ray_results",
    out: str = "demo_output",
    name: str = "demo",
    plots: bool = True,
    verbose: int = 1,
) -> DemoResult:
    """Run the search, then write and print the selection table, leaderboard and plots.

    ``configs`` x ``seeds`` trials of up to ``epochs`` epochs each. One configuration's seeds
    train at a time, side by side: give them ``cpus_per_trial`` such that they fit.
    """
    start = time.perf_counter()
    data = load(dataset, noise=noise, n_samples=n_samples)
    searcher = PostHocSearch(metric=METRIC, mode="min", n_seeds=seeds)
    scheduler = PostHocASHA(
        metric=METRIC,
        mode="min",
        max_t=epochs,
        grace_period=grace_period,
        reduction_factor=reduction_factor,
        # A configuration's seeds train side by side (below) and never wait long for one
        # another: no pausing, which would need a checkpoint every epoch.
        run_ahead=None,
    )
    tuner = tune.Tuner(
        tune.with_resources(tune.with_parameters(train_mlp, data=data), {"cpu": cpus_per_trial}),
        param_space=mlp_space(epochs),
        tune_config=tune.TuneConfig(
            search_alg=searcher,
            scheduler=scheduler,
            num_samples=configs * seeds,
            # One configuration at a time, its seeds side by side (fresh actors start
            # pending trials in order): PostHocASHA can judge a group as soon as it
            # reaches a rung, instead of waiting for a straggler.
            max_concurrent_trials=seeds,
            reuse_actors=False,
        ),
        run_config=tune.RunConfig(
            name=name,
            storage_path=os.path.abspath(storage),
            callbacks=[PostHocCallback(scheduler, searcher)],
            verbose=verbose,
        ),
    )
    results = tuner.fit()
    if results.errors:
        raise RuntimeError(f"{len(results.errors)} demo trials failed: {results.errors[0]}")

    store = open_store(results)
    table = selection_table(store, over="configs+epochs")
    board = leaderboard(store, METRIC)
    groups = configurations(store)
    table_view, board_view = selection_view(table, groups), leaderboard_view(board, groups)
    epochs_run = int(results.get_dataframe()["training_iteration"].sum())
    out_dir = Path(out)
    out_dir.mkdir(parents=True, exist_ok=True)
    write_frame(table, "md", out_dir / "selection_table.md", readable=table_view)
    write_frame(table, "csv", out_dir / "selection_table.csv")
    write_frame(board, "md", out_dir / "leaderboard.md", readable=board_view)
    files = [out_dir / f for f in ("selection_table.md", "selection_table.csv", "leaderboard.md")]
    if plots:
        from posthoc_tune.plots import plot_experiment

        files += plot_experiment(results, out_dir / "plots", formats=("png",))

    print(
        f"\n{dataset}, {noise:.0%} symmetric label noise on train, val and test; "
        f"{configs} configurations x {seeds} seeds, PostHocASHA on {METRIC}: "
        f"{epochs_run} of {configs * seeds * epochs} epochs trained "
        f"({epochs_run / (configs * seeds * epochs):.0%}).\n"
    )
    print("Naive vs post-hoc selection over configurations and epochs (noisy test labels):\n")
    print(render(table_view, "md"))
    row = table.loc["swa+ens+ts"]
    print(
        f"\nswa+ens+ts test nll: naive selection {row['naive/test/nll']:.4f}, post-hoc "
        f"selection {row['posthoc/test/nll']:.4f} (gain over the base model "
        f"{row['naive/gain/nll']:+.4f} -> {row['posthoc/gain/nll']:+.4f})"
    )
    print(f"\nConfigurations ranked by {METRIC} (naive rank beside):\n")
    print(render(board_view, "md"))
    print(f"\nwrote {len(files)} files to {out_dir}; experiment in {results.experiment_path}")
    print(f"done in {time.perf_counter() - start:.0f} s")
    return DemoResult(results, table, board, epochs_run, configs * seeds * epochs, files)


def run_grid(
    *,
    dataset: str = "mnist1d",
    noise: float = 0.4,
    n_samples: int = 12000,
    lrs: Sequence[float] = (0.01, 0.03, 0.1, 0.3),
    widths: Sequence[int] = (64, 256),
    weight_decay: float = 5e-4,
    seeds: int = 4,
    epochs: int = 40,
    cpus_per_trial: float = 0.5,
    storage: str = "demo_output/ray_results",
    name: str = "grid",
    verbose: int = 0,
) -> tune.ResultGrid:
    """Train every configuration of a grid, each as ``seeds`` seeds, to the full budget: the
    stored curves that :mod:`posthoc_tune.replay` compares strategies on."""
    data = load(dataset, noise=noise, n_samples=n_samples)
    space = with_seeds(
        {
            "lr": tune.grid_search(list(lrs)),
            "width": tune.grid_search(list(widths)),
            "weight_decay": weight_decay,
            "batch_size": 128,
            "epochs": epochs,
        },
        n=seeds,
    )
    tuner = tune.Tuner(
        tune.with_resources(tune.with_parameters(train_mlp, data=data), {"cpu": cpus_per_trial}),
        param_space=space,
        tune_config=tune.TuneConfig(reuse_actors=True),
        run_config=tune.RunConfig(
            name=name, storage_path=os.path.abspath(storage), verbose=verbose
        ),
    )
    results = tuner.fit()
    if results.errors:
        raise RuntimeError(f"{len(results.errors)} grid trials failed: {results.errors[0]}")
    return results
