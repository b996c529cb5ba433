"""How PostHocASHA judges arms at its rungs: trial by trial, or seed group by seed group.

PostHocASHA parses its metric key once and hands Tune's hooks to one :class:`RungPolicy`:

* :class:`TrialPolicy` for a per-trial key (``val/swa+ts/nll``): each trial is an arm, judged
  on the value it reports exactly as Ray's ``AsyncHyperBandScheduler`` judges a metric;
* :class:`GroupPolicy` for a group key (``val/swa+ens+ts/nll``): each seed group is an arm.
  Once every live member reached a rung (errored and finished members are not waited for),
  the group's ensemble at one common epoch is evaluated from the prediction store and a
  losing group is stopped as a whole. A member that runs ahead of a sibling past a rung its
  group has not decided is paused (when its result carries a checkpoint to resume from), so
  that no member trains on while its group waits to be judged; :meth:`GroupPolicy.choose`
  starts the siblings of waiting members first and resumes members once their group passed.
  Ensemble work happens only at rungs; every other result costs O(group size).
"""

from __future__ import annotations

import copy
import math
import warnings
from abc import ABC, abstractmethod
from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Any, ClassVar, Literal

import numpy as np
from ray.tune.experiment import Trial
from ray.tune.result import SHOULD_CHECKPOINT
from ray.tune.schedulers import TrialScheduler

from posthoc_tune._component import Ensembles, experiment_store
from posthoc_tune._rungs import Bracket
from posthoc_tune.ensemble import EnsembleEvaluator
from posthoc_tune.groups import (
    DONE,
    ERROR,
    LIVE,
    Member,
    SeedGroup,
    Status,
    group_key,
    member_seed,
)
from posthoc_tune.keys import Objective
from posthoc_tune.store import PredictionStore

RungValue = Literal["last", "best"]
FINAL = "FINAL"
STOP, CONTINUE, PAUSE = TrialScheduler.STOP, TrialScheduler.CONTINUE, TrialScheduler.PAUSE
_STOPPABLE = (Trial.RUNNING, Trial.PENDING, Trial.PAUSED)
_WAITING = (Trial.RUNNING, Trial.PAUSED)  # a group with such members is being judged


@dataclass(frozen=True)
class Settings:
    """PostHocASHA's rung settings (validated there), as both policies apply them."""

    time_attr: str
    max_t: float
    grace_period: float
    reduction_factor: float
    n_brackets: int
    rung_value: RungValue
    stop_last_trials: bool
    run_ahead: int | None  # results past an undecided rung before a pause; None: never
    seeds: tuple[int, ...] | None  # members a group needs at each rung; None: all it has


class RungPolicy(ABC):
    """Judges arms at ASHA's rungs on a parsed objective.

    Holds what a restored scheduler needs (the rungs, each arm's bracket, every decision and
    the trials stopped by one): :meth:`get_state` lists it. Scores are higher-is-better
    (:meth:`Objective.score`), as in ``_rungs``.
    """

    arms: ClassVar[str]  # what an arm is, for debug strings
    _STATE: ClassVar[tuple[str, ...]] = ("brackets", "arm_bracket", "decisions", "pruned")

    def __init__(self, objective: Objective, settings: Settings) -> None:
        self.objective = objective
        self.settings = settings
        self.brackets = [
            Bracket(
                settings.grace_period,
                settings.max_t,
                settings.reduction_factor,
                s,
                settings.stop_last_trials,
            )
            for s in range(settings.n_brackets)
        ]
        self.arm_bracket: dict[str, int] = {}
        self.decisions: list[dict[str, Any]] = []
        self.pruned: set[str] = set()  # stopped by a rung decision (not at max_t)

    # -- Tune's hooks (results without the time attribute never reach a policy) --------------

    @abstractmethod
    def on_add(self, tc: Any, trial: Trial) -> None: ...

    @abstractmethod
    def on_result(self, tc: Any, trial: Trial, result: Mapping[str, Any]) -> str: ...

    @abstractmethod
    def on_complete(self, tc: Any, trial: Trial, result: Mapping[str, Any] | None) -> None:
        """``result``: the trial's last result, None when it has no time attribute."""

    @abstractmethod
    def on_error(self, trial: Trial) -> None:
        """A trial failed; Tune may retry it (then ``on_add`` follows at once)."""

    @abstractmethod
    def on_failed(self, trial: Trial) -> None:
        """A trial failed for good (Tune retries it no more)."""

    @abstractmethod
    def on_remove(self, tc: Any, trial: Trial) -> None:
        """A trial was stopped before it ran."""

    # -- state ------------------------------------------------------------------------------

    def get_state(self) -> dict[str, Any]:
        return copy.deepcopy({name: getattr(self, name) for name in self._STATE})

    def set_state(self, state: Mapping[str, Any]) -> None:
        missing = [name for name in self._STATE if name not in state]
        if missing:
            raise ValueError(f"not a PostHocASHA state: missing {missing}")
        for name in self._STATE:
            setattr(self, name, copy.deepcopy(state[name]))

    # -- rungs ------------------------------------------------------------------------------

    def _assign(self, arm: str) -> None:
        """Give a new arm a bracket: Ray's softmax over rung counts (the same RNG calls)."""
        if arm not in self.arm_bracket:
            sizes = np.array([len(b.milestones) for b in self.brackets])
            probs = np.e ** (sizes - sizes.max())
            choice = np.random.choice(len(self.brackets), p=probs / probs.sum())
            self.arm_bracket[arm] = int(choice)

    def _bracket(self, arm: str) -> Bracket:
        return self.brackets[self.arm_bracket[arm]]

    def _judge(
        self,
        arm: str,
        rung: int,
        score: float,
        *,
        members: tuple[str, ...],
        epoch: int | None = None,
        final: bool = False,
    ) -> bool:
        """Record an arm's score at a rung against its cutoff and log the decision; returns
        whether the arm is stopped. A ``final`` score (an arm that ran its budget) is
        recorded, as Ray records a finished trial's, but stops nothing."""
        bracket = self._bracket(arm)
        lost, cutoff = bracket.record(arm, rung, score)
        stop = lost and not final
        sign = self.objective.sign  # back to the metric's own units
        self.decisions.append(
            {
                "arm": arm,
                "bracket": bracket.s,
                "milestone": bracket.milestones[rung],
                "epoch": epoch,
                "value": sign * score,
                "cutoff": None if cutoff is None else sign * cutoff,
                "decision": FINAL if final else STOP if stop else CONTINUE,
                "n_members": len(members),
                "members": list(members),
            }
        )
        return stop


class TrialPolicy(RungPolicy):
    """Per-trial keys: each trial is an arm, decided as Ray's ASHA decides it."""

    arms = "trials"
    _STATE = (*RungPolicy._STATE, "best")

    def __init__(self, objective: Objective, settings: Settings) -> None:
        super().__init__(objective, settings)
        self.best: dict[str, float] = {}  # each trial's best score (rung_value="best")

    def on_add(self, tc: Any, trial: Trial) -> None:
        self._assign(trial.trial_id)

    def on_result(self, tc: Any, trial: Trial, result: Mapping[str, Any]) -> str:
        if self.objective.key not in result:
            return CONTINUE
        trial_id = trial.trial_id
        score = self._score(trial_id, result[self.objective.key])
        t = result[self.settings.time_attr]
        if t >= self.settings.max_t and self.settings.stop_last_trials:
            return STOP
        rung = self._bracket(trial_id).next_rung(trial_id, t)
        if rung is None:
            return CONTINUE
        if self._judge(trial_id, rung, score, members=(trial_id,)):
            self.pruned.add(trial_id)
            return STOP
        return CONTINUE

    def on_complete(self, tc: Any, trial: Trial, result: Mapping[str, Any] | None) -> None:
        if result is None or self.objective.key not in result:
            return
        trial_id = trial.trial_id
        rung = self._bracket(trial_id).next_rung(trial_id, result[self.settings.time_attr])
        if rung is not None:
            score = self._score(trial_id, result[self.objective.key])
            self._judge(trial_id, rung, score, members=(trial_id,), final=True)

    # As in Ray's ASHA, a failed or removed trial changes no rung.

    def on_error(self, trial: Trial) -> None:
        pass

    def on_failed(self, trial: Trial) -> None:
        pass

    def on_remove(self, tc: Any, trial: Trial) -> None:
        pass

    def _score(self, trial_id: str, value: Any) -> float:
        """A reported value's score (NaN ignored by ``rung_value="best"``)."""
        score = self.objective.score(_as_float(value))
        if self.settings.rung_value == "best":
            score = self.best[trial_id] = _best(self.best.get(trial_id, math.nan), score)
        return score


@dataclass
class _RungGroup(SeedGroup):
    """A seed group as an arm: whether it was stopped, its best score over the rungs
    evaluated (``rung_value="best"``), and the epoch at which each member first reached
    each rung."""

    stopped: bool = False
    best: float = math.nan
    crossed: dict[str, dict[int, int]] = field(default_factory=dict)  # member -> rung -> epoch


class GroupPolicy(RungPolicy):
    """Group keys: each seed group is an arm, judged on its ensemble at a common epoch."""

    arms = "groups"
    _STATE = (*RungPolicy._STATE, "groups", "trial_arm")

    def __init__(
        self, objective: Objective, settings: Settings, seed_key: str, ensembles: Ensembles
    ) -> None:
        super().__init__(objective, settings)
        self.seed_key = seed_key
        self.ensembles = ensembles
        self.groups: dict[str, _RungGroup] = {}
        self.trial_arm: dict[str, str] = {}
        self.trials: dict[str, Trial] = {}  # re-attached as Tune (re-)adds them
        self._warned_no_checkpoint = False

    def on_add(self, tc: Any, trial: Trial) -> None:
        member_seed(trial.config, self.seed_key)  # a clear error when the seed is missing
        arm = group_key(trial.config, self.seed_key)
        self.groups.setdefault(arm, _RungGroup()).join(trial.trial_id, _status(trial))
        self.trial_arm[trial.trial_id] = arm
        self.trials[trial.trial_id] = trial
        self._assign(arm)

    def on_result(self, tc: Any, trial: Trial, result: Mapping[str, Any]) -> str:
        arm = self.trial_arm[trial.trial_id]
        if self.groups[arm].stopped:
            return STOP
        self._progress(arm, trial.trial_id, result)
        if self._decide(tc, arm, current=trial.trial_id):
            return STOP
        if (
            result[self.settings.time_attr] >= self.settings.max_t
            and self.settings.stop_last_trials
        ):
            return STOP
        if self._held(arm, trial.trial_id):
            if result.get(SHOULD_CHECKPOINT):
                return PAUSE
            self._warn_no_checkpoint(trial, result)
        return CONTINUE

    def choose(self, tc: Any) -> Trial | None:
        """The trial Tune should start or resume next: a pending member of a group whose
        other members are running or paused (the group waits for it), then a paused
        member its group no longer holds, then Tune's order. Held members are never resumed:
        the slowest live member of a group is never held, so the group always gets judged.
        Paused members of a group stopped without the controller at hand are stopped here.
        """
        trials = tc.get_trials()
        for trial in trials:
            arm = self.trial_arm.get(trial.trial_id)
            if trial.status == Trial.PAUSED and arm is not None and self.groups[arm].stopped:
                tc.stop_trial(trial)
        pending = [t for t in trials if t.status == Trial.PENDING]
        judged = {
            self.trial_arm[t.trial_id]
            for t in trials
            if t.status in _WAITING and t.trial_id in self.trial_arm
        }

        def held(trial: Trial) -> bool:
            arm = self.trial_arm.get(trial.trial_id)
            return arm is not None and self._held(arm, trial.trial_id)

        resumable = (t for t in trials if t.status == Trial.PAUSED and not held(t))
        siblings = (t for t in pending if self.trial_arm.get(t.trial_id) in judged)
        return next(siblings, None) or next(resumable, None) or next(iter(pending), None)

    def on_complete(self, tc: Any, trial: Trial, result: Mapping[str, Any] | None) -> None:
        member = self._member(trial.trial_id)
        if member is None:
            return
        arm = self.trial_arm[trial.trial_id]
        if result is not None and not self.groups[arm].stopped:
            self._progress(arm, trial.trial_id, result)
        member.status = DONE
        self._decide(tc, arm, current=None)

    def on_error(self, trial: Trial) -> None:
        # Tune calls this for a final failure and also just before it retries a trial (then
        # on_add follows at once). Judging the group here would decide a rung without the
        # member about to resume, so the group is judged at its next event instead, or at
        # once by on_failed, which the callback calls for final failures only.
        member = self._member(trial.trial_id)
        if member is not None:
            member.status = ERROR
            if self.ensembles.evaluator is not None:
                self.ensembles.evaluator.discard([trial.trial_id])

    def on_failed(self, trial: Trial) -> None:
        """Judge the group at once. Without Tune's controller at hand, the group's other live
        members are stopped at their next result if it loses."""
        member = self._member(trial.trial_id)
        if member is not None and member.status == ERROR:
            self._decide(None, self.trial_arm[trial.trial_id], current=None)

    def on_remove(self, tc: Any, trial: Trial) -> None:
        member = self._member(trial.trial_id)
        if member is not None and member.status == LIVE:
            member.status = DONE
            self._decide(tc, self.trial_arm[trial.trial_id], current=None)

    # -- internals --------------------------------------------------------------------------

    def _held(self, arm: str, trial_id: str) -> bool:
        """Whether a member must wait: it reported ``run_ahead`` results past a rung below
        ``max_t`` that its group has not decided, while a live sibling has not reached the
        rung (or not reported since it started). The slowest live member is never held."""
        run_ahead = self.settings.run_ahead
        group = self.groups[arm]
        member = group.members.get(trial_id)
        if run_ahead is None or group.stopped or member is None or member.status != LIVE:
            return False
        crossed = group.crossed.get(trial_id, {})
        behind = [m.time for t, m in group.members.items() if t != trial_id and m.status == LIVE]
        bracket = self._bracket(arm)
        return any(
            rung in crossed
            and member.epoch - crossed[rung] >= run_ahead
            and milestone < self.settings.max_t
            and arm not in bracket.recorded[rung]
            and (
                any(t is None or t < milestone for t in behind)
                or len(group.members) < self._required(rung)  # seeds yet to join
            )
            for rung, milestone in enumerate(bracket.milestones)
        )

    def _required(self, rung: int) -> int:
        """The members a group must have to be judged at ``rung`` (0 without a seed
        schedule: whatever joined)."""
        seeds = self.settings.seeds
        return 0 if seeds is None else seeds[min(rung, len(seeds) - 1)]

    def seeds_wanted(self, trial_id: str) -> int | None:
        """How many members the group of ``trial_id`` should have now: what its next rung
        needs under the seed schedule, or once it passed every rung below ``max_t`` the
        schedule's next entry (what it has once it is stopped or judged at ``max_t``); None
        without a schedule or for a trial this policy does not know."""
        arm = self.trial_arm.get(trial_id)
        if self.settings.seeds is None or arm is None:
            return None
        group = self.groups[arm]
        bracket = self._bracket(arm)
        if group.stopped or (
            arm in bracket.recorded[-1] and bracket.milestones[-1] >= self.settings.max_t
        ):
            return len(group.members)  # cut, or judged at max_t: no seed would be judged
        # The next rung to judge; past the last one (below max_t), the stretch to max_t,
        # which a group that passed every rung trains with the schedule's next entry.
        rung = next(
            (i for i, r in enumerate(bracket.recorded) if arm not in r), len(bracket.milestones)
        )
        return max(len(group.members), self._required(rung))

    def member_status(self, trial_id: str) -> Status | None:
        """A member's status as this policy knows it (None for an unknown trial)."""
        member = self._member(trial_id)
        return None if member is None else member.status

    def _warn_no_checkpoint(self, trial: Trial, result: Mapping[str, Any]) -> None:
        if self._warned_no_checkpoint:
            return
        self._warned_no_checkpoint = True
        where = f"{self.settings.time_attr}={result[self.settings.time_attr]}"
        if _is_train_trial(trial, result):
            why = (
                "it is a Ray Train trial, which Tune cannot pause (its checkpoints belong to "
                "the Train run, not to Tune)"
            )
            fix = "Pass PostHocASHA(run_ahead=None) for Ray Train trials"
        else:
            why = "its result carries no checkpoint, and pausing it would restart it from scratch"
            fix = (
                "Report a checkpoint every epoch (PostHocReporter(checkpoint=...)) to have "
                "such members paused, or pass PostHocASHA(run_ahead=None) to let them run "
                "ahead without this warning"
            )
        warnings.warn(
            f"PostHocASHA: trial {trial.trial_id} ran past a rung its group has not decided, "
            f"ahead of a sibling ({where}), but {why}: it keeps training while its group "
            f"waits to be judged, and may train past the rung at which the group is cut. {fix}",
            UserWarning,
            stacklevel=4,
        )

    def _member(self, trial_id: str) -> Member | None:
        arm = self.trial_arm.get(trial_id)
        return None if arm is None else self.groups[arm].members.get(trial_id)

    def _progress(self, arm: str, trial_id: str, result: Mapping[str, Any]) -> None:
        """Note a member's progress; at each rung it reaches first, start reading its logits
        in the background, so the group's judgement waits only for its last member's read."""
        if "epoch" not in result:
            raise ValueError(
                f"PostHocASHA on the group key {self.objective.key!r} needs the 'epoch' that "
                f"PostHocReporter reports, but trial {trial_id} reported "
                f"{sorted(result)[:8]}...: report through posthoc_tune.PostHocReporter"
            )
        t = float(result[self.settings.time_attr])
        epoch = int(result["epoch"])
        group = self.groups[arm]
        group.report(trial_id, epoch, t)
        crossed = group.crossed.setdefault(trial_id, {})
        for rung, milestone in enumerate(self._bracket(arm).milestones):
            if t >= milestone and rung not in crossed:
                crossed[rung] = epoch
                self._evaluator(arm).prefetch(trial_id, epoch, self.objective.transform.variant)

    def _decide(self, tc: Any, arm: str, current: str | None) -> bool:
        """Judge the group at its next rung if every live member reached it; stop it as a
        whole if it loses. Returns whether the group is stopped."""
        group = self.groups[arm]
        t = group.live_time()
        if group.stopped or t is None:
            return group.stopped
        bracket = self._bracket(arm)
        rung = bracket.next_rung(arm, t)
        if rung is None:
            return False
        if len(group.members) < self._required(rung):
            return False  # seeds asked for at the last rung have not joined yet
        crossed = {
            trial_id: group.crossed[trial_id][rung]
            for trial_id in group.ids(LIVE, DONE)
            if rung in group.crossed.get(trial_id, {})
        }
        if not crossed:
            return False
        epoch = min(crossed.values())
        evaluator = self._evaluator(arm)
        value = evaluator.evaluate(arm, epoch, sorted(crossed), self.objective.transform.name)
        score = self.objective.score(_as_float(value.values.get(self.objective.key, math.nan)))
        if self.settings.rung_value == "best":
            score = group.best = _best(group.best, score)
        # A rung at max_t (grace_period * rf**k == max_t) records the value, as Ray's ASHA
        # does for a finished trial, but prunes nothing: the group ran its budget.
        final = bracket.milestones[rung] >= self.settings.max_t
        if not self._judge(arm, rung, score, members=value.members, epoch=epoch, final=final):
            return False
        group.stopped = True
        self.pruned.update(group.members)
        evaluator.discard(group.members)
        # Paused and pending members stop now. A running one stops at its next result (it
        # has reached the rung already), which Tune then processes: stopping it mid-epoch
        # would leave a stored epoch that no result, and so no ResultGrid, shows.
        for trial_id in group.members:
            trial = self.trials.get(trial_id)
            stoppable = trial is not None and trial.status in (Trial.PENDING, Trial.PAUSED)
            if tc is not None and trial_id != current and stoppable:
                tc.stop_trial(trial)
        return True

    def _evaluator(self, arm: str) -> EnsembleEvaluator:
        return self.ensembles.get(lambda: self._experiment_store(arm))

    def _experiment_store(self, arm: str) -> PredictionStore:
        """The experiment's store, found from a member of ``arm``."""
        trial = next(self.trials[t] for t in self.groups[arm].members if t in self.trials)
        store = experiment_store(trial)
        if store is None:
            raise RuntimeError(
                f"trial {trial.trial_id} has no storage context; pass PostHocASHA(store=...)"
            )
        return store


def _status(trial: Trial) -> Status:
    """A member's status as Tune (re-)adds its trial: a restore re-adds finished trials, and
    errored ones unless it resumes them."""
    if trial.status in _STOPPABLE:
        return LIVE
    return ERROR if trial.status == Trial.ERROR else DONE


def _as_float(value: Any) -> float:
    try:
        return float(value)
    except (TypeError, ValueError):
        raise TypeError(f"metric value must be a number, got {value!r}") from None


def _best(a: float, b: float) -> float:
    """The larger score, ignoring NaN unless both are NaN."""
    if math.isnan(a):
        return b
    if math.isnan(b):
        return a
    return max(a, b)


def _is_train_trial(trial: Trial, result: Mapping[str, Any]) -> bool:
    """A trial that runs a Ray Train run: posthoc_tune's ``torch_trainable``, or a Tune
    function reporting through Ray's ``TuneReportCallback`` (its results name the Train
    checkpoint)."""
    from posthoc_tune.ray_train import CHECKPOINT_PATH_KEY, TorchTrial

    if CHECKPOINT_PATH_KEY in result:
        return True
    try:
        trainable = trial.get_trainable_cls()
    except Exception:  # an unregistered trainable (hook-level tests): not a Train trial
        return False
    return isinstance(trainable, type) and issubclass(trainable, TorchTrial)
