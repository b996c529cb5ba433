"""Seed groups under scarce trial slots (issue 19): do a group's members run ahead of it?

The setting a user meets first: 48 trials (12 configurations x 4 seeds, ``with_seeds(...,
key="_seed")``), 0.25 CPU each on 2 cores, so 8 run at once, and
``PostHocASHA(metric="val/swa+ens+ts/nll", max_t=8, grace_period=1, reduction_factor=2)``.
Each trial is an MLP on MNIST-1D (12,000 samples, 40% symmetric label noise) whose reporter
checkpoints every epoch (``checkpoint={"optimizer": opt}``), so a pause resumes exactly.

``tune``: one real Tune run (``--run-ahead`` sets PostHocASHA's ``run_ahead``); prints epochs
trained (stored epoch files: every one was trained), epochs Tune never processed (stored past
the trial's last result), the epochs that members of groups cut at rung r trained past r,
trial (re)starts, wall time and the final ``swa+ens+ts`` model's test NLL (post-hoc selection
over configurations and epochs).

``grid``: the same 48 trials to the full budget (no scheduler), for ``replay``: PostHocASHA
replayed on the stored curves with 8 slots and random start orders of the trials (Tune starts
pending trials in an arbitrary order when it reuses actors), as it was (no pausing, Tune's
start order) and as it is.

``pause``: the cost of one pause/resume cycle: one trial paused at every epoch by a scheduler
that only does that, against the same trial never paused.

Run: .venv/bin/python benchmarks/seed_groups.py tune|grid|replay|pause [--root DIR]
(``tune --label NAME`` names the run; the "before" row ran this script on the previous commit)
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import time
from pathlib import Path
from typing import Any

os.environ.setdefault("RAY_AUTH_MODE", "disabled")

import ray
import torch
from ray import tune
from ray.tune.schedulers import FIFOScheduler, TrialScheduler

import posthoc_tune as pht
from posthoc_tune.datasets import NoisyDataset, load
from posthoc_tune.demo import mlp
from posthoc_tune.replay import Experiment

METRIC = "val/swa+ens+ts/nll"
SEEDS, MAX_T, GRACE, RF = 4, 8, 1, 2
SPACE = {
    "lr": tune.grid_search([0.01, 0.03, 0.1]),
    "width": tune.grid_search([64, 256]),
    "weight_decay": tune.grid_search([0.0, 5e-4]),
    "batch_size": 128,
    "epochs": MAX_T,
}
ORDERS = 5


def train(config: dict[str, Any], data: NoisyDataset) -> None:
    """An MLP whose reporter checkpoints every epoch; batches depend on (seed, epoch) only, so
    a resumed trial trains exactly as an uninterrupted one."""
    torch.set_num_threads(1)
    torch.manual_seed(config["_seed"])
    model = mlp(data.x_train.shape[1], config["width"], data.n_classes)
    opt = torch.optim.SGD(
        model.parameters(), lr=config["lr"], momentum=0.9, weight_decay=config["weight_decay"]
    )
    reporter = pht.PostHocReporter(
        model,
        config,
        val=(data.x_val, data.y_val),
        test=(data.x_test, data.y_test),
        seed_key="_seed",
        checkpoint={"optimizer": opt},
    )
    dataset = torch.utils.data.TensorDataset(data.x_train, data.y_train)
    for epoch in range(reporter.epoch, config["epochs"]):
        order = torch.Generator().manual_seed(1000 * config["_seed"] + epoch)
        batches = torch.utils.data.DataLoader(
            dataset, batch_size=config["batch_size"], shuffle=True, generator=order
        )
        model.train()
        for x, y in batches:
            opt.zero_grad()
            torch.nn.functional.cross_entropy(model(x), y).backward()
            opt.step()
        reporter.step()


class Starts(tune.Callback):
    """Counts trial starts (first starts and resumes)."""

    def __init__(self) -> None:
        self.starts = 0

    def on_trial_start(self, iteration: int, trials: list, trial: Any, **info: Any) -> None:
        self.starts += 1


def tuner(
    data: NoisyDataset, root: Path, name: str, scheduler: TrialScheduler | None, starts: Starts
) -> tune.Tuner:
    callbacks: list[tune.Callback] = [starts]
    if isinstance(scheduler, pht.PostHocASHA):
        callbacks.append(scheduler.callback)
    return tune.Tuner(
        tune.with_resources(tune.with_parameters(train, data=data), {"cpu": 0.25}),
        param_space=pht.with_seeds(SPACE, SEEDS, key="_seed"),
        tune_config=tune.TuneConfig(scheduler=scheduler, reuse_actors=True),
        run_config=tune.RunConfig(
            name=name,
            storage_path=str(root.resolve()),
            callbacks=callbacks,
            verbose=0,
            checkpoint_config=tune.CheckpointConfig(num_to_keep=2),
        ),
    )


def run_tune(root: Path, label: str, run_ahead: str | None) -> dict[str, Any]:
    data = load("mnist1d", noise=0.4, n_samples=12000)
    settings: dict[str, Any] = {"metric": METRIC, "mode": "min", "max_t": MAX_T}
    settings |= {"grace_period": GRACE, "reduction_factor": RF, "seed_key": "_seed"}
    if run_ahead is not None:  # the "before" run's PostHocASHA has no such argument
        settings["run_ahead"] = None if run_ahead == "none" else int(run_ahead)
    scheduler = pht.PostHocASHA(**settings)
    starts = Starts()
    start = time.perf_counter()
    results = tuner(data, root, f"tune_{label}", scheduler, starts).fit()
    seconds = time.perf_counter() - start
    assert not results.errors, results.errors
    store = pht.PredictionStore.open(results.experiment_path, must_exist=True)
    frame = results.get_dataframe()
    processed = dict(zip(frame["trial_id"], frame["epoch"].astype(int), strict=True))
    stored = {t: store.epochs(t) for t in processed}
    group = {t: store.metadata(t)["group"] for t in processed}
    decisions = scheduler.decisions
    cut = decisions[decisions["decision"] == "STOP"].set_index("arm")["milestone"].to_dict()
    assert not decisions.empty, "the scheduler object saw no decision"
    over = [max(0, len(stored[t]) - int(cut[group[t]])) for t in processed if group[t] in cut]
    ended: dict[str, list[int]] = {}
    for t in sorted(processed):
        ended.setdefault(group[t], []).append(len(stored[t]))
    table = pht.selection_table(store, over="configs+epochs")
    row = {
        "label": label,
        "seconds": round(seconds),
        "trials": len(processed),
        "starts": starts.starts,
        "epochs_trained": sum(len(e) for e in stored.values()),
        "epochs_unprocessed": sum(len([e for e in stored[t] if e > processed[t]]) for t in stored),
        "cut_groups": len(cut),
        "cut_members_past_rung": sum(over),
        "max_past_rung": max(over, default=0),
        "test_nll": float(table.loc["swa+ens+ts", "posthoc/test/nll"]),
        "groups": {g: sorted(e) for g, e in ended.items()},
    }
    (root / f"tune_{label}.json").write_text(json.dumps(row, indent=1))
    return row


def run_grid(root: Path) -> Path:
    path = root / "grid"
    if not (path / "complete").exists():
        data = load("mnist1d", noise=0.4, n_samples=12000)
        start = time.perf_counter()
        results = tuner(data, root, "grid", None, Starts()).fit()
        assert not results.errors, results.errors
        (path / "complete").write_text(
            f"{len(results)} trials in {time.perf_counter() - start:.0f} s\n"
        )
    return path


class _TuneOrder(pht.PostHocASHA):
    """PostHocASHA as it was: Tune's start order (FIFO over pending trials)."""

    def choose_trial_to_run(self, tune_controller: Any) -> Any:
        return FIFOScheduler.choose_trial_to_run(self, tune_controller)


def run_replay(root: Path) -> list[dict[str, Any]]:
    experiment = Experiment(run_grid(root))
    settings: dict[str, Any] = {"metric": METRIC, "mode": "min", "max_t": MAX_T}
    settings |= {"grace_period": GRACE, "reduction_factor": RF, "seed_key": "_seed"}
    variants = {
        "run ahead, Tune's start order (before)": lambda: _TuneOrder(**settings, run_ahead=None),
        "run ahead, siblings first": lambda: pht.PostHocASHA(**settings, run_ahead=None),
        "run_ahead=1, siblings first": lambda: pht.PostHocASHA(**settings, run_ahead=1),
        "run_ahead=0, siblings first": lambda: pht.PostHocASHA(**settings, run_ahead=0),
    }
    rows = []
    for name, make in variants.items():
        for seed in range(ORDERS):
            replay = experiment.replay(make(), concurrency=8, seed=seed, shuffle="trials")
            scheduler = replay.scheduler
            assert isinstance(scheduler, pht.PostHocASHA)
            d = scheduler.decisions
            cut = d[d["decision"] == "STOP"].set_index("arm")["milestone"].to_dict()
            over = [
                max(0, replay.epochs[t] - int(cut[experiment.group(t)]))
                for t in experiment.trials
                if experiment.group(t) in cut
            ]
            selected = experiment.select(replay)
            rows.append(
                {
                    "variant": name,
                    "seed": seed,
                    "compute": replay.compute,
                    "past_rung": sum(over),
                    "max_past_rung": max(over, default=0),
                    "pauses": replay.pauses,
                    "test_nll": selected["test/nll"],
                }
            )
    return rows


class _PauseAll(FIFOScheduler):
    """Pauses one trial at every result (PAUSE, then Tune resumes it at once)."""

    def on_trial_result(self, tune_controller: Any, trial: Any, result: dict[str, Any]) -> str:
        return TrialScheduler.PAUSE if result.get("should_checkpoint") else TrialScheduler.CONTINUE


def run_pause(root: Path) -> list[dict[str, Any]]:
    data = load("mnist1d", noise=0.4, n_samples=12000)
    one = {"lr": 0.03, "width": 64, "weight_decay": 0.0, "batch_size": 128, "epochs": 10}
    rows = []
    for reuse in (True, False):
        for name, scheduler in (("never paused", None), ("paused every epoch", _PauseAll())):
            times = []
            for repeat in range(2):
                start = time.perf_counter()
                results = tune.Tuner(
                    tune.with_resources(tune.with_parameters(train, data=data), {"cpu": 1}),
                    param_space={**one, "_seed": repeat},
                    tune_config=tune.TuneConfig(scheduler=scheduler, reuse_actors=reuse),
                    run_config=tune.RunConfig(
                        name=f"pause_{reuse}_{name.split()[0]}_{repeat}",
                        storage_path=str(root.resolve()),
                        verbose=0,
                        checkpoint_config=tune.CheckpointConfig(num_to_keep=2),
                    ),
                ).fit()
                times.append(time.perf_counter() - start)
                metrics = results[0].metrics
                assert not results.errors and metrics is not None and metrics["epoch"] == 10
            rows.append({"reuse_actors": reuse, "run": name, "seconds": statistics.median(times)})
    return rows


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("what", choices=["tune", "grid", "replay", "pause"])
    parser.add_argument("--root", type=Path, default=Path("/tmp/seed_groups"))
    parser.add_argument("--label", default="after")
    parser.add_argument("--run-ahead", help="PostHocASHA(run_ahead=...): an int or 'none'")
    args = parser.parse_args()
    args.root.mkdir(parents=True, exist_ok=True)
    ray.init(num_cpus=2, include_dashboard=False, log_to_driver=False)
    if args.what == "tune":
        row = run_tune(args.root, args.label, args.run_ahead)
        print(json.dumps({k: v for k, v in row.items() if k != "groups"}, indent=1))
        cut = [e for e in row["groups"].values() if min(e) < MAX_T]
        print("members' epochs in cut groups:", sorted(cut))
    elif args.what == "grid":
        print((run_grid(args.root) / "complete").read_text())
    elif args.what == "replay":
        import pandas as pd

        rows = pd.DataFrame(run_replay(args.root))
        print(rows.to_string())
        print(rows.drop(columns="seed").groupby("variant", sort=False).mean().to_markdown())
    else:
        import pandas as pd

        print(pd.DataFrame(run_pause(args.root)).to_markdown(index=False))


if __name__ == "__main__":
    main()
