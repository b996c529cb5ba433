"""PostHocASHA: asynchronous successive halving on post-hoc metrics, group-aware for ensembles.

Stock ASHA prunes on whatever a trial reports; with noisy labels that kills the long runs
that become best after SWA, ensembling and TS. PostHocASHA prunes on the metric that ships:

* a per-trial key (``val/swa+ts/nll``) is judged exactly as Ray's ``AsyncHyperBandScheduler``
  judges a reported metric, trial by trial;
* a group key (``val/swa+ens+ts/nll``) makes each seed group one arm. A member that reaches a
  rung keeps running; once every live member has reached it (errored and finished members are
  not waited for), the driver evaluates the ensemble from the prediction store at one common
  epoch, compares it with the rung's cutoff, and stops a losing group as a whole. Ensemble
  work happens only at rungs; every other result costs O(group size).

Tune does not save scheduler state, so :attr:`PostHocASHA.callback` (a ``tune.Callback``,
add it to ``RunConfig(callbacks=[...])``) carries it through ``Tuner.restore`` and writes the
driver's ensemble values into the trials' results.
"""

from __future__ import annotations

import copy
import math
import os
import warnings
from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any, Literal

import numpy as np
import pandas as pd
from ray.tune.experiment import Trial
from ray.tune.result import DEFAULT_METRIC
from ray.tune.schedulers import FIFOScheduler, TrialScheduler

from posthoc_tune._rungs import Bracket
from posthoc_tune.ensemble import EnsembleEvaluator, shared_evaluator
from posthoc_tune.groups import check_seed_key, group_key, member_seed
from posthoc_tune.keys import check_objective, parse_metric_key
from posthoc_tune.store import PredictionStore
from posthoc_tune.transforms import Combiner

if TYPE_CHECKING:
    from posthoc_tune.callback import PostHocCallback

RungValue = Literal["last", "best"]
_LIVE, _DONE, _ERROR = "live", "done", "error"
_STOPPABLE = (Trial.RUNNING, Trial.PENDING, Trial.PAUSED)
_FINAL = "FINAL"


@dataclass
class _Member:
    """A group member's progress: its latest time (None until it reports after a (re)start)
    and, per rung, the epoch at which it first reached the milestone."""

    status: str = _LIVE
    time: float | None = None
    crossed: dict[int, int] = field(default_factory=dict)


@dataclass
class _Group:
    members: dict[str, _Member] = field(default_factory=dict)
    stopped: bool = False
    best: float = math.nan  # best score over evaluated rungs (rung_value="best")


class PostHocASHA(FIFOScheduler):
    """Asynchronous successive halving on a post-hoc metric key.

    Args:
        metric: a metric key (``"{split}/{transform}/{metric}"``); keys whose transform
            contains ``ens`` are group keys. May come from ``TuneConfig`` instead.
        mode: ``"min"`` or ``"max"``; may come from ``TuneConfig``.
        time_attr: the progress attribute of results (as in Ray's ASHA).
        max_t: time units after which trials stop.
        grace_period: first rung; no arm is stopped before it.
        reduction_factor: rung spacing and the kept fraction (1 / reduction_factor).
        brackets: number of ASHA brackets (arms are assigned at random, as in Ray).
        rung_value: ``"last"``: an arm's value at the milestone; ``"best"``: its best value up
            to the milestone, as post-hoc selection keeps the best epoch. For group keys
            ``"best"`` is the best over the rungs evaluated so far (ensembles are computed only
            at rungs).
        seed_key: the config key (or "a/b" path) that separates the members of one group.
        ensemble: ensemble combiner for group keys: ``"logits"`` (the paper) or ``"probs"``.
        stop_last_trials: stop trials at ``max_t`` (as in Ray).
        store: where group keys read members' predictions: a :class:`PredictionStore`, an
            experiment path or URI, or None for the experiment's own storage (found from the
            trials). Per-trial keys never read the store.
    """

    def __init__(
        self,
        metric: str | None = None,
        mode: str | None = None,
        time_attr: str = "training_iteration",
        max_t: float = 100,
        grace_period: float = 1,
        reduction_factor: float = 4,
        brackets: int = 1,
        rung_value: RungValue = "last",
        seed_key: str = "seed",
        ensemble: Combiner = "logits",
        stop_last_trials: bool = True,
        store: PredictionStore | str | os.PathLike[str] | None = None,
    ) -> None:
        super().__init__()
        check_objective(metric, mode)
        if not isinstance(time_attr, str) or not time_attr:
            raise ValueError(f"time_attr must be a non-empty string, got {time_attr!r}")
        for name, value in (("max_t", max_t), ("grace_period", grace_period)):
            if not _is_real(value) or not value > 0:
                raise ValueError(f"{name} must be a number > 0, got {value!r}")
        if grace_period > max_t:
            raise ValueError(f"grace_period ({grace_period}) must be <= max_t ({max_t})")
        if not _is_real(reduction_factor) or not reduction_factor > 1:
            raise ValueError(f"reduction_factor must be a number > 1, got {reduction_factor!r}")
        if isinstance(brackets, bool) or not isinstance(brackets, int) or brackets < 1:
            raise ValueError(f"brackets must be an int >= 1, got {brackets!r}")
        if rung_value not in ("last", "best"):
            raise ValueError(f"rung_value must be 'last' or 'best', got {rung_value!r}")
        check_seed_key(seed_key)
        if ensemble not in ("logits", "probs"):
            raise ValueError(f"ensemble must be 'logits' or 'probs', got {ensemble!r}")
        if not isinstance(stop_last_trials, bool):
            raise TypeError(f"stop_last_trials must be a bool, got {stop_last_trials!r}")
        self._metric = metric
        self._mode = mode
        self._time_attr = time_attr
        self._max_t = max_t
        self._rung_value = rung_value
        self.seed_key = seed_key
        self.ensemble: Combiner = ensemble
        self._stop_last_trials = stop_last_trials
        self._brackets = [
            Bracket(grace_period, max_t, reduction_factor, s, stop_last_trials)
            for s in range(brackets)
        ]
        self._arm_bracket: dict[str, int] = {}
        self._trial_arm: dict[str, str] = {}
        self._best: dict[str, float] = {}  # per-trial best score (rung_value="best")
        self._groups: dict[str, _Group] = {}
        self._decisions: list[dict[str, Any]] = []
        self._num_stopped = 0
        self.pruned_trials: set[str] = set()  # stopped by a rung decision (not at max_t)
        self._trials: dict[str, Trial] = {}
        self._store = (
            PredictionStore.open(store) if isinstance(store, (str, os.PathLike)) else store
        )
        self._evaluator: EnsembleEvaluator | None = None
        self._callback: PostHocCallback | None = None
        self._callback_attached = False
        self._warned_no_callback = False

    # -- configuration ----------------------------------------------------------------------

    @property
    def is_group_metric(self) -> bool:
        """Whether the metric is an ensemble (group) key."""
        return self._metric is not None and parse_metric_key(self._metric)[1].ens

    @property
    def store(self) -> PredictionStore | None:
        """The store given at construction (None: the experiment's, found from the trials)."""
        return self._store

    @property
    def callback(self) -> PostHocCallback:
        """The companion ``tune.Callback``; add it to ``RunConfig(callbacks=[...])``."""
        if self._callback is None:
            from posthoc_tune.callback import PostHocCallback

            self._callback = PostHocCallback(self)
        return self._callback

    def attach_evaluator(self, evaluator: EnsembleEvaluator) -> None:
        """Evaluate group keys with ``evaluator`` instead of the experiment's shared,
        persisting one (replays use a non-persisting evaluator on a stored experiment)."""
        self._evaluator = evaluator

    def set_search_properties(self, metric: str | None, mode: str | None, **spec: Any) -> bool:
        if (self._metric and metric) or (self._mode and mode):
            return False
        check_objective(metric or None, mode or None)
        self._metric = metric or self._metric
        self._mode = mode or self._mode
        if self._metric is None and self._mode:
            self._metric = DEFAULT_METRIC
        return True

    # -- Tune hooks -------------------------------------------------------------------------

    def on_trial_add(self, tune_controller: Any, trial: Trial) -> None:
        if not self._metric or not self._mode or self._metric == DEFAULT_METRIC:
            raise ValueError(
                f"PostHocASHA needs a metric key and a mode, got metric={self._metric!r}, "
                f"mode={self._mode!r}: pass them to PostHocASHA(...) or tune.TuneConfig(...)"
            )
        trial_id = trial.trial_id
        self._trials[trial_id] = trial
        if self.is_group_metric:
            member_seed(trial.config, self.seed_key)  # a clear error when the seed is missing
            arm = group_key(trial.config, self.seed_key)
            group = self._groups.setdefault(arm, _Group())
            member = group.members.setdefault(trial_id, _Member())
            # Added again on a retry or a restore: it reports anew from its checkpoint.
            member.time = None
            if trial.status in _STOPPABLE:
                member.status = _LIVE
            elif trial.status == Trial.ERROR:  # restored without resume_errored
                member.status = _ERROR
            else:
                member.status = _DONE
        else:
            arm = trial_id
        self._trial_arm[trial_id] = arm
        if arm not in self._arm_bracket:
            self._arm_bracket[arm] = self._choose_bracket()

    def on_trial_result(self, tune_controller: Any, trial: Trial, result: dict[str, Any]) -> str:
        if not self._callback_attached and not self._warned_no_callback:
            # Checked here, not in on_trial_add: on a restore, trials are re-added before
            # callbacks are set up.
            self._warned_no_callback = True
            warnings.warn(
                "PostHocASHA's callback is not registered: add it with "
                "RunConfig(callbacks=[scheduler.callback]) so its state survives "
                "Tuner.restore and ensemble values reach the results",
                UserWarning,
                stacklevel=2,
            )
        if self._time_attr not in result:
            return TrialScheduler.CONTINUE
        if self.is_group_metric:
            action = self._on_member_result(tune_controller, trial, result)
        else:
            action = self._on_trial_result(trial, result)
        if action == TrialScheduler.STOP:
            self._num_stopped += 1
        return action

    def on_trial_complete(
        self, tune_controller: Any, trial: Trial, result: dict[str, Any] | None
    ) -> None:
        trial_id = trial.trial_id
        if self.is_group_metric:
            member = self._member(trial_id)
            if member is None:
                return
            group = self._groups[self._trial_arm[trial_id]]
            if result and self._time_attr in result and not group.stopped:
                self._note_progress(trial_id, member, result)
            member.status = _DONE
            self._decide_group(tune_controller, self._trial_arm[trial_id], current=None)
        elif result and self._time_attr in result and self._metric in result:
            t = result[self._time_attr]
            bracket = self._brackets[self._arm_bracket[trial_id]]
            rung = bracket.next_rung(trial_id, t)
            if rung is not None:
                score = self._trial_score(trial_id, result[self._metric])
                _, cutoff = bracket.record(trial_id, rung, score)
                self._log(trial_id, bracket, rung, score, cutoff, _FINAL, members=(trial_id,))

    def on_trial_error(self, tune_controller: Any, trial: Trial) -> None:
        # Tune calls this for a final failure and also just before it retries a trial (then
        # on_trial_add follows at once). Judging the group here would decide a rung without
        # the member about to resume, so the group is judged at its next event instead, or
        # at once by the callback's on_trial_error, which Tune calls for final failures only.
        member = self._member(trial.trial_id)
        if member is not None:
            member.status = _ERROR
            if self._evaluator is not None:
                self._evaluator.discard([trial.trial_id])

    def on_member_failed(self, trial: Trial) -> None:
        """Judge the group of a member that failed for good (called by PostHocCallback).

        Without Tune's controller at hand, the group's other live members are stopped at
        their next result if it loses."""
        member = self._member(trial.trial_id)
        if member is not None and member.status == _ERROR:
            self._decide_group(None, self._trial_arm[trial.trial_id], current=None)

    def on_trial_remove(self, tune_controller: Any, trial: Trial) -> None:
        member = self._member(trial.trial_id)
        if member is not None and member.status == _LIVE:
            member.status = _DONE
            self._decide_group(tune_controller, self._trial_arm[trial.trial_id], current=None)

    def debug_string(self) -> str:
        arms = "groups" if self.is_group_metric else "trials"
        lines = [f"Using PostHocASHA on {self._metric} ({arms}): num_stopped={self._num_stopped}"]
        for b in self._brackets:
            cutoffs = " | ".join(
                f"t={m:g}: {b.cutoff(i)}" for i, m in enumerate(b.milestones) if b.recorded[i]
            )
            lines.append(f"Bracket: {cutoffs}")
        return "\n".join(lines)

    # -- per-trial keys (Ray's ASHA semantics) ----------------------------------------------

    def _on_trial_result(self, trial: Trial, result: Mapping[str, Any]) -> str:
        assert self._metric is not None
        if self._metric not in result:
            return TrialScheduler.CONTINUE
        trial_id = trial.trial_id
        score = self._trial_score(trial_id, result[self._metric])
        t = result[self._time_attr]
        if t >= self._max_t and self._stop_last_trials:
            return TrialScheduler.STOP
        bracket = self._brackets[self._arm_bracket[trial_id]]
        rung = bracket.next_rung(trial_id, t)
        if rung is None:
            return TrialScheduler.CONTINUE
        stop, cutoff = bracket.record(trial_id, rung, score)
        action = TrialScheduler.STOP if stop else TrialScheduler.CONTINUE
        self._log(trial_id, bracket, rung, score, cutoff, action, members=(trial_id,))
        if stop:
            self.pruned_trials.add(trial_id)
        return action

    def _trial_score(self, trial_id: str, value: Any) -> float:
        """Higher-is-better score; with ``rung_value="best"`` the best so far (NaN ignored)."""
        score = self._sign * _as_float(value)
        if self._rung_value == "best":
            score = _best(self._best.get(trial_id, math.nan), score)
            self._best[trial_id] = score
        return score

    # -- group keys -------------------------------------------------------------------------

    def _on_member_result(self, tc: Any, trial: Trial, result: Mapping[str, Any]) -> str:
        trial_id = trial.trial_id
        arm = self._trial_arm[trial_id]
        group = self._groups[arm]
        member = group.members[trial_id]
        if group.stopped:
            return TrialScheduler.STOP
        self._note_progress(trial_id, member, result)
        if self._decide_group(tc, arm, current=trial_id):
            return TrialScheduler.STOP
        if result[self._time_attr] >= self._max_t and self._stop_last_trials:
            return TrialScheduler.STOP
        return TrialScheduler.CONTINUE

    def _note_progress(self, trial_id: str, member: _Member, result: Mapping[str, Any]) -> None:
        if "epoch" not in result:
            raise ValueError(
                f"PostHocASHA on the group key {self._metric!r} needs the 'epoch' that "
                f"PostHocReporter reports, but trial {trial_id} reported "
                f"{sorted(result)[:8]}...: report through posthoc_tune.PostHocReporter"
            )
        t = float(result[self._time_attr])
        member.time = t
        epoch = int(result["epoch"])
        arm = self._trial_arm[trial_id]
        bracket = self._brackets[self._arm_bracket[arm]]
        for i, milestone in enumerate(bracket.milestones):
            if t >= milestone and i not in member.crossed:
                member.crossed[i] = epoch
                # Read its logits now, in the background: the group's judgement then waits
                # only for the last member's read.
                self._ensembles(arm).prefetch(trial_id, epoch, self._variant)

    def _group_time(self, group: _Group) -> float | None:
        """The time every live member has reached (the slowest one's); None while a live
        member has not reported since it (re)started."""
        live = [m.time for m in group.members.values() if m.status == _LIVE]
        if live:
            return None if any(t is None for t in live) else min(t for t in live if t is not None)
        done = [m.time for m in group.members.values() if m.status == _DONE and m.time is not None]
        return max(done) if done else None

    def _decide_group(self, tc: Any, arm: str, current: str | None) -> bool:
        """Judge the group at its next rung if every live member reached it; stop it as a
        whole if it loses. Returns whether the group was stopped."""
        group = self._groups[arm]
        t = self._group_time(group)
        if group.stopped or t is None:
            return group.stopped
        bracket = self._brackets[self._arm_bracket[arm]]
        rung = bracket.next_rung(arm, t)
        if rung is None:
            return False
        crossed = {
            trial_id: m.crossed[rung]
            for trial_id, m in group.members.items()
            if m.status != _ERROR and rung in m.crossed
        }
        if not crossed:
            return False
        epoch = min(crossed.values())
        assert self._metric is not None
        transform = parse_metric_key(self._metric)[1]
        value = self._ensembles(arm).evaluate(arm, epoch, sorted(crossed), transform.name)
        score = self._sign * _as_float(value.values.get(self._metric, math.nan))
        if self._rung_value == "best":
            score = group.best = _best(group.best, score)
        stop, cutoff = bracket.record(arm, rung, score)
        if bracket.milestones[rung] >= self._max_t:
            # A rung at max_t (grace_period * rf**k == max_t) records the value, as Ray's
            # ASHA does for a finished trial, but prunes nothing: the group ran its budget.
            stop, action = False, _FINAL
        else:
            action = TrialScheduler.STOP if stop else TrialScheduler.CONTINUE
        self._log(arm, bracket, rung, score, cutoff, action, members=value.members, epoch=epoch)
        if stop:
            group.stopped = True
            self.pruned_trials.update(group.members)
            self._ensembles(arm).discard(group.members)
            for trial_id in group.members:
                trial = self._trials.get(trial_id)
                stoppable = trial is not None and trial.status in _STOPPABLE
                if tc is not None and trial_id != current and stoppable:
                    tc.stop_trial(trial)
        return stop

    def _member(self, trial_id: str) -> _Member | None:
        if not self.is_group_metric or trial_id not in self._trial_arm:
            return None
        return self._groups[self._trial_arm[trial_id]].members.get(trial_id)

    def _ensembles(self, arm: str) -> EnsembleEvaluator:
        """The evaluator on the store (by default the experiment's, found from a member)."""
        if self._evaluator is None:
            store = self._store or self._experiment_store(arm)
            self._evaluator = shared_evaluator(store, ensemble=self.ensemble, splits=["val"])
        return self._evaluator

    def _experiment_store(self, arm: str) -> PredictionStore:
        trial = next(self._trials[t] for t in self._groups[arm].members if t in self._trials)
        storage = trial.storage
        if storage is None:
            raise RuntimeError(
                f"trial {trial.trial_id} has no storage context; pass PostHocASHA(store=...)"
            )
        return PredictionStore(storage.storage_filesystem, storage.experiment_fs_path)

    # -- shared -----------------------------------------------------------------------------

    @property
    def _variant(self) -> str:
        assert self._metric is not None
        return parse_metric_key(self._metric)[1].variant

    @property
    def _sign(self) -> float:
        return 1.0 if self._mode == "max" else -1.0

    def _choose_bracket(self) -> int:
        """Ray's bracket choice: softmax over rung counts (same RNG calls as Ray)."""
        sizes = np.array([len(b.milestones) for b in self._brackets])
        probs = np.e ** (sizes - sizes.max())
        return int(np.random.choice(len(self._brackets), p=probs / probs.sum()))

    def _log(
        self,
        arm: str,
        bracket: Bracket,
        rung: int,
        score: float,
        cutoff: float | None,
        decision: str,
        *,
        members: tuple[str, ...],
        epoch: int | None = None,
    ) -> None:
        self._decisions.append(
            {
                "arm": arm,
                "bracket": bracket.s,
                "milestone": bracket.milestones[rung],
                "epoch": epoch,
                "value": self._sign * score,
                "cutoff": None if cutoff is None else self._sign * cutoff,
                "decision": decision,
                "n_members": len(members),
                "members": list(members),
            }
        )

    @property
    def decisions(self) -> pd.DataFrame:
        """Every rung decision: arm (trial id or group key), bracket, milestone, epoch (group
        keys), value and cutoff in the metric's own units, decision (``CONTINUE``, ``STOP``,
        or ``FINAL`` for a finished trial's last value, recorded as Ray's ASHA records it, and for
        a group's value at a rung at ``max_t``),
        and the members used."""
        columns = [
            "arm",
            "bracket",
            "milestone",
            "epoch",
            "value",
            "cutoff",
            "decision",
            "n_members",
            "members",
        ]
        return pd.DataFrame(self._decisions, columns=columns)

    # -- state (Tune never saves schedulers; the callback does) -------------------------------

    _STATE = (
        "_metric",
        "_mode",
        "_brackets",
        "_arm_bracket",
        "_trial_arm",
        "_best",
        "_groups",
        "_decisions",
        "_num_stopped",
        "pruned_trials",
    )

    def get_state(self) -> dict[str, Any]:
        """Rungs, arms, groups and decisions (plain data; picklable)."""
        return copy.deepcopy({name: getattr(self, name) for name in self._STATE})

    def set_state(self, state: Mapping[str, Any]) -> None:
        """Restore :meth:`get_state`; trials are re-attached as Tune re-adds them."""
        missing = [name for name in self._STATE if name not in state]
        if missing:
            raise ValueError(f"not a PostHocASHA state: missing {missing}")
        for name in self._STATE:
            setattr(self, name, copy.deepcopy(state[name]))
        self._evaluator = None


def _is_real(value: object) -> bool:
    return isinstance(value, (int, float, np.integer, np.floating)) and not isinstance(value, bool)


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
