"""Greedy ensemble selection over every stored model of an experiment (Caruana et al., 2004).

The paper ensembles the seeds of one configuration at one common epoch. AutoML systems
(auto-sklearn, AutoGluon) build their final model differently: forward selection *with
replacement* from every model they trained, on validation predictions. The prediction store
already holds every trial's val and test logits at every epoch, in two variants (the model and
its SWA average), so the candidates cost nothing to train.

A candidate is one stored model, ``(trial, epoch, variant)``, temperature-scaled with the
temperature its reporter fit on val. Selection then repeats ``size`` times: add (again, if it
is already in) the candidate whose addition gives the ensemble (the mean of its members'
scaled logits, each pick one vote) the best val objective. The ensemble kept is the best
prefix of those picks (Caruana's "select the best ensemble seen"), and one more temperature is
fit on its val logits: the transform ``ens+ts`` applied to the picked members, through the
project's one scoring path (:func:`posthoc_tune.scoring.score`).

Two flavours, as the selection table compares them:

* ``"posthoc"``: any stored epoch of any trial, either variant, may be picked. To bound time
  and memory on large stores, each trial contributes its ``pool`` best candidates by their own
  val objective, and at most ``max_candidates`` enter the selection.
* ``"naive"``: each trial only at its base-best epoch (the epoch naive selection keeps: lowest
  val NLL of the untransformed model), base variant.

The pool is built in one streaming pass over the stored epochs (one read per epoch file), in a
buffer of ``max_candidates`` val logits allocated once: memory is bounded by
``max_candidates`` x N x C float32 (plus one trial's ``pool``), whatever the numbers of trials
and epochs. Time grows with the stored models (each is read and scored once) plus ``size``
selection steps over the pool.
"""

from __future__ import annotations

import heapq
import math
from collections.abc import Iterator, Sequence
from dataclasses import dataclass, field
from typing import Any, Literal

import numpy as np
import pandas as pd
import torch

from posthoc_tune import metrics
from posthoc_tune.curves import configurations, open_store, processed_epochs
from posthoc_tune.groups import flatten_config
from posthoc_tune.keys import VARIANTS, check_name
from posthoc_tune.scoring import score, store_labels
from posthoc_tune.store import PredictionStore, VariantParts
from posthoc_tune.transforms import TemperatureScaler, combine

Flavour = Literal["posthoc", "naive"]
FLAVOURS: tuple[str, ...] = ("posthoc", "naive")
OBJECTIVES: tuple[str, ...] = ("nll", "error")


@dataclass(frozen=True, order=True)
class Candidate:
    """One stored model: a trial's ``variant`` at ``epoch``, scaled by ``temperature``."""

    trial_id: str
    epoch: int
    variant: str
    temperature: float = field(compare=False)


@dataclass
class GreedyEnsemble:
    """The result of :func:`greedy_ensemble`.

    Attributes:
        flavour: ``"posthoc"`` or ``"naive"``.
        objective: the val metric the selection minimised.
        members: one row per distinct member: ``trial_id``, ``epoch``, ``variant``,
            ``weight`` (its share of the votes), ``temperature`` (its own TS) and
            ``config/...`` (its trial's configuration): enough to rebuild the model.
        temperature: the ensemble's final temperature (fit on val).
        scores: the final model's metric keys ``{split}/ens+ts/{metric}``.
        history: the val objective after each pick (the kept prefix ends at its minimum).
        n_candidates: candidates the selection chose from; ``skipped``: candidates left out
            because their val logits are not finite (a diverged model: never picked).
    """

    flavour: str
    objective: str
    members: pd.DataFrame
    temperature: float
    scores: dict[str, float]
    history: list[float]
    n_candidates: int
    skipped: int = 0

    def value(self, split: str, metric: str) -> float:
        """The final model's ``metric`` on ``split`` (NaN when the store has no such split)."""
        return self.scores.get(f"{split}/ens+ts/{metric}", math.nan)


def greedy_ensemble(
    results_or_path: Any,
    *,
    flavour: str = "posthoc",
    objective: str = "nll",
    size: int = 20,
    pool: int = 5,
    max_candidates: int = 1000,
    variants: Sequence[str] = VARIANTS,
) -> GreedyEnsemble:
    """Greedy forward selection with replacement over a stored experiment's models.

    Args:
        results_or_path: a ``tune.ResultGrid``, an experiment path/URI or a store.
        flavour: ``"posthoc"`` (any epoch of any trial) or ``"naive"`` (each trial at its
            base-best epoch); see the module docstring.
        objective: val ``"nll"`` or ``"error"`` (ties broken by NLL), minimised.
        size: picks (with replacement), at most; the best prefix is kept.
        pool: candidates per trial (``posthoc``): its best by their own val objective.
        max_candidates: candidates entering the selection at most (the best by their own
            val objective), bounding memory at ``max_candidates`` val logits.
        variants: the model variants that may be picked (``posthoc``).
    """
    check_name("flavour", flavour, FLAVOURS)
    check_name("objective", objective, OBJECTIVES)
    for name, value in (("size", size), ("pool", pool), ("max_candidates", max_candidates)):
        if isinstance(value, bool) or not isinstance(value, int) or value < 1:
            raise ValueError(f"{name} must be an int >= 1, got {value!r}")
    wanted = [check_name("variant", v, VARIANTS) for v in variants]
    if not wanted:
        raise ValueError("variants must name at least one of 'base', 'swa'")
    store = open_store(results_or_path)
    labels = store_labels(store)
    trials = [m for members, _ in configurations(store).values() for m in members]
    if flavour == "naive":
        found = _naive_pool(store, trials, labels["val"], max_candidates)
    else:
        found = _posthoc_pool(store, trials, labels["val"], objective, pool, wanted, max_candidates)
    if not found.candidates:
        raise ValueError(
            f"no candidate to select from in {store.root!r}: no trial has finite val logits "
            f"of the variants {wanted}"
        )
    candidates = found.candidates
    picks, history = _select(
        found.logits(), torch.from_numpy(labels["val"]), objective, size, found.ranks()
    )
    counts = np.bincount(picks, minlength=len(candidates))
    chosen = [i for i in range(len(candidates)) if counts[i]]
    parts = _read_members(store, [candidates[i] for i in chosen])
    votes = [parts[k] for k, i in enumerate(chosen) for _ in range(counts[i])]
    scores = score("ens+ts", votes, labels)
    # The final temperature, to rebuild the model: ens+ts fits it on the same mean.
    mean = combine([p.logits["val"] / np.float32(p.temperature or 1.0) for p in votes])
    final = TemperatureScaler().fit(mean, labels["val"]).temperature_
    rows = [
        {
            "trial_id": candidates[i].trial_id,
            "epoch": candidates[i].epoch,
            "variant": candidates[i].variant,
            "weight": counts[i] / len(picks),
            "temperature": candidates[i].temperature,
            **flatten_config(store.metadata(candidates[i].trial_id)["config"], "config/"),
        }
        for i in chosen
    ]
    members = pd.DataFrame(rows).sort_values("weight", ascending=False, ignore_index=True)
    return GreedyEnsemble(
        flavour, objective, members, final, scores, history, len(candidates), found.skipped
    )


# -- candidate pools -------------------------------------------------------------------------------


class _Pool:
    """The best ``capacity`` candidates seen so far by their own val objective, their scaled
    val logits in one buffer allocated once: memory is ``capacity`` logits whatever the
    number of trials and epochs scanned."""

    def __init__(self, capacity: int) -> None:
        self.capacity = capacity
        self.skipped = 0
        self._buffer: np.ndarray | None = None
        self._heap: list[tuple[float, int, int, Candidate]] = []  # (-value, -seen, slot, c)
        self._seen = 0

    def offer(self, value: float, candidate: Candidate, scaled: np.ndarray) -> None:
        self._seen += 1
        item = (-value, -self._seen, len(self._heap), candidate)
        if len(self._heap) < self.capacity:
            if self._buffer is None:
                self._buffer = np.empty((self.capacity, *scaled.shape), np.float32)
            heapq.heappush(self._heap, item)
        elif item[:2] > self._heap[0][:2]:  # better than the worst kept: take its slot
            item = (*item[:2], self._heap[0][2], candidate)
            heapq.heapreplace(self._heap, item)
        else:
            return
        assert self._buffer is not None
        if scaled.shape != self._buffer.shape[1:]:
            raise ValueError(
                f"trial {candidate.trial_id!r} epoch {candidate.epoch} has val logits of shape "
                f"{scaled.shape}, other candidates {self._buffer.shape[1:]}: all trials must "
                f"predict the same classes on the same val rows"
            )
        self._buffer[item[2]] = scaled

    @property
    def candidates(self) -> list[Candidate]:
        """The kept candidates, by slot."""
        return [c for _, c, _ in self.items()]

    def items(self) -> Iterator[tuple[float, Candidate, np.ndarray]]:
        """(own objective, candidate, scaled val logits) of the kept candidates, by slot."""
        for value, _, slot, candidate in sorted(self._heap, key=lambda item: item[2]):
            assert self._buffer is not None
            yield -value, candidate, self._buffer[slot]

    def logits(self) -> torch.Tensor:
        """The kept candidates' scaled val logits, by slot (no copy)."""
        assert self._buffer is not None
        return torch.from_numpy(self._buffer[: len(self._heap)])

    def ranks(self) -> torch.Tensor:
        """Each slot's rank by own objective (then candidate): ties in the selection go to
        the better candidate on its own."""
        by_slot = list(self.items())
        order = sorted(range(len(by_slot)), key=lambda i: by_slot[i][:2])
        ranks = torch.empty(len(order), dtype=torch.int64)
        ranks[torch.tensor(order, dtype=torch.int64)] = torch.arange(len(order))
        return ranks


def _own_objective(scaled: np.ndarray, labels: np.ndarray, objective: str) -> float:
    """One candidate's own val objective (what ranks it within its trial's pool)."""
    return float(_objective(torch.from_numpy(scaled)[None], torch.from_numpy(labels), objective))


def _candidates(
    store: PredictionStore, trial_id: str, epochs: Sequence[int], variants: Sequence[str]
) -> Iterator[tuple[Candidate, np.ndarray]]:
    """A trial's stored val logits, scaled by their recorded temperature (fit here when none
    was recorded), one epoch (one read) and variant at a time."""
    for epoch in epochs:
        parts = store.read_split(trial_id, epoch, "val")
        for variant in variants:
            if variant not in parts:  # no SWA logits before SWA starts
                continue
            z = parts[variant].logits["val"]
            temperature = parts[variant].temperature
            if temperature is None:
                temperature = TemperatureScaler().fit(z, store.labels("val")).temperature_
            yield Candidate(trial_id, epoch, variant, temperature), z / np.float32(temperature)


def _checked(labels: np.ndarray, candidate: Candidate, z: np.ndarray) -> bool:
    """Whether a candidate's val logits are usable: the store's shape (else an error naming
    the trial), and finite (else skipped)."""
    if z.shape[0] != labels.shape[0]:
        raise ValueError(
            f"trial {candidate.trial_id!r} epoch {candidate.epoch} has {z.shape[0]} val rows, "
            f"the store's labels {labels.shape[0]}: all trials must share the val rows"
        )
    return bool(np.isfinite(z).all())


def _posthoc_pool(
    store: PredictionStore,
    trials: Sequence[str],
    labels: np.ndarray,
    objective: str,
    pool: int,
    variants: Sequence[str],
    max_candidates: int,
) -> _Pool:
    """Each trial's ``pool`` best candidates, of which the best ``max_candidates`` are kept."""
    found = _Pool(min(max_candidates, pool * len(trials)))
    for trial_id in trials:
        best = _Pool(pool)
        for candidate, z in _candidates(
            store, trial_id, processed_epochs(store, trial_id), variants
        ):
            if _checked(labels, candidate, z):
                best.offer(_own_objective(z, labels, objective), candidate, z)
            else:
                found.skipped += 1
        for value, candidate, z in best.items():
            found.offer(value, candidate, z)
    return found


def _naive_pool(
    store: PredictionStore, trials: Sequence[str], labels: np.ndarray, max_candidates: int
) -> _Pool:
    """Each trial's base model at its base-best epoch (lowest raw val NLL, earliest on ties)."""
    found = _Pool(min(max_candidates, len(trials)))
    for trial_id in trials:
        best: tuple[float, int] | None = None
        for epoch in processed_epochs(store, trial_id):
            value = metrics.nll(store.read(trial_id, epoch, "val", "base"), labels)
            if math.isfinite(value) and (best is None or value < best[0]):
                best = (value, epoch)
        if best is None:
            found.skipped += 1
            continue
        (candidate, z) = next(_candidates(store, trial_id, [best[1]], ["base"]))
        if _checked(labels, candidate, z):
            found.offer(_own_objective(z, labels, "nll"), candidate, z)
        else:
            found.skipped += 1
    return found


# -- selection -----------------------------------------------------------------------------------


def _select(
    scaled: torch.Tensor, labels: torch.Tensor, objective: str, size: int, ranks: torch.Tensor
) -> tuple[list[int], list[float]]:
    """Forward selection with replacement: ``size`` picks, each the candidate whose vote
    minimises the val objective of the mean of the votes; returns the best prefix's picks and
    the objective after every pick. Ties go to the lowest of ``ranks``."""
    total = torch.zeros(scaled.shape[1:], dtype=torch.float32)
    picks: list[int] = []
    history: list[float] = []
    for k in range(1, size + 1):
        values = torch.cat(
            [
                _objective((total + chunk) / k, labels, objective)
                for chunk in scaled.split(max(1, (1 << 24) // max(scaled[0].numel(), 1)))
            ]
        )
        ties = torch.nonzero(values == values.min()).flatten()
        best = int(ties[torch.argmin(ranks[ties])])
        picks.append(best)
        history.append(float(values[best]))
        total += scaled[best]
    keep = int(np.argmin(history)) + 1
    return picks[:keep], history


def _objective(mean: torch.Tensor, labels: torch.Tensor, objective: str) -> torch.Tensor:
    """Each candidate ensemble's val objective (``mean`` is (P, N, C))."""
    logp = torch.log_softmax(mean, dim=2)
    index = labels[None, :, None].expand(mean.shape[0], -1, 1)
    nll = -logp.gather(2, index).squeeze(2).to(torch.float64).mean(dim=1)
    if objective == "nll":
        return nll
    error = (mean.argmax(dim=2) != labels[None]).to(torch.float64).mean(dim=1)
    return error + 1e-9 * nll


def _read_members(store: PredictionStore, members: Sequence[Candidate]) -> list[VariantParts]:
    """The picked members' val and test logits, with their temperatures."""
    out = []
    for c in members:
        part = store.read_variant(c.trial_id, c.epoch, c.variant)
        out.append(VariantParts(part.logits, c.temperature))
    return out


__all__ = ["FLAVOURS", "OBJECTIVES", "Candidate", "GreedyEnsemble", "greedy_ensemble"]
