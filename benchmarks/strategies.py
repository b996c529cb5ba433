"""Strategy benchmark (issue 6): test loss against compute, by replaying one full grid.

Trains a full grid once per dataset (MNIST-1D generated offline and scikit-learn digits, 40%
symmetric label noise on train, val and test; lr x width, 4 seeds each, every trial to the end),
then replays the stored curves through real scheduler objects (``posthoc_tune.replay``) on a
simulated cluster of ``--concurrency`` trial slots:

  (a) full budget, naive selection        (b) full budget, post-hoc selection
  (c) stock ASHA on val/base/nll, the transforms applied afterwards (selected post hoc)
  (d) PostHocASHA on val/swa+ens+ts/nll   (e) PostHocASHA on val/swa+ts/nll

Every strategy ends with the ``swa+ens+ts`` model of its selection. A sweep over ASHA's
grace period and reduction factor gives stock ASHA and PostHocASHA at several budgets, to
compare them at equal compute.

Run: .venv/bin/python benchmarks/strategies.py [--datasets mnist1d digits] [--root DIR]
(prints markdown; a grid is trained once under DIR and reused by later runs)
"""

from __future__ import annotations

import argparse
import os
import time
from pathlib import Path
from typing import Any

os.environ.setdefault("RAY_AUTH_MODE", "disabled")

import pandas as pd
from ray.tune.schedulers import ASHAScheduler

from posthoc_tune import PostHocASHA
from posthoc_tune.demo import run_grid
from posthoc_tune.replay import Experiment, Strategy, compare, default_strategies

EPOCHS = {"mnist1d": 40, "digits": 40}
SAMPLES = 12000  # MNIST-1D; digits has its 1,797 images
GRACE, RF = 4, 3  # the headline strategies' ASHA settings
SWEEP = [(1, 2), (1, 3), (2, 2), (2, 3), (4, 2), (4, 3), (4, 4), (8, 2), (8, 3)]
TRANSFORM = "swa+ens+ts"
ORDERS = 5  # random start orders of the configurations


def grid(dataset: str, root: Path) -> Path:
    """The full-budget experiment, trained once (a marker file says it completed)."""
    path = root / f"grid_{dataset}"
    if not (path / "complete").exists():
        start = time.perf_counter()
        results = run_grid(
            dataset=dataset,
            n_samples=SAMPLES,
            epochs=EPOCHS[dataset],
            storage=str(root),
            name=path.name,
        )
        seconds = time.perf_counter() - start
        (path / "complete").write_text(f"{len(results)} trials in {seconds:.0f} s\n")
    return path


def _strategies(max_t: int) -> dict[str, Strategy]:
    """The headline strategies and the sweep (fresh scheduler objects: they are stateful)."""
    strategies = default_strategies(max_t, grace_period=GRACE, reduction_factor=RF)
    for grace, rf in SWEEP:
        asha: dict[str, Any] = dict(
            mode="min", max_t=max_t, grace_period=grace, reduction_factor=rf
        )
        strategies[f"ASHA base g={grace} rf={rf}"] = Strategy(
            ASHAScheduler(metric="val/base/nll", **asha)
        )
        strategies[f"PostHocASHA ens g={grace} rf={rf}"] = Strategy(
            PostHocASHA(metric=f"val/{TRANSFORM}/nll", **asha)
        )
    return strategies


def replays(experiment: Experiment, max_t: int, concurrency: int) -> pd.DataFrame:
    """Every strategy over ``ORDERS`` random start orders of the configurations: the mean
    test metrics and compute, and how often the full-budget post-hoc model was found."""
    frames = []
    for seed in range(ORDERS):
        frame = compare(
            experiment, _strategies(max_t), transform=TRANSFORM, concurrency=concurrency, seed=seed
        )
        models = [_model(c, e) for c, e in zip(frame["config"], frame["epoch"], strict=True)]
        frames.append(frame.assign(model=models))
    runs = pd.concat(frames)
    best = runs.loc["full budget, post-hoc", "model"].iloc[0]
    grouped = runs.groupby(level=0, sort=False)
    return pd.DataFrame(
        {
            "test/nll": grouped["test/nll"].mean(),
            "test/nll sd": grouped["test/nll"].std(ddof=0),
            "test/error": grouped["test/error"].mean(),
            "compute": grouped["compute"].mean(),
            "compute_fraction": grouped["compute_fraction"].mean(),
            "finds (b)'s model": grouped["model"].agg(lambda m: (m == best).mean()),
        }
    ).assign(example=frames[0]["model"])


def _model(config: dict[str, Any], epochs: list[int]) -> str:
    """A selected model, compactly: its lr and width, and its epoch(s)."""
    return f"lr={config['lr']} w={config['width']} @ {','.join(map(str, epochs))}"


def verdict(table: pd.DataFrame) -> list[str]:
    """The issue's targets, measured."""
    full = table.loc["full budget, post-hoc"]
    ours = table.loc[f"PostHocASHA on val/{TRANSFORM}/nll"]
    loss_gap = ours["test/nll"] / full["test/nll"] - 1
    lines = [
        f"* PostHocASHA (d) vs full-budget post-hoc selection (b): mean test nll "
        f"{ours['test/nll']:.4f} vs {full['test/nll']:.4f} ({loss_gap:+.2%}; target within "
        f"+2%) using {ours['compute_fraction']:.0%} of its compute (target <= 40%)."
    ]
    stock = table[table.index.str.startswith("ASHA base")]
    cheaper = stock[stock["compute"] <= ours["compute"]]
    if cheaper.empty:
        lines.append("* No stock-ASHA setting used as little compute as (d).")
    else:
        best = cheaper["test/nll"].idxmin()
        lines.append(
            f"* Best stock ASHA on val/base/nll using at most (d)'s compute ({best}, "
            f"{cheaper.loc[best, 'compute']:.0f} vs {ours['compute']:.0f} epochs): mean test "
            f"nll {cheaper.loc[best, 'test/nll']:.4f} vs (d) {ours['test/nll']:.4f}."
        )
    nearest = (stock["compute"] - ours["compute"]).abs().idxmin()
    lines.append(
        f"* Stock ASHA nearest in compute ({nearest}, {stock.loc[nearest, 'compute']:.0f} "
        f"epochs): mean test nll {stock.loc[nearest, 'test/nll']:.4f}."
    )
    return lines


def _markdown(frame: pd.DataFrame) -> str:
    shown = frame.copy()
    shown["compute_fraction"] = [f"{f:.0%}" for f in frame["compute_fraction"]]
    shown["finds (b)'s model"] = [f"{f:.0%}" for f in frame["finds (b)'s model"]]
    return shown.to_markdown(floatfmt=".4f")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--datasets", nargs="+", default=["mnist1d", "digits"], choices=EPOCHS)
    parser.add_argument("--root", default="benchmarks/out/strategies", type=Path)
    parser.add_argument("--concurrency", type=int, default=8, help="simulated trial slots")
    args = parser.parse_args()
    args.root = args.root.resolve()
    for dataset in args.datasets:
        path = grid(dataset, args.root)
        start = time.perf_counter()
        experiment = Experiment(path, transforms=[TRANSFORM])
        scored = time.perf_counter() - start
        max_t = EPOCHS[dataset]
        table = replays(experiment, max_t, args.concurrency)
        trained = (path / "complete").read_text().strip()
        print(f"\n## {dataset}: {trained}; curves scored in {scored:.0f} s\n")
        print(
            f"Means over {ORDERS} random start orders of the configurations, {args.concurrency} "
            f"trial slots, max_t {max_t}; headline ASHA settings: grace period {GRACE}, "
            f"reduction factor {RF}; g/rf rows: the sweep. The {TRANSFORM} model of each "
            "strategy's selection; `example`: its pick in the first order.\n"
        )
        print(_markdown(table))
        print()
        print("\n".join(verdict(table)))


if __name__ == "__main__":
    main()
