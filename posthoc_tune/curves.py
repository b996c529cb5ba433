"""Scored learning curves of a stored experiment: the scoring path that tables, leaderboards,
plots, replay and retention share.

:func:`scan` reads one configuration's stored logits an epoch at a time and scores each
transform on val and test: single-model transforms per member and epoch, ensembles at each
epoch every member reached. When :func:`posthoc_tune.retention.compact` deletes logits it
first stores the configuration's scored curves (:func:`scores_table`), and a scan takes the
deleted epochs' scores from there, so every table and figure stays the same.
"""

from __future__ import annotations

import json
import math
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any

import numpy as np
import pyarrow as pa

from posthoc_tune.groups import without_path
from posthoc_tune.keys import METRICS, SPLITS, parse_transform
from posthoc_tune.metrics import evaluate
from posthoc_tune.store import PredictionStore, VariantParts
from posthoc_tune.transforms import Combiner, apply_transform

Scores = dict[str, float]  # "{split}/{metric}": "val/nll", "test/error", ...
DEFAULT_METRICS: tuple[str, ...] = ("nll", "error")  # what the selection table reports

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


def configurations(store: PredictionStore) -> dict[str, tuple[list[str], dict[str, Any]]]:
    """The store's configurations: group key -> (member trial ids, config without the seed)."""
    groups: dict[str, tuple[list[str], dict[str, Any]]] = {}
    for trial_id in store.trials():
        meta = store.metadata(trial_id)
        config = without_path(meta["config"], meta["seed_key"])
        groups.setdefault(meta["group"], ([], config))[0].append(trial_id)
    if not groups:
        raise ValueError(f"the store at {store.root!r} holds no trials")
    return groups


def scan(
    store: PredictionStore,
    group: str,
    members: list[str],
    config: dict[str, Any],
    transforms: Sequence[str],
    ensemble: Combiner,
    metrics: Sequence[str] = DEFAULT_METRICS,
) -> Curves:
    """Score ``transforms`` on every stored epoch of a configuration's ``members``, reading
    one epoch of its members at a time (memory stays flat in the number of epochs); epochs a
    compaction deleted come from the configuration's stored scores."""
    curves = Curves(group, config, members)
    parsed = {t: parse_transform(t) for t in transforms}
    for t in transforms:
        if parsed[t].ens:
            curves.ens[t] = {}
        else:
            curves.single[t] = {m: {} for m in members}
    epochs = {m: set(store.epochs(m)) for m in members}
    for epoch in sorted(set().union(*epochs.values())):
        read = {m: variants(store, m, epoch) for m in members if epoch in epochs[m]}
        for t in transforms:
            variant = parsed[t].variant
            have = {m: r[variant] for m, r in read.items() if variant in r}
            if parsed[t].ens:
                if len(have) == len(members):
                    curves.ens[t][epoch] = transform_scores(
                        store, list(have.values()), t, ensemble, metrics
                    )
            else:
                for m, part in have.items():
                    curves.single[t][m][epoch] = transform_scores(
                        store, [part], t, ensemble, metrics
                    )
    _fill_from_stored_scores(store, curves, ensemble, metrics)
    return curves


def variants(store: PredictionStore, trial_id: str, epoch: int) -> dict[str, VariantParts]:
    """A trial's stored logits of one epoch, by variant (base, swa), with temperatures."""
    parts = store.read_epoch(trial_id, epoch)
    temperatures = store.temperatures(trial_id, epoch)
    out = {}
    for variant in ("base", "swa"):
        logits = {s: z for (s, v), z in parts.items() if v == variant}
        if "val" in logits:
            out[variant] = VariantParts(logits, temperatures.get(variant))
    return out


def transform_scores(
    store: PredictionStore,
    parts: Sequence[VariantParts],
    transform: str,
    ensemble: Combiner,
    metrics: Sequence[str] = DEFAULT_METRICS,
) -> Scores:
    """Scores of a transform of one or more members' logits of its variant (TS fit on val,
    applied unchanged to test; the members' recorded temperatures reused)."""
    tests = [p.logits["test"] for p in parts] if all("test" in p.logits for p in parts) else None
    val, test = apply_transform(
        transform,
        [p.logits["val"] for p in parts],
        store.labels("val"),
        tests,
        ensemble=ensemble,
        member_temperatures=[p.temperature for p in parts],
    )
    out = {f"val/{m}": v for m, v in evaluate(val, store.labels("val"), metrics).items()}
    if test is not None:
        out.update(
            {f"test/{m}": v for m, v in evaluate(test, store.labels("test"), metrics).items()}
        )
    return out


def naive_ensembles(
    store: PredictionStore, curves: Curves, select_by: str, ensemble: Combiner
) -> None:
    """(Re)build ``curves.naive_ens``: each ensemble transform of the members at their own
    base-best epochs within ``curves`` (which a replay may have cut short), for the
    objectives of ``select_by`` (``"same"``: nll and error; ``"nll"``: nll)."""
    curves.naive_ens.clear()
    for t in curves.ens:
        variant = parse_transform(t).variant
        for obj in objectives(select_by):
            chosen = {m: argbest(curves.single["base"][m], f"val/{obj}") for m in curves.members}
            picked = {m: e for m, e in chosen.items() if e is not None}
            if len(picked) < len(curves.members):
                curves.naive_ens[(t, obj)] = {}
                continue
            parts = [variants(store, m, e)[variant] for m, e in picked.items()]
            curves.naive_ens[(t, obj)] = transform_scores(store, parts, t, ensemble)


def objectives(select_by: str) -> tuple[str, ...]:
    """The val metrics that select: nll and error (each its own), or nll for both."""
    return ("nll", "error") if select_by == "same" else ("nll",)


def argbest(curve: Mapping[int, Scores], key: str) -> int | None:
    """The epoch with the lowest finite ``key`` (the earliest on ties), or None."""
    finite = {e: s[key] for e, s in curve.items() if key in s and math.isfinite(s[key])}
    return min(finite, key=lambda e: (finite[e], e)) if finite else None


def objective_curve(curves: Curves, transform: str, key: str) -> dict[int, float]:
    """What selection ranks a configuration by, per epoch: the ensemble's value for an
    ensemble transform, the members' mean where every member has the epoch otherwise."""
    if parse_transform(transform).ens:
        return {e: s.get(key, math.nan) for e, s in sorted(curves.ens[transform].items())}
    per_member = curves.single[transform]
    common = set.intersection(*(set(c) for c in per_member.values()))
    return {
        e: float(np.mean([per_member[m][e].get(key, math.nan) for m in per_member]))
        for e in sorted(common)
    }


# -- stored scores of compacted configurations ---------------------------------------------------


def scores_table(curves: Curves, ensemble: Combiner) -> pa.Table:
    """A configuration's curves as a table (one row per member, or ensemble, transform and
    epoch; a column per split/metric), to store before logits are deleted."""
    columns = [f"{s}/{m}" for s in SPLITS for m in METRICS]
    rows: list[dict[str, Any]] = []
    for t, per_member in curves.single.items():
        for m, curve in per_member.items():
            rows += [{"member": m, "transform": t, "epoch": e, **s} for e, s in curve.items()]
    for t, curve in curves.ens.items():
        rows += [{"member": None, "transform": t, "epoch": e, **s} for e, s in curve.items()]
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
    keys = [f"{s}/{m}" for s in SPLITS for m in metrics if f"{s}/{m}" in table.column_names]
    for row in table.to_pylist():
        scores = {k: row[k] for k in keys if not (k.startswith("test/") and math.isnan(row[k]))}
        t, m, epoch = row["transform"], row["member"], row["epoch"]
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
