"""Retention benchmark (issue 7): the store's disk footprint, and what retention removes.

A CIFAR-sized synthetic run: 100 trials (25 configurations x 4 seeds) x 100 epochs, C = 10,
5,000 val + 5,000 test rows (the paper's CIFAR-N split), base and SWA logits per epoch with
recorded temperatures, as the reporter writes them. Base curves overfit after a few epochs,
SWA curves keep improving, and configurations differ in signal strength, so schedulers have
something to decide. Measured: the footprint in float32 and float16; then, on the float32
store, after dropping the trials PostHocASHA on val/swa+ens+ts/nll would have pruned (found by
replaying the curves), and after keeping only the epochs a selection can pick.

Run: .venv/bin/python benchmarks/retention.py [--root DIR]   (writes ~12 GB under DIR)
"""

from __future__ import annotations

import argparse
import shutil
import tempfile
import time
from pathlib import Path

import numpy as np

from posthoc_tune import PostHocASHA, PredictionStore, selection_table
from posthoc_tune.replay import Experiment
from posthoc_tune.retention import compact

CONFIGS, SEEDS, EPOCHS, C, N = 25, 4, 100, 10, 5_000


def write(root: Path, dtype: str) -> Path:
    """The synthetic run, written through the store as the reporter would."""
    rng = np.random.default_rng(0)
    store = PredictionStore.open(root, dtype=dtype)  # type: ignore[arg-type]
    labels = {s: rng.integers(0, C, N) for s in ("val", "test")}
    for split, y in labels.items():
        store.write_labels(split, y)
    onehot = {s: np.eye(C, dtype=np.float32)[y] for s, y in labels.items()}
    for c in range(CONFIGS):
        strength = 0.5 + 1.5 * c / (CONFIGS - 1)
        for seed in range(SEEDS):
            trial = f"t{c:02d}_{seed}"
            store.write_metadata(trial, {"config": c, "seed": seed})
            for epoch in range(1, EPOCHS + 1):
                base = strength * min(epoch, 8) / 8 - 0.02 * max(0, epoch - 8)  # overfits
                swa = strength * (1 - 0.9**epoch)  # keeps improving
                parts = {}
                for split in ("val", "test"):
                    noise = rng.standard_normal((N, C), dtype=np.float32)
                    parts[(split, "base")] = base * 3 * onehot[split] + 1.5 * noise
                    parts[(split, "swa")] = swa * 3 * onehot[split] + 1.5 * noise
                store.write_epoch(trial, epoch, parts, temperatures={"base": 1.0, "swa": 1.0})
    return root


def size_mb(path: Path) -> float:
    return sum(f.stat().st_size for f in path.rglob("*") if f.is_file()) / 2**20


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--root", type=Path, default=Path(tempfile.gettempdir()) / "retention")
    args = parser.parse_args()
    shutil.rmtree(args.root, ignore_errors=True)
    rows = []
    for dtype in ("float32", "float16"):
        start = time.perf_counter()
        path = write(args.root / dtype, dtype)
        rows.append((f"full run, {dtype}", size_mb(path), time.perf_counter() - start))
    path = args.root / "float32"

    start = time.perf_counter()
    experiment = Experiment(path)
    scheduler = PostHocASHA(
        metric="val/swa+ens+ts/nll", mode="min", max_t=EPOCHS, grace_period=4, reduction_factor=3
    )
    replay = experiment.replay(scheduler, concurrency=8, seed=0)
    pruned = sorted(scheduler.pruned_trials)
    report = compact(path, keep="all", drop_trials=pruned)
    rows.append(
        (
            f"float32, {len(report.dropped_trials)} pruned trials dropped "
            f"(replayed compute {replay.compute / experiment.full_compute:.0%})",
            size_mb(path),
            time.perf_counter() - start,
        )
    )
    before = selection_table(path, over="configs+epochs")
    start = time.perf_counter()
    report = compact(path, keep="selectable")
    seconds = time.perf_counter() - start
    kept = sum(map(len, report.kept_epochs.values()))
    rows.append((f"float32, then selectable epochs only ({kept} files)", size_mb(path), seconds))
    after = selection_table(path, over="configs+epochs")
    same = np.allclose(before["posthoc/test/nll"], after["posthoc/test/nll"]) and np.allclose(
        before["naive/test/nll"], after["naive/test/nll"]
    )

    full = rows[0][1]
    print("| store | disk MB | of the float32 run | seconds |")
    print("|---|---|---|---|")
    for name, mb, secs in rows:
        print(f"| {name} | {mb:,.0f} | {mb / full:.1%} | {secs:.0f} |")
    print(f"\nselection table unchanged by the epoch compaction: {same}")


if __name__ == "__main__":
    main()
