"""Checkpoint ensembles (issue 16): where ``ckpt`` lands between base, SWA and seed ensembles.

A checkpoint ensemble is one trial's own last w end-of-epoch models (``ckpt``; ``swa+ckpt``
of its SWA model), each temperature-scaled, logits averaged; ``+ts`` fits one more
temperature on the average. This script scores them from three stored experiments:

  demo     the demo's stored experiment (MNIST-1D, 8 configurations x 4 seeds, 30 epochs,
           pruned by PostHocASHA on val/swa+ens+ts/nll), read only
  mnist1d  the strategy benchmark's full-budget grid (``benchmarks/strategies.py``: 40% label
  digits   noise, lr x width, 4 seeds, 40 epochs, every trial to the end), trained once

For each: the naive vs post-hoc selection table over configurations and epochs (the rows of
``posthoc_tune.selection_table(path, over="configs+epochs", select_by="same")``, built here
from the same ``scan`` / ``summarise`` / ``table_row`` in one pass that also keeps each
configuration's base-best epochs) for the single-model, checkpoint and seed-ensemble
transforms, and a sweep of the checkpoint window w for ``ckpt+ts`` and ``swa+ckpt+ts``
(``dataclasses.replace(parse_transform(t), window=w)`` passed to ``scan``).

Run: .venv/bin/python benchmarks/checkpoint_ensembles.py [--demo PATH] [--root DIR]
     [--experiments demo mnist1d digits] [--windows 3 5 10 20]
(prints markdown; the main tables use the library default w =
``posthoc_tune.keys.CHECKPOINT_WINDOW``, which the sweep always includes; the grids are
trained under DIR once, 3.5-6 minutes on 2 shared cores, and reused by later runs)
"""

from __future__ import annotations

import argparse
import json
import math
import os
import sys
import time
from dataclasses import replace
from pathlib import Path
from typing import Any

os.environ.setdefault("RAY_AUTH_MODE", "disabled")

import numpy as np
import pandas as pd

from posthoc_tune.curves import configurations, naive_ensembles, scan
from posthoc_tune.keys import CHECKPOINT_WINDOW, Transform, parse_transform
from posthoc_tune.selection import Summary, open_store, summarise, table_row

sys.path.insert(0, str(Path(__file__).resolve().parent))
from strategies import grid  # the strategy benchmark's full-budget grids

TRANSFORMS = [
    "base", "ts", "swa", "swa+ts",
    "ckpt", "ckpt+ts", "swa+ckpt", "swa+ckpt+ts",
    "ens+ts", "swa+ens+ts",
]  # fmt: skip
SWEPT = ["ckpt+ts", "swa+ckpt+ts"]
WINDOWS = [3, 5, 10, 20]  # the sweep's default; CHECKPOINT_WINDOW is added to it
DEMO = "/tmp/refdemo/ray_results/demo"
SHOWN = {"lr": "lr", "width": "w", "weight_decay": "wd"}  # the others are fixed


def measure(path: Path, windows: list[int]) -> tuple[pd.DataFrame, pd.DataFrame, float]:
    """The selection table (``TRANSFORMS``), the window sweep (``SWEPT`` at each w) and the
    seconds spent scoring, from one pass over the configurations."""
    store = open_store(str(path))
    main: list[Summary] = []
    swept: dict[int, list[Summary]] = {w: [] for w in windows if w != CHECKPOINT_WINDOW}
    start = time.perf_counter()
    for group, (members, config) in configurations(store).items():
        curves = scan(store, group, members, config, TRANSFORMS, "logits")
        naive_ensembles(store, curves, "same", "logits")
        main.append(summarise(curves, TRANSFORMS, "same"))
        for w, summaries in swept.items():
            variants: list[str | Transform] = ["base"]
            variants += [replace(parse_transform(t), window=w) for t in SWEPT]
            curves = scan(store, group, members, config, variants, "logits")
            summaries.append(summarise(curves, ["base", *SWEPT], "same"))
    seconds = time.perf_counter() - start
    table = _table(main, TRANSFORMS)
    rows = []
    for t in SWEPT:
        for w in sorted(windows):
            frame = table if w == CHECKPOINT_WINDOW else _table(swept[w], ["base", *SWEPT])
            row = frame.loc[t]
            rows.append(
                {
                    "transform": t,
                    "w": w,
                    "naive test nll": row["naive/test/nll"],
                    "post-hoc test nll": row["posthoc/test/nll"],
                    "naive test error": row["naive/test/error"],
                    "post-hoc test error": row["posthoc/test/error"],
                    "post-hoc epochs": _epochs(row["posthoc/epoch"]),
                    "post-hoc config": _config(row["posthoc/config"]),
                }
            )
    return table, pd.DataFrame(rows), seconds


def _table(summaries: list[Summary], transforms: list[str]) -> pd.DataFrame:
    """``selection_table``'s rows over configurations and epochs, with the gains, the base
    model's best epochs in the post-hoc configuration, and post-hoc reversal: post-hoc
    epoch(s) later than those and a larger post-hoc than naive test-nll gain."""
    by_config = {json.dumps(s.config, sort_keys=True): s for s in summaries}
    frame = pd.DataFrame.from_dict({t: table_row(summaries, t) for t in transforms}, orient="index")
    for metric in ("nll", "error"):
        base = frame.loc["base", f"naive/test/{metric}"]
        for kind in ("naive", "posthoc"):
            frame[f"{kind}/gain/{metric}"] = base - frame[f"{kind}/test/{metric}"]
    frame["base_best/epoch"] = [
        by_config[c].picks[("base", "nll", True)].epochs for c in frame["posthoc/config"]
    ]
    later = [
        _mean(p) > _mean(b)
        for p, b in zip(frame["posthoc/epoch"], frame["base_best/epoch"], strict=True)
    ]
    larger = frame["posthoc/gain/nll"] > frame["naive/gain/nll"]
    frame["reversal"] = [
        "-" if t == "base" else ("yes" if a and b else "no")
        for t, a, b in zip(frame.index, later, larger, strict=True)
    ]
    return frame


def _config(text: str) -> str:
    config = json.loads(text)
    return " ".join(f"{short}={config[k]:.3g}" for k, short in SHOWN.items() if k in config)


def _epochs(epochs: list[Any]) -> str:
    return ",".join(str(e) for e in epochs)


def _mean(epochs: list[Any]) -> float:
    finite = [e for e in epochs if e is not None]
    return float(np.mean(finite)) if finite else math.nan


def readable(frame: pd.DataFrame) -> pd.DataFrame:
    return pd.DataFrame(
        {
            "naive nll": frame["naive/test/nll"],
            "post-hoc nll": frame["posthoc/test/nll"],
            "naive gain": frame["naive/gain/nll"],
            "post-hoc gain": frame["posthoc/gain/nll"],
            "naive error": frame["naive/test/error"],
            "post-hoc error": frame["posthoc/test/error"],
            "naive epochs": frame["naive/epoch"].map(_epochs),
            "naive config": frame["naive/config"].map(_config),
            "post-hoc epochs": frame["posthoc/epoch"].map(_epochs),
            "post-hoc config": frame["posthoc/config"].map(_config),
            "its base-best epochs": frame["base_best/epoch"].map(_epochs),
            "reversal": frame["reversal"],
        }
    )


def describe(name: str, path: Path) -> str:
    store = open_store(str(path))
    groups = configurations(store)
    trials = [m for members, _ in groups.values() for m in members]
    stored = sum(len(store.epochs(m)) for m in trials)
    longest = max(max(store.epochs(m)) for m in trials)
    text = (
        f"{len(groups)} configurations x {len(trials) // len(groups)} seeds, {longest} epochs; "
        f"{stored} of {len(trials) * longest} trial-epochs stored"
    )
    if name == "demo":
        text += " (the demo's run, pruned by PostHocASHA on val/swa+ens+ts/nll)"
    elif (path / "complete").exists():
        text += f"; trained: {(path / 'complete').read_text().strip()}"
    return text


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--demo", default=DEMO, type=Path, help="the demo's experiment path")
    parser.add_argument("--root", default="benchmarks/out/strategies", type=Path)
    parser.add_argument(
        "--experiments", nargs="+", default=["demo", "mnist1d", "digits"],
        choices=["demo", "mnist1d", "digits"],
    )  # fmt: skip
    parser.add_argument(
        "--windows", nargs="+", type=int, default=WINDOWS,
        help=f"windows to sweep (CHECKPOINT_WINDOW = {CHECKPOINT_WINDOW} is always added)",
    )  # fmt: skip
    args = parser.parse_args()
    windows = sorted(set(args.windows) | {CHECKPOINT_WINDOW})
    for name in args.experiments:
        path = args.demo if name == "demo" else grid(name, args.root.resolve())
        table, sweep, seconds = measure(path, windows)
        print(f"\n### {name}: {describe(name, path)}\n")
        print(
            'Selection over configurations and epochs (`select_by="same"`): test nll and '
            "error of the model selected naively (each member at its base-best epoch, the "
            "configuration by base val nll) and post hoc (by the row's val metric); gain: "
            "base's naive test nll minus the row's; epochs and configurations are the nll "
            "selection's; `its base-best epochs`: the base model's best val-nll epochs in the "
            "post-hoc configuration; reversal: post-hoc epochs later than those and post-hoc "
            f"gain > naive gain. Scored in {seconds:.0f} s (with the sweep).\n"
        )
        print(readable(table).to_markdown(floatfmt=".4f"))
        print(
            f"\nWindow sweep (w = {CHECKPOINT_WINDOW} is the default, "
            "`posthoc_tune.keys.CHECKPOINT_WINDOW`: the table above; each w selected on its "
            "own):\n"
        )
        print(sweep.to_markdown(floatfmt=".4f", index=False))
        sys.stdout.flush()


if __name__ == "__main__":
    main()
