"""The one scoring path: a registered transform of its members' logits, scored on val and test.

A trial's reporter (its own transforms, every epoch), the driver's seed-ensemble evaluation
(PostHocASHA, PostHocSearch, the ResultGrid's group keys) and every scan of a stored
experiment (tables, leaderboard, plots, replay, retention; :mod:`posthoc_tune.curves`) call
:func:`score`, so a transform means the same model everywhere. What differs between callers
is only where the members come from: :func:`window` picks a trial's own epochs for
checkpoint ensembles, the driver picks a group's seeds at one epoch.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence

import numpy as np

from posthoc_tune.keys import METRICS, SPLITS, Transform, parse_transform
from posthoc_tune.metrics import evaluate
from posthoc_tune.store import PredictionStore, VariantParts
from posthoc_tune.transforms import Combiner, apply_transform

History = Mapping[int, Mapping[str, VariantParts]]
"""One trial's logits by epoch and variant (``"base"``, ``"swa"``)."""


def score(
    transform: str | Transform,
    members: Sequence[VariantParts],
    labels: Mapping[str, np.ndarray],
    *,
    ensemble: Combiner = "logits",
    metrics: Sequence[str] = METRICS,
    splits: Sequence[str] = SPLITS,
) -> dict[str, float]:
    """Metric values (keys ``{split}/{transform}/{metric}``) of ``transform`` applied to
    ``members``' logits of its variant.

    Temperatures are fit on val (the members' recorded ones reused) and applied unchanged to
    test; test is scored when it is in ``splits`` and every member and ``labels`` have it.
    """
    t = parse_transform(transform)
    if not members:
        raise ValueError(f"transform {t.name!r} needs at least one member, got none")
    has_test = "test" in splits and "test" in labels and all("test" in m.logits for m in members)
    val, test = apply_transform(
        t,
        [m.logits["val"] for m in members],
        labels["val"],
        [m.logits["test"] for m in members] if has_test else None,
        ensemble=ensemble,
        member_temperatures=[m.temperature for m in members],
    )
    out = {f"val/{t.name}/{k}": v for k, v in evaluate(val, labels["val"], metrics).items()}
    if test is not None:
        out.update(
            {f"test/{t.name}/{k}": v for k, v in evaluate(test, labels["test"], metrics).items()}
        )
    return out


def window(transform: str | Transform, epoch: int, history: History) -> list[VariantParts] | None:
    """A trial-scope transform's members when judged at ``epoch``: its variant's logits at
    each epoch of its window (:meth:`~posthoc_tune.keys.Transform.epochs`) that has them (the
    SWA variant starts later). None when ``epoch`` lacks the variant or an epoch of the
    window is missing from ``history`` (a compacted store): the value is then unknown."""
    t = parse_transform(transform)
    if t.ens:
        raise ValueError(f"transform {t.name!r} combines a seed group, not a trial's epochs")
    if epoch not in history or t.variant not in history[epoch]:
        return None
    epochs = t.epochs(epoch)
    if any(e not in history for e in epochs):
        return None
    return [history[e][t.variant] for e in epochs if t.variant in history[e]]


def store_labels(store: PredictionStore, splits: Sequence[str] = SPLITS) -> dict[str, np.ndarray]:
    """The labels a store holds of ``splits`` (test is optional)."""
    out = {}
    for split in splits:
        try:
            out[split] = store.labels(split)
        except KeyError:
            if split == "val":
                raise
    return out
