"""Selection from the prediction store alone: the configuration leaderboard.

Post-hoc selection ranks configurations by the transformed model's val metric at its best
epoch (one common epoch for the members of an ensemble); naive selection by the base model's
val metric, each member at its own best epoch. Both are computed from the stored logits, so
a leaderboard needs no Ray and no result logs.
"""

from __future__ import annotations

import math
import os
from collections.abc import Mapping
from typing import Any

import numpy as np
import pandas as pd

from posthoc_tune.ensemble import EnsembleEvaluator
from posthoc_tune.groups import flatten_config
from posthoc_tune.keys import parse_metric_key
from posthoc_tune.metrics import evaluate
from posthoc_tune.store import PredictionStore
from posthoc_tune.transforms import Combiner, apply_transform


def leaderboard(
    results_or_experiment_path: Any,
    metric: str = "val/swa+ens+ts/nll",
    mode: str = "min",
    *,
    ensemble: Combiner = "logits",
) -> pd.DataFrame:
    """One row per configuration, ranked by its post-hoc objective, naive rank beside it.

    Args:
        results_or_experiment_path: a ``tune.ResultGrid`` or an experiment path/URI.
        metric: the post-hoc key to rank by; group keys (``ens``) score the ensemble of the
            configuration's members, per-trial keys the mean over members.
        mode: ``"min"`` or ``"max"``.
        ensemble: ensemble combiner for group keys.

    Columns: ``rank``, ``group``, ``config/<name>`` (the configuration without its seed),
    ``n_members``, ``epoch`` (the best common epoch), ``metric`` (its value there),
    ``naive_value`` (the members' mean of their best base value of the same split and metric,
    each at its own epoch), ``naive_epochs`` and ``naive_rank``.
    """
    split, transform, name = parse_metric_key(metric)
    if mode not in ("min", "max"):
        raise ValueError(f"mode must be 'min' or 'max', got {mode!r}")
    store = _open(results_or_experiment_path)
    groups: dict[str, list[str]] = {}
    configs: dict[str, dict[str, Any]] = {}
    for trial_id in store.trials():
        meta = store.metadata(trial_id)
        groups.setdefault(meta["group"], []).append(trial_id)
        config = {k: v for k, v in meta["config"].items() if k != meta["seed_key"]}
        configs[meta["group"]] = config
    if not groups:
        raise ValueError(f"the store at {store.root!r} holds no trials")
    evaluator = EnsembleEvaluator(store, ensemble=ensemble, splits=[split], persist=False)
    evaluator.load()
    better = min if mode == "min" else max
    rows = []
    for group, members in groups.items():
        epochs = sorted(set.intersection(*(set(store.epochs(m)) for m in members)))
        scores = {}
        base: dict[str, dict[int, float]] = {m: {} for m in members}
        for epoch in epochs:
            per_member = []
            for m in members:
                parts = store.read_epoch(m, epoch)
                y = store.labels(split)
                if (split, "base") in parts:
                    base[m][epoch] = evaluate(parts[(split, "base")], y)[name]
                if not transform.ens:
                    per_member.append(_member_value(store, parts, transform.name, split, name))
            if transform.ens:
                value = evaluator.evaluate(group, epoch, members, transform.name)
                scores[epoch] = value.values.get(metric, math.nan)
            else:
                scores[epoch] = float(np.mean(per_member))
        finite = {e: v for e, v in scores.items() if math.isfinite(v)}
        best_epoch = better(finite, key=finite.__getitem__) if finite else None
        naive = [_best(base[m], better) for m in members]
        rows.append(
            {
                "group": group,
                **flatten_config(configs[group], "config/"),
                "n_members": len(members),
                "epoch": best_epoch,
                metric: finite[best_epoch] if best_epoch is not None else math.nan,
                "naive_value": float(np.mean([v for _, v in naive])),
                "naive_epochs": [e for e, _ in naive],
            }
        )
    frame = pd.DataFrame(rows)
    ascending = mode == "min"
    frame["naive_rank"] = frame["naive_value"].rank(ascending=ascending, method="min")
    frame = frame.sort_values(metric, ascending=ascending, na_position="last", ignore_index=True)
    frame.insert(0, "rank", np.arange(1, len(frame) + 1))
    frame["naive_rank"] = frame["naive_rank"].astype("Int64")
    return frame


def _open(results_or_path: Any) -> PredictionStore:
    if isinstance(results_or_path, PredictionStore):
        return results_or_path
    if isinstance(results_or_path, (str, os.PathLike)):
        return PredictionStore.open(results_or_path)
    path = getattr(results_or_path, "experiment_path", None)
    if path is None:
        kind = type(results_or_path).__name__
        raise TypeError(f"expected a tune.ResultGrid or an experiment path, got {kind}")
    return PredictionStore.open(path, filesystem=getattr(results_or_path, "filesystem", None))


def _member_value(
    store: PredictionStore,
    parts: Mapping[tuple[str, str], np.ndarray],
    transform: str,
    split: str,
    metric: str,
) -> float:
    """A single model's transformed metric (TS fit on its val logits, applied to ``split``)."""
    variant = "swa" if transform.startswith("swa") else "base"
    if (split, variant) not in parts:
        return math.nan
    test = [parts[(split, variant)]] if split != "val" else None
    val_z, test_z = apply_transform(transform, [parts[("val", variant)]], store.labels("val"), test)
    z = val_z if split == "val" else test_z
    assert z is not None
    return evaluate(z, store.labels(split))[metric]


def _best(values: Mapping[int, float], better: Any) -> tuple[int | None, float]:
    finite = {e: v for e, v in values.items() if math.isfinite(v)}
    if not finite:
        return None, math.nan
    epoch = better(finite, key=finite.__getitem__)
    return epoch, finite[epoch]
