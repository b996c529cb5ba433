"""Seed groups' ensemble values in their members' Tune results, where ``ResultGrid`` sees them.

An ensemble key (``val/swa+ens+ts/nll``) exists only on the driver, once every member of a
seed group has reached an epoch; a trial's own results hold NaN there. Ray Tune ranks and
tabulates trials (``ResultGrid.get_best_result``, ``get_dataframe``) on what each trial's
results hold, so :class:`EnsembleResults` evaluates each group at every epoch all its live
members have reached and writes the values into the members' results:

* every result a member reports carries its group's latest value, and the epoch that value
  belongs to under ``ensemble_epoch/<transform>`` (members run ahead of their group);
* when the experiment ends, every member's last result holds the value at the group's last
  common epoch, and the per-trial metric analysis that ``get_best_result`` reads (``scope=
  "last"``, ``"all"``, ...) is rebuilt from the group's per-epoch values, as if each member had
  reported them itself: ``scope="all"`` then ranks groups by their best common epoch, as
  :func:`posthoc_tune.leaderboard` does.

Ray keeps each trial's metric analysis in its run metadata (``Trial.run_metadata``, updated by
``Trial.update_last_result``); :func:`_add_to_analysis` and :func:`_rebuild_analysis` are
the only places here that write it.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Any

from ray.tune.experiment import Trial

from posthoc_tune.ensemble import EnsembleEvaluator, EnsembleValue
from posthoc_tune.groups import group_key, has_path
from posthoc_tune.keys import ensemble_epoch_key, parse_transform


@dataclass
class _Group:
    """A seed group as the callback sees it: its trials and the epochs evaluated so far."""

    trials: dict[str, Trial] = field(default_factory=dict)
    evaluated: int = 0  # epochs 1..evaluated have values for the current member set
    members: tuple[str, ...] = ()  # the member set they were evaluated with
    values: dict[str, dict[int, EnsembleValue]] = field(default_factory=dict)  # transform, epoch


class EnsembleResults:
    """Evaluate seed groups at each common epoch and write the values into Tune results.

    Args:
        transforms: ensemble transforms to evaluate (e.g. ``["swa+ens+ts"]``).
        seed_key: the config key (or "a/b" path) that separates a group's members.
        group_size: members per group when known in advance (``PostHocSearch``'s
            ``n_seeds``: it creates them one by one); None: every trial Tune has created.
    """

    def __init__(
        self, transforms: Sequence[str], seed_key: str, group_size: int | None = None
    ) -> None:
        parsed = [parse_transform(t) for t in transforms]
        single = [t.name for t in parsed if not t.ens]
        if single:
            raise ValueError(f"EnsembleResults takes ensemble transforms, got {single}")
        self.transforms = [t.name for t in parsed]
        self.seed_key = seed_key
        self.group_size = group_size
        self._evaluator: EnsembleEvaluator | None = None
        self._groups: dict[str, _Group] = {}
        self._trial_group: dict[str, str] = {}
        self._n_seen = 0  # trials of Tune's list already grouped

    @property
    def attached(self) -> bool:
        """Whether an evaluator is attached (it needs the experiment's store)."""
        return self._evaluator is not None

    def attach_evaluator(self, evaluator: EnsembleEvaluator) -> None:
        """Evaluate with ``evaluator`` (the one PostHocCallback gives the experiment's
        scheduler and searcher too: values they computed are reused, not recomputed)."""
        self._evaluator = evaluator

    def on_result(self, trials: Sequence[Trial], trial: Trial, result: dict[str, Any]) -> None:
        """Evaluate the epochs the result completes for its group and write the group's
        latest values into ``result`` (Tune stores it as the trial's last result next)."""
        if self._evaluator is None or "epoch" not in result:
            return
        self._add_trials(trials)
        name = self._trial_group.get(trial.trial_id)
        if name is None:
            return
        epoch = int(result["epoch"])
        for transform in self.transforms:
            self._evaluator.prefetch(trial.trial_id, epoch, parse_transform(transform).variant)
        group = self._groups[name]
        progress = {t: _epoch(member) for t, member in group.trials.items()}
        progress[trial.trial_id] = epoch
        new = self._evaluate(name, group, progress)
        for trial_id, member in group.trials.items():
            if trial_id != trial.trial_id and new:
                _write_latest(member.run_metadata.last_result, group, self.transforms)
                for transform in self.transforms:
                    for value in new[transform]:
                        _add_to_analysis(member, value, transform)
        _write_latest(result, group, self.transforms)

    def finish(self, trials: Sequence[Trial]) -> None:
        """At the experiment's end (also of a restored one): evaluate every group up to its
        last common epoch and rebuild each member's last result and metric analysis."""
        if self._evaluator is None:
            return
        self._add_trials(trials)
        for name, group in self._groups.items():
            progress = {t: _epoch(member) for t, member in group.trials.items()}
            ran = {t: e for t, e in progress.items() if e > 0}  # never started: not a member
            self._evaluate(name, group, ran, finished=True)
            for trial_id, member in group.trials.items():
                if member.status == Trial.ERROR or trial_id not in ran:
                    continue
                _write_latest(member.run_metadata.last_result, group, self.transforms)
                for transform in self.transforms:
                    _rebuild_analysis(member, group.values.get(transform, {}), transform)
            self._evaluator.discard(group.trials)

    # -- internals ------------------------------------------------------------------------

    def _add_trials(self, trials: Sequence[Trial]) -> None:
        """Group the trials not seen yet: Tune's list only grows, so each result costs
        O(new trials), not O(all trials)."""
        start = self._n_seen if len(trials) >= self._n_seen else 0
        self._n_seen = len(trials)
        for trial in trials[start:]:
            if trial.trial_id not in self._trial_group and has_path(trial.config, self.seed_key):
                name = group_key(trial.config, self.seed_key)
                self._trial_group[trial.trial_id] = name
                self._groups.setdefault(name, _Group()).trials[trial.trial_id] = trial

    def _evaluate(
        self, name: str, group: _Group, progress: dict[str, int], *, finished: bool = False
    ) -> dict[str, list[EnsembleValue]]:
        """Evaluate the epochs every live member has reached and that have no value yet for
        the current member set; returns the new values per transform."""
        assert self._evaluator is not None
        if not finished and self.group_size is not None and len(group.trials) < self.group_size:
            return {}  # the searcher has not created every member yet
        members = tuple(
            sorted(
                t
                for t, member in group.trials.items()
                if member.status != Trial.ERROR and t in progress
            )
        )
        if not members:
            return {}
        if members != group.members:  # a member failed or joined: earlier values are stale
            group.members, group.evaluated, group.values = members, 0, {}
        common = min(progress[t] for t in members)
        new: dict[str, list[EnsembleValue]] = {t: [] for t in self.transforms}
        for epoch in range(group.evaluated + 1, common + 1):
            for transform in self.transforms:
                value = self._evaluator.evaluate(name, epoch, members, transform)
                group.values.setdefault(transform, {})[epoch] = value
                new[transform].append(value)
        group.evaluated = max(group.evaluated, common)
        return new if common >= 1 and any(new.values()) else {}


def _epoch(trial: Trial) -> int:
    """The last epoch Tune processed of a trial (0 before its first result). Read from the
    run metadata: ``Trial.last_result`` may fetch a default result from the trial's actor."""
    epoch = trial.run_metadata.last_result.get("epoch")
    return int(epoch) if isinstance(epoch, (int, float)) and epoch == epoch else 0


def _latest(group: _Group, transform: str) -> EnsembleValue | None:
    values = group.values.get(transform)
    return values[max(values)] if values else None


def _write_latest(result: dict[str, Any], group: _Group, transforms: Sequence[str]) -> None:
    """The group's latest values (and their epoch) into a result dict."""
    for transform in transforms:
        value = _latest(group, transform)
        if value is not None:
            result.update(value.values)
            result[ensemble_epoch_key(transform)] = value.epoch


def _add_to_analysis(trial: Trial, value: EnsembleValue, transform: str) -> None:
    """Fold one new value into a trial's metric analysis, as Tune folds a reported one."""
    metadata: Any = trial.run_metadata  # typed for numbers.Number, which floats are
    for key, v in value.values.items():
        metadata.update_metric(key, v, step=value.epoch)
    metadata.update_metric(ensemble_epoch_key(transform), value.epoch, step=value.epoch)


def _rebuild_analysis(trial: Trial, values: dict[int, EnsembleValue], transform: str) -> None:
    """Replace a trial's analysis of the group's keys by the group's per-epoch values, fed in
    epoch order through Tune's own ``update_metric`` (so ``min``, ``last``, ``avg``, ... mean
    what they mean for a reported metric, NaN handling included)."""
    if not values:
        return
    metadata = trial.run_metadata
    keys = {*next(iter(values.values())).values, ensemble_epoch_key(transform)}
    for key in keys:
        metadata.metric_analysis.pop(key, None)
        metadata.metric_n_steps.pop(key, None)
    for epoch in sorted(values):
        _add_to_analysis(trial, values[epoch], transform)
