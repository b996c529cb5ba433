"""selection_table figures for benchmarks/RESULTS.md (issue 5).

A synthetic store of 200 trials (50 configurations x 4 seeds) x 50 epochs, C = 10, 5,000 val +
5,000 test rows, base and SWA logits with recorded temperatures (as the reporter writes them).
``selection_table(over="configs+epochs")`` runs in a fresh process over the first 50, 100 and
200 trials (experiment folders of symbolic links into one store), reporting wall time and peak
resident memory: the scan holds one epoch of one configuration at a time, so memory must not
grow with the number of trials.

Run: .venv/bin/python benchmarks/selection.py [--root DIR]   (prints a markdown table; the
store takes ~8 GB, written once under DIR and reused)
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

from posthoc_tune import PredictionStore

CONFIGS, SEEDS, EPOCHS, C, N = 50, 4, 50, 10, 5_000


def build(root: Path) -> Path:
    """Write the full store once (reused when its marker exists)."""
    exp = root / "full"
    if (exp / "complete").exists():
        return exp
    rng = np.random.default_rng(0)
    store = PredictionStore.open(exp)
    labels = {s: rng.integers(0, C, N) for s in ("val", "test")}
    for split, y in labels.items():
        store.write_labels(split, y)
    onehot = {s: np.eye(C, dtype=np.float32)[y] for s, y in labels.items()}
    for cfg in range(CONFIGS):
        quality = rng.uniform(0.5, 2.0)
        for seed in range(SEEDS):
            trial_id = f"c{cfg:03d}_s{seed}"
            store.write_metadata(trial_id, {"cfg": cfg, "seed": seed})
            for epoch in range(1, EPOCHS + 1):
                signal = quality * (1 + 0.02 * epoch)
                parts = {
                    (s, v): signal * onehot[s]
                    + rng.standard_normal((N, C), dtype=np.float32) * (1.5 if v == "base" else 1.0)
                    for s in ("val", "test")
                    for v in ("base", "swa")
                }
                store.write_epoch(trial_id, epoch, parts, {"base": 1.3, "swa": 1.1})
    (exp / "complete").touch()
    return exp


def subset(full: Path, root: Path, n_trials: int) -> Path:
    """An experiment folder holding the first ``n_trials`` trials, as symbolic links."""
    exp = root / f"first{n_trials}"
    if exp.exists():
        return exp
    trials = sorted(p.name for p in (full / "posthoc" / "logits").iterdir())[:n_trials]
    for folder in ("logits", "meta", "labels"):
        (exp / "posthoc" / folder).mkdir(parents=True)
    for name in ("val.parquet", "test.parquet"):
        (exp / "posthoc" / "labels" / name).symlink_to(full / "posthoc" / "labels" / name)
    for trial in trials:
        (exp / "posthoc" / "logits" / trial).symlink_to(full / "posthoc" / "logits" / trial)
        meta = f"{trial}.json"
        (exp / "posthoc" / "meta" / meta).symlink_to(full / "posthoc" / "meta" / meta)
    return exp


MEASURE = """
import json, resource, sys, time
import posthoc_tune as pht
baseline = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
start = time.perf_counter()
table = pht.selection_table(sys.argv[1], over="configs+epochs", progress=False)
wall = time.perf_counter() - start
peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
print(json.dumps({"wall_s": wall, "baseline_mb": baseline / 1024, "peak_mb": peak / 1024,
                  "rows": len(table)}))
"""


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--root", default=os.path.join(tempfile.gettempdir(), "pht-selection"))
    root = Path(parser.parse_args().root)
    start = time.perf_counter()
    full = build(root)
    print(f"store ready in {time.perf_counter() - start:.0f} s at {full}")
    print("\n| trials | epoch files | wall s | RSS after imports MB | peak RSS MB |")
    print("|---|---|---|---|---|")
    for n_trials in (50, 100, 200):
        exp = subset(full, root, n_trials)
        out = subprocess.run(
            [sys.executable, "-c", MEASURE, str(exp)], capture_output=True, text=True, check=True
        )
        m = json.loads(out.stdout.strip().splitlines()[-1])
        print(
            f"| {n_trials} | {n_trials * EPOCHS:,} | {m['wall_s']:.0f} | "
            f"{m['baseline_mb']:.0f} | {m['peak_mb']:.0f} |"
        )


if __name__ == "__main__":
    main()
