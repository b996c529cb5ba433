"""A small end-to-end run: a real Ray Tune search on noisy-label data with the reporter.

Each configuration runs as several seeds; stock ASHA prunes on the post-hoc key
``val/swa+ts/nll``; afterwards, for every trial, the epoch chosen by the base val loss
(naive) is compared with the epoch chosen by the post-hoc val loss, on test.
"""

from __future__ import annotations

import os
import time
from typing import Any

import pandas as pd
import torch
from ray import tune
from ray.tune.schedulers import ASHAScheduler

from posthoc_tune.datasets import NoisyDataset, load
from posthoc_tune.groups import with_seeds
from posthoc_tune.reporter import PostHocReporter
from posthoc_tune.store import PredictionStore


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


def selection_by_trial(results: tune.ResultGrid) -> pd.DataFrame:
    """Per trial: test swa+ts loss at the base-val-best epoch (naive) and at the swa+ts-val-best."""
    rows = []
    for i in range(len(results)):
        result = results[i]
        df, config = result.metrics_dataframe, result.config
        assert df is not None and config is not None, f"trial {result.path} left no results"
        naive = df.loc[df["val/base/nll"].idxmin()]
        posthoc = df.loc[df["val/swa+ts/nll"].idxmin()]
        rows.append(
            {
                "lr": config["lr"],
                "seed": config["seed"],
                "epochs run": int(df["epoch"].max()),
                "naive epoch": int(naive["epoch"]),
                "naive test swa+ts nll": naive["test/swa+ts/nll"],
                "post-hoc epoch": int(posthoc["epoch"]),
                "post-hoc test swa+ts nll": posthoc["test/swa+ts/nll"],
            }
        )
    return pd.DataFrame(rows).sort_values(["lr", "seed"]).reset_index(drop=True)


def run(
    *,
    dataset: str = "mnist1d",
    noise: float = 0.4,
    n_samples: int = 6000,
    epochs: int = 20,
    seeds: int = 2,
    lrs: tuple[float, ...] = (0.03, 0.1),
    storage: str = "demo_output",
    name: str = "demo",
    verbose: int = 1,
) -> tuple[tune.ResultGrid, pd.DataFrame]:
    """Run the demo experiment and return its results and the per-trial selection table."""
    start = time.perf_counter()
    data = load(dataset, noise=noise, n_samples=n_samples)
    space = with_seeds(
        {
            "lr": tune.grid_search(list(lrs)),
            "width": 128,
            "weight_decay": 5e-4,
            "batch_size": 128,
            "epochs": epochs,
        },
        n=seeds,
    )
    tuner = tune.Tuner(
        tune.with_parameters(train_mlp, data=data),
        param_space=space,
        tune_config=tune.TuneConfig(
            scheduler=ASHAScheduler(
                metric="val/swa+ts/nll", mode="min", max_t=epochs, grace_period=max(1, epochs // 4)
            ),
            reuse_actors=True,
        ),
        run_config=tune.RunConfig(
            name=name, storage_path=os.path.abspath(storage), verbose=verbose
        ),
    )
    results = tuner.fit()
    table = selection_by_trial(results)
    store = PredictionStore.open(results.experiment_path)
    n_files = sum(len(store.epochs(t)) for t in store.trials())
    print(
        f"\n{dataset}, {noise:.0%} symmetric label noise: {len(results)} trials, "
        f"{n_files} epoch files in {store.root}\n"
    )
    print(table.to_string(index=False, float_format=lambda v: f"{v:.4f}"))
    print(f"\ndone in {time.perf_counter() - start:.0f} s")
    return results, table
