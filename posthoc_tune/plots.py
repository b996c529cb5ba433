"""Plots that show post-hoc reversal, from the prediction store alone.

Per configuration: the val and test curves over epochs of the base model and each transform
(single-model transforms averaged over the members' common epochs), each member's own base
curve with a marker at its naive epoch (members choose their own, and a pruned member's
curve stops where its data does), the post-hoc epoch (the last transform's val best), and the
span between the mean base curve's best and the post-hoc epoch shaded when the transformed
model keeps improving there: the epochs that naive selection throws away. Plus a leaderboard
chart of dots, not bars: a bar's length would be read from an axis that does not start at
zero. Configurations carry the labels of the tables (:mod:`posthoc_tune.display`).
Matplotlib's object API is used directly (no pyplot, no display needed).
"""

from __future__ import annotations

import math
import os
import textwrap
from collections.abc import Iterator, Mapping, Sequence
from pathlib import Path
from typing import Any

import matplotlib
import numpy as np
import pandas as pd
from matplotlib.axes import Axes
from matplotlib.figure import Figure
from matplotlib.ticker import MaxNLocator

from posthoc_tune.curves import (
    Curves,
    best_epoch,
    configurations,
    members_best,
    objective_curve,
    scan,
)
from posthoc_tune.display import config_legend, config_titles
from posthoc_tune.keys import PLOT_TRANSFORMS, check_name, metric_key, parse_transform
from posthoc_tune.selection import leaderboard, open_store
from posthoc_tune.transforms import Combiner


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
    for fmt in formats:
        check_name("format", fmt, ("png", "svg", "pdf"))
    figures = experiment_figures(
        results_or_experiment_path, transforms=transforms, metric=metric, ensemble=ensemble
    )
    out = Path(out_dir)
    written: list[Path] = []
    for stem, figure in figures:  # one at a time: memory stays flat in the configurations
        out.mkdir(parents=True, exist_ok=True)  # once there is a figure: not for a bad path
        written += _save(figure, out / stem, formats)
    return written


def experiment_figures(
    results_or_experiment_path: Any,
    *,
    transforms: Sequence[str] = PLOT_TRANSFORMS,
    metric: str = "nll",
    ensemble: Combiner = "logits",
) -> Iterator[tuple[str, Figure]]:
    """The figures :func:`plot_experiment` writes, as ``(file stem, Figure)``: the curves of
    each configuration (``curves_c1_<group>``, ...), then ``leaderboard``. A generator, so
    that one configuration is scanned and drawn at a time.

    The leaderboard chart's naive value is each member's best base val metric over all its
    epochs (as in the selection table), with the members' mean as the dot and their range.
    """
    check_name("metric", metric, ("nll", "error"))
    names = [parse_transform(t).name for t in transforms]
    if not names:
        raise ValueError("transforms must name at least one transform")
    store = open_store(results_or_experiment_path)
    groups = configurations(store)  # fails on a path that is not an experiment
    labels, titles = config_legend(groups)["config"], config_titles(groups)
    needed = list(dict.fromkeys(["base", *names]))
    naive = {}
    for group, (members, config) in groups.items():
        curves = scan(store, group, members, config, needed, ensemble)
        best = members_best(curves.single["base"], metric_key("val", "base", metric))
        naive[group] = [value for _, value in best]
        yield (
            f"curves_{labels[group]}_{group}",
            _curves_figure(curves, names, metric, titles[group]),
        )
    key = metric_key("val", names[-1], metric)
    board = leaderboard(store, metric=key, ensemble=ensemble)
    yield "leaderboard", _leaderboard_figure(board, key, titles, naive)


def _curves_figure(curves: Curves, transforms: list[str], metric: str, title: str) -> Figure:
    figure = Figure(figsize=(12, 4.2), layout="constrained")
    axes = figure.subplots(1, 2)
    best = members_best(curves.single["base"], metric_key("val", "base", metric))
    naive = {m: epoch for m, (epoch, _) in zip(curves.single["base"], best, strict=True)}
    last = transforms[-1]
    base_best = best_epoch(objective_curve(curves, "base", metric_key("val", "base", metric)))[0]
    posthoc = best_epoch(objective_curve(curves, last, metric_key("val", last, metric)))[0]
    for ax, split in zip(axes, ("val", "test"), strict=True):
        key = metric_key(split, "base", metric)
        for i, member in enumerate(curves.members):
            scores = curves.single["base"][member]
            epochs = sorted(scores)
            ax.plot(
                epochs,
                [scores[e].get(key, math.nan) for e in epochs],
                color="grey",
                linewidth=0.8,
                alpha=0.6,
                label="base (each member)" if i == 0 else "_member",
            )
            epoch = naive[member]
            if epoch is not None:
                ax.plot(
                    [epoch],
                    [scores[epoch].get(key, math.nan)],
                    marker="v",
                    linestyle="none",
                    color="black",
                    zorder=3,
                    gid=f"naive:{member}",
                    label="naive epoch: member's base val best" if i == 0 else "_naive",
                )
        empty = []
        for transform in ["base", *transforms]:
            curve = objective_curve(curves, transform, metric_key(split, transform, metric))
            style = {"color": "black", "linewidth": 2} if transform == "base" else {}
            label = "base (members' mean)" if transform == "base" else transform
            ax.plot(
                list(curve), list(curve.values()), marker="o", markersize=3, label=label, **style
            )
            if not np.isfinite(list(curve.values())).any():
                empty.append(label)
        ax.xaxis.set_major_locator(MaxNLocator(integer=True, min_n_ticks=1))  # epochs
        _title(ax, f"{split} {metric}", empty)  # before the epoch lines, which are finite
        if posthoc is not None:
            ax.axvline(posthoc, color="tab:red", linestyle=":", label=f"post-hoc epoch ({last})")
            if base_best is not None and posthoc > base_best:
                ax.axvspan(
                    base_best,
                    posthoc,
                    color="tab:red",
                    alpha=0.08,
                    label=f"reversal: mean base past its best, {last} improving",
                )
        ax.set_xlabel("epoch")
    figure.legend(*axes[0].get_legend_handles_labels(), loc="outside right upper", fontsize=8)
    figure.suptitle(title, fontsize=10)
    return figure


def _title(ax: Axes, title: str, empty: list[str]) -> None:
    """Title the axes, saying which curves have no finite value: an empty curve would
    otherwise vanish silently, and axes with nothing finite look broken."""
    if not any(np.isfinite(line.get_ydata()).any() for line in ax.get_lines()):
        ax.text(0.5, 0.5, f"no finite {title}", transform=ax.transAxes, ha="center")
        ax.set_xticks([])
        ax.set_yticks([])
    elif empty:
        title += "\n" + textwrap.fill(f"no finite values: {', '.join(empty)}", 60)
    ax.set_title(title, fontsize=9)


def _leaderboard_figure(
    board: pd.DataFrame, key: str, titles: Mapping[str, str], naive: Mapping[str, list[float]]
) -> Figure:
    figure = Figure(figsize=(8, 0.45 * len(board) + 1.8), layout="constrained")
    ax = figure.subplots()
    y = np.arange(len(board))[::-1]  # rank 1 on top
    values = [np.asarray(naive[g], float) for g in board["group"]]
    mean, lo, hi = (np.array([f(v) for v in values]) for f in (np.mean, np.min, np.max))
    ax.errorbar(
        mean,
        y,
        xerr=[mean - lo, hi - mean],
        fmt="o",
        color="black",
        capsize=3,
        label="naive: members' best base value (mean, min to max)",
    )
    ax.plot(board[key], y, "D", color="tab:red", label="post-hoc: value at the best common epoch")
    ticks = [
        titles[g] + ("" if math.isfinite(v) else " (no finite value)")
        for g, v in zip(board["group"], board[key], strict=True)
    ]
    ax.set_yticks(y, ticks, fontsize=8)
    ax.set_title(f"Configurations ranked by post-hoc {key}", fontsize=10)
    ax.set_xlabel(key)
    ax.grid(axis="x", alpha=0.3)
    figure.legend(fontsize=8, loc="outside lower center", ncols=2)
    return figure


def _save(figure: Figure, stem: Path, formats: Sequence[str]) -> list[Path]:
    paths = [stem.with_suffix(f".{fmt}") for fmt in formats]
    with matplotlib.rc_context({"svg.fonttype": "none"}):  # SVG text stays text
        for path in paths:
            figure.savefig(path, dpi=120)
    return paths
