"""Retention: shrink a finished experiment's store to what selection can still use.

A store keeps every epoch's logits of every trial, which is what post-hoc selection needs
while the experiment runs. Afterwards most of it can go:

* **Epochs no selection can pick.** Naive selection picks each member's base-best epoch (and
  ensembles those); post-hoc selection the best epoch of each transform (per member, or one
  common epoch for an ensemble or the members' mean), by val nll or val error. Before deleting
  the other epochs' logits, :func:`compact` stores each configuration's scored curves (every
  transform, split and metric at every epoch, a few numbers per epoch: see
  :mod:`posthoc_tune.curves`), so :func:`~posthoc_tune.selection_table`, the leaderboard and
  the plots give exactly what they gave before. What is lost: a replay (it needs every epoch's
  logits, and refuses a compacted store), and ensembles with another combiner than
  ``ensemble`` at the deleted epochs.
* **Pruned trials.** Trials a scheduler stopped early (``PostHocASHA.pruned_trials``) rarely
  hold the selected model; dropping them removes them from every later table.

New stores can also be written in float16 (``PostHocReporter(store_dtype="float16")``),
which halves the footprint. Nothing is deleted unless asked: :func:`compact` is explicit.
"""

from __future__ import annotations

from collections.abc import Iterable, Sequence
from dataclasses import dataclass
from typing import Any, Literal

from posthoc_tune.curves import (
    Curves,
    argbest,
    best_epoch,
    configurations,
    objective_curve,
    scan,
    scores_table,
)
from posthoc_tune.keys import METRICS, TABLE_TRANSFORMS, TRANSFORMS, metric_key, parse_transform
from posthoc_tune.selection import open_store
from posthoc_tune.transforms import Combiner

Keep = Literal["all", "selectable"]
_OBJECTIVES = ("nll", "error")


@dataclass(frozen=True)
class Compaction:
    """What :func:`compact` removed (and, with ``dry_run``, would remove)."""

    dropped_trials: list[str]
    dropped_epochs: dict[str, list[int]]  # trial id -> epochs deleted
    kept_epochs: dict[str, list[int]]  # trial id -> epochs kept

    @property
    def n_dropped_files(self) -> int:
        """Epoch files deleted from the trials that stay."""
        return sum(len(e) for e in self.dropped_epochs.values())


def selectable_epochs(
    curves: Curves, transforms: Sequence[str] = TRANSFORMS
) -> dict[str, set[int]]:
    """Per member, the epochs a naive or post-hoc selection of any transform can pick, by
    val nll or val error: each member's best epoch of each single-model transform, and the
    best common epoch of each ensemble and of each single-model transform's mean over the
    members (the leaderboard's pick for a per-trial key), for every member; with a
    checkpoint window, every epoch of the window ending at a picked epoch (the models it
    averages)."""
    keep: dict[str, set[int]] = {m: set() for m in curves.members}

    def add(member: str, epoch: int | None, transform: str) -> None:
        if epoch is not None:
            keep[member].update(parse_transform(transform).epochs(epoch))

    names = {parse_transform(t).name for t in transforms}
    for obj in _OBJECTIVES:
        for transform, per_member in curves.single.items():
            if transform not in names:
                continue
            key = metric_key("val", transform, obj)
            for m, curve in per_member.items():
                add(m, argbest(curve, key), transform)
            common = best_epoch(objective_curve(curves, transform, key))[0]
            for m in curves.members:
                add(m, common, transform)
        for transform, curve in curves.ens.items():
            if transform not in names:
                continue
            epoch = argbest(curve, metric_key("val", transform, obj))
            for m in curves.members:
                add(m, epoch, transform)
    return keep


def compact(
    experiment: Any,
    *,
    keep: Keep = "selectable",
    drop_trials: Iterable[str] = (),
    ensemble: Combiner = "logits",
    transforms: Sequence[str] = TABLE_TRANSFORMS,
    dry_run: bool = False,
) -> Compaction:
    """Delete what later selection does not need from an experiment's store.

    Args:
        experiment: a ``tune.ResultGrid``, an experiment path/URI or a PredictionStore.
        keep: ``"selectable"``: of the remaining trials, only the epochs some selection can
            pick (see the module docstring); ``"all"``: every epoch.
        drop_trials: trials to delete entirely (logits and metadata), e.g. a scheduler's
            ``pruned_trials``.
        ensemble: the combiner later selections will use (it decides the ensembles' best
            epochs).
        transforms: the transforms whose selected models keep their logits (default: the
            selection table's rows); a checkpoint ensemble (``ckpt*``) keeps its whole window
            of epochs. Every transform's scores are stored either way, so tables of any
            transform stay the same.
        dry_run: report what would be deleted, delete nothing.

    Run it after the experiment has finished: trials still writing would race the deletes.
    The epochs to keep are decided (a full scan) before anything is deleted, so an
    interrupted compaction leaves a store that is a subset of a valid one.
    """
    if keep not in ("all", "selectable"):
        raise ValueError(f"keep must be 'all' or 'selectable', got {keep!r}")
    store = open_store(experiment)
    trials = set(store.trials())
    dropped = sorted(set(drop_trials))
    unknown = [t for t in dropped if t not in trials]
    if unknown:
        raise ValueError(f"drop_trials names trials the store does not hold: {unknown[:5]}")
    kept: dict[str, list[int]] = {}
    deleted: dict[str, list[int]] = {}
    scored = []
    if keep == "selectable":
        for group, (members, config) in configurations(store).items():
            members = [m for m in members if m not in dropped]
            if not members:
                continue
            curves = scan(store, group, members, config, TRANSFORMS, ensemble, METRICS)
            scored.append(curves)
            for m, selectable in selectable_epochs(curves, transforms).items():
                stored = store.epochs(m)
                kept[m] = [e for e in stored if e in selectable]
                deleted[m] = [e for e in stored if e not in selectable]
    else:
        kept = {m: store.epochs(m) for m in sorted(trials - set(dropped))}
    if not dry_run:
        for trial_id in dropped:
            store.delete_trial(trial_id)
        for curves in scored:  # every configuration's curves, before any of its logits go
            if any(deleted[m] for m in curves.members):
                store.write_scores(curves.group, scores_table(curves, ensemble))
        for trial_id, gone in deleted.items():
            store.delete_epochs(trial_id, gone)
    return Compaction(dropped, deleted, kept)


__all__ = ["Compaction", "compact", "selectable_epochs"]
