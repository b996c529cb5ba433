"""Compare pruning strategies on your own curves, without retraining.

Train a grid once to the full budget (every trial reports and stores its predictions), then
replay the stored curves through real Tune schedulers on a simulated cluster: stock ASHA on
the base loss, PostHocASHA on the ensemble's post-hoc loss, and the full budget with naive or
post-hoc selection. Each row: the configuration and epoch the strategy ends with, the test
loss and error of its SWA + ensemble + TS model, and the epochs it trained.

    python examples/compare_strategies.py --dataset mnist1d          # ~3 minutes on 2 cores
    python examples/compare_strategies.py --dataset digits --epochs 6  # a smoke run
    posthoc-tune replay example_output/strategies_mnist1d           # the same, from the CLI
"""

from __future__ import annotations

import argparse
from collections.abc import Sequence

import pandas as pd

from posthoc_tune.datasets import DATASETS
from posthoc_tune.demo import run_grid
from posthoc_tune.replay import Experiment, compare, default_strategies


def main(argv: Sequence[str] | None = None) -> pd.DataFrame:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--dataset", choices=DATASETS, default="mnist1d")
    parser.add_argument("--lrs", type=float, nargs="+", default=[0.01, 0.03, 0.1, 0.3])
    parser.add_argument("--widths", type=int, nargs="+", default=[64, 256])
    parser.add_argument("--seeds", type=int, default=4)
    parser.add_argument("--epochs", type=int, default=30)
    parser.add_argument("--grace-period", type=int, default=4)
    parser.add_argument("--storage", default="example_output")
    args = parser.parse_args(argv)

    results = run_grid(  # the full budget: FIFO, every trial to the end
        dataset=args.dataset,
        lrs=args.lrs,
        widths=args.widths,
        seeds=args.seeds,
        epochs=args.epochs,
        storage=args.storage,
        name=f"strategies_{args.dataset}",
    )
    experiment = Experiment(results.experiment_path)  # curves scored once, from the store
    strategies = default_strategies(args.epochs, grace_period=args.grace_period, reduction_factor=3)
    # Two configurations' seeds at a time; configurations start in a seeded random order.
    table = compare(experiment, strategies, concurrency=2 * args.seeds, seed=0)
    with pd.option_context("display.width", 200, "display.max_colwidth", 60):
        print(table)
    return table


if __name__ == "__main__":
    main()
