"""Scored learning curves of a stored experiment: the scoring path that tables, leaderboards,
plots, replay and retention share.

:func:`scan` reads one configuration's stored logits an epoch at a time and scores each
transform on val and test through :func:`posthoc_tune.scoring.score`: trial transforms per
member and epoch (a checkpoint ensemble over the member's last epochs), seed ensembles at each
epoch every member reached. When :func:`posthoc_tune.retention.compact` deletes logits it
first stores the configuration's scored curves (:func:`scores_table`), and a scan takes the
deleted epochs' scores from there, so every table and figure stays the same.
"""

from __future__ import annotations

import json
import math
import os
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any

import numpy as np
import pyarrow as pa

from posthoc_tune import tokens as tok
from posthoc_tune.groups import without_path
from posthoc_tune.keys import (
    METRICS,
    SPLITS,
    TOKEN_METRICS,
    VARIANTS,
    Transform,
    metric_key,
    parse_transform,
)
from posthoc_tune.scoring import score, store_labels, window
from posthoc_tune.store import PredictionStore, VariantParts
from posthoc_tune.transforms import Combiner

Scores = dict[str, float]  # metric key -> value: "val/swa+ts/nll", "test/base/error", ...
DEFAULT_METRICS: tuple[str, ...] = ("nll", "error")  # what the selection table reports
TOKEN_TABLE_METRICS: tuple[str, ...] = ("token_nll", "perplexity", "token_error")
"""What a token-level selection table reports (``selection_table(metrics=...)``)."""

_COMBINER = b"posthoc_tune.combiner"
_MEMBERS = b"posthoc_tune.members"


@dataclass
class Curves:
    """One configuration's scores: per member and epoch for single-model transforms, per
    common epoch for ensemble transforms, and (filled by :func:`naive_ensembles`) the
    ensembles naive selection builds."""

    group: str
    config: dict[str, Any]
    members: list[str]
    single: dict[str, dict[str, dict[int, Scores]]] = field(default_factory=dict)
    ens: dict[str, dict[int, Scores]] = field(default_factory=dict)
    naive_ens: dict[tuple[str, str], Scores] = field(default_factory=dict)  # (transform, obj)


def open_store(results_or_path: Any) -> PredictionStore:
    """The prediction store of a ``tune.ResultGrid``, an experiment path/URI or a store; a
    path that does not exist is an error (readers never create a store)."""
    if isinstance(results_or_path, PredictionStore):
        return results_or_path
    if isinstance(results_or_path, (str, os.PathLike)):
        return PredictionStore.open(results_or_path, must_exist=True)
    path = getattr(results_or_path, "experiment_path", None)
    if path is None:
        kind = type(results_or_path).__name__
        raise TypeError(f"expected a tune.ResultGrid or an experiment path, got {kind}")
    filesystem = getattr(results_or_path, "filesystem", None)
    return PredictionStore.open(path, filesystem=filesystem, must_exist=True)


def configurations(store: PredictionStore) -> dict[str, tuple[list[str], dict[str, Any]]]:
    """The store's configurations: group key -> (member trial ids, config without the seed)."""
    groups: dict[str, tuple[list[str], dict[str, Any]]] = {}
    for trial_id in store.trials():
        meta = store.metadata(trial_id)
        groups.setdefault(meta["group"], ([], trial_config(meta)))[0].append(trial_id)
    if not groups:
        raise ValueError(f"the store at {store.root!r} holds no trials")
    return groups


def trial_config(meta: Mapping[str, Any]) -> dict[str, Any]:
    """A trial's configuration without its seed (what its seed group shares), from its
    stored metadata."""
    config: dict[str, Any] = without_path(meta["config"], meta["seed_key"])
    return config


def scan(
    store: PredictionStore,
    group: str,
    members: list[str],
    config: dict[str, Any],
    transforms: Sequence[str | Transform],
    ensemble: Combiner,
    metrics: Sequence[str] = DEFAULT_METRICS,
) -> Curves:
    """Score ``transforms`` on every stored epoch of a configuration's ``members``, reading
    one epoch of its members at a time and keeping the last few a checkpoint window needs
    (memory stays flat in the number of epochs); epochs a compaction deleted come from the
    configuration's stored scores. Token metrics come from the stored token records (single
    models only)."""
    curves = Curves(group, config, members)
    parsed = [parse_transform(t) for t in transforms]
    for t in parsed:
        if t.ens:
            curves.ens[t.name] = {}
        else:
            curves.single[t.name] = {m: {} for m in members}
    class_metrics = [m for m in metrics if m not in TOKEN_METRICS]
    if class_metrics:
        _scan_logits(store, curves, parsed, ensemble, class_metrics)
        _fill_from_stored_scores(store, curves, ensemble, class_metrics)
    token_metrics = [m for m in metrics if m in TOKEN_METRICS]
    if token_metrics:
        _scan_tokens(store, curves, [t for t in parsed if not t.combines], token_metrics)
    return curves


def processed_epochs(store: PredictionStore, trial_id: str, *, tokens: bool = False) -> list[int]:
    """A trial's stored epochs (of token records with ``tokens``) that selection may pick:
    those up to the last result Tune processed, where PostHocCallback recorded it.

    A trial stopped while an epoch's result was on its way (a time budget or ``stop`` that
    ended the run, a scheduler stopping it from another trial's result) stored that epoch,
    but no ResultGrid shows it. The store keeps it; the tables, leaderboard, greedy
    ensembles and replays leave it out, so they agree with the ResultGrid.
    """
    epochs = store.token_epochs(trial_id) if tokens else store.epochs(trial_id)
    last = store.processed_epoch(trial_id)
    return epochs if last is None else [e for e in epochs if e <= last]


def _scan_logits(
    store: PredictionStore,
    curves: Curves,
    parsed: Sequence[Transform],
    ensemble: Combiner,
    metrics: Sequence[str],
) -> None:
    """Class metrics from the stored logits, an epoch of every member at a time."""
    members = curves.members
    depth = max((t.window for t in parsed if not t.ens), default=1)
    labels = store_labels(store)
    epochs = {m: set(processed_epochs(store, m)) for m in members}
    history: dict[str, dict[int, dict[str, VariantParts]]] = {m: {} for m in members}
    for epoch in sorted(set().union(*epochs.values())):
        read = {m: variants(store, m, epoch) for m in members if epoch in epochs[m]}
        for m, parts in read.items():
            history[m] = {e: h for e, h in history[m].items() if e > epoch - depth}
            history[m][epoch] = parts
        for t in parsed:
            if t.ens:
                have = [r[t.variant] for r in read.values() if t.variant in r]
                if len(have) == len(members):
                    curves.ens[t.name][epoch] = score(
                        t, have, labels, ensemble=ensemble, metrics=metrics
                    )
                continue
            for m in read:
                members_of = window(t, epoch, history[m])
                if members_of is not None and not t.combines:
                    # A single model's TS is refit on its stored logits (which may be
                    # float16); recorded temperatures serve the members of a combination.
                    members_of = [VariantParts(p.logits, None) for p in members_of]
                if members_of is not None:
                    curves.single[t.name][m][epoch] = score(
                        t, members_of, labels, ensemble=ensemble, metrics=metrics
                    )


def _scan_tokens(
    store: PredictionStore, curves: Curves, parsed: Sequence[Transform], metrics: Sequence[str]
) -> None:
    """Token metrics of single-model transforms from each member's stored token records, one
    epoch and variant at a time, at their recorded temperatures (a refit of the same float32
    records by the same code would give the same temperature)."""
    variants = dict.fromkeys(t.variant for t in parsed)
    for m in curves.members:
        for epoch in processed_epochs(store, m, tokens=True):
            for variant in variants:
                try:
                    parts = store.read_tokens(m, epoch, variant)
                except KeyError:  # no SWA records before SWA starts
                    continue
                for t in (t for t in parsed if t.variant == variant):
                    scores = tok.score(t, parts, metrics=metrics)
                    curves.single[t.name][m].setdefault(epoch, {}).update(scores)


def variants(store: PredictionStore, trial_id: str, epoch: int) -> dict[str, VariantParts]:
    """A trial's stored logits of one epoch, by variant (base, swa), with temperatures."""
    parts = store.read_epoch(trial_id, epoch)
    temperatures = store.temperatures(trial_id, epoch)
    out = {}
    for variant in VARIANTS:
        logits = {s: z for (s, v), z in parts.items() if v == variant}
        if "val" in logits:
            out[variant] = VariantParts(logits, temperatures.get(variant))
    return out


def naive_ensembles(
    store: PredictionStore, curves: Curves, select_by: str, ensemble: Combiner
) -> None:
    """(Re)build ``curves.naive_ens``: each ensemble transform of the members at their own
    base-best epochs within ``curves`` (which a replay may have cut short), for the
    objectives of ``select_by`` (``"same"``: nll and error; ``"nll"``: nll)."""
    curves.naive_ens.clear()
    if not curves.ens:
        return
    labels = store_labels(store)
    for t in curves.ens:
        variant = parse_transform(t).variant
        for obj in objectives(select_by):
            key = metric_key("val", "base", obj)
            chosen = {m: argbest(curves.single["base"][m], key) for m in curves.members}
            picked = {m: e for m, e in chosen.items() if e is not None}
            if len(picked) < len(curves.members):
                curves.naive_ens[(t, obj)] = {}
                continue
            parts = [variants(store, m, e)[variant] for m, e in picked.items()]
            curves.naive_ens[(t, obj)] = score(
                t, parts, labels, ensemble=ensemble, metrics=DEFAULT_METRICS
            )


def objectives(select_by: str) -> tuple[str, ...]:
    """The val metrics that select: nll and error (each its own), or nll for both."""
    return ("nll", "error") if select_by == "same" else ("nll",)


def best_epoch(curve: Mapping[int, float], mode: str = "min") -> tuple[int | None, float]:
    """The epoch with the best finite value (the earliest on ties) and the value, or
    ``(None, nan)``: how every selection over epochs picks one."""
    sign = 1.0 if mode == "min" else -1.0
    finite = {e: v for e, v in curve.items() if v is not None and math.isfinite(v)}
    if not finite:
        return None, math.nan
    epoch = min(finite, key=lambda e: (sign * finite[e], e))
    return epoch, finite[epoch]


def argbest(curve: Mapping[int, Scores], key: str) -> int | None:
    """The epoch with the lowest finite ``key`` (the earliest on ties), or None."""
    return best_epoch({e: s[key] for e, s in curve.items() if key in s})[0]


def members_best(
    per_member: Mapping[str, Mapping[int, Scores]], key: str, mode: str = "min"
) -> list[tuple[int | None, float]]:
    """Each member's best epoch by ``key`` and its value there: what naive selection keeps
    of each seed (and ranks a configuration by, their mean)."""
    return [
        best_epoch({e: s.get(key, math.nan) for e, s in curve.items()}, mode)
        for curve in per_member.values()
    ]


def members_mean(per_member: Mapping[str, Mapping[int, float]]) -> dict[int, float]:
    """The members' mean at each epoch every member has: what a per-trial key scores a
    configuration by (its seeds are judged together, as its ensemble would be)."""
    if not per_member:
        return {}
    common = set.intersection(*(set(c) for c in per_member.values()))
    return {e: float(np.mean([c[e] for c in per_member.values()])) for e in sorted(common)}


def objective_curve(curves: Curves, transform: str, key: str) -> dict[int, float]:
    """What selection ranks a configuration by, per epoch (``key`` a metric key of
    ``transform``): the ensemble's value for a group transform, the members' mean where every
    member has the epoch otherwise."""
    if parse_transform(transform).ens:
        return {e: s.get(key, math.nan) for e, s in sorted(curves.ens[transform].items())}
    return members_mean(
        {
            m: {e: s.get(key, math.nan) for e, s in c.items()}
            for m, c in curves.single[transform].items()
        }
    )


# -- stored scores of compacted configurations ---------------------------------------------------


def scores_table(curves: Curves, ensemble: Combiner) -> pa.Table:
    """A configuration's curves as a table (one row per member, or ensemble, transform and
    epoch; a column per split/metric), to store before logits are deleted."""
    columns = [f"{s}/{m}" for s in SPLITS for m in METRICS]  # the file's columns: split/metric
    rows: list[dict[str, Any]] = []

    def row(member: str | None, t: str, epoch: int, scores: Scores) -> dict[str, Any]:
        return {"member": member, "transform": t, "epoch": epoch, **_columns(scores, t)}

    for t, per_member in curves.single.items():
        for m, curve in per_member.items():
            rows += [row(m, t, e, s) for e, s in curve.items()]
    for t, curve in curves.ens.items():
        rows += [row(None, t, e, s) for e, s in curve.items()]
    schema = pa.schema(
        [("member", pa.string()), ("transform", pa.string()), ("epoch", pa.int32())]
        + [(c, pa.float64()) for c in columns],
        metadata={_COMBINER: ensemble, _MEMBERS: json.dumps(sorted(curves.members))},
    )
    return pa.Table.from_pylist(
        [{c: row.get(c, math.nan) for c in schema.names} for row in rows], schema=schema
    )


def _fill_from_stored_scores(
    store: PredictionStore, curves: Curves, ensemble: Combiner, metrics: Sequence[str]
) -> None:
    """Add the scores a compaction stored for epochs whose logits are gone. Ensemble rows
    count only for the combiner and the member set they were computed with."""
    table = store.scores(curves.group)
    if table is None:
        return
    metadata = table.schema.metadata or {}
    same_ensemble = metadata.get(_COMBINER, b"").decode() == ensemble and json.loads(
        metadata.get(_MEMBERS, b"[]")
    ) == sorted(curves.members)
    columns = [(s, m) for s in SPLITS for m in metrics if f"{s}/{m}" in table.column_names]
    for row in table.to_pylist():
        t, m, epoch = row["transform"], row["member"], row["epoch"]
        scores = {
            metric_key(s, t, k): row[f"{s}/{k}"]
            for s, k in columns
            if not (s == "test" and math.isnan(row[f"{s}/{k}"]))
        }
        if m is None:
            if same_ensemble and t in curves.ens:
                curves.ens[t].setdefault(epoch, scores)
        elif t in curves.single and m in curves.single[t]:
            curves.single[t][m].setdefault(epoch, scores)
    for per_member in curves.single.values():  # epochs in order, as a scan of logits has them
        for m, curve in per_member.items():
            per_member[m] = dict(sorted(curve.items()))
    for t, curve in curves.ens.items():
        curves.ens[t] = dict(sorted(curve.items()))


def _columns(scores: Scores, transform: str) -> dict[str, float]:
    """A transform's scores keyed by the stored table's ``split/metric`` columns."""
    return {
        f"{s}/{m}": scores[metric_key(s, transform, m)]
        for s in SPLITS
        for m in METRICS
        if metric_key(s, transform, m) in scores
    }
