"""Selection from the prediction store alone: the leaderboard and the naive vs post-hoc table.

Post-hoc selection ranks configurations by the transformed model's val metric at its best
epoch (one common epoch for the members of an ensemble); naive selection by the base model's
val metric, each member at its own best epoch. Both are computed from the stored logits
through :mod:`posthoc_tune.curves`, so they need no Ray and no result logs.
"""

from __future__ import annotations

import json
import math
import os
import sys
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

import numpy as np
import pandas as pd

from posthoc_tune.curves import (
    DEFAULT_METRICS,
    Curves,
    argbest,
    best_epoch,
    configurations,
    members_best,
    naive_ensembles,
    objective_curve,
    open_store,
    scan,
    trial_config,
)
from posthoc_tune.display import render
from posthoc_tune.greedy import OBJECTIVES, greedy_ensemble
from posthoc_tune.groups import flatten_config
from posthoc_tune.keys import (
    FORMATS,
    METRICS,
    TABLE_TRANSFORMS,
    TOKEN_METRICS,
    TOKEN_TRANSFORMS,
    Objective,
    check_name,
    metric_key,
    parse_transform,
)
from posthoc_tune.store import PredictionStore
from posthoc_tune.transforms import Combiner


def leaderboard(
    results_or_experiment_path: Any,
    metric: str = "val/swa+ens+ts/nll",
    mode: str = "min",
    *,
    ensemble: Combiner = "logits",
    greedy: bool = False,
) -> pd.DataFrame:
    """One row per configuration, ranked by its post-hoc objective, naive rank beside it.

    Args:
        results_or_experiment_path: a ``tune.ResultGrid`` or an experiment path/URI.
        metric: the post-hoc key to rank by; group keys (``ens``) score the ensemble of the
            configuration's members, per-trial keys the mean over members.
        mode: ``"min"`` or ``"max"``.
        ensemble: ensemble combiner for group keys.
        greedy: add a row ``group="greedy"``: the greedy ensemble over every stored model
            (:func:`posthoc_tune.greedy_ensemble`, by the key's metric, nll or error), its
            value on the key's split and metric, ``naive_value`` the naive flavour's. It
            chose its members on val, so on a val key it is optimistic: compare on test.

    Columns: ``rank``, ``group``, ``config/<name>`` (the configuration without its seed),
    ``n_members``, ``epoch`` (the best epoch every member reached), ``metric`` (its value
    there), ``naive_value`` (the members' mean of their best base value of the same split and
    metric, each member at its own best epoch among all it ran, as naive selection keeps it),
    ``naive_epochs`` and ``naive_rank``.
    """
    objective = Objective.parse(metric, mode)
    transform = objective.transform.name
    store = open_store(results_or_experiment_path)
    naive_key = metric_key(objective.split, "base", objective.metric)
    rows = []
    for group, (members, config) in configurations(store).items():
        curves = scan(
            store, group, members, config, ["base", transform], ensemble, [objective.metric]
        )
        best_at, best = best_epoch(objective_curve(curves, transform, metric), mode)
        naive = members_best(curves.single["base"], naive_key, mode)
        rows.append(
            {
                "group": group,
                **flatten_config(config, "config/"),
                "n_members": len(members),
                "epoch": best_at,
                metric: best,
                "naive_value": float(np.mean([v for _, v in naive])),
                "naive_epochs": [e for e, _ in naive],
            }
        )
    if greedy:
        rows.append(_greedy_board_row(store, objective))
    frame = pd.DataFrame(rows)
    ascending = mode == "min"
    frame["naive_rank"] = frame["naive_value"].rank(ascending=ascending, method="min")
    frame = frame.sort_values(metric, ascending=ascending, na_position="last", ignore_index=True)
    frame.insert(0, "rank", np.arange(1, len(frame) + 1))
    frame["naive_rank"] = frame["naive_rank"].astype("Int64")
    return frame


# -- naive vs post-hoc selection table ----------------------------------------------------------


def selection_table(
    results_or_experiment_path: Any,
    transforms: Sequence[str] | None = None,
    over: str = "epochs",
    select_by: str = "same",
    ensemble: Combiner = "logits",
    progress: bool | None = None,
    metrics: Sequence[str] = DEFAULT_METRICS,
    greedy: bool = False,
) -> pd.DataFrame:
    """Naive vs post-hoc selection for each transform, from the prediction store alone.

    Post-hoc selection picks, per transform, the epoch (and with ``over="configs+epochs"`` the
    configuration) minimising the *transformed* model's val metric: each member on its own
    for single-model transforms, one common epoch for ensembles. Naive selection picks each
    member's epoch by its *base* val metric and evaluates the transform there; its ensembles
    combine the members at their own epochs and fit a fresh ensemble temperature.

    Args:
        results_or_experiment_path: a ``tune.ResultGrid`` or an experiment path/URI.
        transforms: rows, any of ``posthoc_tune.TRANSFORMS`` (default: the paper's
            ``TABLE_TRANSFORMS``, or ``TOKEN_TRANSFORMS`` for token metrics); ``base`` is
            always computed (the gains are measured from it).
        over: ``"epochs"`` (each configuration on its own; with several configurations the
            index is (config, transform)) or ``"configs+epochs"`` (the configuration is chosen
            too: naive by the base val metric, post-hoc by the transformed one).
        select_by: ``"same"``: each column selected by its own val metric (loss by val nll,
            error by val error: the paper); ``"nll"``: all by val nll (``token_nll`` for token
            metrics).
        ensemble: ensemble combiner.
        progress: show a progress bar on standard error (default: when it is a terminal).
        metrics: the reported metrics, class metrics (default ``("nll", "error")``) or token
            metrics of a language model's stored token records (e.g.
            ``("token_nll", "perplexity", "token_error")``, single-model transforms only);
            the first is the loss whose selection the epoch, config and ratio columns
            describe.
        greedy: add a ``greedy`` row (``over="configs+epochs"``, class metrics): greedy
            ensemble selection over every stored model (:func:`posthoc_tune.greedy_ensemble`,
            default arguments, by val nll), naive (each trial at its base-best epoch) and post
            hoc (any epoch); its epoch columns list the members' epochs, one per vote.

    The scan streams: it holds one epoch of one configuration's members at a time, plus a
    few scalars per member and epoch, so memory does not grow with the number of trials.

    Returns a DataFrame with, for each metric ``m`` (``nll`` and ``error``): ``naive/test/<m>``,
    ``posthoc/test/<m>`` (single-model transforms: mean over members, ``..._std`` their
    standard deviation), ``naive/gain/<m>`` and ``posthoc/gain/<m>`` (base's test value
    minus the row's: positive is better), ``ratio/<m>`` (post-hoc gain / naive gain), and
    ``naive/epoch``, ``posthoc/epoch`` (lists: one epoch per member, or the ensemble's one),
    ``naive/config``, ``posthoc/config`` (JSON; epoch and configuration columns describe the
    loss columns' selection). ``ratio`` is ``ratio/nll``; it is negative when naive selection
    made the transform worse than the base model.
    """
    metrics = table_metrics(metrics)
    tokens = metrics[0] in TOKEN_METRICS
    if greedy and (over != "configs+epochs" or tokens):
        raise ValueError(
            "greedy=True adds a row that picks models across configurations: it needs "
            "over='configs+epochs' and class metrics"
        )
    if transforms is None:
        transforms = TOKEN_TRANSFORMS if tokens else TABLE_TRANSFORMS
    names = [parse_transform(t).name for t in transforms]
    combined = [t for t in names if tokens and parse_transform(t).combines]
    if combined:
        raise ValueError(
            f"transforms {combined} combine models, which token records cannot score: a "
            f"token-level table takes {list(TOKEN_TRANSFORMS)} (evaluate token-level "
            f"ensembles with posthoc_tune.tokens.evaluate_ensemble)"
        )
    if over not in ("epochs", "configs+epochs"):
        raise ValueError(f"over must be 'epochs' or 'configs+epochs', got {over!r}")
    if select_by not in ("same", "nll"):
        raise ValueError(f"select_by must be 'same' or 'nll', got {select_by!r}")
    store = open_store(results_or_experiment_path)
    needed = list(dict.fromkeys(["base", *names]))
    groups = configurations(store)
    bar = _Progress(sum(len(m) for m, _ in groups.values()), progress)
    curves = []  # per configuration only its picks: memory stays flat in the trial count
    for group, (members, config) in groups.items():
        scanned = scan(store, group, members, config, needed, ensemble, metrics)
        naive_ensembles(store, scanned, select_by, ensemble)
        curves.append(summarise(scanned, needed, select_by, metrics))
        bar.advance(len(members))
    bar.close()
    if over == "configs+epochs" or len(curves) == 1:
        rows = {t: table_row(curves, t, metrics) for t in needed}
        frame = pd.DataFrame.from_dict(rows, orient="index")
    else:
        blocks = {
            (json.dumps(c.config, sort_keys=True), t): table_row([c], t, metrics)
            for c in curves
            for t in needed
        }
        frame = pd.DataFrame.from_dict(blocks, orient="index")
        frame.index.names = ["config", "transform"]
    if greedy:
        frame.loc["greedy"] = pd.Series(_greedy_row(store, metrics))
    frame = _with_gains(frame, metrics)
    keep = frame.index.get_level_values(-1).isin([*names, "greedy"])
    frame = frame[keep]
    if frame.index.nlevels == 1:
        frame.index.name = "transform"
    return frame


class _Progress:
    """A one-line progress bar on standard error: trials scanned of the total."""

    def __init__(self, total: int, show: bool | None) -> None:
        self.total, self.done = total, 0
        self.show = sys.stderr.isatty() if show is None else show

    def advance(self, n: int) -> None:
        self.done += n
        if self.show:
            filled = round(30 * self.done / max(self.total, 1))
            bar = "#" * filled + "." * (30 - filled)
            print(f"\rscanning [{bar}] {self.done}/{self.total} trials", end="", file=sys.stderr)

    def close(self) -> None:
        if self.show:
            print(file=sys.stderr)


def _selected(curves: Curves, transform: str, metric: str, obj: str, naive: bool) -> _Pick:
    """One configuration's selected test ``metric`` for a transform, chosen by val ``obj``."""
    base = curves.single["base"]
    base_key, obj_key = metric_key("val", "base", obj), metric_key("val", transform, obj)
    test_key = metric_key("test", transform, metric)
    # Naive selection ranks configurations by the base val metric (members at their best).
    naive_rank = float(np.mean([v for _, v in members_best(base, base_key)]))
    if parse_transform(transform).ens:
        if naive:
            epochs = [argbest(base[m], base_key) for m in curves.members]
            scores = curves.naive_ens.get((transform, obj), {})
            return _Pick([scores.get(test_key, math.nan)], epochs, naive_rank)
        epoch = argbest(curves.ens[transform], obj_key)
        if epoch is None:
            return _Pick([math.nan], [], math.nan)
        scores = curves.ens[transform][epoch]
        return _Pick([scores.get(test_key, math.nan)], [epoch], scores[obj_key])
    values, epochs, vals = [], [], []
    for m in curves.members:
        curve = curves.single[transform][m]
        epoch = argbest(base[m], base_key) if naive else argbest(curve, obj_key)
        epochs.append(epoch)
        scores = curve.get(epoch, {}) if epoch is not None else {}
        values.append(scores.get(test_key, math.nan))
        vals.append(scores.get(obj_key, math.nan))
    return _Pick(values, epochs, naive_rank if naive else float(np.mean(vals)))


@dataclass
class _Pick:
    test: list[float]  # one per member (single-model transforms) or the ensemble's one
    epochs: list[int | None]
    val: float  # what configurations are ranked by


@dataclass
class Summary:
    """What the table needs of one configuration: its picks per (transform, metric, naive)."""

    config: dict[str, Any]
    picks: dict[tuple[str, str, bool], _Pick]


def _greedy_board_row(store: PredictionStore, objective: Objective) -> dict[str, Any]:
    if objective.metric not in OBJECTIVES or objective.mode != "min":
        raise ValueError(
            f"greedy=True selects by val {list(OBJECTIVES)} (minimised); the leaderboard "
            f"ranks by {objective.key!r} ({objective.mode})"
        )
    posthoc = greedy_ensemble(store, objective=objective.metric)
    naive = greedy_ensemble(store, flavour="naive", objective=objective.metric)
    return {
        "group": "greedy",
        "n_members": len(posthoc.members),
        "epoch": None,
        objective.key: posthoc.value(objective.split, objective.metric),
        "naive_value": naive.value(objective.split, objective.metric),
        "naive_epochs": sorted(int(e) for e in naive.members["epoch"]),
    }


def _greedy_row(store: PredictionStore, metrics: Sequence[str]) -> dict[str, Any]:
    """The selection table's ``greedy`` row: both flavours' test metrics, the members'
    epochs and their configurations (a JSON list)."""
    row: dict[str, Any] = {}
    for kind in ("naive", "posthoc"):
        ensemble = greedy_ensemble(store, flavour=kind)
        for metric in metrics:
            row[f"{kind}/test/{metric}"] = ensemble.value("test", metric)
            row[f"{kind}/test/{metric}_std"] = math.nan
        members = ensemble.members
        row[f"{kind}/epoch"] = sorted(int(e) for e in members["epoch"])
        configs = {
            json.dumps(trial_config(store.metadata(t)), sort_keys=True) for t in members["trial_id"]
        }
        row[f"{kind}/config"] = json.dumps(sorted(configs))
    return row


def table_metrics(metrics: Sequence[str]) -> tuple[str, ...]:
    """Validated table metrics: one family (class or token), no repeats."""
    if isinstance(metrics, str) or not metrics:
        raise ValueError(f"metrics must be a non-empty list of metric names, got {metrics!r}")
    names = tuple(dict.fromkeys(check_name("metric", m, METRICS + TOKEN_METRICS) for m in metrics))
    family = TOKEN_METRICS if names[0] in TOKEN_METRICS else METRICS
    if any(m not in family for m in names):
        raise ValueError(
            f"metrics {list(names)} mix class and token metrics: a table reports one kind, "
            f"{list(METRICS)} or {list(TOKEN_METRICS)}"
        )
    return names


def summarise(
    curves: Curves,
    transforms: list[str],
    select_by: str,
    metrics: Sequence[str] = DEFAULT_METRICS,
) -> Summary:
    """A configuration's naive and post-hoc picks for every transform and reported metric."""
    picks = {}
    loss = "token_nll" if metrics[0] in TOKEN_METRICS else "nll"
    for transform in transforms:
        for metric in metrics:
            obj = metric if select_by == "same" else loss
            for naive in (True, False):
                picks[(transform, metric, naive)] = _selected(curves, transform, metric, obj, naive)
    return Summary(curves.config, picks)


def table_row(
    curves: list[Summary], transform: str, metrics: Sequence[str] = DEFAULT_METRICS
) -> dict[str, Any]:
    """A table row: for each reported metric, the naive and post-hoc picks, choosing the
    configuration (when there are several) by the naive or post-hoc val objective."""
    row: dict[str, Any] = {}
    for metric in metrics:
        for kind, naive in (("naive", True), ("posthoc", False)):
            picks = [(c, c.picks[(transform, metric, naive)]) for c in curves]
            finite = [(c, p) for c, p in picks if math.isfinite(p.val)]
            chosen, pick = min(finite, key=lambda cp: cp[1].val) if finite else picks[0]
            row[f"{kind}/test/{metric}"] = float(np.mean(pick.test))
            row[f"{kind}/test/{metric}_std"] = (
                float(np.std(pick.test)) if len(pick.test) > 1 else math.nan
            )
            if metric == metrics[0]:
                row[f"{kind}/epoch"] = pick.epochs
                row[f"{kind}/config"] = json.dumps(chosen.config, sort_keys=True)
    return row


def _with_gains(frame: pd.DataFrame, metrics: Sequence[str]) -> pd.DataFrame:
    """Gains over the untransformed base (of the same configuration block) and their ratio."""
    frame = frame.copy()
    for metric in metrics:
        if frame.index.nlevels == 1:
            base = frame.loc["base", f"naive/test/{metric}"]
        else:
            base = (
                frame.xs("base", level="transform")[f"naive/test/{metric}"]
                .reindex(frame.index.get_level_values("config"))
                .to_numpy()
            )
        for kind in ("naive", "posthoc"):
            frame[f"{kind}/gain/{metric}"] = base - frame[f"{kind}/test/{metric}"]
        with np.errstate(divide="ignore", invalid="ignore"):
            frame[f"ratio/{metric}"] = (
                frame[f"posthoc/gain/{metric}"] / frame[f"naive/gain/{metric}"]
            )
    frame["ratio"] = frame[f"ratio/{metrics[0]}"]
    return frame


def write_frame(
    frame: pd.DataFrame,
    fmt: str,
    out: str | os.PathLike[str] | None = None,
    *,
    readable: Sequence[pd.DataFrame] | None = None,
) -> None:
    """Write a table to ``out`` or standard output: md and LaTeX for reading, csv and Parquet
    (``out`` required) with every column.

    md and LaTeX print ``readable`` (a view such as :func:`posthoc_tune.display.selection_view`)
    when given, else ``frame``, with numbers formatted by :func:`posthoc_tune.display.render`.
    """
    check_name("format", fmt, FORMATS)
    if fmt == "parquet":
        if out is None:
            raise ValueError("--format parquet needs --out FILE (Parquet is binary)")
        frame.to_parquet(out)
        return
    text = frame.to_csv() if fmt == "csv" else render(readable or [frame], fmt)
    if out is None:
        print(text)
    else:
        with open(out, "w") as f:
            f.write(text if text.endswith("\n") else text + "\n")
