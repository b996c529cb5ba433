"""Plots that show post-hoc reversal, from the prediction store alone.

Per configuration: the val and test curves over epochs of the base model and each transform
(single-model transforms averaged over members), with the naive epoch (members' base-best)
and the post-hoc epoch (the last transform's val-best) marked, and the span between them
shaded when the transformed model keeps improving after the base model peaked: the epochs
that naive selection throws away. Plus a leaderboard chart. Matplotlib's object API is used
directly (no pyplot, no display needed).
"""

from __future__ import annotations

import json
import math
import os
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import matplotlib
import numpy as np
from matplotlib.figure import Figure
from matplotlib.ticker import MaxNLocator

from posthoc_tune.keys import check_name, parse_transform
from posthoc_tune.selection import (
    Curves,
    argbest,
    configurations,
    leaderboard,
    open_store,
    scan,
)
from posthoc_tune.transforms import Combiner

PLOT_TRANSFORMS = ("swa", "swa+ts", "ens+ts", "swa+ens+ts")


def plot_experiment(
    results_or_experiment_path: Any,
    out_dir: str | os.PathLike[str],
    *,
    transforms: Sequence[str] = PLOT_TRANSFORMS,
    metric: str = "nll",
    formats: Sequence[str] = ("png", "svg"),
    ensemble: Combiner = "logits",
) -> list[Path]:
    """Write one curves figure per configuration and a leaderboard chart; returns the files.

    ``metric`` is ``nll`` or ``error``; the leaderboard ranks by ``val/<last transform>/<metric>``.
    """
    check_name("metric", metric, ("nll", "error"))
    for fmt in formats:
        check_name("format", fmt, ("png", "svg", "pdf"))
    names = [parse_transform(t).name for t in transforms]
    if not names:
        raise ValueError("transforms must name at least one transform")
    store = open_store(results_or_experiment_path)
    groups = sorted(configurations(store).items())  # fails on a path that is not an experiment
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    needed = list(dict.fromkeys(["base", *names]))
    written = []
    for i, (group, (members, config)) in enumerate(groups):
        curves = scan(store, group, members, config, needed, "nll", ensemble)
        figure = _curves_figure(curves, names, metric)
        written += _save(figure, out / f"curves_{i:03d}_{group}", formats)
    board = leaderboard(store, metric=f"val/{names[-1]}/{metric}", ensemble=ensemble)
    written += _save(
        _leaderboard_figure(board, f"val/{names[-1]}/{metric}"), out / "leaderboard", formats
    )
    return written


def _mean_curve(curves: Curves, transform: str, key: str) -> dict[int, float]:
    """A transform's curve: the ensemble's, or the members' mean where all have the epoch."""
    if parse_transform(transform).ens:
        return {e: s.get(key, math.nan) for e, s in sorted(curves.ens[transform].items())}
    per_member = curves.single[transform]
    common = set.intersection(*(set(c) for c in per_member.values()))
    return {
        e: float(np.mean([per_member[m][e].get(key, math.nan) for m in per_member]))
        for e in sorted(common)
    }


def _curves_figure(curves: Curves, transforms: list[str], metric: str) -> Figure:
    figure = Figure(figsize=(11, 4.2), layout="constrained")
    axes = figure.subplots(1, 2, sharex=True)
    naive = [argbest(curves.single["base"][m], f"val/{metric}") for m in curves.members]
    naive_epochs = [e for e in naive if e is not None]
    last = transforms[-1]
    posthoc = argbest(
        {e: {"v": v} for e, v in _mean_curve(curves, last, f"val/{metric}").items()}, "v"
    )
    for ax, split in zip(axes, ("val", "test"), strict=True):
        for transform in ["base", *transforms]:
            curve = _mean_curve(curves, transform, f"{split}/{metric}")
            if curve:
                style = {"color": "black", "linewidth": 2} if transform == "base" else {}
                ax.plot(list(curve), list(curve.values()), label=transform, **style)
        if naive_epochs:
            ax.axvline(
                float(np.median(naive_epochs)),
                color="grey",
                linestyle="--",
                label="naive epoch (base val best)",
            )
        if posthoc is not None:
            ax.axvline(posthoc, color="tab:red", linestyle=":", label=f"post-hoc epoch ({last})")
            if naive_epochs and posthoc > np.median(naive_epochs):
                ax.axvspan(
                    float(np.median(naive_epochs)),
                    posthoc,
                    color="tab:red",
                    alpha=0.08,
                    label="reversal: base worsens, post-hoc improves",
                )
        ax.set_title(f"{split} {metric}")
        ax.set_xlabel("epoch")
    axes[0].legend(fontsize=7)
    figure.suptitle(json.dumps(curves.config, sort_keys=True), fontsize=9)
    return figure


def _leaderboard_figure(board: Any, key: str) -> Figure:
    figure = Figure(figsize=(8, 0.4 * len(board) + 2.0), layout="constrained")
    ax = figure.subplots()
    # Label configurations by the values that differ between them.
    varying = [c for c in board.columns if c.startswith("config/") and board[c].nunique() > 1]
    labels = [
        ", ".join(f"{c.removeprefix('config/')}={row[c]}" for c in varying) or row["group"]
        for _, row in board.iterrows()
    ]
    y = np.arange(len(board))[::-1]
    ax.barh(y, board[key], color="tab:red", alpha=0.6, label=f"post-hoc: best {key}")
    ax.scatter(
        board["naive_value"], y, color="black", zorder=3, label="naive: members' best base value"
    )
    ax.set_yticks(y, labels, fontsize=7)
    values = np.concatenate([board[key].to_numpy(float), board["naive_value"].to_numpy(float)])
    values = values[np.isfinite(values)]
    if values.size:  # zoom on the values: differences are small next to the loss itself
        lo, hi = values.min(), values.max()
        pad = 0.15 * (hi - lo) if hi > lo else 0.05 * abs(hi) or 0.05
        ax.set_xlim(lo - pad, hi + pad)
    ax.set_xlabel(key)
    ax.xaxis.set_major_locator(MaxNLocator(5))
    figure.legend(fontsize=7, loc="outside lower center", ncols=2)
    return figure


def _save(figure: Figure, stem: Path, formats: Sequence[str]) -> list[Path]:
    paths = [stem.with_suffix(f".{fmt}") for fmt in formats]
    with matplotlib.rc_context({"svg.fonttype": "none"}):  # SVG text stays text
        for path in paths:
            figure.savefig(path, dpi=120)
    return paths
