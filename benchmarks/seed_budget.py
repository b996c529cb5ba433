"""Seeds as a budget (issue 20), by replay on the strategy benchmark's grids.

A seed schedule (``PostHocASHA(seeds=(1, 2, 4))``) starts each configuration as one seed and
adds seeds only to configurations that pass a rung, judging every group at a rung on the same
number of members. This replays it on the full grids ``benchmarks/strategies.py`` trains
(MNIST-1D and digits, 8 configurations x 4 seeds x 40 epochs) with the same settings (8 slots,
the same 5 random start orders of the configurations), beside the full budget, stock ASHA on
``val/base/nll`` and PostHocASHA without a schedule, over a sweep of ASHA settings. Every
strategy ends with the ``swa+ens+ts`` model of its post-hoc selection (a configuration's
ensemble of the seeds it trained). ``misses``: orders in which the strategy did not end with
the configuration full-budget post-hoc selection picks, and what that configuration had
earned there (seeds, and the rung it was cut at).

Run: .venv/bin/python benchmarks/seed_budget.py [--root DIR] (DIR holds grid_mnist1d and
grid_digits, as strategies.py writes them; trained there if missing)
"""

from __future__ import annotations

import argparse
import os
import sys
from pathlib import Path
from typing import Any

os.environ.setdefault("RAY_AUTH_MODE", "disabled")

import pandas as pd
from ray.tune.schedulers import ASHAScheduler, TrialScheduler

from posthoc_tune import PostHocASHA
from posthoc_tune.replay import Experiment

sys.path.insert(0, str(Path(__file__).resolve().parent))
from strategies import EPOCHS, ORDERS, TRANSFORM, grid  # the strategy benchmark's grids

SWEEP = [(1, 2), (1, 3), (2, 3), (2, 4), (4, 3), (4, 4), (8, 3)]
SCHEDULES = [(1, 2, 4), (1, 1, 2), (1, 1, 4), (1, 1, 1, 2)]
KEY = f"val/{TRANSFORM}/nll"


def strategies(max_t: int) -> dict[str, TrialScheduler | None]:
    """Fresh scheduler objects (they are stateful); None: the full budget."""
    out: dict[str, TrialScheduler | None] = {"full budget, post-hoc": None}
    for grace, rf in SWEEP:
        asha: dict[str, Any] = dict(
            mode="min", max_t=max_t, grace_period=grace, reduction_factor=rf
        )
        out[f"ASHA base g={grace} rf={rf}"] = ASHAScheduler(metric="val/base/nll", **asha)
        out[f"PostHocASHA ens g={grace} rf={rf}"] = PostHocASHA(metric=KEY, **asha)
        for seeds in SCHEDULES:
            name = f"seeds {'-'.join(map(str, seeds))} g={grace} rf={rf}"
            out[name] = PostHocASHA(metric=KEY, seeds=seeds, **asha)
    return out


def fate(
    experiment: Experiment, scheduler: TrialScheduler | None, group: str, epochs: dict[str, int]
) -> str:
    """What a configuration earned in a replay: its seeds, and the rung it was cut at."""
    seeds = sum(epochs[m] > 0 for m in experiment.curves[group].members)
    cut = ""
    if isinstance(scheduler, PostHocASHA):
        d = scheduler.decisions
        lost = d[(d["arm"] == group) & (d["decision"] == "STOP")]["milestone"]
        cut = f" cut@{lost.iloc[0]:g}" if len(lost) else ""
    return f"{seeds}s{cut}"


def run(experiment: Experiment, max_t: int, concurrency: int) -> pd.DataFrame:
    full = experiment.select(None, TRANSFORM)
    best = next(g for g, c in experiment.curves.items() if c.config == full["config"])
    rows = []
    for seed in range(ORDERS):
        for name, scheduler in strategies(max_t).items():
            replay = (
                None
                if scheduler is None
                else experiment.replay(scheduler, concurrency=concurrency, seed=seed)
            )
            picked = experiment.select(replay, TRANSFORM)
            compute = experiment.full_compute if replay is None else replay.compute
            epochs = (
                {m: experiment.max_epochs[m] for m in experiment.trials}
                if replay is None
                else replay.epochs
            )
            found = picked["config"] == full["config"]
            rows.append(
                {
                    "strategy": name,
                    "test/nll": picked["test/nll"],
                    "compute_fraction": compute / experiment.full_compute,
                    "finds": found,
                    "miss": "" if found else fate(experiment, scheduler, best, epochs),
                }
            )
    frame = pd.DataFrame(rows)
    grouped = frame.groupby("strategy", sort=False)
    table = pd.DataFrame(
        {
            "test/nll": grouped["test/nll"].mean(),
            "sd": grouped["test/nll"].std(ddof=0),
            "compute": grouped["compute_fraction"].mean(),
            "finds (b)'s config": grouped["finds"].mean(),
            "misses: (b)'s config had": grouped["miss"].agg(lambda m: " ".join(x for x in m if x)),
        }
    )
    table.insert(1, "gap", table["test/nll"] / full["test/nll"] - 1)
    return table


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--datasets", nargs="+", default=["mnist1d", "digits"], choices=EPOCHS)
    parser.add_argument("--root", default="benchmarks/out/strategies", type=Path)
    parser.add_argument("--concurrency", type=int, default=8)
    args = parser.parse_args()
    for dataset in args.datasets:
        experiment = Experiment(grid(dataset, args.root.resolve()), transforms=[TRANSFORM])
        table = run(experiment, EPOCHS[dataset], args.concurrency)
        shown = table.assign(
            gap=[f"{g:+.2%}" for g in table["gap"]],
            compute=[f"{c:.1%}" for c in table["compute"]],
            **{"finds (b)'s config": [f"{f:.0%}" for f in table["finds (b)'s config"]]},
        )
        print(f"\n### {dataset}: means over {ORDERS} start orders, {args.concurrency} slots\n")
        print(shown.to_markdown(floatfmt=".4f"))


if __name__ == "__main__":
    main()
